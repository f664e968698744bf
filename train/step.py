"""The distillation training step exactly as the trainer runs it, and the frozen teacher it reads.

    build_step(cfg, *, num_classes=10, device=None, teacher=None) -> DistillStep
    DistillStep.step(x, y, lr=None, generator=None) -> loss (a detached 0-d tensor)
        forward (teacher and student), backward, optimizer step
    DistillStep.run(x, y, lr=None, generator=None) -> StepResult(loss, parts, counts)
        the same step, with the loss's terms and counts (what the trainer's loop calls)
    DistillStep.model, .optimizer, .plans, .task, .runtime; .begin_epoch(global_step), .close()

``build_step`` builds untrained networks for ``cfg`` (a benchmark times the step on synthetic batches);
``train.trainer.fit`` builds the same ``DistillStep`` around its networks and calls ``step`` per batch. Every
speed change is a ``runtime.*`` config key (``train.config.RuntimeConfig``, resolved by ``train.runtime``):

    fold_teacher   true | false   teacher BatchNorm folded into its convs, run without autograd
    channels_last  auto | true | false   teacher, student and batches in channels_last (auto: classifiers)
    se_linear      true | false   MobileNetV3 squeeze-excitation as linear layers
    teacher_stop   true | false   the teacher's pass ends at its last tapped tensor when no loss reads its output
    tiny_map_conv  auto | true | false   trained convs on 2 x 2 and smaller maps over valid taps (auto: CPU)
    compile        auto | true | false   torch.compile of the student (auto: CUDA only)
    threads        auto | N       CPU intra-op threads (auto: adaptive to the load, see ThreadGovernor)
    amp            none | bf16 | fp16     autocast (fp16 with a GradScaler)
    workers, device_augment       the data path (train.gpu_data), not the step
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from redistill.errors import UserError
from train.config import REDSiteConfig, RunConfig, build_kwargs
from train.design import build_student
from train.fold import fold_batchnorm
from train.losses import METHODS
from train.models import build_model, set_se_linear
from train.optim import make_optimizer
from train.red import REDSite, SitePlan
from train.runtime import Runtime, ThreadGovernor, resolve_device, resolve_runtime
from train.tasks import TASKS
from train.tiny_conv import set_tiny_map_conv


class TeacherTap:
    """Frozen teacher that returns its output plus only the tensors RED sites are matched to.

    ``fold``: its BatchNorms folded into the convs first (``train.fold``, the export's fold); a conv or
    BatchNorm named in ``keep`` or by a plan keeps its own tensors, so every tap reads what it read unfolded.
    The pass runs under ``no_grad``, not ``inference_mode``: inference tensors cannot be saved for backward,
    and a loss may use a teacher tensor as is (an MSE target), which ``no_grad`` allows at the same speed.
    ``stop``: the pass ends once every plan's tensor is taken and returns None for the output (RED alone reads
    no teacher output; the layers after the deepest site are most of a teacher's work when the sites are early).
    The first pass runs whole and counts the taps: a tapped module that runs twice in a pass (its last call is
    what a whole pass keeps) turns stopping off.
    """

    def __init__(self, teacher: nn.Module, plans: List[SitePlan], *, fold: bool = False, image_size: int = 32,
                 keep=(), memory_format: torch.memory_format = torch.contiguous_format, stop: bool = False):
        self.folded, self.stop, self._stopping = False, bool(stop and plans), False
        if fold:
            param = next(teacher.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            try:  # fold_batchnorm folds a copy; the caller's teacher goes back where it was
                folded = fold_batchnorm(teacher.cpu(), image_size, keep={p.teacher for p in plans} | set(keep))
                teacher.to(device)
                teacher, self.folded = folded, True
            except UserError as e:  # a speed change never stops a run: the teacher runs unfolded
                print(f"teacher not folded ({e})", flush=True)
            teacher = teacher.to(device)
        self.teacher = teacher.eval().requires_grad_(False).to(memory_format=memory_format)
        self.feats: Dict[str, torch.Tensor] = {}
        modules = dict(self.teacher.named_modules())
        wanted = len({p.key for p in plans})
        self._calls: Optional[Dict[str, int]] = {} if self.stop else None  # the first pass counts the taps
        for p in plans:
            def hook(mod, inp, out, p=p):
                self.feats[p.key] = inp[0] if p.teacher_where == "in" else out
                if self._calls is not None:
                    self._calls[p.key] = self._calls.get(p.key, 0) + 1
                elif self._stopping and len(self.feats) == wanted:
                    raise _TapsTaken

            modules[p.teacher].register_forward_hook(hook)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor):
        self.feats, self._stopping = {}, self.stop  # only a pass from here stops: the module alone runs whole
        try:
            out = self.teacher(*inputs)
            if self._calls is not None:
                self.stop, self._calls = all(n == 1 for n in self._calls.values()), None
            return out, self.feats
        except _TapsTaken:
            return None, self.feats
        finally:
            self._stopping = False


class _TapsTaken(Exception):
    """Raised by the last tap's hook to end a stopping teacher's pass."""


def make_teacher_tap(cfg: RunConfig, teacher: nn.Module, plans: List[SitePlan], rt: Runtime) -> TeacherTap:
    """The run's teacher tap: folded per ``runtime.fold_teacher``, keeping every configured site's teacher
    tensors (RED plans, and the sites FitNet/AT tap), in the run's memory format; stopping at its last RED tap
    per ``runtime.teacher_stop`` when the method reads neither the teacher's output nor other taps."""
    sites = cfg.red.sites if isinstance(cfg.red.sites, list) else []
    keep = {s.teacher for s in sites if isinstance(s, REDSiteConfig)}
    method = METHODS.get(cfg.method)
    stop = rt.teacher_stop and not method.needs_logits and not method.needs_taps
    return TeacherTap(teacher, plans, fold=rt.fold_teacher, image_size=cfg.data.image_size, keep=keep,
                      memory_format=rt.memory_format, stop=stop)


def blocks_in_plan_order(model: nn.Module, plans: List[SitePlan]) -> List[nn.Module]:
    """The RED block of each plan, in plan order."""
    sites = {n: m for n, m in model.named_modules() if isinstance(m, REDSite)}
    return [getattr(sites[p.student], "red_in" if p.where == "in" else "red_out") for p in plans]


class StepResult(NamedTuple):
    loss: torch.Tensor  # detached
    parts: Dict[str, float]  # the loss's terms (task loss, each distillation loss)
    counts: Dict[str, int]  # e.g. correct predictions


class DistillStep:
    """Forward, backward and optimizer step of one batch, with the run's speed settings applied.

    Sets ``model`` to the memory format, squeeze-excitation form, tiny-map convs and device of ``runtime``,
    wraps it in DistributedDataParallel when ``world`` > 1 and compiles it when asked; holds the GradScaler
    of fp16 and the thread setting (``close`` restores the thread count found).
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, task, optimizer: torch.optim.Optimizer, *,
                 blocks: Dict[str, nn.Module], runtime: Runtime, plans: Optional[List[SitePlan]] = None,
                 world: int = 1):
        self.cfg, self.model, self.task, self.optimizer, self.blocks = cfg, model, task, optimizer, blocks
        self.runtime, self.plans, self.device = runtime, plans or [], runtime.device
        model.to(self.device)
        model.to(memory_format=runtime.memory_format)
        for m in task.trainable_modules() if hasattr(task, "trainable_modules") else []:
            m.to(memory_format=runtime.memory_format)
            set_tiny_map_conv(m, runtime.tiny_map_conv)
        set_se_linear(model, runtime.se_linear)
        set_tiny_map_conv(model, runtime.tiny_map_conv)
        net = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.eager = net
        self.net = torch.compile(net) if runtime.compile else net
        self.scaler = torch.amp.GradScaler(self.device.type) if runtime.precision.scaler else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._threads_found = torch.get_num_threads()
        self.governor: Optional[ThreadGovernor] = None
        if runtime.adaptive:
            self.governor = ThreadGovernor(runtime.threads)
        elif runtime.threads:
            torch.set_num_threads(runtime.threads)
        self.global_step = 0

    def begin_epoch(self, global_step: int) -> None:
        """Training mode, RED blocks recording, the thread governor's clock restarted at ``global_step``."""
        self.eager.train()  # the compiled wrapper shares its modules
        for b in self.blocks.values():
            b.record = True
        self.global_step = global_step
        if self.governor is not None:
            self.governor.restart(global_step)

    def end_epoch(self) -> None:
        for b in self.blocks.values():
            b.record = False
            b.last = None

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: Optional[float] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``run``, returning only the (detached) loss."""
        return self.run(x, y, lr, generator).loss

    def run(self, x: torch.Tensor, y: torch.Tensor, lr: Optional[float] = None,
            generator: Optional[torch.Generator] = None) -> StepResult:
        """One batch: the task's loss (teacher and student forward, under autocast), backward, gradient clip,
        optimizer step, the task's after-step (a denoiser's EMA)."""
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.runtime.memory_format)
        y = y.to(self.device, non_blocking=True)
        loss, parts, counts = self._loss_and_grads(x, y, generator or self.generator)
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.task.after_step(self.model)
        for b in self.blocks.values():
            b.last = None
        self.global_step += 1
        if self.governor is not None:
            self.governor.tick(len(y), full=len(y) == self.cfg.data.batch_size)
        return StepResult(loss.detach(), parts, counts)

    def _loss_and_grads(self, x, y, generator):
        """The loss and its gradients; a compiled student that fails (in the forward pass or in a backward compiled
        lazily) runs eagerly from then on, this batch again included."""
        try:
            return self._forward_backward(x, y, generator)
        except Exception as e:
            from torch._dynamo.exc import TorchDynamoException

            if self.net is self.eager or not isinstance(e, TorchDynamoException):
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the student runs "
                  "eagerly: set runtime.compile=false to skip the attempt", flush=True)
            self.net = self.eager
            return self._forward_backward(x, y, generator)

    def _forward_backward(self, x, y, generator):
        with self.runtime.autocast():
            loss, parts, counts = self.task.batch_loss(self.net, x, y, generator)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        return loss, parts, counts

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def extra_state(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the step for an exact resume: the fp16 loss scale, the thread schedule."""
        out: Dict[str, Any] = {}
        if self.scaler is not None:
            out["grad_scaler"] = self.scaler.state_dict()
        if self.governor is not None:
            out["thread_governor"] = self.governor.state()
        return out

    def load_extra(self, ck: Dict[str, Any]) -> None:
        if self.scaler is not None and ck.get("grad_scaler"):
            self.scaler.load_state_dict(ck["grad_scaler"])
        if self.governor is not None:
            self.governor.load(ck.get("thread_governor"))

    def close(self) -> None:
        """Give the process its thread count back."""
        torch.set_num_threads(self._threads_found)


def build_step(cfg: RunConfig, *, num_classes: int = 10, device: Optional[torch.device] = None,
               teacher: Optional[nn.Module] = None) -> DistillStep:
    """The trainer's step for ``cfg`` on freshly built (untrained) networks: the teacher of ``cfg`` (or
    ``teacher``) when the method reads one, the student with its RED blocks, the task, the optimizer.

    What ``train.trainer.fit`` builds per network, without data: time ``.step(x, y)`` on synthetic batches
    of ``cfg.data.batch_size`` images of ``cfg.data.image_size`` px with ``cfg.runtime`` switches set.
    """
    device = device or resolve_device(cfg.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rt = resolve_runtime(cfg.runtime, device, task=cfg.task, world=world)
    method = METHODS.get(cfg.method)
    labels = cfg.label_count(num_classes)
    if method.teacher_only:
        model = build_model(cfg.teacher.arch, labels, cfg.data.image_size, **build_kwargs(cfg, cfg.teacher))
        plans, tap = [], None
    else:
        if teacher is None and method.needs_teacher:
            teacher = build_model(cfg.teacher.arch, labels, cfg.data.image_size, **build_kwargs(cfg, cfg.teacher))
        model, plans = build_student(cfg, labels, teacher)
        tap = make_teacher_tap(cfg, teacher.to(device), plans, rt) if method.needs_teacher else None
    task, blocks, optimizer = assemble(cfg, cfg.method, model, tap, plans, num_classes, device)
    step = DistillStep(cfg, model, task, optimizer, blocks=blocks, runtime=rt, plans=plans, world=world)
    step.begin_epoch(0)
    return step


def assemble(cfg: RunConfig, method: str, model: nn.Module, tap: Optional[TeacherTap], plans: List[SitePlan],
             num_classes: int, device: torch.device):
    """What a step trains besides the networks, as the trainer and ``build_step`` both need it: the task (its
    loss, attached to ``model`` on ``device``), the RED blocks by site key, and the optimizer over the model and
    the task's training-only modules (FitNet's regressors)."""
    model.to(device)
    blocks = dict(zip([p.key for p in plans], blocks_in_plan_order(model, plans)))
    task = TASKS.get(cfg.task)(cfg, method, tap, plans, blocks, num_classes=num_classes)
    task.attach(model)
    optimizer = make_optimizer(cfg, nn.ModuleList([model, *task.trainable_modules()]))
    return task, blocks, optimizer
