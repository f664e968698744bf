"""Deployment targets: which opsets, operators and precisions each runtime accepts.

Adding a target is one decorated function returning a ``Target``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional

from redistill.registry import Registry

#: TensorRT 8.2's ONNX parser. Source: onnx/onnx-tensorrt, branch release/8.2-GA, docs/operators.md
#: ("TensorRT 8.2 supports operators up to Opset 13"), every operator marked Y. Transcribed from the
#: release/8.4-GA table with the operators its Changelog lists as new in 8.4 removed (Xor, Shrink),
#: and with NonMaxSuppression left out (marked experimental). Missing here on purpose, because 8.2
#: marks them N: Mod, NonZero, Reciprocal, RoiAlign, Trilu, HardSwish (opset 14), Hardmax, IsInf,
#: MeanVarianceNormalization, RandomNormal*, QLinearConv, ConvInteger, DynamicQuantizeLinear, ...
TRT82_OPS: FrozenSet[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean Min Mul Neg Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomUniform
RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where
""".split())
TRT82_SOURCE = "onnx/onnx-tensorrt release/8.2-GA docs/operators.md (TensorRT 8.2 supports operators up to Opset 13)"


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str
    max_opset: int
    max_ir_version: int
    #: None: any operator the verifying runtime (ONNX Runtime) runs
    allowed_ops: Optional[FrozenSet[str]]
    ops_source: str
    int8: bool
    #: why INT8 is refused, with what to do instead
    int8_refusal: str = ""
    note: str = ""


TARGETS: Registry = Registry("export target")


@TARGETS.register("tx2")
def tx2() -> Target:
    # IR 7 is what ONNX 1.8 writes (opset 13), the ONNX release TensorRT 8.2's parser is built against
    return Target("tx2", "TensorRT 8.2 (JetPack 4.6)", 13, 7, TRT82_OPS, TRT82_SOURCE, int8=False,
                  int8_refusal="the Jetson TX2 GPU (sm_62) has no INT8 and TensorRT 8.2 cannot build networks with "
                  "Q/DQ layers there: export FP32 and build an FP16 engine on the device, or use --target cpu "
                  "for an INT8 bundle run by ONNX Runtime's CPU backend")


@TARGETS.register("orin")
def orin() -> Target:
    # Held to TensorRT 8.2's operator list too, so that one FP32 bundle also builds on a TX2.
    return Target("orin", "TensorRT 10 (JetPack 6)", 13, 7, TRT82_OPS, TRT82_SOURCE, int8=True,
                  note="Q/DQ with zero point 0 (explicit quantization); build the engine with the INT8 flag")


@TARGETS.register("cpu")
def cpu() -> Target:
    return Target("cpu", "ONNX Runtime CPU", 17, 10, None, "onnxruntime (any operator it runs)", int8=True)


def get_target(name: str) -> Target:
    return TARGETS.get(name)()
