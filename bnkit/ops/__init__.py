"""Kernels: normalize + affine (+ activation), forward and backward. The torch path lives here;
GPU kernels (Triton) are imported lazily so CPU users never need Triton."""
from .activations import ACTIVATIONS, activation_module, apply_activation, check_activation, check_memory_efficient, resolve_activation
from .torch_ops import eval_scale_shift, is_exporting, normalize, normalize_running

__all__ = ["ACTIVATIONS", "activation_module", "apply_activation", "check_activation", "check_memory_efficient", "resolve_activation",
           "eval_scale_shift", "is_exporting", "normalize", "normalize_running"]
