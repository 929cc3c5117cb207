"""Verification tools for kernels on a machine without a GPU.

- ``cuda_host``: build ``csrc/*.cu`` for the CPU with the SIMT harness and call their C launchers;
  compile them with nvcc for sm_80/sm_90 and read registers and spills.
- ``triton_aot``: compile Triton kernels ahead of time for sm_80/sm_90 and read registers, spills,
  shared memory and whether the SASS uses tensor cores (HMMA / HGMMA).
"""
