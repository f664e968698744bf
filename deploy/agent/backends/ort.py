"""The ONNX Runtime backend: the model as exported, on CPU (CUDA when onnxruntime has it); imported lazily."""

from ..bundle import bundle_inputs, onnx_path
from ..common import AgentError, module_available
from .registry import Backend, register_backend


@register_backend("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU (CUDA when present), with the memory arena and pattern off so RSS follows real allocations."""

    auto_rank = 10

    @classmethod
    def available(cls):
        return module_available("onnxruntime")

    def load(self):
        import onnxruntime as ort
        precision = self.args.precision
        bundle_precision = self.manifest.get("precision", "fp32")
        if precision not in ("auto", bundle_precision):
            raise AgentError("refused", "the onnxruntime backend runs the model as exported (%s); --precision %s needs "
                             "--backend tensorrt, or deploy the %s bundle" % (bundle_precision, precision, precision))
        self.precision = bundle_precision
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        graph_opt = getattr(self.args, "point_opt", None)  # a slope point sets it; otherwise ORT's default (all)
        if graph_opt == "off":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif graph_opt == "on":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.args.threads:
            so.intra_op_num_threads = self.args.threads
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if self.args.ort_device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"]
        elif self.args.ort_device == "cuda":
            raise AgentError("refused", "onnxruntime here has no CUDAExecutionProvider (has %s); use --ort-device cpu "
                             "or install onnxruntime-gpu" % ", ".join(available))
        self.sess = ort.InferenceSession(onnx_path(self.bundle_dir, self.manifest), sess_options=so, providers=providers)
        self.input_names = [i.name for i in self.sess.get_inputs()]
        want = [i["name"] for i in bundle_inputs(self.manifest)]
        if sorted(self.input_names) != sorted(want):
            raise AgentError("bad-bundle", "model.onnx takes inputs %s but the manifest lists %s; re-export the bundle"
                             % (", ".join(self.input_names), ", ".join(want)))
        self.output_name = self.sess.get_outputs()[0].name
        self.info = {"name": "onnxruntime", "version": ort.__version__, "providers": self.sess.get_providers(),
                     "precision": self.precision, "cpu_mem_arena": False, "mem_pattern": False,
                     "graph_optimization": str(so.graph_optimization_level).split(".")[-1]}

    def infer(self, feeds):
        return self.sess.run([self.output_name], dict(feeds))[0]

    def bench(self, feeds):
        feed, out, run = dict(feeds), [self.output_name], self.sess.run
        return lambda: run(out, feed)

    def activation_memory(self):
        return None  # measured from RSS by the memory phase
