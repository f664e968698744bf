"""Run exported graphs in ONNX Runtime on real images and compare them with the PyTorch student."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch

from redistill.errors import UserError
from train.data import balanced_indices
from train.diffusion import Diffusion

#: the issue's bar for FP32: max |logit difference| between ONNX Runtime and PyTorch
FP32_ATOL = 1e-4


def session(proto: onnx.ModelProto, threads: int = 0):
    """A CPU ONNX Runtime session for an in-memory model (``threads`` 0 = ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"ONNX Runtime cannot load the exported graph: {str(e).splitlines()[0]}") from None


Feeds = Mapping[str, np.ndarray]


def as_feeds(sess, inputs: Union[np.ndarray, Feeds]) -> Dict[str, np.ndarray]:
    """``{input name: N x ... array}``: a bare array is the first (classifier: only) input."""
    if isinstance(inputs, np.ndarray):
        return {sess.get_inputs()[0].name: inputs}
    return dict(inputs)


def run(sess, inputs: Union[np.ndarray, Feeds], batch: int = 1) -> np.ndarray:
    """First output for N samples (an image array, or one array per input name), ``batch`` at a time
    (1 for a static-batch graph)."""
    feeds = as_feeds(sess, inputs)
    inp = sess.get_inputs()[0]
    static = isinstance(inp.shape[0], int)
    step = 1 if static and inp.shape[0] == 1 else max(1, batch)
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i:i + step] for k, v in feeds.items()})[0] for i in range(0, n, step)]
    return np.concatenate(out).astype(np.float32)


def symbolic_batch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose inputs' and outputs' first axis is the symbol ``batch`` (inner shapes dropped)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for v in list(copy.graph.input) + list(copy.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    del copy.graph.value_info[:]
    return copy


def batched(proto: onnx.ModelProto, probe: np.ndarray) -> onnx.ModelProto:
    """``proto`` with a symbolic batch axis, to evaluate many images per run (2-3x sooner than one at a time on the
    CPU): the same operators and weights, checked to give the same logits as ``proto`` on the ``probe`` images.
    ``proto`` itself when its batch is already symbolic, it has several inputs, or something in it fixes the batch
    (a reshape to a constant shape), which the check finds."""
    inp = proto.graph.input[0].type.tensor_type.shape.dim
    if len(proto.graph.input) != 1 or not inp or not inp[0].HasField("dim_value") or len(probe) < 2:
        return proto
    copy = symbolic_batch(proto)
    try:
        many = run(session(copy), probe, batch=len(probe))
    except Exception:  # onnxruntime raises its own exception types when a fixed batch inside clashes
        return proto
    one = run(session(proto), probe)
    same = many.shape == one.shape and np.abs(many - one).max() <= 1e-4 and (many.argmax(1) == one.argmax(1)).all()
    return copy if same else proto


def take(dataset, n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images (normalised, float32 NCHW) and labels: class-balanced when the set allows, fixed order."""
    labels = getattr(getattr(dataset, "set", None), "labels", None)
    if labels is not None and len(labels):
        idx = balanced_indices(labels, min(n, len(labels)))
    else:
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    xs, ys = zip(*(dataset[i] for i in idx))
    return torch.stack(list(xs)).numpy().astype(np.float32), np.asarray(ys, dtype=np.int64)


@torch.no_grad()
def torch_logits(model: torch.nn.Module, inputs: Union[np.ndarray, Feeds], batch: int = 64) -> np.ndarray:
    """The model's output for N samples: an image array, or ``{name: array}`` in the model's input order."""
    model.eval()
    arrays: Sequence[np.ndarray] = [inputs] if isinstance(inputs, np.ndarray) else list(inputs.values())
    n = len(arrays[0])
    out = [model(*(torch.from_numpy(a[i:i + batch]) for a in arrays)) for i in range(0, n, batch)]
    return torch.cat(out).numpy().astype(np.float32)


def compare(expected: np.ndarray, got: np.ndarray, atol: Optional[float]) -> Dict[str, Any]:
    """Max |diff| and top-1 agreement; ``passed`` when every diff <= atol (None: not checked) and every top-1 matches."""
    diff = np.abs(expected - got)
    same = expected.argmax(1) == got.argmax(1)
    return {
        "images": int(len(expected)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "atol": atol, "top1_identical": int(same.sum()), "top1_agreement": float(same.mean()),
        "passed": bool((atol is None or diff.max() <= atol) and same.all()),
    }


def verify_fp32(model: torch.nn.Module, proto: onnx.ModelProto, images: np.ndarray) -> Dict[str, Any]:
    """ONNX Runtime vs PyTorch on ``images``; a UserError when any logit differs by more than FP32_ATOL or a top-1 changes."""
    r = compare(torch_logits(model, images), run(session(proto), images), FP32_ATOL)
    r["against"] = "pytorch student (unfolded, eval)"
    if not r["passed"]:
        raise UserError(f"verification failed: ONNX Runtime differs from PyTorch by {r['max_abs_diff']:.3g} "
                        f"(limit {FP32_ATOL}), top-1 identical on {r['top1_identical']}/{r['images']} images; "
                        "nothing was written")
    return r


def accuracy(sess, dataset, batch: int = 256, chunk: int = 1000) -> Dict[str, Any]:
    """Top-1 (%) of an ONNX Runtime session on a whole data set, in chunks so memory stays flat."""
    correct = n = 0
    for start in range(0, len(dataset), chunk):
        idx = range(start, min(start + chunk, len(dataset)))
        xs, ys = zip(*(dataset[i] for i in idx))
        logits = run(sess, torch.stack(list(xs)).numpy().astype(np.float32), batch)
        correct += int((logits.argmax(1) == np.asarray(ys)).sum())
        n += len(ys)
    return {"top1": 100.0 * correct / max(n, 1), "images": n}


# --- denoisers: eps on noisy test images -------------------------------------------------------------


def denoise_inputs(ck: Dict[str, Any], images: np.ndarray, labels: Optional[np.ndarray], seed: int = 0
                   ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """``({"x": x_t, "t": t[, "y": y]}, noise)``: ``x_t = q_sample(x_0, t, noise)`` for normalised images x_0.

    Time steps are seeded; the first two samples are t = 0 and t = T-1 (the ends of the schedule), the rest
    uniform over [0, T-1]. Labels (int32) are fed only to a class-conditional model (``num_classes > 0``).
    """
    diff = Diffusion.make(**(ck.get("diffusion") or {}))
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor([0, diff.T - 1])[:n]
    t = torch.cat([ends, torch.randint(0, diff.T, (max(n - len(ends), 0),), generator=g)])
    noise = torch.randn(images.shape, generator=g)
    xt = diff.q_sample(torch.from_numpy(images), t, noise)
    feeds = {"x": xt.numpy().astype(np.float32), "t": t.numpy().astype(np.float32)}
    if ck.get("num_classes", 0) > 0:
        if labels is None:
            raise UserError("a class-conditional denoiser needs labelled images to verify on; use an image folder with classes")
        feeds["y"] = np.asarray(labels, dtype=np.int32)
    return feeds, noise.numpy().astype(np.float32)


def compare_eps(expected: np.ndarray, got: np.ndarray, noise: np.ndarray, t: np.ndarray,
                atol: Optional[float]) -> Dict[str, Any]:
    """Max |diff| of two eps predictions, and each one's denoising MSE against the true noise."""
    diff = np.abs(expected - got)
    per = diff.reshape(len(diff), -1).max(1)
    return {
        "samples": int(len(expected)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "atol": atol, "timesteps": sorted(int(v) for v in set(t.tolist())),
        "max_abs_diff_at_t": {"t_min": float(per[int(np.argmin(t))]), "t_max": float(per[int(np.argmax(t))])},
        "mse_expected": float(np.mean((expected - noise) ** 2)), "mse_got": float(np.mean((got - noise) ** 2)),
        "mse_between": float(np.mean((expected - got) ** 2)),
        "passed": bool(atol is None or diff.max() <= atol),
    }


def verify_denoiser(model: torch.nn.Module, proto: onnx.ModelProto, feeds: Feeds, noise: np.ndarray) -> Dict[str, Any]:
    """ONNX Runtime vs PyTorch eps on noisy test images; a UserError when any value differs by more than FP32_ATOL."""
    r = compare_eps(torch_logits(model, feeds), run(session(proto), feeds), noise, np.asarray(feeds["t"]), FP32_ATOL)
    r["against"] = "pytorch student (unfolded, eval, EMA weights when the checkpoint has them)"
    r["what"] = ("eps predicted for x_t = q_sample(x_0, t, noise) on test images; mse_* = mean (eps - noise)^2 "
                 "(expected = PyTorch, got = ONNX Runtime)")
    if not r["passed"]:
        raise UserError(f"verification failed: ONNX Runtime's eps differs from PyTorch by {r['max_abs_diff']:.3g} "
                        f"(limit {FP32_ATOL}) on {r['samples']} noisy test images; nothing was written")
    return r
