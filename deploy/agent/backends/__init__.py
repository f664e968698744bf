"""The agent's backends: the registry, ONNX Runtime and TensorRT (each module registers its backend when imported)."""

from . import ort, trt
from .registry import BACKENDS, Backend, backend_choices, choose_backend, get_backend, register_backend

__all__ = ["BACKENDS", "Backend", "backend_choices", "choose_backend", "get_backend", "register_backend", "ort", "trt"]
