"""The paper's side of bench.step_speed, and the worker protocol both sides speak.

Run as a script in its own process (``python -I paper.py SPEC_JSON``) with the paper's source folder
(github.com/mengtang-lab/ReDistill) first on ``sys.path``, so its top-level modules (``backbones``,
``utils``, ``reed``) cannot clash with this project's. It imports nothing from this project.

Protocol: the worker gets a JSON spec as its one argument, builds its step, and answers one JSON line
per request on its own stdout (anything else it prints goes to stderr): first ``{"ready": INFO}`` (or
``{"error": LINE}``), then for each ``{"steps": N, "each": BOOL}`` read from stdin
``{"seconds": S, "step_s": [...], "threads": T, "loss": L}``; an empty line or end of input ends it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

#: what a paper source folder must hold for this benchmark, relative to it
EXPECTED = ("base/backbones/common.py", "base/utils/run_manager.py", "base/utils/datasets.py", "reed/models.py",
            "reed/modules.py", "reed/hooks.py")
CONFIG_DIR = "base/configs"


def missing_files(folder, configs=()) -> list:
    """The expected files (and ``configs``, names in base/configs) that ``folder`` lacks; [] when it has them all."""
    root = Path(folder)
    return [p for p in (*EXPECTED, *(f"{CONFIG_DIR}/{c}" for c in configs)) if not (root / p).is_file()]


def source_digest(folder) -> str:
    """sha256 over the expected files' bytes (names sorted): which copy of the code was timed, without git."""
    h = hashlib.sha256()
    for rel in sorted(EXPECTED):
        h.update(rel.encode() + b"\0" + (Path(folder) / rel).read_bytes())
    return h.hexdigest()


def synthetic_batches(torch, count: int, batch: int, size: int, classes: int, seed: int):
    """``count`` seeded (images, labels) batches; the same seed gives the same tensors in every process."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(count)]


# --- the protocol -------------------------------------------------------------------------------------------

def serve(build, spec: dict) -> int:
    """Build the step with ``build(spec) -> (run, info)`` (``run(n)`` does n steps, returns the last loss) and
    answer timing requests until stdin ends."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the code under test prints (config paths, progress bars): keep it off the channel
    sys.stdout = sys.stderr

    def say(obj):
        channel.write(json.dumps(obj) + "\n")

    import torch

    try:
        t0 = time.perf_counter()
        run, info = build(spec)
        info["build_s"] = round(time.perf_counter() - t0, 3)
    except Exception as e:  # the coordinator records the line and goes on without this side
        traceback.print_exc()
        say({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        return 1
    say({"ready": info})
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        try:
            times, loss = [], None
            start = time.perf_counter()
            if req.get("each"):
                for _ in range(req["steps"]):
                    t = time.perf_counter()
                    loss = run(1)
                    times.append(time.perf_counter() - t)
            else:
                loss = run(req["steps"])
            say({"seconds": time.perf_counter() - start, "step_s": times, "threads": torch.get_num_threads(),
                 "loss": None if loss is None else float(loss)})
        except Exception as e:
            traceback.print_exc()
            say({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
            return 1
    return 0


# --- the paper's step ---------------------------------------------------------------------------------------

class _Batches:
    """A loader of ``n`` batches for the paper's ``RunManager.distillation``, each passed through ``mix`` as its
    ``train_loader``'s collate does (so the CutMix/MixUp it applies per batch is inside the timed loop)."""

    def __init__(self, pool, n, mix):
        self.pool, self.n, self.mix, self.i = pool, n, mix, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            x, y = self.pool[self.i % len(self.pool)]
            self.i += 1
            yield self.mix(x, y)


def build_paper(spec: dict):
    """The paper's ReED model (student, frozen teacher, RED blocks from its YAML config) in ``nn.DataParallel``, its
    ``RunManager`` (SGD, momentum 0.9) and its ``train_loader``'s CutMix/MixUp; ``run(n)`` is one call of its
    ``RunManager.distillation`` over n synthetic batches."""
    root = Path(spec["paper_code"]).resolve()
    sys.path[:0] = [str(root / "base"), str(root)]
    import torch
    from torch import nn
    from torchvision.transforms import v2

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    from backbones import Network
    from reed import ReED
    from utils.run_manager import RunManager

    size, classes = spec["image_size"], spec["num_classes"]
    student = Network(spec["student"], image_size=size, num_classes=classes)
    teacher = Network(spec["teacher"], image_size=size, num_classes=classes)
    model = ReED(student, [teacher], str(root / CONFIG_DIR / spec["config"]), dummy_input=torch.randn(1, 3, size, size))
    model = nn.DataParallel(model, device_ids=[0])
    manager = RunManager(model, "SGD", spec["lr"], [], 5, io.StringIO())
    pick = v2.RandomChoice([v2.CutMix(num_classes=classes, alpha=spec["cutmix"]),
                            v2.MixUp(num_classes=classes, alpha=spec["mixup"])])
    pool = synthetic_batches(torch, spec["pool"], spec["batch"], size, classes, spec["seed"])
    log = manager.log_file

    def run(n):
        manager.distillation(1, _Batches(pool, n, pick))
        found = re.findall(r"train_loss: ([0-9.naninf]+)", log.getvalue()[-200:])
        return float(found[-1]) if found else None

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"trainable_params": trainable, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "red_blocks": len(model.module.dist_modules), "optimizer": type(manager.optimizer).__name__,
            "lr": spec["lr"]}
    return run, info


if __name__ == "__main__":
    sys.exit(serve(build_paper, json.loads(sys.argv[1])))
