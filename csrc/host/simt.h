// simt.h: run CUDA kernel sources on the host CPU, so parity tests execute them without a GPU.
//
// The kernel sources in csrc/*.cu are compiled twice: by nvcc for sm_80/sm_90, and by g++ with
// -DNOVA_SIMT_HOST, where csrc/common.cuh includes this header instead of the CUDA runtime.
//
// Model: a launch runs its blocks one after another. Each block's threads are fibers (ucontext) on
// one OS thread, scheduled cooperatively: a thread runs until it reaches a barrier
// (__syncthreads, a warp barrier inside a shuffle/vote, __syncwarp) or finishes. When every live
// thread is parked, the scheduler releases the barrier that is complete. Threads that finished
// count as arrived (as on Volta+ hardware). Because only one fiber runs at a time:
//   - `__shared__` maps to a function-local `static`: one copy, shared by the running block's
//     threads (blocks never overlap);
//   - atomics are plain read-modify-write;
//   - a barrier that can never complete (threads parked on different barriers) is a deadlock: the
//     launch stops and cudaGetLastError() reports it instead of hanging.
// Supported: dim3 grids/blocks, threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// __shfl_sync/_xor/_up/_down (width <= 32), __ballot/__any/__all_sync, __syncwarp, atomicAdd/Max/
// Min/CAS/Exch, dynamic shared memory (NOVA_DYNAMIC_SHARED in common.cuh), __half/__nv_bfloat16
// storage types with round-to-nearest-even conversion, float2/float4/uint2/uint4 vectors.
// Not modelled: memory-ordering races between threads (execution is sequential), lane masks (all
// shuffles act on the whole warp), cooperative groups, streams (launches are synchronous).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  operator uint3() const { return uint3{x, y, z}; }
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) int2 { int x, y; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorLaunchFailure = 4;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr int warpSize = 32;

// ---- 16-bit float storage types: bit-exact conversions, arithmetic through float ----
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
typedef __half half;

inline uint32_t simt_f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float simt_bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: value = man * 2^-24
    const float mag = std::ldexp(static_cast<float>(man), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return simt_bits_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
  return simt_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}
inline __half __float2half(float f) {  // round to nearest even, as __float2half_rn
  const uint32_t u = simt_f32_bits(f), sign = (u >> 16) & 0x8000u;
  const float a = std::fabs(f);
  if (std::isnan(f)) return __half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 65520.0f) return __half{static_cast<uint16_t>(sign | 0x7c00u)};
  if (a < 6.103515625e-05f) {  // subnormal half: quantize to multiples of 2^-24
    const float q = std::nearbyint(std::ldexp(a, 24));  // default rounding mode: nearest even
    return __half{static_cast<uint16_t>(sign | static_cast<uint32_t>(q))};
  }
  uint32_t mag = u & 0x7fffffffu;
  const uint32_t lsb = (mag >> 13) & 1u;
  mag += 0xfffu + lsb;  // round to nearest even on the 13 dropped bits
  const uint32_t exp = (mag >> 23) - 112, man = (mag >> 13) & 0x3ffu;
  return __half{static_cast<uint16_t>(sign | (exp << 10) | man)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return simt_bits_f32(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u = simt_f32_bits(f);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

template <class T> inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }

namespace simt {

enum class Park { running, block_barrier, warp_barrier, done };

struct Fiber {
  uint3 tid{0, 0, 0};
  ucontext_t ctx;
  char* stack = nullptr;
  Park state = Park::running;
};

struct Block {
  uint3 block_idx{0, 0, 0};
  uint3 block_dim{1, 1, 1};
  uint3 grid_dim{1, 1, 1};
  int nthreads = 0;
  int current = 0;
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> exchange;  // one slot per thread for shuffles and votes
  std::vector<unsigned char> dynamic_shared;
  std::function<void()> body;
};

constexpr size_t kStackBytes = 256 * 1024;
inline Block* g_block = nullptr;
inline cudaError_t g_last_error = cudaSuccess;
inline const char* g_last_message = "no error";
inline std::vector<char*> g_stack_pool;

inline Fiber& self() { return g_block->fibers[g_block->current]; }
inline int linear_tid() {
  const uint3 t = self().tid, d = g_block->block_dim;
  return static_cast<int>(t.x + d.x * (t.y + d.y * t.z));
}
inline int lane_id() { return linear_tid() % 32; }

inline void park(Park why) {
  asm volatile("" ::: "memory");
  Fiber& f = self();
  f.state = why;
  swapcontext(&f.ctx, &g_block->scheduler);
  asm volatile("" ::: "memory");
}

inline void fiber_entry() {
  g_block->body();
  self().state = Park::done;  // uc_link returns to the scheduler
}

// One scheduling round: run every runnable fiber until it parks. Then release the barriers that
// are complete. Returns false on deadlock.
inline bool run_block(Block& b) {
  for (;;) {
    bool any_live = false;
    for (int i = 0; i < b.nthreads; ++i) {
      if (b.fibers[i].state == Park::running) {
        b.current = i;
        swapcontext(&b.scheduler, &b.fibers[i].ctx);
      }
      any_live |= b.fibers[i].state != Park::done;
    }
    if (!any_live) return true;
    bool released = false;
    // __syncthreads completes when every unfinished thread of the block waits on it.
    bool all_block = true;
    for (auto& f : b.fibers) all_block &= (f.state == Park::block_barrier || f.state == Park::done);
    if (all_block) {
      for (auto& f : b.fibers) if (f.state == Park::block_barrier) f.state = Park::running;
      released = true;
    } else {
      // A warp barrier completes when every unfinished lane of that warp waits on it.
      for (int w = 0; w * 32 < b.nthreads; ++w) {
        const int lo = w * 32, hi = std::min(b.nthreads, lo + 32);
        bool complete = true, any = false;
        for (int i = lo; i < hi; ++i) {
          complete &= (b.fibers[i].state == Park::warp_barrier || b.fibers[i].state == Park::done);
          any |= b.fibers[i].state == Park::warp_barrier;
        }
        if (complete && any) {
          for (int i = lo; i < hi; ++i) if (b.fibers[i].state == Park::warp_barrier) b.fibers[i].state = Park::running;
          released = true;
        }
      }
    }
    if (!released) return false;
  }
}

template <class Kernel, class... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args) {
  const long long nthreads = 1LL * block.x * block.y * block.z;
  if (nthreads <= 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    g_last_error = cudaErrorInvalidConfiguration;
    g_last_message = "invalid launch configuration (block of 1..1024 threads, non-empty grid)";
    return g_last_error;
  }
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.nthreads = static_cast<int>(nthreads);
  b.fibers.resize(b.nthreads);
  b.exchange.assign(b.nthreads, 0);
  b.dynamic_shared.assign(shared_bytes + 16, 0xA5);  // poisoned: kernels must not read before writing
  b.body = [&]() { kernel(args...); };
  while (g_stack_pool.size() < static_cast<size_t>(b.nthreads)) g_stack_pool.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  Block* saved = g_block;
  g_block = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.block_idx = uint3{bx, by, bz};
        for (int i = 0; i < b.nthreads; ++i) {
          Fiber& f = b.fibers[i];
          f.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                        static_cast<unsigned>(i / (block.x * block.y))};
          f.state = Park::running;
          f.stack = g_stack_pool[i];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        if (!run_block(b)) {
          g_block = saved;
          g_last_error = cudaErrorLaunchFailure;
          g_last_message = "deadlock: threads of a block wait on barriers that can never complete";
          return g_last_error;
        }
      }
  g_block = saved;
  return cudaSuccess;
}

// Shuffle core: publish my value, wait for the warp, read the source lane, wait again so no lane
// overwrites its slot before every lane has read it.
template <class T>
T exchange(T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of values up to 8 bytes");
  const int me = linear_tid(), base = me - me % 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  g_block->exchange[me] = slot;
  park(Park::warp_barrier);
  T out = value;
  const int src = base + src_lane;
  if (src < g_block->nthreads) std::memcpy(&out, &g_block->exchange[src], sizeof(T));
  park(Park::warp_barrier);
  return out;
}

inline unsigned vote(bool pred) {
  const int me = linear_tid(), base = me - me % 32;
  g_block->exchange[me] = pred ? 1 : 0;
  park(Park::warp_barrier);
  unsigned bits = 0;
  for (int l = 0; l < 32 && base + l < g_block->nthreads; ++l) bits |= (g_block->exchange[base + l] ? 1u : 0u) << l;
  park(Park::warp_barrier);
  return bits;
}

inline void* dynamic_shared() { return g_block->dynamic_shared.data(); }

}  // namespace simt

#define threadIdx (simt::self().tid)
#define blockIdx (simt::g_block->block_idx)
#define blockDim (simt::g_block->block_dim)
#define gridDim (simt::g_block->grid_dim)

inline void __syncthreads() { simt::park(simt::Park::block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::park(simt::Park::warp_barrier); }

template <class T> T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = simt::lane_id();
  return simt::exchange(v, (lane / width) * width + (src % width));
}
template <class T> T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = simt::lane_id(), src = lane ^ mask;
  return simt::exchange(v, (src / width == lane / width) ? src : lane);
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  return simt::exchange(v, (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane);
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  return simt::exchange(v, (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
inline unsigned __ballot_sync(unsigned, int pred) { return simt::vote(pred != 0); }
inline int __any_sync(unsigned, int pred) { return simt::vote(pred != 0) != 0; }
inline int __all_sync(unsigned, int pred) {
  const int me = simt::linear_tid(), base = me - me % 32;
  const int lanes = std::min(32, simt::g_block->nthreads - base);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  return simt::vote(pred != 0) == full;
}

template <class T> T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> T atomicMax(T* p, T v) { T old = *p; *p = std::max(old, v); return old; }
template <class T> T atomicMin(T* p, T v) { T old = *p; *p = std::min(old, v); return old; }
template <class T> T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T> T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

inline cudaError_t cudaGetLastError() { cudaError_t e = simt::g_last_error; simt::g_last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : simt::g_last_message; }
