"""The settings probe: every amp / channels_last combination's teacher and RED step timed, the fastest named."""

import json

import pytest
import torch

from bench import gpu_probe
from redistill.errors import UserError


def test_the_probe_times_every_combination_and_names_the_fastest(tmp_path, one_thread):
    out = tmp_path / "probe.json"
    assert gpu_probe.main(["--device", "cpu", "--image-size", "32", "--warmup", "0", "--steps", "1",
                           "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    combos = {(x["role"], x["amp"], x["channels_last"]) for x in r["steps_timed"]}
    assert combos == {(role, amp, cl) for role in ("teacher", "red") for amp in gpu_probe.AMPS
                      for cl in gpu_probe.CHANNELS_LAST}
    assert {x["batch"] for x in r["steps_timed"] if x["role"] == "teacher"} == {128}
    assert {x["batch"] for x in r["steps_timed"] if x["role"] == "red"} == {8}
    ips = {(x["role"], x["amp"], x["channels_last"]): x["images_per_s"] for x in r["steps_timed"]}
    w = gpu_probe.TEACHER_WEIGHT
    fastest = min(((a, c) for a in gpu_probe.AMPS for c in gpu_probe.CHANNELS_LAST),
                  key=lambda k: w / ips[("teacher", *k)] + (1 - w) / ips[("red", *k)])
    assert r["best"] == {"amp": fastest[0], "channels_last": fastest[1]}
    assert [a["augment"] for a in r["augment"]] == ["crop_flip", "crop_flip", "rrc_flip", "rrc_flip"]


def test_a_failing_combination_is_recorded_and_never_the_fastest(monkeypatch):
    def step(preset, overrides, device, warmup, steps):
        if "runtime.amp=bf16" in overrides:
            return {"batch": 8, "error": "RuntimeError: no bf16 here"}
        return {"batch": 8, "step_ms": 10.0 if "runtime.channels_last=true" in overrides else 20.0,
                "warmup_s": 0.1, "images_per_s": 800.0 if "runtime.channels_last=true" in overrides else 400.0}

    monkeypatch.setattr(gpu_probe, "probe_step", step)
    monkeypatch.setattr(gpu_probe, "probe_augment", lambda *a, **k: {"augment": "x", "batch": 8, "images_per_s": 1.0})
    r = gpu_probe.run(gpu_probe.PRESET, 32, torch.device("cpu"), 0, 1, say=lambda m: None)
    assert r["best"] == {"amp": "none", "channels_last": "true"}
    assert sum("error" in x for x in r["steps_timed"]) == 4
    assert gpu_probe.best([x for x in r["steps_timed"] if "error" in x]) is None


def test_bad_options_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        gpu_probe.main(["--steps", "0", "--out", str(tmp_path / "p.json")])


def test_after_a_sticky_device_error_the_rest_is_not_run(monkeypatch):
    calls = []

    def step(preset, overrides, device, warmup, steps):
        calls.append(overrides)
        return {"batch": 8, "error": "AcceleratorError: CUDA error: an illegal memory access was encountered"}

    monkeypatch.setattr(gpu_probe, "probe_step", step)
    monkeypatch.setattr(gpu_probe, "probe_augment", lambda *a, **k: {"augment": "x", "batch": 8, "images_per_s": 1.0})
    r = gpu_probe.run(gpu_probe.PRESET, 32, torch.device("cpu"), 0, 1, say=lambda m: None)
    assert len(calls) == 1 and r["best"] is None
    assert all(x["error"].startswith("not run: the device was lost") for x in r["steps_timed"][1:])
