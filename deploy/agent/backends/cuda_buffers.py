"""Device buffers and a CUDA stream for TensorRT, through pycuda or cuda-python (imported only when built)."""

import sys

from ..common import AgentError, module_available


class CudaBuffers(object):
    """Device buffers and a stream through pycuda or cuda-python, whichever is importable."""

    def __init__(self):
        self.lib = None
        self._ctx = None
        if module_available("pycuda"):
            import pycuda.driver as cuda
            cuda.init()
            self._ctx = cuda.Device(0).make_context()
            self.cuda = cuda
            self.lib = "pycuda"
            self.stream = cuda.Stream()
            self.stream_handle = self.stream.handle
            self.gpu_name = cuda.Device(0).name()
        else:
            cudart = None
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                try:
                    from cuda import cudart  # older cuda-python
                except ImportError:
                    cudart = None
            if cudart is None:
                raise AgentError("no-cuda-python", "TensorRT needs pycuda or cuda-python for buffers and neither is "
                                 "importable by %s; install pycuda (docs/deploy.md) or use --backend onnxruntime"
                                 % sys.executable)
            self.cudart = cudart
            self.lib = "cuda-python"
            self.stream = self._check(cudart.cudaStreamCreate())
            self.stream_handle = int(self.stream)
            prop = self._check(cudart.cudaGetDeviceProperties(0))
            name = prop.name
            self.gpu_name = name.decode("utf-8", "replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
        self._allocs = []

    def _check(self, result):
        err, rest = result[0], result[1:]
        if int(err) != 0:
            raise RuntimeError("CUDA error %s" % err)
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, nbytes):
        nbytes = max(int(nbytes), 1)
        if self.lib == "pycuda":
            mem = self.cuda.mem_alloc(nbytes)
            self._allocs.append(mem)
            return int(mem)
        ptr = self._check(self.cudart.cudaMalloc(nbytes))
        self._allocs.append(ptr)
        return int(ptr)

    def htod(self, ptr, host):
        if self.lib == "pycuda":
            self.cuda.memcpy_htod(ptr, host)
        else:
            self._check(self.cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def dtoh(self, host, ptr):
        if self.lib == "pycuda":
            self.cuda.memcpy_dtoh(host, ptr)
        else:
            self._check(self.cudart.cudaMemcpy(host.ctypes.data, ptr, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def sync(self):
        if self.lib == "pycuda":
            self.stream.synchronize()
        else:
            self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self):
        if self.lib == "pycuda":
            for mem in self._allocs:
                mem.free()
            if self._ctx is not None:
                self._ctx.pop()
        else:
            for ptr in self._allocs:
                self.cudart.cudaFree(ptr)
        self._allocs = []
