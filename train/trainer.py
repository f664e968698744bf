"""One trainer for every method: teacher, student alone, KD, RED and RED+KD.

Resumable at epoch granularity: each epoch seeds its own shuffling and
augmentation from (seed, epoch), and the last checkpoint holds the optimizer
state, so a killed run continued with ``--resume`` ends with the same weights
as an uninterrupted one. Works on CPU or CUDA, and under ``torchrun`` with
DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text, check_writable
from train.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint
from train.config import RunConfig, build_kwargs, flatten_config
from train.data import DataBundle, device_batches, load_data, one_tensor
from train.design import build_student, theoretical_reduction
from train.gpu_data import epoch_order
from train.losses import METHODS
from train.models import build_model
from train.optim import lr_at
from train.red import SitePlan
from train.runtime import resolve_device, resolve_runtime
from train.step import DistillStep, TeacherTap, assemble, make_teacher_tap


# --- environment ------------------------------------------------------------------------------


class Dist:
    """Distributed context from torchrun's environment (a single process when absent)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# --- building ---------------------------------------------------------------------------------


def _progress(iterable, total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


# --- one network ---------------------------------------------------------------------------------


def fit(
    cfg: RunConfig, *, role: str, method: str, arch: str, width_mult: float, model: nn.Module,
    data: DataBundle, stage_dir: Path, epochs: int, resume: bool, ctx: Dist,
    teacher: Optional[TeacherTap] = None, plans: Optional[List[SitePlan]] = None,
) -> Dict[str, Any]:
    """Train ``model`` for ``epochs`` (resuming from ``stage_dir/last.pt``) and return its summary."""
    plans = plans or []
    device = ctx.device
    last_path, best_path = stage_dir / "last.pt", stage_dir / "best.pt"
    num_classes = len(data.classes)
    # a task's training-only modules (FitNet's regressors) train with the model; its extra_state saves them
    task, blocks, optimizer = assemble(cfg, method, model, teacher, plans, num_classes, device)
    start, history, best_val, ck = 0, [], -math.inf, None
    if last_path.exists():
        if not resume:
            raise UserError(f"{stage_dir} already holds a run: pass --resume to continue it, or name=NEW for a new run")
        ck = load_checkpoint(last_path)
        (model.module if hasattr(model, "module") else model).load_state_dict(ck["model"])
        model.to(device)
        optimizer.load_state_dict(ck["optimizer"])
        task.load_extra(ck)
        start, history, best_val = ck["epoch"], ck["history"], ck["best_val"]
        if ctx.main:
            print(f"[{role}] resuming from {last_path} at epoch {start}/{epochs}", flush=True)

    meta = dict(arch=arch, role=role, method=method, num_classes=cfg.label_count(num_classes),
                image_size=cfg.data.image_size, classes=data.classes, mean=data.mean, std=data.std,
                width_mult=width_mult, plans=plans, red_distance=cfg.red.distance, config=cfg.to_dict(),
                build_kwargs=build_kwargs(cfg, cfg.teacher if role == "teacher" else cfg.student))
    rt = resolve_runtime(cfg.runtime, device, task=cfg.task, world=ctx.world, one_tensor=one_tensor(data.train))
    stepper = DistillStep(cfg, model, task, optimizer, blocks=blocks, runtime=rt, plans=plans, world=ctx.world)
    if ck is not None:
        stepper.load_extra(ck)
    if ctx.main:
        print(f"[{role}] {rt.describe()}", flush=True)
    sampler = None
    if ctx.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(data.train, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(data.train) / (cfg.data.batch_size * ctx.world))
    batches = _epoch_batches(cfg, data, rt, ctx, sampler)

    try:
        for epoch in range(start, epochs):
            torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + ctx.rank)
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch)
            noise_gen = torch.Generator().manual_seed(cfg.seed * 15_485_863 + epoch * 104_729 + ctx.rank)
            if sampler is not None:
                sampler.set_epoch(epoch)
            stepper.begin_epoch(epoch * steps_per_epoch)
            sums: Dict[str, float] = {}
            seen, correct, t0 = 0, 0, time.perf_counter()
            bar = _progress(batches(epoch, gen), steps_per_epoch, f"{role} {epoch + 1}/{epochs}", ctx.main)
            for step, (x, y) in enumerate(bar):
                lr = lr_at(cfg, epoch + step / steps_per_epoch, epochs)
                loss, parts, counts = stepper.run(x, y, lr=lr, generator=noise_gen)
                n = len(y)
                seen += n
                correct += counts.get("correct", 0)
                parts["loss"] = float(loss)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                if ctx.main and hasattr(bar, "set_postfix") and step % max(cfg.log_every, 1) == 0:
                    shown = {"loss": f"{sums['loss'] / seen:.4f}", "lr": f"{lr:.2e}", "threads": stepper.threads}
                    if "correct" in counts:
                        shown["acc"] = f"{100 * correct / seen:.1f}"
                    bar.set_postfix(**shown)
            stepper.end_epoch()
            train_time = time.perf_counter() - t0
            ctx.barrier()
            record = {"epoch": epoch + 1, "lr": lr, "train_time_s": round(train_time, 3),
                      "train_images_per_s": round(seen * ctx.world / train_time, 1),
                      "steps": (epoch + 1) * steps_per_epoch, "threads": stepper.threads}
            if cfg.task == "classify":
                record["train_top1"] = round(100.0 * correct / max(seen, 1), 3)
            record.update({f"train_{k}": round(v / max(seen, 1), 6) for k, v in sums.items()})
            if ctx.main:
                score = float(epoch)  # no val split: the latest epoch is the best
                if data.val is not None:
                    figures, score = task.validate(task.eval_model(model), data.val, device)
                    record.update(figures)
                history.append(record)
                extra = {**task.extra_state(), **stepper.extra_state()}
                # best.pt before last.pt: a run killed between the two must not resume believing best.pt exists
                if score > best_val:
                    best_val = score
                    save_checkpoint(make_payload(model, epoch=epoch + 1, history=history, best_val=best_val,
                                                 extra=extra, **meta), best_path)
                save_checkpoint(make_payload(model, optimizer=optimizer.state_dict(), epoch=epoch + 1,
                                             history=history, best_val=best_val, extra=extra, **meta), last_path)
                _write_metrics(stage_dir / "metrics.jsonl", history)
                shown = " ".join(f"{k.replace('train_', '')} {v:.4g}" for k, v in record.items()
                                 if k.startswith(("train_", "val_")) and k not in ("train_time_s", "train_images_per_s"))
                print(f"[{role}] epoch {epoch + 1}/{epochs} {shown} lr {lr:.4g} "
                      f"{record['train_images_per_s']:.0f} img/s {train_time:.1f}s", flush=True)
            ctx.barrier()
        summary: Dict[str, Any] = {}
        if ctx.main:  # tested at the thread count training ended with (a busy machine stays busy)
            summary = finish_stage(stage_dir, data, cfg, device, role, task)
        ctx.barrier()
    finally:
        stepper.close()
    return summary


def _epoch_batches(cfg: RunConfig, data: DataBundle, rt, ctx: Dist, sampler):
    """``batches(epoch, generator)``: an epoch's training batches, augmented whole on the device
    (``runtime.device_augment``) or per image in a DataLoader; ``generator`` orders them."""
    if rt.device_augment:
        source = device_batches(data, cfg.data.augment, cfg.data.image_size, cfg.data.batch_size, ctx.device,
                                rt.memory_format)

        def batches(epoch, gen):
            augment = torch.Generator().manual_seed(cfg.seed * 6_700_417 + epoch * 3_571 + ctx.rank)
            return source.epoch(epoch_order(len(source), gen, sampler), augment)
    else:
        def batches(epoch, gen):
            return DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=gen, num_workers=rt.workers, drop_last=False, persistent_workers=False,
                              pin_memory=ctx.device.type == "cuda")
    return batches


def _write_metrics(path: Path, history: List[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in history))


def finish_stage(stage_dir: Path, data: DataBundle, cfg: RunConfig, device: torch.device, role: str,
                 task) -> Dict[str, Any]:
    """Test figures of the best (by validation) and the last epoch (by ``task``); written to ``summary.json``."""
    out: Dict[str, Any] = {"role": role, "task": cfg.task}
    for tag in ("best", "last"):
        ck = load_checkpoint(stage_dir / f"{tag}.pt")
        model = model_from_checkpoint(ck).to(device)
        r = task.test(model, data.test, device)
        out[tag] = {"checkpoint": str(stage_dir / f"{tag}.pt"), "epoch": ck["epoch"], **r}
        out.setdefault("arch", ck["arch"])
        out.setdefault("method", ck["method"])
        out["images_per_s"] = ck["history"][-1]["train_images_per_s"] if ck["history"] else None
    out["picked_by"] = "validation split" if data.val is not None else "last epoch (no validation split)"

    atomic_write_json(stage_dir / "summary.json", out)
    b, last = out["best"], out["last"]
    if cfg.task == "classify":
        print(f"[{role}] test top-1: best {b['test_top1']:.2f}% (epoch {b['epoch']}), "
              f"last {last['test_top1']:.2f}% on {b['test_images']} test images", flush=True)
    else:
        print(f"[{role}] test denoising loss (EMA weights, fixed noise): best {b['test_diffusion_loss']:.5f} "
              f"(epoch {b['epoch']}), last {last['test_diffusion_loss']:.5f} on {b['test_images']} test images",
              flush=True)
    return out


# --- the whole run ----------------------------------------------------------------------------

_RESUME_MAY_CHANGE = {"epochs", "device", "log_every", "data.workers", "data.eval_batch_size", "teacher.epochs", "student.epochs"}
#: sections a resume may change: how the run uses the machine, not what it trains
_RESUME_MAY_CHANGE_SECTIONS = ("runtime.",)


#: keys only the student reads: a run whose trained teacher differs from a new config only in these can lend it
_STUDENT_ONLY = ("red.", "student.", "method", "loss.w_ce", "loss.w_dist", "loss.kd_temperature")


def _check_saved_config(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        return
    if not resume:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or name=NEW for a new run")
    saved = flatten_config(yaml.safe_load(path.read_text()) or {})
    now = flatten_config(cfg.to_dict())
    differ = [k for k in sorted(set(saved) | set(now)) if k not in _RESUME_MAY_CHANGE
              and not k.startswith(_RESUME_MAY_CHANGE_SECTIONS) and saved.get(k) != now.get(k)]
    if not differ:
        return
    k = differ[0]
    msg = (f"--resume with a different {k} ({saved.get(k)!r} saved, {now.get(k)!r} now): "
           f"resume with the saved config {path} or start a new run with name=NEW")
    teacher = run_dir / "teacher"
    if (teacher / "summary.json").is_file() and all(d.startswith(_STUDENT_ONLY) for d in differ):
        msg += f"; its trained teacher can be reused: teacher.checkpoint={teacher / 'best.pt'} name=NEW"
    raise UserError(msg)


def _reused_teacher(cfg: RunConfig, data: DataBundle, num_classes: int) -> Optional[nn.Module]:
    """The trained teacher of ``teacher.checkpoint``, checked against the run's data and task; None if not given."""
    if not cfg.teacher.checkpoint:
        return None
    ck = load_checkpoint(cfg.teacher.checkpoint)
    if ck["classes"] != data.classes or ck["image_size"] != cfg.data.image_size or ck.get("task", "classify") != cfg.task:
        raise UserError(f"teacher {cfg.teacher.checkpoint} is a {ck.get('task', 'classify')} network trained on "
                        f"{len(ck['classes'])} classes at {ck['image_size']} px; this run is {cfg.task} with "
                        f"{num_classes} classes at {cfg.data.image_size} px: give a matching teacher.checkpoint")
    return model_from_checkpoint(ck)


def check_networks(cfg: RunConfig, labels: int, teacher: Optional[nn.Module]) -> List[SitePlan]:
    """Build the networks the run trains, untrained, and plan every RED site on them as the student build will.

    A missing layer, an H x W mismatch or a site that is no feature map then fails in seconds, not after the
    teacher's hours of training. ``teacher``: a reused trained one, else None. The global RNG is left as it
    was, so the weights trained later do not change. Returns the student's site plans ([] without a student).
    """
    method = METHODS.get(cfg.method)
    with torch.random.fork_rng(devices=[]):
        if teacher is None and (method.teacher_only or method.needs_teacher):
            teacher = build_model(cfg.teacher.arch, labels, cfg.data.image_size, **build_kwargs(cfg, cfg.teacher))
        return [] if method.teacher_only else build_student(cfg, labels, teacher)[1]


def run_distill(cfg: RunConfig, resume: bool = False) -> Dict[str, Any]:
    """Train the teacher (unless given or not needed), then the student by ``cfg.method``; returns the summary."""
    import yaml

    torch.manual_seed(cfg.seed)
    ctx = Dist(resolve_device(cfg.device))
    run_dir = cfg.run_dir
    if ctx.main:
        _check_saved_config(cfg, run_dir, resume)
    ctx.barrier()
    # a denoiser works on images in [-1, 1]
    data = load_data(cfg.data, **({"mean": (0.5,) * 3, "std": (0.5,) * 3} if cfg.task == "denoise" else {}))
    num_classes = cfg.num_classes or len(data.classes)
    if num_classes != len(data.classes):
        raise UserError(f"num_classes={cfg.num_classes} but the data set has {len(data.classes)} classes; drop num_classes")
    labels = cfg.label_count(num_classes)
    method = METHODS.get(cfg.method)
    reused = _reused_teacher(cfg, data, num_classes) if method.teacher_only or method.needs_teacher else None
    check_networks(cfg, labels, reused)
    # only now, with every check passed, does the run folder appear (a config.yaml would claim the run name)
    if ctx.main:
        check_writable(run_dir / "config.yaml")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(f"data: {data.source}: {len(data.train)} train, {len(data.val) if data.val else 0} val, "
              f"{len(data.test)} test images, {num_classes} classes, {cfg.data.image_size} px; device {ctx.device}, "
              f"{ctx.world} process(es)", flush=True)
    summary: Dict[str, Any] = {"name": cfg.name, "method": cfg.method, "run_dir": str(run_dir)}

    teacher_model = None
    if method.teacher_only or method.needs_teacher:
        if reused is not None:
            teacher_model = reused
            summary["teacher"] = {"checkpoint": cfg.teacher.checkpoint, "arch": reused.arch_name, "reused": True}
        else:
            tm = build_model(cfg.teacher.arch, labels, cfg.data.image_size, **build_kwargs(cfg, cfg.teacher))
            tdir = run_dir / "teacher"
            tsum = fit(cfg, role="teacher", method="teacher", arch=cfg.teacher.arch, width_mult=cfg.teacher.width_mult,
                       model=tm, data=data, stage_dir=tdir, epochs=cfg.teacher.epochs or cfg.epochs,
                       resume=resume, ctx=ctx)
            summary["teacher"] = tsum
            teacher_model = model_from_checkpoint(load_checkpoint(tdir / "best.pt"))
        teacher_model.to(ctx.device)

    if not method.teacher_only:
        student, plans = build_student(cfg, labels, teacher_model)
        rt = resolve_runtime(cfg.runtime, ctx.device, task=cfg.task, world=ctx.world)
        tap = make_teacher_tap(cfg, teacher_model, plans, rt) if method.needs_teacher else None
        ssum = fit(cfg, role="student", method=cfg.method, arch=cfg.student.arch, width_mult=cfg.student.width_mult,
                   model=student, data=data, stage_dir=run_dir / "student", epochs=cfg.student.epochs or cfg.epochs,
                   resume=resume, ctx=ctx, teacher=tap, plans=plans)
        summary["student"] = ssum
    if ctx.main:

        if teacher_model is not None and not method.teacher_only:
            summary["memory"] = theoretical_reduction(teacher_model, run_dir / "student" / "best.pt", cfg.data.image_size)
        atomic_write_json(run_dir / "summary.json", summary)
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary
