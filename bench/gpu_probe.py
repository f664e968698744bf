"""Which runtime settings train fastest here: the teacher's and the distillation step, and the batches augmented on
the device, timed past their first steps. The GPU driver (``bench.red_vs_kd_gpu``) runs it first and tries the
fastest settings first.

    python -m bench.gpu_probe --image-size 128 --out probe.json

For each combination of ``runtime.amp`` (none, bf16) and ``runtime.channels_last`` (false, true): the teacher's
step (the RED-vs-KD benchmark's teacher settings, batch 128) and the RED distillation step (the preset's recipe,
batch 8), built by ``train.step.build_step`` as the trainer builds them, on synthetic batches; ``--warmup`` steps
untimed (first-use costs: kernel loading, cuDNN's choices), then ``--steps`` timed with the device synchronised.
Then the batched augmentation of each (``train.gpu_data.DeviceBatches``) alone. A combination that fails is
recorded with its error, not fatal. Runs on a CPU too (a test runs it tiny).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from bench.red_vs_kd_plan import PRESET, TEACHER_SETTINGS
from redistill.errors import UserError
from redistill.io import atomic_write_json
from redistill.report import machine, timestamp
from train import gpu_data
from train.config import load_config
from train.data import AUGMENTS
from train.step import build_step

PROG = "python -m bench.gpu_probe"
#: the settings combined (every pair is timed)
AMPS, CHANNELS_LAST = ("none", "bf16"), ("false", "true")
#: kept the same in every combination: the driver's 16 processes want one CPU thread each; compiling is not probed
FIXED = ("runtime.compile=false", "runtime.threads=1")
#: the teacher's share of the time a combination is judged by (bench.red_vs_kd_gpu gives it at most 35 %)
TEACHER_WEIGHT = 0.35
#: errors after which a CUDA context is unusable: the combinations left are not run
STICKY = ("CUDA error", "device-side assert", "illegal memory access", "AcceleratorError")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> Dict[str, float]:
    """Seconds of ``warmup`` first calls and per call over ``steps`` more (device synchronised around each part)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return {"warmup_s": round(t1 - t0, 3), "step_ms": round((time.perf_counter() - t1) / steps * 1000, 3)}


def settings(role: str, amp: str, channels_last: str, image_size: int) -> List[str]:
    """The ``key=value`` of one probed step: the teacher's (the benchmark's teacher settings) or RED's."""
    own = ["method=teacher", *TEACHER_SETTINGS] if role == "teacher" else ["method=red"]
    return [*own, f"data.image_size={image_size}", f"runtime.amp={amp}", f"runtime.channels_last={channels_last}",
            *FIXED]


def probe_step(preset: str, overrides: List[str], device: torch.device, warmup: int, steps: int) -> Dict[str, Any]:
    """One step timed: its batch, images/s past the warm-up, or the error that stopped it."""
    cfg = load_config(preset, overrides)
    b, size = cfg.data.batch_size, cfg.data.image_size
    step = None
    try:
        step = build_step(cfg, device=device)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(b, 3, size, size, generator=g), torch.randint(0, 10, (b,), generator=g)
        # where training's batches arrive: on the device, in the step's memory format
        x, y = x.to(device).contiguous(memory_format=step.runtime.memory_format), y.to(device)
        t = time_steps(lambda: step.step(x, y), device, warmup, steps)
    except Exception as e:  # recorded: the probe says what fails on this machine
        return {"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        if step is not None:
            step.close()
    return {"batch": b, **t, "images_per_s": round(b / t["step_ms"] * 1000, 1)}


def probe_augment(augment: str, batch: int, image_size: int, channels_last: bool, device: torch.device,
                  warmup: int, steps: int) -> Dict[str, Any]:
    """The batched augmentation alone: host gather, copy to the device, augment, normalise."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    db = gpu_data.DeviceBatches(images, torch.zeros(len(images), dtype=torch.long), AUGMENTS.get(augment).batched,
                                image_size, (0.5,) * 3, (0.25,) * 3, batch, device, fmt)
    idx = torch.arange(batch)
    t = time_steps(lambda: db.batch(idx, g), device, warmup, steps)
    return {"augment": augment, "batch": batch, **t, "images_per_s": round(batch / t["step_ms"] * 1000, 1)}


def run(preset: str, image_size: int, device: torch.device, warmup: int, steps: int,
        say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every combination's teacher and RED step, the augmentations, and the fastest combination for each role."""
    rows, lost = [], None
    for amp, cl in itertools.product(AMPS, CHANNELS_LAST):
        for role in ("teacher", "red"):
            r = {"role": role, "amp": amp, "channels_last": cl}
            r.update({"error": f"not run: {lost}"} if lost else
                     probe_step(preset, settings(role, amp, cl, image_size), device, warmup, steps))
            if not lost and any(k in r.get("error", "") for k in STICKY):
                lost = f"the device was lost after {role} amp {amp} channels_last {cl}"  # CUDA errors stick
            rows.append(r)
            say(f"[probe] {role:<8} amp {amp:<5} channels_last {cl:<5}: "
                + (r["error"] if "error" in r else f"{r['images_per_s']:8.1f} images/s (batch {r['batch']}, "
                   f"{r['step_ms']:.1f} ms/step; first {warmup} steps {r['warmup_s']:.1f} s)"))
    cfg = load_config(preset, [f"data.image_size={image_size}"])
    teacher_cfg = load_config(preset, [*TEACHER_SETTINGS, "method=teacher", f"data.image_size={image_size}"])
    augment = []
    for c in (teacher_cfg, cfg):
        for cl in CHANNELS_LAST:
            try:
                augment.append(probe_augment(c.data.augment, c.data.batch_size, image_size, cl == "true", device,
                                             warmup, steps))
            except Exception as e:
                augment.append({"augment": c.data.augment, "batch": c.data.batch_size,
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    for a in augment:
        say(f"[probe] augment {a['augment']} batch {a['batch']}: "
            + (a["error"] if "error" in a else f"{a['images_per_s']:.1f} images/s"))
    return {"preset": preset, "image_size": image_size, "device": str(device), "warmup": warmup, "steps": steps,
            "steps_timed": rows, "augment": augment, "best": best(rows), "machine": machine(torch=torch.__version__),
            "when": timestamp()}


def best(rows: List[Dict[str, Any]]) -> Optional[Dict[str, str]]:
    """The combination whose teacher and RED steps both ran with the least time per image, weighted as the GPU
    driver spends its time (``TEACHER_WEIGHT`` on the teacher); None when none ran both."""
    ips = {(r["role"], r["amp"], r["channels_last"]): r["images_per_s"] for r in rows if "error" not in r}
    pairs = [(amp, cl) for amp, cl in itertools.product(AMPS, CHANNELS_LAST)
             if ("teacher", amp, cl) in ips and ("red", amp, cl) in ips]
    if not pairs:
        return None
    amp, cl = min(pairs, key=lambda k: TEACHER_WEIGHT / ips[("teacher", *k)] + (1 - TEACHER_WEIGHT) / ips[("red", *k)])
    return {"amp": amp, "channels_last": cl}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=PRESET)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=15, help="untimed first steps of each (default 15)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each (default 30)")
    ap.add_argument("--out", required=True, help="the JSON record to write")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    a = parser().parse_args(argv)
    if a.warmup < 0 or a.steps < 1 or a.image_size < 8:
        raise UserError("--warmup must be at least 0, --steps at least 1 and --image-size at least 8")
    load_config(a.preset, [f"data.image_size={a.image_size}"])  # a bad preset: one line before anything runs
    record = run(a.preset, a.image_size, torch.device(a.device), a.warmup, a.steps)
    atomic_write_json(a.out, record)
    print(f"[probe] fastest: {record['best']}; {a.out}", flush=True)
    return 0 if record["best"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
