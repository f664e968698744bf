"""Measuring for bench.step_speed: step workers timed in interleaved rounds, what else loads the machine, and a
training epoch run by the trainer alone and beside a CPU-heavy process.

Every function returns raw records (seconds, steps, thread counts); figures are computed by the page.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from redistill.io import atomic_write_text
from train.checkpoint import make_payload, save_checkpoint
from train.config import RunConfig, build_kwargs, load_config
from train.models import build_model

REPO = Path(__file__).resolve().parents[2]
PAPER_SCRIPT = Path(__file__).resolve().with_name("paper.py")
BUILD_TIMEOUT_S = 900  # a worker's start (imports, model build) and any single request, compile included
EPOCH_TIMEOUT_S = 1800
#: thread variables removed from every process started: threads are set by --threads and runtime.threads alone
#: (an inherited OMP_NUM_THREADS would also pin the adaptive setting)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def clean_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in THREAD_ENV}


# --- step workers ---------------------------------------------------------------------------------------

class Worker:
    """One side of the comparison in its own process (``paper.serve`` protocol); requests are answered in turn."""

    def __init__(self, label: str, argv: List[str], log: Path, env: Optional[Dict[str, str]] = None):
        self.label, self.error = label, None
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=clean_env() if env is None else env)

    def _answer(self, timeout: float) -> Dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            why = "no answer in time" if not ready else f"exited with code {self.proc.poll()}"
            return {"error": f"worker {why}; see {self._log.name}"}
        return json.loads(line)

    def ready(self) -> Dict[str, Any]:
        msg = self._answer(BUILD_TIMEOUT_S)
        self.error = msg.get("error")
        return msg.get("ready") or {}

    def steps(self, n: int, each: bool = False) -> Dict[str, Any]:
        """Run ``n`` steps; ``each`` times every step on its own (warm-up, compile)."""
        try:
            self.proc.stdin.write(json.dumps({"steps": n, "each": each}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            msg = {"error": f"worker gone (exit code {self.proc.poll()}); see {self._log.name}"}
        else:
            msg = self._answer(BUILD_TIMEOUT_S)
        self.error = msg.get("error")
        return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class Side:
    """A worker to start: its label, ``paper`` or ``ours``, the spec it gets, and the runtime settings it stands for."""

    label: str
    kind: str
    spec: Dict[str, Any]
    settings: Dict[str, Any] = field(default_factory=dict)

    def argv(self) -> List[str]:
        if self.kind == "paper":  # isolated: neither this project's folder nor PYTHONPATH on its sys.path
            return [sys.executable, "-I", str(PAPER_SCRIPT), json.dumps(self.spec)]
        return [sys.executable, "-m", "bench.step_speed.ours", json.dumps(self.spec)]


def interleaved(sides: List[Side], rounds: int, warmup: int, steps: Optional[int], round_seconds: float,
                log_dir: Path, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Start every side, warm each up (``warmup`` steps timed one by one, then discarded), then time ``rounds``
    rounds of the same number of steps per side, one side after another, the order rotated every round."""
    workers: Dict[str, Worker] = {}
    rec: Dict[str, Any] = {"sides": {}}
    try:
        for s in sides:
            say(f"  start {s.label}")
            w = Worker(s.label, s.argv(), log_dir / f"{s.label}.log")
            info = w.ready()
            rec["sides"][s.label] = {"kind": s.kind, "settings": s.settings, "info": info, "error": w.error,
                                     "warmup_s": [], "rounds": []}
            if w.error:
                say(f"  {s.label}: {w.error}")
                w.close()
            else:
                workers[s.label] = w
        for label, w in list(workers.items()):
            msg = w.steps(warmup, each=True)
            rec["sides"][label]["warmup_s"] = msg.get("step_s", [])
            if w.error:
                _drop(workers, rec, label, say)
        ref = next((lab for lab in workers if rec["sides"][lab]["kind"] == "paper"), next(iter(workers), None))
        if ref is None:
            rec["steps_per_round"] = 0
            return rec
        last = rec["sides"][ref]["warmup_s"][-1]
        k = steps or max(1, round(round_seconds / max(last, 1e-6)))
        rec["steps_per_round"], rec["reference"] = k, ref
        say(f"  {rounds} rounds of {k} steps per side")
        for r in range(rounds):
            labels = list(workers)
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                if label not in workers:
                    continue
                msg = workers[label].steps(k)
                if workers[label].error:
                    _drop(workers, rec, label, say)
                    continue
                rec["sides"][label]["rounds"].append({"round": r, "steps": k, "seconds": msg["seconds"],
                                                      "threads": msg["threads"], "loss": msg["loss"]})
    finally:
        for w in workers.values():
            w.close()
    return rec


def _drop(workers, rec, label, say) -> None:
    rec["sides"][label]["error"] = workers[label].error
    say(f"  {label}: {workers[label].error}")
    workers.pop(label).close()


# --- what else runs -------------------------------------------------------------------------------------

def _cpu_ticks() -> Dict[int, tuple]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        out[int(d.name)] = (int(rest[11]) + int(rest[12]), cmd or stat.split("(", 1)[1].rsplit(")", 1)[0])
    return out


def machine_load(sample_s: float = 1.0, min_percent: float = 10.0) -> Dict[str, Any]:
    """The load averages and every other process that used at least ``min_percent`` of a core over ``sample_s``."""
    loads = os.getloadavg()
    rec: Dict[str, Any] = {"loadavg": [round(x, 2) for x in loads], "busy": [], "sample_s": sample_s}
    if not Path("/proc/self/stat").exists():
        return rec
    a, t0 = _cpu_ticks(), time.perf_counter()
    time.sleep(sample_s)
    b, dt = _cpu_ticks(), time.perf_counter() - t0
    hz = os.sysconf("SC_CLK_TCK")
    for pid, (ticks, cmd) in b.items():
        if pid == os.getpid() or pid not in a:
            continue
        pct = 100.0 * (ticks - a[pid][0]) / hz / dt
        if pct >= min_percent:
            rec["busy"].append({"pid": pid, "cpu_percent": round(pct), "command": cmd[:120]})
    rec["busy"].sort(key=lambda p: -p["cpu_percent"])
    return rec


# --- a training epoch beside a CPU-heavy process -----------------------------------------------------------

#: the CPU-heavy neighbours: name -> (what it is, its program; it prints its work rate when sent SIGTERM)
NEIGHBOURS = {
    "spin": ("one Python busy loop (one thread, never sleeps)",
             "import signal, time\nstop = []\nsignal.signal(signal.SIGTERM, lambda *a: stop.append(1))\n"
             "n, t = 0, time.perf_counter()\nwhile not stop:\n    n += 1\n"
             "print(f'{n / (time.perf_counter() - t):.0f} loop iterations/s')\n"),
    "matmul2": ("a 2-thread float32 matmul loop in PyTorch (like a second training run)",
                "import signal, time, torch\ntorch.set_num_threads(2)\nstop = []\n"
                "signal.signal(signal.SIGTERM, lambda *a: stop.append(1))\na = torch.randn(512, 512)\n"
                "n, t = 0, time.perf_counter()\nwhile not stop:\n    a @ a\n    n += 1\n"
                "print(f'{n / (time.perf_counter() - t):.1f} 512x512 matmuls/s')\n"),
}


def subset_images(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """``dst``: the first images of each class of the imagefolder ``src`` (train/ and test/), copied once."""
    done = dst / ".complete"
    if done.is_file() and done.read_text() == f"{src.resolve()} {train_per_class} {test_per_class}":
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(d for d in (src / split).iterdir() if d.is_dir() and not d.name.startswith(".")):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(p for p in cls.iterdir() if p.is_file())[:n]:
                shutil.copyfile(f, dst / split / cls.name / f.name)
    atomic_write_text(done, f"{src.resolve()} {train_per_class} {test_per_class}")
    return dst


def untrained_teacher(cfg: RunConfig, classes: List[str], path: Path) -> Path:
    """A checkpoint of the preset's teacher, untrained (the epoch's speed does not depend on its weights)."""
    if path.is_file():
        return path
    torch.manual_seed(cfg.seed)
    kwargs = build_kwargs(cfg, cfg.teacher)
    model = build_model(cfg.teacher.arch, len(classes), cfg.data.image_size, **kwargs)
    payload = make_payload(model, arch=cfg.teacher.arch, role="teacher", method="teacher", num_classes=len(classes),
                           image_size=cfg.data.image_size, classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3,
                           width_mult=cfg.teacher.width_mult, plans=[], red_distance=cfg.red.distance,
                           config=cfg.to_dict(), epoch=0, history=[], best_val=0.0, build_kwargs=kwargs)
    return save_checkpoint(payload, path)


def train_epoch(preset: str, overrides: List[str], run_root: Path, name: str, neighbour: Optional[str],
                say: Callable[[str], None] = print) -> Dict[str, Any]:
    """One student epoch of ``redistill distill PRESET`` in a new process (optionally beside ``neighbour``), read
    back from its metrics.jsonl: the trainer's own timing of the epoch's training loop (loader included)."""
    out = run_root / name
    shutil.rmtree(out, ignore_errors=True)  # a part killed half-way leaves its run folder behind
    argv = [sys.executable, "-m", "redistill.cli", "distill", preset, f"name={name}", f"out_dir={run_root}", *overrides]
    busy = None
    if neighbour:
        busy = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[neighbour][1]], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=clean_env())
        time.sleep(1.0)
    t0 = time.perf_counter()
    try:
        with open(run_root / f"{name}.log", "w") as log:
            proc = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=EPOCH_TIMEOUT_S,
                                  env=clean_env())
    finally:
        neighbour_rate = None
        if busy is not None:
            busy.send_signal(signal.SIGTERM)
            try:
                neighbour_rate = (busy.communicate(timeout=30)[0] or "").strip().splitlines()[-1:] or None
            except subprocess.TimeoutExpired:
                busy.kill()
                busy.communicate()
    rec: Dict[str, Any] = {"command": " ".join(argv[1:]), "rc": proc.returncode,
                           "process_s": round(time.perf_counter() - t0, 2), "neighbour": neighbour,
                           "neighbour_rate": neighbour_rate[0] if neighbour_rate else None}
    metrics = out / "student" / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        rec["error"] = f"the trainer exited with code {proc.returncode}; see {run_root / (name + '.log')}"
        say(f"  {name}: {rec['error']}")
        return rec
    epoch = json.loads(metrics.read_text().splitlines()[0])
    rec.update(train_time_s=epoch["train_time_s"], images_per_s=epoch["train_images_per_s"],
               images=round(epoch["train_time_s"] * epoch["train_images_per_s"]), steps=epoch.get("steps"),
               threads_at_end=epoch.get("threads"))
    return rec


def epoch_setup(preset: str, data_root: str, run_root: Path, train_per_class: int, test_per_class: int) -> List[str]:
    """The data subset and untrained teacher checkpoint of the contention runs; their shared config overrides."""
    src = Path(data_root)
    data = subset_images(src, run_root / "data", train_per_class, test_per_class)
    classes = sorted(d.name for d in (data / "train").iterdir() if d.is_dir())
    cfg = load_config(preset)
    ck = untrained_teacher(cfg, classes, run_root / "teacher.pt")
    return [f"data.root={data}", f"teacher.checkpoint={ck}", "epochs=1", "device=cpu", "data.name=imagefolder"]
