"""FAKES of the TensorRT 8.2 / 10.x Python API surfaces and of pycuda, for unit-testing the agent's version handling.

Each fake exposes only the attributes its real version has (8.2: ``max_workspace_size``,
``build_engine``, bindings API, ``execute_v2``, ``device_memory_size``; 10.x:
``set_memory_pool_limit``, tensor-name API, ``execute_async_v3``, ``device_memory_size_v2``,
no ``build_engine``) and records every call. The "engine" runs the ONNX model with
onnxruntime so buffers and shapes are exercised. Models with several inputs (a denoiser's x, t) are
supported; the fake engine lists their bindings in REVERSED ONNX order, so that an agent that binds
by position instead of by name feeds the wrong buffers. The engine's device memory grows with the largest batch
of its optimisation profiles (``device_memory(base, batch)``), as a real engine's is sized for it. Passing tests
here do NOT verify TensorRT.
"""

import re
import types

import numpy as np

#: device memory of a FAKE engine: base (12345 on 8.2, 23456 on 10.x) + this per image beyond the first
FAKE_BYTES_PER_IMAGE = 1000


def device_memory(base, max_batch):
    return base + FAKE_BYTES_PER_IMAGE * (max_batch - 1)


class _Enum:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return self.name


def make_fake_pycuda(calls, gpu_name="NVIDIA Tegra X2"):
    """A fake ``pycuda`` package: device memory is a dict of numpy byte arrays keyed by fake pointers."""
    memory = {}
    driver = types.ModuleType("pycuda.driver")
    counter = [0x1000]

    class Alloc:
        def __init__(self, n):
            counter[0] += 0x10000
            self.ptr = counter[0]
            memory[self.ptr] = np.zeros(n, np.uint8)

        def __int__(self):
            return self.ptr

        def free(self):
            memory.pop(self.ptr, None)

    class Device:
        def __init__(self, i):
            self.i = i

        def name(self):
            return gpu_name

        def make_context(self):
            calls.append("pycuda.make_context")
            return types.SimpleNamespace(pop=lambda: calls.append("pycuda.ctx.pop"))

    class Stream:
        handle = 0xABC

        def synchronize(self):
            calls.append("stream.synchronize")

    def memcpy_htod(ptr, host):
        memory[int(ptr)][:host.nbytes] = np.frombuffer(np.ascontiguousarray(host).tobytes(), np.uint8)

    def memcpy_dtoh(host, ptr):
        host.view(np.uint8).reshape(-1)[:] = memory[int(ptr)][:host.nbytes]

    driver.init = lambda: calls.append("pycuda.init")
    driver.Device, driver.Stream, driver.mem_alloc = Device, Stream, Alloc
    driver.memcpy_htod, driver.memcpy_dtoh = memcpy_htod, memcpy_dtoh
    pkg = types.ModuleType("pycuda")
    pkg.__path__ = []
    pkg.driver = driver
    return pkg, driver, memory


def make_fake_tensorrt(version, calls, memory, fast_int8=False, fast_fp16=True):
    """A fake ``tensorrt`` module with the API surface of ``version`` ("8.2.1.8" or "10.3.0")."""
    v10 = int(version.split(".")[0]) >= 10
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, sev=2: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=_Enum("EXPLICIT_BATCH", 0))
    trt.BuilderFlag = types.SimpleNamespace(FP16=_Enum("FP16", 0), INT8=_Enum("INT8", 1))
    trt.DataType = types.SimpleNamespace(FLOAT=_Enum("FLOAT", 0), INT32=_Enum("INT32", 3))
    trt.nptype = lambda dt: {"FLOAT": np.float32, "INT32": np.int32}[dt.name]
    ort_types = {"tensor(float)": trt.DataType.FLOAT, "tensor(int32)": trt.DataType.INT32}
    if v10:
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=_Enum("WORKSPACE", 0))
        trt.TensorIOMode = types.SimpleNamespace(INPUT=_Enum("INPUT", 1), OUTPUT=_Enum("OUTPUT", 2))

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.onnx = None

        def _inputs(self):
            import onnx
            m = onnx.load_from_string(self.onnx)
            inits = {t.name for t in m.graph.initializer}
            return [i for i in m.graph.input if i.name not in inits]

        @property
        def num_inputs(self):
            return len(self._inputs())

        def get_input(self, i):
            inp = self._inputs()[i]
            dims = tuple(d.dim_value if d.dim_value else -1 for d in inp.type.tensor_type.shape.dim)
            return Tensor(inp.name, dims)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse(self, data):
            calls.append("parser.parse")
            self.network.onnx = data
            return True

        def get_error(self, i):
            return "no error"

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"FAKE-TIMING-CACHE"

    class ConfigBase:
        def __init__(self):
            self.flags = []
            self.profiles = []
            self._timing = None

        def set_flag(self, flag):
            calls.append("config.set_flag(%r)" % flag)
            self.flags.append(flag.name)

        def add_optimization_profile(self, p):
            calls.append("config.add_optimization_profile")
            self.profiles.append(p)

        def create_timing_cache(self, blob):
            calls.append("config.create_timing_cache(%d bytes)" % len(blob))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self._timing = cache

        def get_timing_cache(self):
            return self._timing

    if v10:
        class Config(ConfigBase):
            __slots__ = ()

            def set_memory_pool_limit(self, pool, size):
                calls.append("config.set_memory_pool_limit(%r, %d)" % (pool, size))

        class _NoWorkspace(Config):
            def __setattr__(self, k, v):
                if k == "max_workspace_size":
                    raise AttributeError("'IBuilderConfig' object has no attribute 'max_workspace_size' (TensorRT 10)")
                object.__setattr__(self, k, v)
        Config = _NoWorkspace
    else:
        class Config(ConfigBase):
            def __setattr__(self, k, v):
                if k == "max_workspace_size":
                    calls.append("config.max_workspace_size=%d" % v)
                object.__setattr__(self, k, v)

    class Profile:
        def __init__(self):
            self.max_batch = 1

        def set_shape(self, name, lo, opt, hi):
            calls.append("profile.set_shape(%s, %s, %s, %s)" % (name, lo, opt, hi))
            self.max_batch = max(self.max_batch, hi[0])

    class Builder:
        platform_has_fast_int8 = fast_int8
        platform_has_fast_fp16 = fast_fp16

        def __init__(self, logger):
            calls.append("Builder")

        def create_network(self, flags=0):
            calls.append("builder.create_network(flags=%d)" % flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append("builder.build_serialized_network")
            max_batch = max([p.max_batch for p in config.profiles] or [1])
            return (b"FAKE-TRT-ENGINE:" + ",".join(config.flags).encode() + b";max_batch=%d;profiles=%d\n"
                    % (max_batch, len(config.profiles)) + network.onnx)

    if not v10:
        def build_engine(self, network, config):
            calls.append("builder.build_engine")
            raise AssertionError("build_engine is deprecated; the agent must use build_serialized_network")
        Builder.build_engine = build_engine

    def ort_session(blob):
        import onnxruntime as ort
        return ort.InferenceSession(blob.split(b"\n", 1)[1], providers=["CPUExecutionProvider"])

    class Engine:
        def __init__(self, blob):
            header = blob.split(b"\n", 1)[0].decode()
            self.max_batch = int(re.search(r"max_batch=(\d+)", header).group(1))
            self.num_optimization_profiles = int(re.search(r"profiles=(\d+)", header).group(1))
            self.sess = ort_session(blob)
            ins = self.sess.get_inputs()
            self.inputs = [i.name for i in ins][::-1]  # reversed: the agent must bind by name
            self.output = self.sess.get_outputs()[0]
            self.names = self.inputs + [self.output.name]
            self.dtypes = dict((i.name, ort_types[i.type]) for i in ins)
            self.dtypes[self.output.name] = trt.DataType.FLOAT

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.in_shapes = {}
            self.addresses = {}

        def _out_shape(self):
            batch = next(iter(self.in_shapes.values()))[0]
            return tuple(d if isinstance(d, int) else batch for d in self.engine.output.shape)

        def _shape(self, name):
            return self.in_shapes[name] if name in self.engine.inputs else self._out_shape()

        def _run(self, ptrs):
            feed = {}
            for name in self.engine.inputs:
                dt = np.dtype(trt.nptype(self.engine.dtypes[name]))
                shape = self.in_shapes[name]
                n = int(np.prod(shape)) * dt.itemsize
                feed[name] = memory[ptrs[name]][:n].view(dt).reshape(shape)
            y = self.engine.sess.run(None, feed)[0].astype(np.float32)
            memory[ptrs[self.engine.output.name]][:y.nbytes] = np.frombuffer(y.tobytes(), np.uint8)

    if v10:
        class Engine10(Engine):
            device_memory_size = 999  # deprecated in 10; the agent must prefer _v2

            @property
            def device_memory_size_v2(self):
                return device_memory(23456, self.max_batch)

            @property
            def num_io_tensors(self):
                return len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return self.dtypes[name]

        class Context10(Context):
            def set_input_shape(self, name, shape):
                calls.append("context.set_input_shape(%s, %s)" % (name, tuple(shape)))
                self.in_shapes[name] = tuple(shape)

            def get_tensor_shape(self, name):
                return self._shape(name)

            def set_tensor_address(self, name, ptr):
                calls.append("context.set_tensor_address(%s)" % name)
                self.addresses[name] = ptr

            def execute_async_v3(self, stream):
                calls.append("context.execute_async_v3")
                self._run(self.addresses)
                return True

        EngineCls, Context = Engine10, Context10
    else:
        class Engine82(Engine):
            @property
            def device_memory_size(self):
                return device_memory(12345, self.max_batch)

            @property
            def num_bindings(self):
                return len(self.names)

            def get_binding_name(self, i):
                return self.names[i]

            def binding_is_input(self, i):
                return self.names[i] in self.inputs

            def get_binding_dtype(self, i):
                return self.dtypes[self.names[i]]

        class Context82(Context):
            def set_binding_shape(self, i, shape):
                calls.append("context.set_binding_shape(%d=%s, %s)" % (i, self.engine.names[i], tuple(shape)))
                self.in_shapes[self.engine.names[i]] = tuple(shape)

            def get_binding_shape(self, i):
                return self._shape(self.engine.names[i])

            def execute_v2(self, bindings):
                calls.append("context.execute_v2")
                self._run(dict(zip(self.engine.names, bindings)))
                return True

        EngineCls, Context = Engine82, Context82

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls.append("runtime.deserialize_cuda_engine")
            return EngineCls(bytes(blob))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt
