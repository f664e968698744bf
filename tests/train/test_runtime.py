"""runtime.* config keys and what they resolve to, and the adaptive thread count (driven by a fake clock)."""

import pytest
import torch

from redistill.errors import UserError
from train.config import load_config
from train.runtime import PRECISIONS, ThreadGovernor, resolve_runtime


class FakeMachine:
    """A clock and a thread setting: each step takes ``per_image[threads]`` seconds per image."""

    def __init__(self, per_image):
        self.per_image, self.now, self.threads, self.calls = per_image, 0.0, None, []

    def set_threads(self, n):
        self.threads = n
        self.calls.append(n)

    def clock(self):
        return self.now

    def speedup(self, more, fewer):
        return self.per_image[fewer] / self.per_image[more]

    def run(self, gov, steps, images=10):
        for _ in range(steps):
            self.now += self.per_image[self.threads] * images
            gov.tick(images)


def _governor(machine, most=2, **kw):
    kw.setdefault("speedup", machine.speedup)
    return ThreadGovernor(most, clock=machine.clock, set_threads=machine.set_threads, **kw)


def _idle_run(steps=300):
    """A governor after ``steps`` steps on an idle 2-core machine (settled on both cores)."""
    m = FakeMachine({1: 1.0, 2: 0.6})
    g = _governor(m)
    g.restart(0)
    m.run(g, steps)
    return m, g


def test_idle_machine_starts_on_every_core_and_stays():
    m = FakeMachine({1: 1.0, 2: 0.6})
    g = _governor(m)
    assert m.threads == 2  # the start check found the cores free
    g.restart(0)
    m.run(g, 1000)
    assert m.threads == 2 and g.current == 2 and not g.switches
    probes = sum(1 for a, b in zip(m.calls, m.calls[1:]) if a == 2 and b == 1)
    assert 1 <= probes <= 5  # back-off: few steps are spent trying one thread


def test_busy_cores_at_the_start_start_it_on_one_thread_and_it_climbs_when_they_free():
    m = FakeMachine({1: 1.0, 2: 0.6})
    busy = [True]
    g = _governor(m, speedup=lambda more, fewer: 0.5 if busy[0] else m.speedup(more, fewer))
    assert m.threads == 1  # a run started beside a busy process does not risk a step on both cores
    busy[0] = False
    g.restart(0)
    m.run(g, 1000)
    assert m.threads == 2 and [s[1:3] for s in g.switches] == [(1, 2)]


def test_more_cores_start_on_the_most_that_still_pay():
    m = FakeMachine({1: 8.0, 2: 4.2, 4: 2.3, 8: 1.4, 16: 1.3})
    g = _governor(m, most=16)
    assert m.threads == 8  # 16 threads are not gate (1.2) times faster than 8


def test_a_busy_core_sends_it_to_one_thread_and_a_freed_core_back():
    m = FakeMachine({1: 1.0, 2: 0.6})
    g = _governor(m)
    g.restart(0)
    m.run(g, 50)
    assert m.threads == 2
    m.per_image = {1: 1.1, 2: 5.0}  # another process takes a core: two threads collapse
    m.run(g, 30)
    assert m.threads == 1 and g.switches[-1][3] == "slowdown"
    m.per_image = {1: 1.0, 2: 0.6}  # the core is free again
    m.run(g, 1000)
    assert m.threads == 2 and g.switches[-1][3] == "scheduled"


@pytest.mark.parametrize("gate_fooled", [False, True])
def test_busy_cores_cost_no_step_and_a_collapsing_probe_one(gate_fooled):
    """A quick matrix product on more threads tells busy cores before a step is risked on them; where it is
    fooled, the collapsing step ends the probe at once."""
    m = FakeMachine({1: 1.0, 2: 40.0})
    g = _governor(m, speedup=(lambda more, fewer: 1.9) if gate_fooled else m.speedup)
    g.restart(0)
    steps_at_two = 0
    for _ in range(2000):
        m.run(g, 1)
        steps_at_two += m.threads == 2
    assert g.current == 1
    if not gate_fooled:
        assert not g.switches and steps_at_two == 0
    else:  # started on both cores: the first scheduled probe leaves them, then one step per probe, ever rarer
        assert [s[1:3] for s in g.switches] == [(2, 1)] and steps_at_two <= 16


def test_a_core_taken_between_epochs_is_noticed():
    m, g = _idle_run()
    m.per_image = {1: 1.1, 2: 20.0}  # taken while the epoch's evaluation ran
    g.restart(300)
    m.run(g, 20)
    assert m.threads == 1 and g.switches[-1][3] == "slowdown"


def test_a_resume_on_busy_cores_starts_on_the_fewer_threads():
    _, g = _idle_run()
    state = g.state()
    assert state["threads"] == 2 and state["best"] is not None
    busy = FakeMachine({1: 1.1, 2: 20.0})
    g2 = _governor(busy)  # its start check finds the cores busy
    g2.load(state)
    assert busy.threads == 1 and g2.best is None


def test_more_cores_are_tried_in_halvings_and_all_kept_when_they_pay():
    m = FakeMachine({1: 8.0, 2: 4.2, 4: 2.3, 8: 1.4, 16: 1.0})
    g = _governor(m, most=16)
    g.restart(0)
    m.run(g, 200)
    assert g.candidates == [16, 8, 4, 2, 1] and m.threads == 16


def test_the_schedule_survives_a_checkpoint():
    _, g = _idle_run()
    state = g.state()
    m2 = FakeMachine({1: 1.0, 2: 0.6})
    g2 = _governor(m2)
    g2.load(state)
    assert g2.state() == state and m2.threads == state["threads"]


def test_a_short_last_batch_is_not_timed():
    m = FakeMachine({1: 1.0, 2: 0.6})
    g = _governor(m)
    g.restart(0)
    g.tick(10)
    m.now += 100.0
    g.tick(3, full=False)
    assert g.times == []


def _resolve(*over, device="cpu", **kw):
    return resolve_runtime(load_config("quick", list(over)).runtime, torch.device(device), **kw)


def test_auto_settings(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("train.runtime.cpu_cores", lambda: 2)
    rt = _resolve()
    assert rt.adaptive and rt.threads == 2 and rt.workers == 0 and rt.device_augment
    assert rt.channels_last and not rt.compile and rt.fold_teacher and rt.se_linear and rt.precision.name == "none"
    assert rt.tiny_map_conv and not _resolve("runtime.tiny_map_conv=false").tiny_map_conv
    assert not _resolve(task="denoise").channels_last
    fixed = _resolve("runtime.threads=1", "runtime.workers=3", "runtime.channels_last=off", "runtime.compile=on")
    assert (fixed.threads, fixed.adaptive, fixed.workers, fixed.channels_last, fixed.compile) == (1, False, 3, False, True)
    per_image = _resolve(one_tensor=False)
    assert not per_image.device_augment and per_image.workers == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not _resolve().adaptive
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ddp = _resolve(world=2)
    assert ddp.threads == 1 and not ddp.adaptive


def test_device_augment_on_images_of_many_sizes_is_one_line():
    with pytest.raises(UserError, match="runtime.device_augment=true needs images of one size"):
        _resolve("runtime.device_augment=true", one_tensor=False)


@pytest.mark.parametrize("override, message", [
    ("runtime.threads=0", "runtime.threads='0' is out of range: it must be auto or an integer >= 1"),
    ("runtime.threads=many", "runtime.threads='many' is out of range"),
    ("runtime.workers=-1", "runtime.workers='-1' is out of range: it must be auto or an integer >= 0"),
    ("runtime.amp=fp8", "'runtime.amp' is 'fp8'"),
    ("runtime.channels_last=maybe", "'runtime.channels_last' is 'maybe'"),
    ("runtime.fold_teacher=perhaps", "'runtime.fold_teacher' needs bool"),
    ("runtime.thread=2", "unknown config key 'runtime.thread'"),
])
def test_bad_runtime_values_are_one_line(override, message):
    with pytest.raises(UserError) as e:
        load_config("quick", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_data_workers_of_older_configs_is_runtime_workers():
    cfg = load_config("quick", ["data.workers=2"])
    assert cfg.runtime.workers == "2" and "workers" not in cfg.to_dict()["data"]
    assert load_config("quick", ["data.workers=2", "runtime.workers=1"]).runtime.workers == "1"


def test_every_precision_autocasts_a_matmul():
    for name in PRECISIONS:
        p = PRECISIONS.get(name)
        rt = _resolve(f"runtime.amp={name}")
        with rt.autocast():
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        assert out.dtype == (p.dtype or torch.float32)
