"""The TensorRT backend: an engine built on the device from the bundle's ONNX file, cached, run on CUDA buffers.

``tensorrt`` (and pycuda or cuda-python) are imported only when this backend loads a model.
"""

import datetime
import hashlib
import json
import os
import re
import time

import numpy as np

from ..bundle import input_batch_is_dynamic, is_qdq_onnx, onnx_path
from ..common import AgentError, atomic_write_bytes, log, module_available
from .cuda_buffers import CudaBuffers
from .registry import Backend, register_backend


def slug(text):
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower() or "unknown"


@register_backend("tensorrt")
class TensorRTBackend(Backend):
    """TensorRT 8.2 (JetPack 4.6) and 10.x (JetPack 6): engine built on the device from the ONNX file and cached.

    API differences are detected from the objects themselves (``set_memory_pool_limit`` vs
    ``max_workspace_size``, ``num_io_tensors`` vs ``num_bindings``, ``device_memory_size_v2``
    vs ``device_memory_size``), so 8.4-8.6 take whichever path they support.
    """

    auto_rank = 0

    @classmethod
    def available(cls):
        return module_available("tensorrt") and (module_available("pycuda") or module_available("cuda"))

    def load(self):
        import tensorrt as trt
        self.trt = trt
        self.trt_version = str(getattr(trt, "__version__", "unknown"))
        self.major = int(re.match(r"(\d+)", self.trt_version).group(1)) if re.match(r"\d+", self.trt_version) else 0
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.cuda = CudaBuffers()
        self.gpu_name = self.cuda.gpu_name
        self.precision = self.resolve_precision()
        self.point_batch = getattr(self.args, "point_batch", None)  # a slope point: one profile at this batch
        key = "%s-trt%s-%s-%s" % (self.bundle_id[:16], slug(self.trt_version), slug(self.gpu_name), self.precision)
        if self.point_batch:
            key += "-b%d" % self.point_batch
        cache_dir = self.args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.bundle_dir)), "engines")
        self.engine_path = os.path.join(cache_dir, key + ".engine")
        self.sidecar_path = os.path.join(cache_dir, key + ".json")
        self.timing_cache_path = os.path.join(cache_dir, key + ".timing-cache")
        cached = self.load_cached_engine()
        if cached is None:
            serialized, build_s = self.build_engine()
            data = bytes(serialized)
            atomic_write_bytes(self.engine_path, data)
            meta = {"bundle_id": self.bundle_id, "tensorrt": self.trt_version, "gpu": self.gpu_name,
                    "precision": self.precision, "engine_sha256": hashlib.sha256(data).hexdigest(),
                    "engine_bytes": len(data), "build_seconds": round(build_s, 3),
                    "workspace_bytes": self.args.workspace_mb * 1024 * 1024,
                    "created": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")}
            atomic_write_bytes(self.sidecar_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
            engine_cache = {"hit": False, "build_seconds": round(build_s, 3)}
        else:
            data, meta = cached
            engine_cache = {"hit": True, "built": meta.get("created")}
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize %s" % self.engine_path)
        self.context = self.engine.create_execution_context()
        self.v3 = hasattr(self.engine, "num_io_tensors")
        self.io = self.describe_io()
        engine_cache.update({"path": self.engine_path, "sidecar": self.sidecar_path, "key": key, "engine_bytes": len(data)})
        self.info = {"name": "tensorrt", "version": self.trt_version, "gpu": self.gpu_name, "precision": self.precision,
                     "cuda_buffers": self.cuda.lib, "api": "execute_async_v3" if self.v3 else "execute_v2",
                     "engine_cache": engine_cache}
        self._shape = None

    def resolve_precision(self):
        bundle_precision = self.manifest.get("precision", "fp32")
        precision = self.args.precision
        if precision == "auto":
            precision = "int8" if bundle_precision == "int8" else "fp32"
        self.qdq = is_qdq_onnx(onnx_path(self.bundle_dir, self.manifest))
        if self.qdq and precision != "int8":
            raise AgentError("refused", "this bundle is Q/DQ-quantized (INT8) and TensorRT builds Q/DQ networks only as "
                             "INT8; use --precision int8 on a GPU with fast INT8, or deploy the fp32 bundle")
        return precision

    def _builder_flags(self, builder, config):
        trt = self.trt
        if self.precision == "fp16":
            if not getattr(builder, "platform_has_fast_fp16", True):
                log("warning: platform_has_fast_fp16 is False; FP16 will not be faster than FP32 here")
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "int8":
            fast_int8 = getattr(builder, "platform_has_fast_int8", None)
            if fast_int8 is None:
                fast_int8 = self.major >= 10  # the attribute is deprecated there; INT8-capable GPUs are the norm
            if not fast_int8:
                raise AgentError("refused", "INT8 refused: TensorRT reports platform_has_fast_int8 = False for %s (the "
                                 "Jetson TX2 has no INT8 and cannot build Q/DQ networks); deploy the fp32 bundle with "
                                 "--precision fp16 instead" % self.gpu_name)
            if not self.qdq:
                raise AgentError("refused", "INT8 refused: the bundle is not Q/DQ-quantized (no QuantizeLinear/"
                                 "DequantizeLinear nodes) and this agent does no calibration; export with "
                                 "an INT8 target (`redistill export --target orin-int8`) and deploy that bundle")
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)

    def build_engine(self):
        trt = self.trt
        t0 = time.perf_counter()
        log("building TensorRT %s engine (%s) for %s; this can take minutes on a TX2"
            % (self.trt_version, self.precision, self.gpu_name))
        builder = trt.Builder(self.logger)
        flags = 0
        if self.major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        with open(onnx_path(self.bundle_dir, self.manifest), "rb") as f:
            if not parser.parse(f.read()):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise AgentError("refused", "TensorRT %s cannot parse the ONNX model: %s; re-export with opset 13 "
                                 "(docs/deploy.md)" % (self.trt_version, errors))
        config = builder.create_builder_config()
        workspace = self.args.workspace_mb * 1024 * 1024
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        else:
            config.max_workspace_size = workspace
        self._builder_flags(builder, config)
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        if any(d < 0 for inp in inputs for d in tuple(inp.shape)):
            lo, opt, hi = self.profile_batches()
            profile = builder.create_optimization_profile()
            for inp in inputs:  # one profile covers every input: the batch axis is shared
                fixed = tuple(tuple(inp.shape)[1:])
                profile.set_shape(inp.name, (lo,) + fixed, (opt,) + fixed, (hi,) + fixed)
            config.add_optimization_profile(profile)
        timing = None
        if hasattr(config, "create_timing_cache"):
            blob = b""
            if os.path.isfile(self.timing_cache_path):
                with open(self.timing_cache_path, "rb") as f:
                    blob = f.read()
            timing = config.create_timing_cache(blob)
            config.set_timing_cache(timing, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise AgentError("refused", "TensorRT %s failed to build the engine (see its log above); try --precision fp32 "
                             "or a larger --workspace-mb" % self.trt_version)
        if timing is not None:
            atomic_write_bytes(self.timing_cache_path, bytes(config.get_timing_cache().serialize()))
        return serialized, time.perf_counter() - t0

    def profile_batches(self):
        """(min, opt, max) batch of the optimisation profile of a dynamic-batch bundle: a slope point's batch, else
        1, --batch and the reference count (the output check runs every reference sample at once)."""
        if self.point_batch:
            return self.point_batch, self.point_batch, self.point_batch
        n = self.args.batch
        return 1, n, max(n, int((self.manifest.get("reference") or {}).get("count") or n))

    def load_cached_engine(self):
        if not (os.path.isfile(self.engine_path) and os.path.isfile(self.sidecar_path)):
            return None
        with open(self.sidecar_path) as f:
            meta = json.load(f)
        with open(self.engine_path, "rb") as f:
            data = f.read()
        if (meta.get("engine_sha256") != hashlib.sha256(data).hexdigest() or meta.get("bundle_id") != self.bundle_id
                or meta.get("tensorrt") != self.trt_version or meta.get("precision") != self.precision):
            log("cached engine %s does not match its sidecar; rebuilding" % self.engine_path)
            return None
        log("using cached engine %s" % self.engine_path)
        return data, meta

    def describe_io(self):
        trt, e = self.trt, self.engine
        io = []
        if self.v3:
            for i in range(e.num_io_tensors):
                name = e.get_tensor_name(i)
                io.append({"name": name, "input": e.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                           "dtype": np.dtype(trt.nptype(e.get_tensor_dtype(name))), "index": i})
        else:
            for i in range(e.num_bindings):
                io.append({"name": e.get_binding_name(i), "input": bool(e.binding_is_input(i)),
                           "dtype": np.dtype(trt.nptype(e.get_binding_dtype(i))), "index": i})
        return io

    def _prepare(self, shapes):
        """Set every input's shape (by name), allocate device buffers for them and bind them (once per shapes)."""
        key = tuple(sorted(shapes.items()))
        if self._shape == key:
            return
        ctx = self.context
        missing = [t["name"] for t in self.io if t["input"] and t["name"] not in shapes]
        if missing:
            raise AgentError("bad-bundle", "the engine takes input(s) %s that the bundle does not feed; re-export the "
                             "bundle" % ", ".join(missing))
        for t in self.io:
            if t["input"]:
                if self.v3:
                    ctx.set_input_shape(t["name"], shapes[t["name"]])
                else:
                    ctx.set_binding_shape(t["index"], shapes[t["name"]])
        for t in self.io:
            tshape = tuple(ctx.get_tensor_shape(t["name"])) if self.v3 else tuple(ctx.get_binding_shape(t["index"]))
            t["shape"] = tshape
            t["host"] = np.empty(tshape, dtype=t["dtype"])
            t["ptr"] = self.cuda.alloc(t["host"].nbytes)
            if self.v3:
                ctx.set_tensor_address(t["name"], t["ptr"])
        self.bindings = [t["ptr"] for t in sorted(self.io, key=lambda t: t["index"])]
        self._shape = key

    def _execute(self):
        if self.v3:
            self.context.execute_async_v3(self.cuda.stream_handle)
            self.cuda.sync()
        else:
            self.context.execute_v2(self.bindings)

    def infer(self, feeds):
        self._prepare(dict((name, tuple(np.shape(a))) for name, a in feeds.items()))
        for t in self.io:
            if t["input"]:  # bound by name: the engine's binding order need not be the ONNX input order
                self.cuda.htod(t["ptr"], np.ascontiguousarray(np.asarray(feeds[t["name"]]).astype(t["dtype"], copy=False)))
        self._execute()
        outs = [t for t in self.io if not t["input"]]
        for t in outs:
            self.cuda.dtoh(t["host"], t["ptr"])
        return outs[0]["host"].astype(np.float32).copy()

    def bench(self, feeds):
        self.infer(feeds)  # binds buffers and uploads the inputs once; timing covers execution only
        return self._execute

    def activation_memory(self):
        e = self.engine
        if hasattr(e, "device_memory_size_v2"):
            value, attr = e.device_memory_size_v2, "device_memory_size_v2"
        else:
            value, attr = e.device_memory_size, "device_memory_size"
        batch = self.profile_batches()[2] if input_batch_is_dynamic(self.manifest) else 1
        return {"method": "tensorrt_device_memory", "label": "TensorRT device memory (batch %d)" % batch,
                "per_image": False, "batch": batch, "bytes": int(value), "attr": attr,
                "what": "device memory TensorRT reserves for the engine's activations and scratch at its largest "
                        "profile batch (%d; shared with system RAM on a Jetson)" % batch,
                "how": "ICudaEngine.%s (TensorRT %s)" % (attr, self.trt_version),
                "quantum_bytes": 1, "resolution_bytes": 1,
                "resolution_how": "exact: the size TensorRT allocates for a context; a reservation (activations and "
                                  "the scratch of the tactics it chose), not a measured use"}

    def close(self):
        for attr in ("context", "engine"):
            if hasattr(self, attr):
                delattr(self, attr)
        if hasattr(self, "cuda"):
            self.cuda.close()
