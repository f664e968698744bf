"""INT8 that keeps its accuracy: calibration and the nodes kept in float, chosen on the run's validation images.

1. Every candidate calibration (method x number of training images) quantizes the FP32 graph and is judged by its
   top-1 on the validation split: the one that keeps FP32's top-1 on the most images is chosen (ties: the
   smaller drop); each one's drop and its standard error are recorded.
2. While the goal is not met, each activation's range is scaled by the factor that brings the logits closest to
   FP32's on the calibration images (``export.refine``); the refined ranges are kept when they keep FP32's top-1 on
   more validation images.
3. While the goal is not met, the quantized nodes are ranked by the noise each adds
   (``export.sensitivity``, onnxruntime's QDQ debugging tools), and the most sensitive are kept in float one
   unit at a time, greedily: a unit stays float when it keeps FP32's top-1 on more validation images without
   raising the drop by more than its standard error, until the goal is met, the cap on float nodes is reached or
   the tries run out. The calibration ranges are computed once and reused for every try.

The goal counts as met on validation when the drop plus one standard error is within it: with about half a point
of error on the drop, a drop just under the goal says little about the test split.

Why not the drop alone: INT8 changes the top-1 of 7-35 % of a small student's images (most of them near-ties),
and the drop is the small difference of the images it breaks and those it mends, so on 2,500 images its standard
error is about half a point, as large as the goal; the images whose top-1 INT8 keeps are counted with a tenth of
that error, and the test split's drop follows them (a RED student: 89.2 % kept and a validation drop of 0.64
dropped 0.63 on the test split, 85.4 % kept and a validation drop of -0.20 dropped 0.90). Nor the logits'
distance to FP32: a calibration that clips the head's activations can shrink every logit (a poor SQNR) and still
keep the most top-1s.

Nothing here sees the test split: the caller measures the test drop once, on the model this returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch

from export.quantize import Ranges, calibrate, float_nodes, quantize_int8
from export.refine import REFINE_IMAGES, refine_scales
from export.sensitivity import NodeSensitivity, node_sensitivity
from export.verify import batched, run, session, symbolic_batch
from redistill.errors import UserError
from train.data import balanced_indices

#: validation images the per-node sensitivity is measured on (class-balanced, from the validation split)
SENSITIVITY_IMAGES = 128
#: units tried per float node allowed (--int8-max-float-nodes): tries = TRIES_PER_NODE * cap
TRIES_PER_NODE = 2
#: sensitivity records kept in the manifest
RANKING_KEPT = 10
#: the least gain in agreement with FP32's top-1 (a fraction of the images) that keeps a unit in float
MIN_AGREEMENT_GAIN = 0.001
#: images per ONNX Runtime run when the graph's batch axis can be made symbolic (export.verify.batched)
EVAL_BATCH = 64


@dataclass
class Goal:
    """What the search aims for and what it may spend."""

    max_drop: float  # validation top-1 drop, points
    max_float_nodes: int  # nodes that may stay float (0: calibration choice only)
    methods: Sequence[str]  # CALIBRATION names to try
    sizes: Sequence[int]  # calibration image counts to try
    refine_scales: bool = False  # try activation scales refined at the logits (export.refine) when the goal is missed

    @property
    def max_tries(self) -> int:
        return TRIES_PER_NODE * self.max_float_nodes


@dataclass
class Score:
    """An INT8 graph's figures on the validation images, against the FP32 graph's."""

    top1: float
    drop: float
    agreement: float  # fraction of images with the FP32 graph's top-1
    se: float  # standard error of the drop, points (paired: from the images INT8 breaks and mends)
    logit_sqnr_db: Optional[float]  # FP32 logits' power over the INT8 error's (None: identical)
    error: float = field(repr=False, default=0.0)  # the error/signal power itself

    def meets(self, max_drop: float) -> bool:
        """The goal, met with one standard error to spare."""
        return self.drop + self.se <= max_drop

    def better_than(self, cur: "Score") -> bool:
        """Closer to FP32 (more images keep its top-1, by at least MIN_AGREEMENT_GAIN) with a drop not worse
        than ``cur``'s by more than its standard error."""
        return self.agreement >= cur.agreement + MIN_AGREEMENT_GAIN and self.drop <= cur.drop + cur.se

    def record(self) -> Dict[str, Any]:
        return {"val_top1": round(self.top1, 4), "val_drop": round(self.drop, 4), "val_drop_se": round(self.se, 4),
                "agreement": round(self.agreement, 6),
                "logit_sqnr_db": None if self.logit_sqnr_db is None else round(self.logit_sqnr_db, 3)}


@dataclass
class Trial:
    """One step of the search, as the manifest records it."""

    step: str  # calibration | refine scales | keep float
    method: str
    calib_images: int
    float_nodes: List[str]  # every node in float in this try
    score: Score
    chosen: bool  # calibration: the one kept; refine scales: the refined ranges kept; keep float: the unit stays float
    unit: Optional[List[str]] = None  # keep float: the unit tried

    def record(self) -> Dict[str, Any]:
        r = {"step": self.step, "method": self.method, "calib_images": self.calib_images,
             "float_nodes": len(self.float_nodes), **self.score.record(), "chosen": self.chosen}
        if self.unit is not None:
            r["unit"] = self.unit
        return r


@dataclass
class SearchResult:
    model: onnx.ModelProto
    method: str
    calib_images: int
    float_units: List[Dict[str, Any]]  # kept in float, in the order chosen: nodes, sensitivity, validation drop
    fp32_top1: float
    val_images: int
    score: Score  # the returned model's
    goal: Goal
    trace: List[Trial]
    ranking: List[NodeSensitivity]
    sensitivity_images: int
    failed: List[Dict[str, Any]]  # calibrations onnxruntime could not compute
    ranges: Ranges = field(repr=False)  # the activation ranges ``model`` was quantized at
    refined: Optional[Dict[str, Any]] = None  # the scale refinement, when tried: kept or not, the factors

    @property
    def scales_refined(self) -> bool:
        """Whether ``model`` is quantized at refined activation scales (the refinement was tried and kept)."""
        return bool(self.refined and self.refined["kept"])

    @property
    def float_nodes(self) -> List[str]:
        return [n for u in self.float_units for n in u["nodes"]]

    @property
    def goal_met(self) -> bool:
        return self.score.meets(self.goal.max_drop)

    def record(self) -> Dict[str, Any]:
        """The manifest's ``quantization.search``."""
        return {
            "goal": {"max_val_drop": self.goal.max_drop, "max_float_nodes": self.goal.max_float_nodes,
                     "max_tries": self.goal.max_tries,
                     "met_when": "validation drop + 1 standard error <= max_val_drop"},
            "goal_met": self.goal_met,
            "candidates": {"methods": list(self.goal.methods), "calib_images": list(self.goal.sizes)},
            "chosen": {"method": self.method, "calib_images": self.calib_images, "float_nodes": self.float_nodes,
                       "scales_refined": self.scales_refined},
            "validation": {"images": self.val_images, "fp32_top1": round(self.fp32_top1, 4), **self.score.record()},
            "sensitivity": {
                "images": self.sensitivity_images, "tool": "onnxruntime.quantization.qdq_loss_debug",
                "measure": "noise a unit adds: error/signal power of its output (quantized vs float graph) minus its "
                           "worst input's, before that input's own Q/DQ; added_sqnr_db = that as an SQNR",
                "ranking": [u.record() for u in self.ranking[:RANKING_KEPT]],
            },
            "trace": [t.record() for t in self.trace],
            "failed": self.failed,
            "refine_scales": self.refined,
        }


def validate(q: onnx.ModelProto, images: np.ndarray, labels: np.ndarray, ref: np.ndarray) -> Score:
    """``q``'s top-1 on the validation images and how far its logits are from the FP32 graph's (``ref``)."""
    logits = run(session(q), images, batch=EVAL_BATCH).astype(np.float64)
    right, fp32_right = logits.argmax(1) == labels, ref.argmax(1) == labels
    n = len(labels)
    broken, mended = int((fp32_right & ~right).sum()), int((right & ~fp32_right).sum())
    se = 100.0 * math.sqrt(max(broken + mended - (broken - mended) ** 2 / n, 0.0)) / n
    err = float(np.sum((logits - ref) ** 2) / max(float(np.sum(ref.astype(np.float64) ** 2)), 1e-30))
    return Score(100.0 * float(right.mean()), 100.0 * (broken - mended) / n,
                 float((logits.argmax(1) == ref.argmax(1)).mean()), se, None if err == 0 else -10 * math.log10(err), err)


class _Search:
    """The state both steps share: the graphs, the validation images and FP32's logits on them, the trace."""

    def __init__(self, fp32: onnx.ModelProto, val: Tuple[np.ndarray, np.ndarray], say: Callable[[str], None],
                 reference: Optional[onnx.ModelProto] = None):
        self.fp32, (self.vx, self.vy), self.say, self.reference = fp32, val, say, reference
        self.ev = batched(fp32, self.vx[:2])  # every graph is run many images at a time when the batch allows
        ref_graph = self.ev if reference is None else batched(reference, self.vx[:2])
        self.ref = run(session(ref_graph), self.vx, batch=EVAL_BATCH)
        self.fp32_top1 = 100.0 * float((self.ref.argmax(1) == self.vy).mean())
        self.trace: List[Trial] = []
        self.failed: List[Dict[str, Any]] = []

    def as_run(self, q: onnx.ModelProto) -> onnx.ModelProto:
        """``q`` with the symbolic batch its FP32 graph took (Q/DQ nodes add nothing batch-bound)."""
        return symbolic_batch(q) if self.ev is not self.fp32 else q

    def score(self, q: onnx.ModelProto) -> Score:
        return validate(self.as_run(q), self.vx, self.vy, self.ref)

    def calibration(self, calib: Mapping[int, np.ndarray], goal: Goal) -> Tuple[Score, Ranges, onnx.ModelProto]:
        """Step 1: every candidate calibration; the one keeping FP32's top-1 on the most images (ties: the smaller
        drop, then the first)."""
        tried = []
        for n in goal.sizes:
            for method in goal.methods:
                try:
                    ranges = calibrate(self.ev, calib[n], method)
                except UserError as e:
                    if len(goal.sizes) * len(goal.methods) == 1:
                        raise
                    self.failed.append({"method": method, "calib_images": n, "error": str(e)})
                    self.say(f"  {method} on {n} training images: failed, skipped ({e})")
                    continue
                q = quantize_int8(self.fp32, ranges)
                s = self.score(q)
                self.trace.append(Trial("calibration", method, n, [], s, False))
                tried.append((s, ranges, q, self.trace[-1]))
                self.say(f"  {method} on {n} training images: validation top-1 {s.top1:.2f}% (drop {s.drop:+.2f} "
                         f"+- {s.se:.2f}), FP32's top-1 kept on {100 * s.agreement:.1f}%")
        if not tried:
            raise UserError(f"every INT8 calibration failed; the first: {self.failed[0]['error']}")
        s, ranges, q, trial = max(tried, key=lambda t: (t[0].agreement, -t[0].drop))
        trial.chosen = True
        return s, ranges, q

    def refine(self, cur: Score, ranges: Ranges, q: onnx.ModelProto, images: np.ndarray
               ) -> Tuple[Score, Ranges, onnx.ModelProto, Dict[str, Any]]:
        """Step 2: the activation scales refined at the logits (``export.refine``), kept when they keep FP32's top-1
        on more validation images without a drop worse by more than its standard error."""
        new, factors = refine_scales(self.fp32, ranges, images, self.say, self.reference, q)
        trial_q = quantize_int8(self.fp32, new)
        s = self.score(trial_q)
        keep = bool(factors) and s.better_than(cur)
        self.trace.append(Trial("refine scales", ranges.method, ranges.images, [], s, keep))
        self.say(f"  {'kept' if keep else 'not kept'}: refined scales: validation drop {s.drop:+.2f} +- {s.se:.2f}, "
                 f"FP32's top-1 kept on {100 * s.agreement:.1f}% (was {100 * cur.agreement:.1f}%)")
        record = {"kept": keep, "changed": len(factors), "images": min(len(images), REFINE_IMAGES),
                  "factors": {k: factors[k] for k in sorted(factors)}, "validation": s.record(),
                  "measure": "each activation alone rounded, its symmetric range times the factor of FACTORS with the "
                             "least relative squared error of the logits against FP32's on calibration images"}
        return (s, new, trial_q, record) if keep else (cur, ranges, q, record)

    def keep_float(self, cur: Score, ranges: Ranges, q: onnx.ModelProto, ranking: List[NodeSensitivity],
                   goal: Goal) -> Tuple[Score, onnx.ModelProto, List[Dict[str, Any]]]:
        """Step 3: the most sensitive units kept in float, greedily, while the goal is not met."""
        kept: List[Dict[str, Any]] = []
        floats: List[str] = []
        tries = 0
        for rank, unit in enumerate(ranking, 1):
            if cur.meets(goal.max_drop) or tries >= goal.max_tries:
                break
            if len(floats) + len(unit.nodes) > goal.max_float_nodes:
                continue
            tries += 1
            trial_q = quantize_int8(self.fp32, ranges, exclude=floats + unit.nodes)
            s = self.score(trial_q)
            keep = s.better_than(cur)
            self.trace.append(Trial("keep float", ranges.method, ranges.images, floats + unit.nodes, s, keep,
                                    unit.nodes))
            self.say(f"  {'float' if keep else 'no gain, quantized again'}: {', '.join(unit.nodes)} (adds "
                     f"{unit.added_db:.1f} dB SQNR of noise): validation drop {s.drop:+.2f}, FP32's top-1 kept on "
                     f"{100 * s.agreement:.1f}%")
            if keep:
                floats += unit.nodes
                kept.append({**unit.record(), "rank": rank, "of": len(ranking), "val_drop_before": round(cur.drop, 4),
                             "val_drop_after": round(s.drop, 4), "agreement_before": round(cur.agreement, 6),
                             "agreement_after": round(s.agreement, 6),
                             "why": f"rank {rank} of {len(ranking)} by added noise ({unit.added_db:.1f} dB SQNR); "
                                    f"FP32's top-1 kept on {100 * cur.agreement:.2f} -> {100 * s.agreement:.2f}% of "
                                    f"the validation images, drop {cur.drop:+.2f} -> {s.drop:+.2f}"})
                cur, q = s, trial_q
        bad = [n for n, ok in float_nodes(q, floats).items() if not ok]
        if bad:
            raise RuntimeError(f"node {bad[0]} was to stay float but reads a dequantized tensor")
        return cur, q, kept


def search_int8(fp32: onnx.ModelProto, calib: Mapping[int, np.ndarray], val: Tuple[np.ndarray, np.ndarray],
                goal: Goal, say: Callable[[str], None] = lambda _: None,
                reference: Optional[onnx.ModelProto] = None, ranges: Optional[Ranges] = None) -> SearchResult:
    """Choose the calibration, whether to refine its activation scales (``goal.refine_scales``) and the nodes kept
    in float on ``val`` (images, labels); ``calib[n]``: ``n`` class-balanced training images for each candidate
    size. Every score, and the refinement's target, is against ``reference``'s logits when given (the original
    FP32 graph, when ``fp32`` holds fine-tuned weights), else against ``fp32``'s. ``ranges``: no calibration is
    chosen, these activation ranges are the start (those a fine-tuning was rounded at)."""
    search = _Search(fp32, val, say, reference)
    vx, vy = val
    say(f"INT8: choosing on {len(vx)} validation images (FP32 top-1 {search.fp32_top1:.2f}%), goal: drop + 1 "
        f"standard error <= {goal.max_drop} points")
    if ranges is None:
        cur, ranges, q = search.calibration(calib, goal)
    else:
        q = quantize_int8(fp32, ranges)
        cur = search.score(q)
        search.trace.append(Trial("calibration", ranges.method, ranges.images, [], cur, True))
        say(f"  {ranges.method} on {ranges.images} training images, the ranges given: validation drop {cur.drop:+.2f} "
            f"+- {cur.se:.2f}, FP32's top-1 kept on {100 * cur.agreement:.1f}%")
    refined = None
    if not cur.meets(goal.max_drop) and goal.refine_scales and ranges.images in calib:
        cur, ranges, q, refined = search.refine(cur, ranges, q, calib[ranges.images])
    ranking: List[NodeSensitivity] = []
    kept: List[Dict[str, Any]] = []
    sel: List[int] = []
    if not cur.meets(goal.max_drop) and goal.max_float_nodes > 0:
        sel = balanced_indices(torch.as_tensor(vy), min(SENSITIVITY_IMAGES, len(vy)))
        ranking = node_sensitivity(search.ev, search.as_run(q), {fp32.graph.input[0].name: vx[sel]})
        say(f"INT8: drop {cur.drop:.2f} +- {cur.se:.2f} is not within {goal.max_drop}: keeping the most sensitive "
            f"of {len(ranking)} units in float (at most {goal.max_float_nodes} nodes; sensitivity on {len(sel)} "
            "validation images)")
        cur, q, kept = search.keep_float(cur, ranges, q, ranking, goal)
    return SearchResult(q, ranges.method, ranges.images, kept, search.fp32_top1, len(vx), cur, goal, search.trace,
                        ranking, len(sel), search.failed, ranges, refined)
