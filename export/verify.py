"""Run exported graphs in ONNX Runtime on real images and compare them with the PyTorch student."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import onnx
import torch

from redistill.errors import UserError

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


def run(sess, images: np.ndarray, batch: int = 1) -> np.ndarray:
    """Logits for N x C x H x W float32 ``images``, fed ``batch`` at a time (1 for a static-batch graph)."""
    inp = sess.get_inputs()[0]
    static = isinstance(inp.shape[0], int)
    step = 1 if static and inp.shape[0] == 1 else max(1, batch)
    out = [sess.run(None, {inp.name: images[i:i + step]})[0] for i in range(0, len(images), step)]
    return np.concatenate(out).astype(np.float32)


def take(dataset, n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images (normalised, float32 NCHW) and labels: class-balanced when the set allows, fixed order."""
    from train.data import balanced_indices

    labels = getattr(getattr(dataset, "set", None), "labels", None)
    if labels is not None and len(labels):
        idx = balanced_indices(labels, min(n, len(labels)))
    else:
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    xs, ys = zip(*(dataset[i] for i in idx))
    return torch.stack(list(xs)).numpy().astype(np.float32), np.asarray(ys, dtype=np.int64)


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(images[i:i + batch])) for i in range(0, len(images), batch)]
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
