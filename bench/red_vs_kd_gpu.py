"""The RED-vs-KD comparison at 128 px on one GPU in a fixed time (issue 13): one prepared command for a lent machine.

    python -m bench.red_vs_kd_gpu --archive .gpu/cifar10-jpeg.tar.gz --work /tmp/rvk128 --out "$OUT" --minutes 9
    python -m bench.red_vs_kd_gpu --unpack DIR/red_vs_kd_128.tar.gz     # back here: into bench/results/
    python -m bench.red_vs_kd --pages-only --results bench/results/red_vs_kd_128 --remarks ...

On the GPU machine it unpacks the data, times the teacher's and RED's step under each amp / channels_last setting
(``bench.gpu_probe``; the fastest goes first in ``LADDER``), then runs ``bench.red_vs_kd`` at 128 px (the paper's
size; the students with the paper's recipe, as at 64 px) in three steps: ``--calibrate`` with ``--jobs`` students
at once, which is also the smoke run of the GPU path (a rung whose calibration fails gives way to the next, fp32
and per-image loading last, and the log says so); sizing the teacher's epochs and
the students' subset to the minutes left; the benchmark itself, stopped by ``--stop-after-s`` before the budget
ends. The results folder, logs and calibrations go into one archive under ``--out`` however the command ends: a
lent machine returns few files. Nothing here needs a GPU (a slow test runs it tiny on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

from bench import red_vs_kd as rvk
from bench import red_vs_kd_plan as rp
from redistill.errors import UserError
from redistill.io import atomic_write_json

PROG = "python -m bench.red_vs_kd_gpu"
RESULTS = "red_vs_kd_128"
#: runtime settings tried in turn until the calibration (the smoke run) passes. No torch.compile: compiling in each
#: student's process costs a minute or more of a 10-minute budget. One CPU thread per process: 16 at once on 16 cores.
LADDER = (("runtime.amp=bf16", "runtime.channels_last=true", "runtime.compile=false", "runtime.threads=1"),
          ("runtime.amp=none", "runtime.channels_last=true", "runtime.compile=false", "runtime.threads=1"),
          ("runtime.amp=none", "runtime.compile=false", "runtime.threads=1", "runtime.device_augment=false",
           "runtime.channels_last=false"))
#: the teacher takes at most this share of the training time, and at most TEACHER_MAX_EPOCHS
TEACHER_SHARE, TEACHER_MAX_EPOCHS = 0.35, 20
#: seconds kept at the end for the page and the archive; a settings rung is not tried with less than MIN_RUNG_S left;
#: the settings probe (bench.gpu_probe) gets at most PROBE_S
TAIL_S, MIN_RUNG_S, PROBE_S = 40.0, 90.0, 120.0


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


def _run(argv: List[str], log, timeout_s: float) -> int:
    """``bench.red_vs_kd`` with ``argv`` in its own process group, stopped whole (its runs too) after ``timeout_s``."""
    print(f"[gpu] {' '.join(argv)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "bench.red_vs_kd", *argv], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        print(f"[gpu] stopped after {timeout_s:.0f} s", flush=True)
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return proc.wait()


def size(a, overrides, left_s: float) -> Optional[Tuple[int, int]]:
    """(teacher epochs, student subset) that the calibrated rates fit into ``left_s`` seconds of wall time, or None
    when not even one teacher epoch and the smallest subset fit."""
    probe = rvk.parser().parse_args(bench_argv(a, overrides, teacher_epochs=1, subset=1000))
    s = rvk.settings_of(probe)
    rates = {**rp.RATE_KINDS, **json.loads((Path(a.work) / "runs" / "calibration" / "rates.json").read_text())["rates"]}
    counts = rp.image_counts(s.data_root)
    teacher = next(st for st in rp.plan(probe, s) if st.variant is None)

    def teacher_s(e):
        return rp.estimate(teacher, replace(s, teacher_epochs=e), rates, counts)[1]

    epochs = max([e for e in range(1, TEACHER_MAX_EPOCHS + 1) if teacher_s(e) <= TEACHER_SHARE * left_s], default=1)
    s = replace(s, teacher_epochs=epochs)
    subset = rp.subset_for(rp.plan(probe, s), s, rates, counts, left_s, a.jobs)
    return None if subset is None else (epochs, min(subset, counts[0]))


#: the files the archive holds: records, logs, pages; of checkpoints only the teacher's copy in the results folder
PACKED = (".json", ".jsonl", ".yaml", ".log", ".txt", ".md", ".png")


def _packed(m: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
    keep = m.isdir() or m.name.endswith(PACKED) or (m.name.startswith("results/") and m.name.endswith("/teacher/best.pt"))
    return m if keep else None


def pack(a, name: str) -> Path:
    """The results folder, logs, calibrations (failed ones too), the environment and the benchmark's log in one
    archive under ``--out``, written whole or not at all."""
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dest, tmp = out / name, out / (name + ".partial")
    runs = work / "runs"
    folders = [(work / "results", "results"), (runs / "logs", "logs"), (runs / "calibration", "calibration"),
               *((f, f.name) for f in sorted(runs.glob("calibration-failed-*")))]
    with tarfile.open(tmp, "w:gz") as tar:
        for folder, arc in folders:
            if folder.is_dir():
                tar.add(folder, arcname=arc, filter=_packed)
        for f in ("environment.json", "probe.json", "bench.log"):
            if (work / f).is_file():
                tar.add(work / f, arcname=f)
    os.replace(tmp, dest)
    return dest


def unpack_data(archive: str, work: Path) -> Path:
    """The data archive unpacked into <work>/data (through a temporary folder, so a half-unpacked one is never used)."""
    data = work / "data"
    if not (data / "train").is_dir():
        tmp = work / "data.partial"
        if tmp.exists():
            shutil.rmtree(tmp)  # this command's own, from an interrupted call
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if data.exists():
            data.rmdir()
        tmp.rename(data)
    return data


def drive(a) -> int:
    """Unpack, calibrate down the settings ladder, size to the minutes left, run; the archive is written however
    this ends. Exit: the benchmark's, or 2 when no settings passed or nothing fitted the time."""
    t0 = time.time()
    deadline = t0 + a.minutes * 60
    work = Path(a.work)
    if (work / "runs" / "state.json").exists():
        raise UserError(f"--work {work} holds an earlier run (sized to its own minutes): give a fresh --work")
    try:
        return _drive(a, work, deadline)
    finally:
        dest = pack(a, RESULTS + ".tar.gz")
        print(f"[gpu] {dest} ({dest.stat().st_size / 2**20:.1f} MiB) after {time.time() - t0:.0f} s", flush=True)


def _drive(a, work: Path, deadline: float) -> int:
    unpack_data(a.archive, work)
    atomic_write_json(work / "environment.json", environment())
    print(f"[gpu] {json.dumps(json.loads((work / 'environment.json').read_text()))}", flush=True)
    probe = None if a.rung else run_probe(a, work, deadline - time.time() - TAIL_S - 2 * MIN_RUNG_S)
    log_path = work / "bench.log"
    with open(log_path, "a") as log:
        chosen = None
        for rung in rungs(a, probe):
            left = deadline - time.time() - TAIL_S
            if left < MIN_RUNG_S:
                print(f"[gpu] {left:.0f} s left: no time for another settings rung", flush=True)
                break
            if _run([*bench_argv(a, rung, teacher_epochs=1, subset=1000), "--plan", "--calibrate"], log, left) == 0:
                chosen = rung
                break
            failed = work / "runs" / f"calibration-failed-{len(list((work / 'runs').glob('calibration-failed-*')))}"
            if (work / "runs" / "calibration").is_dir():
                (work / "runs" / "calibration").rename(failed)  # its logs travel back in the archive
            print(f"[gpu] calibration failed with {' '.join(rung)} (logs: {failed}); trying the next settings", flush=True)
        if chosen is None:
            print(f"[gpu] no settings rung passed its calibration; see the logs in the archive ({log_path})", flush=True)
            return 2
        left = deadline - time.time() - TAIL_S
        sized = size(a, chosen, left)
        if sized is None:
            print(f"[gpu] settings {' '.join(chosen)} passed, but at the calibrated rates nothing fits the {left:.0f} s "
                  "left (the archive holds the calibration): give more --minutes or fewer --seeds/--variants",
                  flush=True)
            return 2
        epochs, subset = sized
        print(f"[gpu] settings {' '.join(chosen)}; {left:.0f} s left: teacher {epochs} epochs, students "
              f"{a.epochs} epochs on {subset} images", flush=True)
        stop = deadline - time.time() - TAIL_S
        rc = _run([*bench_argv(a, chosen, teacher_epochs=epochs, subset=subset), f"--stop-after-s={stop:.0f}"], log,
                  stop + TAIL_S / 2)
    print(log_path.read_text()[-4000:], flush=True)
    print(f"[gpu] benchmark exit {rc}", flush=True)
    return rc


def rungs(a, probe: Optional[dict] = None) -> List[Tuple[str, ...]]:
    """The settings to try in turn: ``--rung`` options, else ``LADDER`` with the probe's fastest first."""
    if a.rung:
        return [tuple(x for x in r.split(",") if x) for r in a.rung]
    fast = (probe or {}).get("best")
    first = [(f"runtime.amp={fast['amp']}", f"runtime.channels_last={fast['channels_last']}",
              *LADDER[0][2:])] if fast else []
    return list(dict.fromkeys(first + list(LADDER)))


def run_probe(a, work: Path, left_s: float) -> Optional[dict]:
    """``bench.gpu_probe`` at the driver's image size (about a minute on a GPU; tiny steps on a CPU): which settings
    step fastest, or None (no time for it, or it failed: the ladder runs in its own order)."""
    import torch

    out = work / "probe.json"
    out.unlink(missing_ok=True)  # only this call's record is read
    if left_s < 30:
        print(f"[gpu] {left_s:.0f} s left: no settings probe", flush=True)
        return None
    tiny = [] if torch.cuda.is_available() else ["--warmup", "1", "--steps", "2"]
    argv = [sys.executable, "-m", "bench.gpu_probe", "--out", str(out), "--image-size", str(a.image_size), *tiny]
    print(f"[gpu] {' '.join(argv[1:])}", flush=True)
    try:
        rc = subprocess.run(argv, timeout=min(PROBE_S, left_s)).returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0 or not out.is_file():
        print(f"[gpu] the settings probe {'timed out' if rc is None else f'ended with exit {rc}'}: the ladder runs in "
              "its own order", flush=True)
        return None
    return json.loads(out.read_text())


def unpack(archive: str, results: str) -> int:
    """Put a returned archive's results folder beside the other results (<results>_run/), with its logs,
    calibrations and environment; an archive of calibrations only (no run finished) goes there too."""
    dest = Path(results + "_run")
    tmp = dest.with_name(dest.name + ".unpacking")
    for p in (dest, tmp):
        if p.exists():
            raise UserError(f"{p} exists: move it away first (this never overwrites results)")
    try:
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            if not any(n.startswith(("results/", "calibration", "environment.json")) for n in names):
                raise UserError(f"{archive} holds no results, calibration or environment: not this command's archive")
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive}: not a readable archive ({e}); fetch it again") from None
    run = tmp / "results" / f"{RESULTS}_run"
    if run.is_dir():
        run.rename(dest)
    else:
        dest.mkdir(parents=True)
    for p in tmp.iterdir():
        if p.name != "results":
            p.rename(dest / p.name)
    shutil.rmtree(tmp)  # what is left: the page written there (rewritten here from the files)
    page = "; now: python -m bench.red_vs_kd --pages-only --results " + results if (dest / "state.json").is_file() \
        else " (calibrations only: no run finished, so there is no page)"
    print(f"[gpu] unpacked into {dest}{page}", flush=True)
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
    if a.minutes * 60 < TAIL_S + MIN_RUNG_S or a.jobs < 1:
        raise UserError(f"--minutes must leave room for a run (at least {(TAIL_S + MIN_RUNG_S) / 60:g}) and --jobs be "
                        "at least 1")
    for rung in rungs(a):  # every option checked before the data is unpacked
        rvk.settings_of(rvk.parser().parse_args(bench_argv(a, rung, teacher_epochs=1, subset=1000)))
    return drive(a)


if __name__ == "__main__":
    raise SystemExit(main())
