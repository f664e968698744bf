"""The RED-vs-KD comparison at 128 px on one GPU in a fixed time (issue 13): one prepared command for a lent machine.

    python -m bench.red_vs_kd_gpu --archive .gpu/cifar10-jpeg.tar.gz --work /tmp/rvk128 --out "$OUT" --minutes 9
    python -m bench.red_vs_kd_gpu --unpack DIR/red_vs_kd_128.tar.gz     # back here: into bench/results/
    python -m bench.red_vs_kd --pages-only --results bench/results/red_vs_kd_128 --remarks ...

On the GPU machine it unpacks the data, then runs ``bench.red_vs_kd`` at 128 px (the paper's size; the students
with the paper's recipe, as at 64 px) in three steps: ``--calibrate`` with ``--jobs`` students at once, which is
also the smoke run of the GPU path (bf16 autocast, channels_last, batches augmented on the GPU; a setting whose
smoke run fails is dropped for the next rung of ``LADDER``, and the log says so); sizing the teacher's epochs and
the students' subset to the minutes left; the benchmark itself, stopped by ``--stop-after-s`` before the budget
ends. The results folder, logs and calibration go into one archive under ``--out``: a lent machine returns few
files. Nothing here needs a GPU to run (a test runs it tiny on the CPU); on a CPU it is only slow.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from bench import red_vs_kd as rvk
from redistill.errors import UserError
from redistill.io import atomic_write_json

PROG = "python -m bench.red_vs_kd_gpu"
RESULTS = "red_vs_kd_128"
#: runtime settings tried in turn until the calibration (the smoke run) passes. No torch.compile: compiling each
#: of 8 processes costs a minute or more of a 10-minute budget. One CPU thread per process: 16 at once on 16 cores.
LADDER = (("runtime.amp=bf16", "runtime.compile=false", "runtime.threads=1"),
          ("runtime.amp=none", "runtime.compile=false", "runtime.threads=1"),
          ("runtime.amp=none", "runtime.compile=false", "runtime.threads=1", "runtime.device_augment=false",
           "runtime.channels_last=false"))
#: the teacher takes at most this share of the training time, and at most TEACHER_MAX_EPOCHS
TEACHER_SHARE, TEACHER_MAX_EPOCHS = 0.35, 20
#: seconds kept at the end for the page and the archive
TAIL_S = 40.0


def environment() -> dict:
    """What ran: torch, CUDA, the GPU and its driver (nvidia-smi), for the archive."""
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def bench_argv(a, overrides, *, teacher_epochs: int, subset: int) -> List[str]:
    """The ``bench.red_vs_kd`` options of this comparison (all but the steering ones)."""
    return ["--image-size", str(a.image_size), "--data-root", str(Path(a.work) / "data"), "--runs",
            str(Path(a.work) / "runs"), "--results", str(Path(a.work) / "results" / RESULTS), "--epochs",
            str(a.epochs), "--teacher-epochs", str(teacher_epochs), "--train-subset", str(subset), "--seeds", a.seeds,
            "--variants", a.variants, "--no-reference", "--jobs", str(a.jobs), *[f"--set={o}" for o in overrides]]


def _run(argv: List[str], log) -> int:
    print(f"[gpu] {' '.join(argv)}", flush=True)
    return subprocess.call([sys.executable, "-m", "bench.red_vs_kd", *argv], stdout=log, stderr=subprocess.STDOUT)


def size(a, overrides, left_s: float):
    """(teacher epochs, student subset) that the calibrated rates fit into ``left_s`` seconds of wall time."""
    probe = rvk.parser().parse_args(bench_argv(a, overrides, teacher_epochs=1, subset=1000))
    s = rvk.settings_of(probe)
    rates = {**rvk.RATE_KINDS, **json.loads((Path(a.work) / "runs" / "calibration" / "rates.json").read_text())["rates"]}
    counts = rvk.image_counts(s.data_root)
    teacher = next(st for st in rvk.plan(probe, s) if st.variant is None)

    def teacher_s(e):
        return rvk.estimate(teacher, replace(s, teacher_epochs=e), rates, counts)[1]

    epochs = max([e for e in range(1, TEACHER_MAX_EPOCHS + 1) if teacher_s(e) <= TEACHER_SHARE * left_s], default=1)
    s = replace(s, teacher_epochs=epochs)
    subset = rvk.subset_for(rvk.plan(probe, s), s, rates, counts, left_s, a.jobs) or 1000
    return epochs, min(subset, counts[0])


def pack(a, name: str) -> Path:
    """The results folder, logs and calibration (checkpoints apart from the teacher's left out) in one archive."""
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / name
    with tarfile.open(dest, "w:gz") as tar:
        extra = [(f, f.name) for f in sorted((work / "runs").glob("calibration-failed-*"))]
        for folder, arc in ((work / "results", "results"), (work / "runs" / "logs", "logs"),
                            (work / "runs" / "calibration", "calibration"), *extra):
            if folder.is_dir():
                tar.add(folder, arcname=arc, filter=lambda m: None if m.name.endswith(("last.pt", "student/best.pt",
                                                                                          "teacher/teacher/best.pt"))
                        else m)
        for f in ("environment.json", "bench.log"):
            if (work / f).is_file():
                tar.add(work / f, arcname=f)
    return dest


def drive(a) -> int:
    t0 = time.time()
    deadline = t0 + a.minutes * 60
    work = Path(a.work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "train").is_dir():
        with tarfile.open(a.archive) as tar:
            tar.extractall(work / "data", filter="data")
    atomic_write_json(work / "environment.json", environment())
    print(f"[gpu] {json.dumps(json.loads((work / 'environment.json').read_text()))}", flush=True)
    log_path = work / "bench.log"
    with open(log_path, "a") as log:
        chosen = None
        for rung in [tuple(r.split(",")) for r in a.rung] or LADDER:
            if _run([*bench_argv(a, rung, teacher_epochs=1, subset=1000), "--plan", "--calibrate"], log) == 0:
                chosen = rung
                break
            failed = work / "runs" / f"calibration-failed-{len(list((work / 'runs').glob('calibration-failed-*')))}"
            (work / "runs" / "calibration").rename(failed)  # its logs travel back in the archive
            print(f"[gpu] calibration failed with {' '.join(rung)} (logs: {failed}); trying the next settings", flush=True)
        if chosen is None:
            pack(a, RESULTS + ".tar.gz")
            raise SystemExit("[gpu] every rung of the settings ladder failed; see the logs in the archive")
        left = deadline - time.time() - TAIL_S
        epochs, subset = size(a, chosen, left)
        print(f"[gpu] settings {' '.join(chosen)}; {left:.0f} s left: teacher {epochs} epochs, students "
              f"{a.epochs} epochs on {subset} images", flush=True)
        rc = _run([*bench_argv(a, chosen, teacher_epochs=epochs, subset=subset),
                   f"--stop-after-s={max(deadline - time.time() - TAIL_S / 2, 1):.0f}"], log)
    print(log_path.read_text()[-4000:], flush=True)
    dest = pack(a, RESULTS + ".tar.gz")
    print(f"[gpu] benchmark exit {rc}; {dest} ({dest.stat().st_size / 2**20:.1f} MiB) after {time.time() - t0:.0f} s",
          flush=True)
    return rc


def unpack(archive: str, results: str) -> int:
    """Put a returned archive's results folder beside the other results, and its logs under <results>_run/logs."""
    dest = Path(results + "_run")
    if dest.exists():
        raise UserError(f"{dest} exists: move it away first (this never overwrites results)")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        if f"results/{RESULTS}_run/state.json" not in names:
            raise UserError(f"{archive} holds no results/{RESULTS}_run/state.json: not this command's archive")
        tmp = dest.with_name(dest.name + ".unpacking")
        tar.extractall(tmp, filter="data")
    (tmp / "results" / f"{RESULTS}_run").rename(dest)
    for extra in ("logs", "calibration", "environment.json", "bench.log", *(p.name for p in tmp.glob("calibration-failed-*"))):
        if (tmp / extra).exists():
            (tmp / extra).rename(dest / extra)
    for p in sorted(tmp.rglob("*"), reverse=True):  # what is left: the page written there (rewritten here)
        p.unlink() if p.is_file() else p.rmdir()
    tmp.rmdir()
    print(f"[gpu] unpacked into {dest}; now: python -m bench.red_vs_kd --pages-only --results {results}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", help="the CIFAR-10 JPEG archive (../shared/data/cifar10-jpeg.tar.gz, copied along)")
    ap.add_argument("--work", default="/tmp/rvk128", help="scratch folder on the GPU machine")
    ap.add_argument("--out", help="where the archive of results goes (the device's $OUT)")
    ap.add_argument("--minutes", type=float, default=9.0, help="the whole command's budget, unpacking included")
    ap.add_argument("--jobs", type=int, default=16, help="students trained at once (all 16 runs of 2 seeds)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(v.name for v in rvk.VARIANTS))
    ap.add_argument("--epochs", type=int, default=6, help="epochs of every student (the 64 px benchmark's)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--rung", action="append", default=[], metavar="KEY=VALUE,...", help="runtime settings to try, "
                    "in turn, instead of LADDER's (repeatable), e.g. runtime.threads=1 for a test on a CPU")
    ap.add_argument("--unpack", metavar="ARCHIVE", help="here, after the run: put a returned archive into --results")
    ap.add_argument("--results", default=f"bench/results/{RESULTS}", help="with --unpack: the page path, no extension")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    a = parser().parse_args(argv)
    if a.unpack:
        return unpack(a.unpack, a.results)
    if not a.archive or not Path(a.archive).is_file() or not a.out:
        raise UserError("give --archive (the CIFAR-10 JPEG archive, copied to the machine) and --out (a folder)")
    if a.minutes * 60 < 3 * TAIL_S or a.jobs < 1:
        raise UserError(f"--minutes must leave room for a run (at least {3 * TAIL_S / 60:g}) and --jobs be at least 1")
    return drive(a)


if __name__ == "__main__":
    raise SystemExit(main())
