"""Triton kernels of nova_fast, one op family per module (installed as ``nova_fast.kernels``).

Each module holds ``@triton.jit`` kernels and their launchers only; argument checks, dispatch and
autograd live in ``nova_fast.ops``. Each module also lists ``AOT_SPECS``: the signatures its kernels
are compiled for ahead of time in tests (sm_80 and sm_90, no GPU needed).
"""
