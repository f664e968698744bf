"""Deployment targets: the runtime a bundle is for, the precision it is exported in, and what that runtime parses.

The target is the one switch of ``redistill export``: ``--target orin-int8`` says TensorRT on Orin, INT8.
Adding a target is one ``add_target(Target(...))``; the export CLI's choices, help and checks read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, FrozenSet, List, Optional

from deploy.agent.backends import BACKENDS
from redistill.errors import UserError
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


#: the precisions a bundle can be exported in (INT8: Q/DQ post-training quantization)
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class Target:
    """A runtime and precision: what the exported graph may contain and how the device should run it."""

    name: str
    backend: str  # the device agent's backend that runs the bundle (deploy/agent/backends), e.g. tensorrt
    runtime: str  # the runtime's name and version, for messages and the manifest
    precision: str  # fp32 | int8: what the bundle is exported in
    max_opset: int
    max_ir_version: int
    #: None: any operator the verifying runtime (ONNX Runtime) runs
    allowed_ops: Optional[FrozenSet[str]]
    ops_source: str
    note: str = ""
    #: precisions this runtime cannot run, with why and what to do instead; ``NAME-PRECISION`` is refused with it
    refused: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"target {self.name!r}: precision must be one of {PRECISIONS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"target {self.name!r}: backend must be one of the agent's {sorted(BACKENDS)}")

    def summary(self) -> str:
        """One line for the CLI help: runtime, precision, opset limit and refusals."""
        refused = "".join(f"; no {p}" for p in sorted(self.refused))
        return f"{self.name}: {self.runtime}, {self.precision}, opset <= {self.max_opset}{refused}"


TARGETS: Registry[Target] = Registry("export target")


def add_target(target: Target) -> Target:
    """Register ``target`` under its name."""
    return TARGETS.register(target.name)(target)


def get_target(name: str) -> Target:
    """The target ``name``; ``NAME-PRECISION`` that NAME's runtime cannot run is refused with the reason."""
    base, _, precision = name.rpartition("-")
    if name not in TARGETS and base in TARGETS and precision in TARGETS.get(base).refused:
        raise UserError(f"--target {name} is refused: {TARGETS.get(base).refused[precision]}")
    return TARGETS.get(name)


def targets_with(precision: str) -> List[str]:
    """Names of the targets exporting ``precision``, for messages that point to one."""
    return [t.name for t in TARGETS.values() if t.precision == precision]


# IR 7 is what ONNX 1.8 writes (opset 13), the ONNX release TensorRT 8.2's parser is built against
add_target(Target(
    "tx2", "tensorrt", "TensorRT 8.2 (JetPack 4.6)", "fp32", 13, 7, TRT82_OPS, TRT82_SOURCE,
    refused={"int8": "the Jetson TX2 GPU (sm_62) has no INT8 and TensorRT 8.2 cannot build networks with Q/DQ layers "
             "there: export FP32 (--target tx2) and build an FP16 engine on the device, or use --target cpu-int8 "
             "for an INT8 bundle run by ONNX Runtime's CPU backend"}))
# Held to TensorRT 8.2's operator list too, so that one FP32 bundle also builds on a TX2.
ORIN = add_target(Target("orin", "tensorrt", "TensorRT 10 (JetPack 6)", "fp32", 13, 7, TRT82_OPS, TRT82_SOURCE))
add_target(replace(ORIN, name="orin-int8", precision="int8",
                   note="Q/DQ with zero point 0 (explicit quantization); build the engine with the INT8 flag"))
CPU = add_target(Target("cpu", "onnxruntime", "ONNX Runtime CPU", "fp32", 17, 10, None,
                        "onnxruntime (any operator it runs)"))
add_target(replace(CPU, name="cpu-int8", precision="int8"))
