"""nova_fast: fused kernels and drop-in acceleration for NOVA.

``import nova_fast`` is light: it loads no kernel, compiles nothing and does not touch the CUDA
extension. Ops and the accelerator are imported on first attribute access.
"""
from nova_fast.backends import BackendUnavailable, backend_info, set_backend, use_backend

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily on first access)
_LAZY = {
    "group_causal_attention": "nova_fast.ops.group_causal_attention",
    "frame_groups": "nova_fast.ops.group_causal_attention",
    "random_set_groups": "nova_fast.ops.group_causal_attention",
    "attention_work": "nova_fast.ops.group_causal_attention",
    "MaskPlan": "nova_fast.ops.group_causal_attention",
    "modulate": "nova_fast.ops.modulate",
    "residual_norm": "nova_fast.ops.residual_norm",
    "denoise_tokens": "nova_fast.ops.denoise_tokens",
    "accelerate": "nova_fast.accelerator",
    "restore": "nova_fast.accelerator",
    "parallelize": "nova_fast.distributed",
    "ParallelConfig": "nova_fast.distributed",
    "ParallelGeneration": "nova_fast.distributed",
}

__all__ = ["BackendUnavailable", "backend_info", "set_backend", "use_backend", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nova_fast' has no attribute {name!r}")
