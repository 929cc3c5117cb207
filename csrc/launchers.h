// launchers.h: the extern "C" launchers of csrc/*.cu, as seen by bindings.cpp (torch glue).
// Each takes raw pointers, sizes, a NovaDType code and a cudaStream_t (void*), and returns a
// cudaError_t as int. Every op appends its launchers here.
#pragma once
#include <cstdint>

enum NovaDType : int { NOVA_F32 = 0, NOVA_F16 = 1, NOVA_BF16 = 2 };

extern "C" {
// denoise_step.cu: fused guidance + scheduler step (guide: 0 none, 1 cfg, 2 image, 3 stg).
int denoise_guided_step(const void* out, const void* x, const void* noise, void* new_x, const float* coef,
                        const float* scales, int step, int num_groups, int group_len, int group_stride, int guide,
                        int renorm, int dtype, void* stream);
// The same with a workspace of denoise_step_workspace_floats(...) fp32 (null when that is 0): long
// renorm groups are then split over blocks. denoise_step_launch_plan fills the launches' kind, grid.x
// and threads (at most 2) without launching and returns their number.
int denoise_guided_step_ws(const void* out, const void* x, const void* noise, void* new_x, const float* coef,
                           const float* scales, float* workspace, int step, int num_groups, int group_len,
                           int group_stride, int guide, int renorm, int dtype, void* stream);
int denoise_step_workspace_floats(int num_groups, int group_len, int renorm);
int denoise_step_launch_plan(int num_groups, int group_len, int renorm, int has_workspace, int* kind,
                             long long* grid, int* threads);
// adaln.cu: modulate (LN(x) or x) * (1 + scale) + shift and residual_norm x + gate * (LN(y) * w + b).
// Strides are (per sample, per token) in elements (0: broadcast); outputs/gradients contiguous (B, L, D).
// Backward: workspace is fp32 (B, chunks, 2 | 3, D); mean/rstd fp32 (B, L); gate/dgate may be null.
int nova_modulate_fwd(const void* x, long long x_sb, long long x_sl, const void* scale, long long sc_sb,
                      long long sc_sl, const void* shift, long long sh_sb, long long sh_sl, void* out, float* mean,
                      float* rstd, int B, int L, int D, int normalize, float eps, int dtype, void* stream);
int nova_modulate_bwd(const void* dout, const void* x, long long x_sb, long long x_sl, const void* scale,
                      long long sc_sb, long long sc_sl, const float* mean, const float* rstd, void* dx, void* dscale,
                      void* dshift, float* workspace, int chunks, int B, int L, int D, int normalize, int per_token,
                      int dtype, void* stream);
int nova_residual_norm_fwd(const void* x, long long x_sb, long long x_sl, const void* y, long long y_sb,
                           long long y_sl, const void* weight, const void* bias, const void* gate, long long g_sb,
                           long long g_sl, void* out, long long o_sb, long long o_sl, float* mean, float* rstd, int B,
                           int L, int D, float eps, int dtype, void* stream);
int nova_residual_norm_bwd(const void* dout, const void* y, long long y_sb, long long y_sl, const void* weight,
                           const void* bias, const void* gate, long long g_sb, long long g_sl, const float* mean,
                           const float* rstd, void* dy, void* dweight, void* dbias, void* dgate, float* workspace,
                           int chunks, int B, int L, int D, int gate_per_token, int dtype, void* stream);
// The grid (x, y, z) of an adaLN launch and its threads per row, computed as the launchers do, without
// launching: kernel 0 a forward, 1 a backward (B, chunks), 2 the partial sums (B groups). Returns
// cudaErrorInvalidConfiguration where the launcher would refuse (past CUDA's grid limits).
int nova_adaln_launch_grid(int kernel, long long B, long long L, int D, int chunks, int vectorized, long long* grid,
                           int* threads_per_row);
}
