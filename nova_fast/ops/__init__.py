"""Public fused ops: argument checks, backend dispatch, autograd and torch.library registration.

One op per module (``modulate``, ``residual_norm``, ``group_causal_attention``, ``denoise_tokens``);
kernels live in ``nova_fast.kernels`` (Triton) and ``nova_fast._C`` (CUDA C++).
"""
