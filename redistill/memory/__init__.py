"""Theoretical peak activation memory of ONNX graphs: the analysis every stage uses (no torch import).

``analysis`` holds the liveness walk, the in-place variant and the paper's layer-wise estimate;
``plot`` draws live memory over the execution order. Building networks by name is ``train.design``.
"""

from redistill.memory.analysis import (DEFINITION, DTYPES, INPLACE_RULES, LAYER_OPS, MemoryReport, NodeRow,
                                       TensorInfo, analyze_onnx, fmt_bytes, manifest_entry)

__all__ = ["DEFINITION", "DTYPES", "INPLACE_RULES", "LAYER_OPS", "MemoryReport", "NodeRow", "TensorInfo",
           "analyze_onnx", "fmt_bytes", "manifest_entry"]
