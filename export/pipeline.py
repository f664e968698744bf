"""``redistill export``: checkpoint -> folded, checked, verified ONNX bundle (FP32 or INT8)."""

from __future__ import annotations

import io
import math
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime
import torch
import torchvision

from export.bundle import check_out, write_bundle
from export.calibration import (AUTO, AUTO_CALIB_SIZES, CALIBRATION, FALLBACK_CALIB_IMAGES, FALLBACK_METHOD,
                                auto_methods)
from export.int8_search import Goal, SearchResult, search_int8
from train.fold import fold_batchnorm
from export.onnx_export import INPUT_NAME, MIN_OPSET, check_model, export_onnx, graph_io, lower_ir_version
from export.preflight import preflight
from export.qat import QATSettings
from export.qat_graph import GraphModule, finetune_graph
from export.quantize import qdq_summary, quantize_int8
from export.targets import get_target
from export.verify import (accuracy, batched, compare, compare_eps, denoise_inputs, run, session, symbolic_batch, take,
                           torch_logits, verify_denoiser, verify_fp32)
from redistill import __version__
from redistill.errors import UserError
from redistill.io import check_writable, sha256_file
from redistill.memory import manifest_entry
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import DataConfig
from train.data import DATASETS, TransformedImages, balanced_indices, build_transform, load_data, split_train_val
from train.models import task_of

#: what a device should allow between its runtime and the bundle's reference outputs (see docs/export.md)
DEVICE_ATOL_FP32 = 1e-3
DEVICE_ATOL_INT8_FLOOR = 0.05
INT8_GOAL_MAX_DROP = 0.5  # top-1 points: --int8-max-drop's default, judged on validation, reported on test
INT8_MAX_FLOAT_NODES = 8  # --int8-max-float-nodes' default


@dataclass
class ExportOptions:
    checkpoint: str
    out: Optional[str] = None
    target: str = "tx2"  # an export.targets name; it fixes the runtime and the precision (orin-int8: INT8)
    opset: int = 13
    dynamic_batch: bool = False
    data_root: Optional[str] = None
    data_name: Optional[str] = None
    calib_images: int = 0  # 0 = auto: chosen on validation among AUTO_CALIB_SIZES (denoisers: 256)
    calib_method: str = AUTO  # a CALIBRATION name, or auto: chosen on validation (denoisers: minmax)
    int8_max_drop: float = INT8_GOAL_MAX_DROP  # goal: validation top-1 drop, points
    int8_max_float_nodes: int = INT8_MAX_FLOAT_NODES  # nodes that may stay float to meet it (0: none)
    int8_val_images: int = 0  # validation images the INT8 choices are judged on (0 = all the run held out)
    int8_qat_epochs: int = 0  # when the search misses the goal on validation: QAT epochs to try (0: none)
    int8_refine_scales: bool = True  # when the goal is missed: try activation scales refined at the logits
    verify_images: int = 64
    reference_images: int = 8
    eval_subset: int = 0  # 0 = the whole test split
    tarball: bool = False
    name: Optional[str] = None
    quiet: bool = False


def check_options(o: ExportOptions):
    """Every refusal that needs no checkpoint, before anything heavy runs; returns the Target."""
    t = get_target(o.target)
    if o.opset > t.max_opset:
        raise UserError(f"--opset {o.opset} is refused for --target {t.name}: {t.runtime} parses ONNX operators only up to "
                        f"opset {t.max_opset} ({t.ops_source}); use --opset {t.max_opset} or lower")
    if o.opset < MIN_OPSET:
        raise UserError(f"--opset {o.opset} is too old: choose {MIN_OPSET}-{t.max_opset} (13 is the default)")
    if t.precision == "int8":
        if o.calib_method != AUTO:
            CALIBRATION.get(o.calib_method)
        if o.calib_images < 0:
            raise UserError("--calib-images must be auto or a positive count of training images")
        if not (isinstance(o.int8_max_drop, (int, float)) and math.isfinite(o.int8_max_drop) and o.int8_max_drop >= 0):
            raise UserError(f"--int8-max-drop must be a number of top-1 points >= 0 ({INT8_GOAL_MAX_DROP} is the default)")
        if o.int8_max_float_nodes < 0:
            raise UserError(f"--int8-max-float-nodes must be 0 (quantize every node) or a positive count "
                            f"({INT8_MAX_FLOAT_NODES} is the default)")
        if o.int8_val_images < 0:
            raise UserError("--int8-val-images must be 0 (every image the run held out) or a positive count")
        if o.int8_qat_epochs < 0:
            raise UserError("--int8-qat-epochs must be 0 (no quantization-aware fine-tuning) or a positive count")
    for flag, v in (("--verify-images", o.verify_images), ("--reference-images", o.reference_images)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1")
    if o.eval_subset < 0:
        raise UserError("--eval-subset must be 0 (whole test set) or a positive count")
    return t


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _say(o: ExportOptions, msg: str) -> None:
    if not o.quiet:
        print(f"[export] {msg}", flush=True)


def _versions() -> Dict[str, str]:
    return {"redistill_edge": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)"}


def _memory(onnx_bytes: bytes) -> Tuple[Optional[dict], Optional[str]]:
    """``redistill.memory.manifest_entry`` for the bundled graph, or (None, why) when the analysis failed."""
    with tempfile.TemporaryDirectory(prefix="redistill-mem-") as tmp:
        p = Path(tmp) / "model.onnx"
        p.write_bytes(onnx_bytes)
        try:
            return manifest_entry(p), None
        except Exception as e:  # a report figure must not sink a verified export
            return None, f"redistill.memory.manifest_entry failed: {type(e).__name__}: {e}"


@dataclass
class Int8Data:
    """Where the INT8 choices are made: calibration images from the run's training part and validation images from
    the part it held out (``split_train_val``, seed 0, as training split them), both with the test-time transform;
    never the test split."""

    calib: TransformedImages
    val: Optional[TransformedImages]
    val_fraction: Optional[float]  # the run's data.val_fraction (None: the checkpoint does not record it)
    #: positions in the run's training images (the train folder after data.train_subset)
    train_index: List[int] = field(repr=False, default_factory=list)
    val_index: List[int] = field(repr=False, default_factory=list)


def val_fraction(ck: Dict[str, Any]) -> Optional[float]:
    """The fraction of training images the run held out for validation, as its checkpoint records it."""
    v = ((ck.get("config") or {}).get("data") or {}).get("val_fraction")
    return None if v is None else float(v)


def load_sets(ck: Dict[str, Any], o: ExportOptions, need_calib: bool) -> Tuple[Any, Optional[Int8Data]]:
    """Test set (eval transform) and, for INT8, the run's training and held-out images (``Int8Data``)."""
    saved = (ck.get("config") or {}).get("data", {})
    dcfg = DataConfig(name=o.data_name or saved.get("name", "imagefolder"), root=o.data_root or saved.get("root", "data/cifar10"),
                      image_size=ck["image_size"], test_subset=o.eval_subset, augment=saved.get("augment", "none"))
    data = load_data(dcfg, mean=ck["mean"], std=ck["std"], need_train=False)
    if list(data.classes) != list(ck["classes"]):
        raise UserError(f"the data's classes {data.classes} differ from the checkpoint's {ck['classes']}; "
                        "point --data-root at the set it was trained on")
    if not need_calib:
        return data, None
    full = DATASETS.get(dcfg.name)(dcfg.root, "train")
    if saved.get("train_subset"):  # as train.data.load_data does before splitting
        full = full.subset(balanced_indices(full.labels, int(saved["train_subset"])))
    frac = val_fraction(ck)
    train, val = split_train_val(full.labels, frac or 0.0)
    ev = build_transform(dcfg.image_size, ck["mean"], ck["std"], False, dcfg.augment)
    return data, Int8Data(TransformedImages(full.subset(train), ev), TransformedImages(full.subset(val), ev) if val else None,
                          frac, train, val)


def chooses_on_validation(o: ExportOptions, denoise: bool) -> bool:
    """Whether this INT8 export decides anything on validation images (a classifier with something left to choose)."""
    return not denoise and (o.calib_method == AUTO or not o.calib_images or o.int8_max_float_nodes > 0
                            or o.int8_refine_scales)


def _calib_feeds(ck: Dict[str, Any], calib, n: int, denoise: bool):
    """INT8 calibration data: training images, or for a denoiser (x_t, t[, y]) at seeded random time steps."""
    cal_x, cal_y = take(calib, n)
    if not denoise:
        return cal_x, len(cal_x)
    feeds, _ = denoise_inputs(ck, cal_x, cal_y, seed=1)
    return feeds, len(cal_x)


def _quantize(o: ExportOptions, ck: Dict[str, Any], proto, int8: Int8Data, denoise: bool, folded=None
              ) -> Tuple[Any, Dict[str, Any], Optional[SearchResult], Optional[Dict[str, Any]]]:
    """The INT8 graph, its calibration record, the search that chose it (None for a denoiser, or a classifier
    whose run held no images out and whose settings were all given) and the QAT record (None: not tried)."""
    selection = "class-balanced, first images per class of the run's training part (never its held-out images), eval transform"
    given = o.calib_method != AUTO and bool(o.calib_images)
    if denoise:
        method = FALLBACK_METHOD if o.calib_method == AUTO else o.calib_method
        cal, n_cal = _calib_feeds(ck, int8.calib, o.calib_images or FALLBACK_CALIB_IMAGES, True)
        _say(o, f"INT8: calibrating on {n_cal} noisy training images (x_t, t) at seeded random time steps ({method})")
        record = {"method": method, "images": int(n_cal), "split": "train", "chosen_on": "given" if given else "default",
                  "selection": selection + "; noised by q_sample at seeded uniform time steps"}
        return quantize_int8(proto, cal, method), record, None, None
    methods = auto_methods() if o.calib_method == AUTO else [o.calib_method]
    sizes = sorted({min(n, len(int8.calib)) for n in ([o.calib_images] if o.calib_images else AUTO_CALIB_SIZES)})
    search, qat = None, None
    if int8.val is None:  # nothing left to choose (run_export refused otherwise)
        method, n_cal = methods[0], sizes[0]
        _say(o, f"INT8: calibrating on {n_cal} training images ({method}); the run held out no validation images")
        final = quantize_int8(proto, take(int8.calib, n_cal)[0], method)
    else:
        val = take(int8.val, o.int8_val_images or len(int8.val))
        calib = {n: take(int8.calib, n)[0] for n in sizes}
        goal = Goal(o.int8_max_drop, o.int8_max_float_nodes, methods, sizes, o.int8_refine_scales)
        search = search_int8(proto, calib, val, goal, lambda m: _say(o, m))
        if not search.goal_met and o.int8_qat_epochs and folded is not None:
            search, qat = _try_qat(o, ck, proto, folded, int8, calib, val, goal, search)
        final, method, n_cal = search.model, search.method, search.calib_images
        nodes = len(search.float_nodes)
        drop = f"{search.score.drop:+.2f} +- {search.score.se:.2f}"
        refined = ", scales refined" if search.scales_refined else ""
        if search.goal_met:
            _say(o, f"INT8: {method} on {n_cal} training images{refined}, {nodes} nodes in float: validation drop "
                    f"{drop} (goal {o.int8_max_drop} met)")
        else:
            _say(o, f"WARNING: INT8 misses the goal on validation: drop {drop} points is not within "
                    f"{o.int8_max_drop} with {nodes} nodes in float (cap --int8-max-float-nodes "
                    f"{o.int8_max_float_nodes}); the bundle is written anyway"
                    + ("" if o.int8_qat_epochs or folded is None else
                       "; --int8-qat-epochs 4 fine-tunes the INT8 graph for the goal (docs/export.md)"))
    record = {"method": method, "images": int(n_cal), "split": "train",
              "chosen_on": "given" if given else "validation", "selection": selection,
              "scales_refined": bool(search and search.scales_refined)}
    return final, record, search, qat


def _try_qat(o: ExportOptions, ck: Dict[str, Any], proto, folded, int8: Int8Data, calib, val, goal: Goal,
             ptq: SearchResult) -> Tuple[SearchResult, Dict[str, Any]]:
    """Fine-tune the FP32 graph rounded as the QDQ model of the calibration the search chose rounds it (its refined
    scales when it kept them; every node quantized; ``export.qat_graph``), its activation scales learnt with the
    weights, then search the fine-tuned weights twice against the original FP32 graph: at the activation ranges the
    fine-tuning ended with, and calibrated again; keep
    whichever of those and the post-training graph keeps FP32's top-1 on the most validation images (ties: the
    smaller drop). A graph the fine-tuning cannot run leaves the post-training one, with the reason recorded."""
    _say(o, f"INT8: the goal is missed after post-training quantization; quantization-aware fine-tuning for "
            f"{o.int8_qat_epochs} epoch(s) on the run's {len(int8.calib)} training images, rounded as the INT8 graph "
            f"of {ptq.method} on {ptq.calib_images} training images rounds")
    try:  # at the search's own ranges, refined when it kept that
        tuned, trained_ranges, record = finetune_graph(proto, ptq.ranges, int8.calib, val[0],
                                                       QATSettings(o.int8_qat_epochs), lambda m: _say(o, m))
    except UserError as e:
        _say(o, f"INT8: QAT not run ({e}); the post-training graph is kept")
        return ptq, {"chosen": False, "not_run": str(e)}
    record["qdq"] = {"method": ptq.method, "calib_images": ptq.calib_images, "float_nodes": 0,
                     "scales_refined": ptq.scales_refined}
    candidates = {"post-training": ptq,
                  "QAT, trained ranges": search_int8(tuned, calib, val, goal, lambda m: _say(o, m),
                                                     reference=proto, ranges=trained_ranges),
                  "QAT, calibrated again": search_int8(tuned, calib, val, goal, lambda m: _say(o, m), reference=proto)}
    name = max(candidates, key=lambda k: (candidates[k].score.agreement, -candidates[k].score.drop))
    keep = name != "post-training"
    record.update(chosen=keep, kept=name, validation_ptq=ptq.score.record(),
                  validation_qat=candidates["QAT, calibrated again"].score.record(),
                  validation_qat_trained_ranges=candidates["QAT, trained ranges"].score.record(),
                  chosen_by="FP32's top-1 kept on the most validation images (ties: the smaller drop)",
                  note="when chosen, the INT8 graph's weights are the fine-tuned ones; the checkpoint, the FP32 "
                       "figures and the test drop's FP32 side are the original network's")
    _say(o, "INT8: " + "; ".join(f"{k}: FP32's top-1 kept on {100 * v.score.agreement:.1f}% (drop {v.score.drop:+.2f})"
                                 for k, v in candidates.items()) + f"; kept: {name}")
    return candidates[name], record


def _validation_record(search: Optional[SearchResult], int8: Optional[Int8Data]) -> Optional[Dict[str, Any]]:
    """``accuracy.validation``: the held-out figures the INT8 choices were made on."""
    if search is None:
        return None
    return {"split": f"held out from train (data.val_fraction {int8.val_fraction}, seed 0), never trained on",
            "images": search.val_images, "fp32_top1": search.fp32_top1, "int8_top1": search.score.top1,
            "drop": search.score.drop, "drop_se": search.score.se, "agreement": search.score.agreement,
            "goal_met": search.goal_met}


def _io_entries(proto, denoise: bool, ck: Dict[str, Any]) -> list:
    """The manifest's ``inputs``: every graph input with name, shape and dtype (and what a denoiser's mean)."""
    steps = int((ck.get("diffusion") or {}).get("timesteps", 1000))
    meaning = {
        "input": {"layout": "NCHW", "meaning": "image, normalised as in preprocess"},
        "x": {"layout": "NCHW", "meaning": "noisy image x_t (images normalised to [-1, 1] by preprocess, then noised)"},
        "t": {"meaning": "diffusion time step as a float", "range": [0, steps - 1]},
        "y": {"meaning": f"class label; {ck['num_classes']} = no label (classifier-free guidance)",
              "range": [0, ck["num_classes"]]},
    }
    return [dict(e, **meaning.get(e["name"], {})) for e in graph_io(proto)]


def run_export(o: ExportOptions) -> Tuple[Path, Dict[str, Any]]:
    """Fold, export, pre-flight, verify, (quantize), measure, and write the bundle atomically; returns (dir, manifest).

    Classifiers (one image input -> logits) and denoisers (``x, t[, y]`` -> ``eps``) go through the same steps;
    a denoiser is verified on noisy test images and reports denoising MSE instead of top-1.
    """
    target = check_options(o)
    ck = load_checkpoint(o.checkpoint)
    task = ck.get("task") or task_of(ck["arch"])
    denoise = task == "denoise"
    if denoise and o.dynamic_batch:
        raise UserError("--dynamic-batch is not supported for denoisers: their bundles take one denoising step at "
                        "batch 1 (x [1,3,H,W], t [1]); drop --dynamic-batch")
    precision = target.precision
    if denoise and o.int8_qat_epochs:
        raise UserError("--int8-qat-epochs applies to classifiers (it is judged on top-1); drop it for a denoiser")
    if precision == "int8" and chooses_on_validation(o, denoise) and not val_fraction(ck):
        raise UserError(f"{o.checkpoint} records no held-out validation images (data.val_fraction "
                        f"{val_fraction(ck) or 0}), and INT8 settings are chosen on them, never on the test split: "
                        "retrain with data.val_fraction=0.05, or fix them with --calib-method minmax --calib-images "
                        "256 --int8-max-float-nodes 0 --no-int8-refine-scales")
    out = Path(o.out) if o.out else Path("bundles") / f"{(ck.get('config') or {}).get('name', ck['arch'])}-{precision}"
    check_out(out)  # before the long work: a wrong --out fails now and nothing in it is deleted
    check_writable(out)
    torch.manual_seed(0)
    model = model_from_checkpoint(ck)
    size = ck["image_size"]
    _say(o, f"{o.checkpoint}: {ck['arch']} ({task}, {ck['role']}, {ck['method']}), {size} px -> {out} "
            f"[{precision}, {target.name}]")

    folded = fold_batchnorm(model, size)
    proto = export_onnx(folded, size, o.opset, o.dynamic_batch)
    exporter_ir, _ = lower_ir_version(proto, target.max_ir_version)
    check_model(proto)
    bn = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if bn:
        raise UserError(f"BatchNormalization node {bn[0]} survived folding; report the architecture")
    checks = {"fp32": preflight(proto, target)}
    if precision == "int8" and o.int8_qat_epochs:
        GraphModule(proto)  # a graph QAT cannot run: one line now, not after the search
    _say(o, f"exported opset {checks['fp32']['opset']}, IR {proto.ir_version}, {len(proto.graph.node)} nodes; "
            f"pre-flight for {target.runtime} passed")

    data, int8 = load_sets(ck, o, precision == "int8")
    images, labels = take(data.test, o.verify_images)
    acc: Optional[Dict[str, Any]] = None
    denoising: Optional[Dict[str, Any]] = None
    if denoise:
        feeds, noise = denoise_inputs(ck, images, labels, seed=0)
        v = verify_denoiser(model, proto, feeds, noise)
        verification: Dict[str, Any] = {"fp32": v}
        _say(o, f"verified eps on {v['samples']} noisy test images (t {v['timesteps'][0]}..{v['timesteps'][-1]}): "
                f"max |diff| {v['max_abs_diff']:.2e} <= {v['atol']}")
        denoising = {"data": data.source, "split": "test", "samples": v["samples"], "timesteps": v["timesteps"],
                     "pytorch_mse": v["mse_expected"], "fp32_onnx_mse": v["mse_got"], "runtime": "onnxruntime CPU",
                     "what": "denoising MSE mean (eps_pred - noise)^2 on x_t = q_sample(x_0, t, noise) of test images",
                     "diffusion": ck.get("diffusion")}
        _say(o, f"denoising MSE: PyTorch {v['mse_expected']:.5f}, FP32 ONNX {v['mse_got']:.5f}")
        ref_inputs = {k: a[: o.reference_images] for k, a in feeds.items()}
        ref_noise = noise[: o.reference_images]
    else:
        feeds = {INPUT_NAME: images}
        verification = {"fp32": verify_fp32(model, proto, images)}
        v = verification["fp32"]
        _say(o, f"verified on {v['images']} test images: max |diff| {v['max_abs_diff']:.2e} <= {v['atol']}, top-1 identical")
        many = batched(proto, images[:2])  # the same graph, many images per run where its batch allows
        fp32_acc = accuracy(session(many), data.test)
        acc = {"data": data.source, "split": "test", "images": fp32_acc["images"],
               "subset": bool(o.eval_subset), "fp32_top1": fp32_acc["top1"],
               "runtime": "onnxruntime CPU", "checkpoint_best_val": ck.get("best_val")}
        _say(o, f"FP32 ONNX top-1 {fp32_acc['top1']:.2f}% on {fp32_acc['images']} test images")
        ref_inputs = {INPUT_NAME: images[: o.reference_images]}

    final = proto
    ref_outputs = torch_logits(model, ref_inputs)
    ref = {"source": "pytorch student (fp32)", "atol": DEVICE_ATOL_FP32, "top1_agreement_min": None if denoise else 1.0}
    quant = None
    if precision == "int8":
        import onnxruntime

        final, calibration, search, qat = _quantize(o, ck, proto, int8, denoise, folded)
        lower_ir_version(final, target.max_ir_version)
        check_model(final)
        checks["int8"] = preflight(final, target)
        q_sess = session(final)
        if denoise:
            r = compare_eps(torch_logits(model, feeds), run(q_sess, feeds), noise, feeds["t"], None)
            r.update(against="pytorch student (fp32)", passed=True, note="reported, not a limit: INT8 eps error vs FP32")
            verification["int8"] = r
            denoising.update(int8_onnx_mse=r["mse_got"], int8_mse_increase=r["mse_got"] - r["mse_expected"],
                             int8_max_abs_eps_diff=r["max_abs_diff"])
            _say(o, f"INT8 denoising MSE {r['mse_got']:.5f} vs PyTorch {r['mse_expected']:.5f}; "
                    f"max |eps diff| {r['max_abs_diff']:.3g}")
        else:
            r = compare(torch_logits(model, images), run(q_sess, images), None)
            r.update(against="pytorch student (fp32)", passed=True, note="reported, not a limit: INT8 is judged by accuracy")
            verification["int8"] = r
            # the test split's one look, after every choice was made
            int8_acc = accuracy(session(symbolic_batch(final)) if many is not proto else q_sess, data.test)
            drop = fp32_acc["top1"] - int8_acc["top1"]
            acc.update(int8_top1=int8_acc["top1"], drop=drop, goal_max_drop=o.int8_max_drop,
                       goal_met=drop <= o.int8_max_drop, validation=_validation_record(search, int8),
                       test_measured="once, after the calibration and the float nodes were chosen on validation")
            _say(o, f"INT8 top-1 {int8_acc['top1']:.2f}% vs FP32 {fp32_acc['top1']:.2f}% on the test split "
                    f"(drop {drop:+.2f} points, goal <= {o.int8_max_drop})")
            if drop > o.int8_max_drop:
                _say(o, f"WARNING: the INT8 test drop {drop:.2f} misses the goal of at most {o.int8_max_drop} points"
                        + ("" if search is None else f" ({len(search.float_nodes)} nodes in float)"))
        ref_outputs = run(q_sess, ref_inputs)
        ref = {"source": "onnxruntime CPU on this int8 model", "atol": max(DEVICE_ATOL_INT8_FLOOR, r["max_abs_diff"]),
               "top1_agreement_min": None if denoise else 0.875}
        quant = {"tool": f"onnxruntime.quantization {onnxruntime.__version__} quantize_static", "format": "QDQ",
                 "weights": "int8, per-channel, symmetric", "activations": "int8, symmetric (zero point 0)",
                 "calibration": calibration,
                 "float_nodes": search.float_nodes if search else [],
                 "float_units": search.float_units if search else [],
                 "search": search.record() if search else None,
                 "qat": qat,
                 **qdq_summary(final)}
        if denoise:
            quant["search_note"] = ("no search for denoisers: it judges top-1, which a denoiser has not; calibrated "
                                    f"with {calibration['method']} on {calibration['images']} images, no node in float")

    model_bytes = final.SerializeToString()
    memory, memory_note = _memory(model_bytes)
    n, h = ck["num_classes"], size
    batch = "batch" if o.dynamic_batch else 1
    ck_path = Path(o.checkpoint)
    out_io = graph_io(final, outputs=True)[0]
    manifest: Dict[str, Any] = {
        "name": o.name or out.name,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": " ".join(["redistill"] + sys.argv[1:]) if Path(sys.argv[0]).name == "redistill" else None,
        "task": task,
        "model": {"arch": ck["arch"], "method": ck["method"], "role": ck["role"], "num_classes": n,
                  "classes": list(ck["classes"]), "image_size": h, "width_mult": ck.get("width_mult"),
                  "red_blocks": len(ck["red"]["sites"]), "build_kwargs": ck.get("build_kwargs"),
                  "checkpoint": {"file": ck_path.name, "sha256": sha256_file(ck_path), "epoch": ck.get("epoch"),
                                 "weights": "ema" if ck.get("ema") is not None else "trained"}},
        "inputs": _io_entries(final, denoise, ck),
        "output": {"name": out_io["name"], "shape": [batch, n] if not denoise else out_io["shape"], "dtype": "float32"},
        "preprocess": {"mean": list(ck["mean"]), "std": list(ck["std"]), "scale": 1 / 255, "resize": [h, h],
                       "channel_order": "RGB", "formula": "(pixel * scale - mean) / std"},
        "precision": precision,
        "target": target.name,
        "backend": target.backend,
        "onnx": {"file": "model.onnx", "opset": checks["fp32"]["opset"], "ir_version": final.ir_version,
                 "exporter_ir_version": exporter_ir, "producer": f"{final.producer_name} {final.producer_version}".strip(),
                 "batchnorm_folding": getattr(folded, "fold_stats", None)},
        "preflight": checks,
        "versions": _versions(),
        "verification": verification,
        "accuracy": acc,
        "quantization": quant,
        "memory": memory,
    }
    if denoise:
        manifest["diffusion"] = ck.get("diffusion")
        manifest["denoising"] = denoising
        manifest["preprocess"]["applies_to"] = "x_0 before noising; x is fed already noised"
        ref_files = {f"reference/inputs/{k}.npy": a for k, a in ref_inputs.items()}
        manifest["reference"] = {"inputs": {k: f"reference/inputs/{k}.npy" for k in ref_inputs},
                                 "outputs": "reference/outputs.npy", "noise": "reference/noise.npy",
                                 "count": int(len(ref_outputs)), **ref}
        ref_files["reference/noise.npy"] = ref_noise
    else:
        # the single-input v1 description every agent reads, beside the ``inputs`` list
        manifest["input"] = {"name": INPUT_NAME, "shape": [batch, 3, h, h], "dtype": "float32", "layout": "NCHW",
                             "dynamic_batch": o.dynamic_batch}
        ref_files = {"reference/inputs.npy": ref_inputs[INPUT_NAME].astype(np.float32)}
        manifest["reference"] = {"inputs": "reference/inputs.npy", "outputs": "reference/outputs.npy",
                                 "count": int(len(ref_outputs)), **ref}
    if memory_note:
        manifest["memory_note"] = memory_note
    if target.note:
        manifest["target_note"] = target.note
    files = {"model.onnx": model_bytes, "reference/outputs.npy": _npy(ref_outputs.astype(np.float32)),
             **{k: _npy(a) for k, a in ref_files.items()}}
    path = write_bundle(out, files, manifest, tarball=o.tarball)
    _say(o, f"wrote {path}" + (f" and {path}.tar.gz" if o.tarball else ""))
    return path, manifest
