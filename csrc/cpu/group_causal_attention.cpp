// group_causal_attention.cpp: the torch backend's forward of group-causal attention on CPU tensors
// (fp32), a FlashAttention-style loop whose mask comes from the group ids, never from an N x N tensor.
// nova_fast/ops/group_causal_attention.py states the rule (query i sees key j iff
// k_group[j] <= q_group[i]), validates the arguments and computes the two index inputs:
//
//   q_order, k_order (G, Nq) / (G, Nk) int64, optional: sorted position -> token. With them the
//     kernel reads q, k, v in the caller's token order and writes out / lse there too: the stable
//     sort that makes random sets contiguous is fused into the loads and stores (no permuted copies
//     of q, k, v or the output, which cost a pass over each). Absent: the tokens are already sorted.
//   k_visible (G, Nq) int64: for the query at sorted position i, how many keys it sees. Keys sorted
//     by group put the visible ones of every query first, so the rule is "sorted key j < k_visible[i]"
//     and k_visible is non-decreasing along sorted queries.
//
// G is 1 (groups shared by the batch) or B. Work: task = (batch, head, block of kBlockM sorted
// queries). A block attends over keys [0, k_visible[last row]) in tiles of kBlockN; a tile wholly
// below k_visible[first row] needs no mask, the tiles past it are clipped per row. So the work is the
// visible pairs plus at most kBlockM - 1 ragged rows' worth per block (the tile skipping of the
// Triton kernel, at row granularity). The two products of a tile, S = scale Q K^T and O += P V, go
// to the BLAS sgemm torch links (as ATen's own CPU flash attention does); the online softmax between
// them is 8-wide. The at::parallel_for range is split into one contiguous run of tasks per thread,
// so a thread gathers the sorted K and V of a head once, into its own buffers, and reuses them for
// all that head's query blocks.
//
// Outputs, written whole (the caller allocates them): out (B, H, Nq, D) fp32 and lse (B, H, Nq) fp32,
// the natural-log log-sum-exp of the scaled scores (the backward's input); a query that sees no key
// gets out = 0, lse = +inf.
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

// The Fortran BLAS entry point torch is linked with (MKL on x86 wheels, OpenBLAS elsewhere). Weak:
// a torch built without BLAS still loads the other CPU kernels, and this one says why it cannot run.
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace nova_cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

// Query rows per task and keys per tile. 64 rows keep the ragged edge of each block (rows of a block
// that see fewer keys than its last row) small against random sets of ~20 tokens; 512 keys per tile
// give sgemm long enough panels. S (64 x 512 fp32, 128 KiB) and the accumulator stay in L2.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 512;

// Column-major sgemm, as BLAS wants it: C (m x n) = alpha op(A) op(B) + beta C.
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

inline float row_max(const float* s, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  if (n >= Vec::size()) {
    Vec vm = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(s + j));
    m = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - max) for j < n; returns their sum.
inline float exp_sum(float* s, int64_t n, float max) {
  const Vec vmax(max);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - vmax).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - max);
    sum += s[j];
  }
  return sum;
}

struct Problem {
  const float *q, *k, *v;
  float *out, *lse;
  const int64_t *q_order, *k_order, *k_visible;  // q_order / k_order may be null (tokens sorted)
  int64_t B, H, Nq, Nk, D, G;
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;  // element strides (unit along D)
  float scale;
};

// Per-thread scratch, carved from one tensor allocated before the parallel loop (so profilers and
// memory counters see it): the sorted K and V of the head in hand (2 Nk D floats, only when keys
// are gathered), Q of a block, S, the accumulator and the running max / sum of each row.
struct Scratch {
  float *k, *v, *q, *s, *acc, *m, *l;
  int64_t head = -1;  // b * H + h of the K / V held

  static int64_t floats(int64_t Nk, int64_t D, bool gather_keys) {
    return (gather_keys ? 2 * Nk * D : 0) + 2 * kBlockM * D + kBlockM * kBlockN + 2 * kBlockM;
  }
  Scratch(float* base, int64_t Nk, int64_t D, bool gather_keys) {
    const int64_t kv = gather_keys ? Nk * D : 0;
    k = base, v = k + kv, q = v + kv, s = q + kBlockM * D, acc = s + kBlockM * kBlockN;
    m = acc + kBlockM * D, l = m + kBlockM;
  }
};

void attend_block(const Problem& p, int64_t b, int64_t h, int64_t m0, Scratch& w) {
  const int64_t D = p.D, g = p.G == 1 ? 0 : b;
  const int64_t rows = std::min(kBlockM, p.Nq - m0);
  const int64_t* kvis = p.k_visible + g * p.Nq + m0;
  const int64_t* q_ord = p.q_order ? p.q_order + g * p.Nq + m0 : nullptr;
  const int64_t kv_end = kvis[rows - 1];  // the most any row of the block sees
  float* out = p.out + (b * p.H + h) * p.Nq * D;
  float* lse = p.lse + (b * p.H + h) * p.Nq;
  auto token = [&](int64_t i) { return q_ord ? q_ord[i] : m0 + i; };

  // K / V rows in sorted order: the caller's tensor when already sorted, else this thread's gather.
  const float *kbase, *vbase;
  int64_t ldk, ldv;
  if (p.k_order) {
    const int64_t head = b * p.H + h;
    if (w.head != head) {
      const int64_t* k_ord = p.k_order + g * p.Nk;
      const float* ks = p.k + b * p.k_sb + h * p.k_sh;
      const float* vs = p.v + b * p.v_sb + h * p.v_sh;
      for (int64_t j = 0; j < p.Nk; ++j) {
        std::copy_n(ks + k_ord[j] * p.k_sn, D, w.k + j * D);
        std::copy_n(vs + k_ord[j] * p.v_sn, D, w.v + j * D);
      }
      w.head = head;
    }
    kbase = w.k, vbase = w.v, ldk = ldv = D;
  } else {
    kbase = p.k + b * p.k_sb + h * p.k_sh, ldk = p.k_sn;
    vbase = p.v + b * p.v_sb + h * p.v_sh, ldv = p.v_sn;
  }
  const float* qbase = p.q + b * p.q_sb + h * p.q_sh;
  const float* qblk;
  int64_t ldq;
  if (q_ord) {
    for (int64_t i = 0; i < rows; ++i) std::copy_n(qbase + q_ord[i] * p.q_sn, D, w.q + i * D);
    qblk = w.q, ldq = D;
  } else {
    qblk = qbase + m0 * p.q_sn, ldq = p.q_sn;
  }

  float *s = w.s, *acc = w.acc, *mx = w.m, *l = w.l;
  std::fill_n(acc, rows * D, 0.f);
  std::fill_n(mx, rows, -std::numeric_limits<float>::infinity());
  std::fill_n(l, rows, 0.f);
  for (int64_t n0 = 0; n0 < kv_end; n0 += kBlockN) {
    const int64_t cols = std::min(kBlockN, kv_end - n0);
    // S (rows x cols, row stride kBlockN) = scale * Q K^T: column-major S^T = K Q^T
    gemm('T', 'N', cols, rows, D, p.scale, kbase + n0 * ldk, ldk, qblk, ldq, 0.f, s, kBlockN);
    for (int64_t i = 0; i < rows; ++i) {
      float* si = s + i * kBlockN;
      const int64_t seen = std::clamp<int64_t>(kvis[i] - n0, 0, cols);  // keys of this tile row i sees
      if (seen == 0) {  // this row sees none of this tile (nor, keys being sorted, any later one)
        std::fill_n(si, cols, 0.f);
        continue;
      }
      const float m_new = std::max(mx[i], row_max(si, seen));
      const float alpha = std::exp(mx[i] - m_new);  // 0 on the row's first tile (mx = -inf)
      l[i] = l[i] * alpha + exp_sum(si, seen, m_new);
      std::fill(si + seen, si + cols, 0.f);  // keys past the row's prefix: probability 0
      mx[i] = m_new;
      if (alpha != 1.f) {
        float* ai = acc + i * D;
        for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
      }
    }
    // acc (rows x D, row stride D) += P V: column-major acc^T += V^T P^T
    gemm('N', 'N', D, rows, cols, 1.f, vbase + n0 * ldv, ldv, s, kBlockN, 1.f, acc, D);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* dst = out + token(i) * D;
    if (l[i] == 0.f) {  // the row saw no key at all (kv_end == 0: the whole block, no tile above)
      std::fill_n(dst, D, 0.f);
      lse[token(i)] = std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv = 1.f / l[i];
    const float* ai = acc + i * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = ai[d] * inv;
    lse[token(i)] = mx[i] + std::log(l[i]);
  }
}

void check_index(const at::Tensor& t, const char* name, int64_t G, int64_t N) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) == G && t.size(1) == N && t.is_contiguous(),
              "group_causal_attention (CPU kernel): ", name, " must be a contiguous int64 (", G, ", ", N,
              ") tensor, got ", t.scalar_type(), " ", t.sizes());
}

void group_causal_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& q_order, const c10::optional<at::Tensor>& k_order,
                                const at::Tensor& k_visible, double scale, at::Tensor& out, at::Tensor& lse) {
  TORCH_CHECK(sgemm_ != nullptr, "group_causal_attention (CPU kernel): this torch build exports no BLAS sgemm_; "
              "run with NOVA_FAST_CPU_KERNELS=0 for the chunked ATen path");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1,
                "group_causal_attention (CPU kernel): q, k, v must be fp32 (B, H, N, D) CPU tensors with unit "
                "stride along D");
  }
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "group_causal_attention (CPU kernel): k, v must be (B, H, Nk, D) matching q");
  const int64_t G = k_visible.size(0);
  TORCH_CHECK(G == 1 || G == B, "group_causal_attention (CPU kernel): k_visible must have 1 or B rows");
  check_index(k_visible, "k_visible", G, Nq);
  if (q_order) check_index(*q_order, "q_order", G, Nq);
  if (k_order) check_index(*k_order, "k_order", G, Nk);

  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == q.sizes(),
              "group_causal_attention (CPU kernel): out must be a contiguous fp32 tensor shaped like q ", q.sizes(),
              ", got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 &&
                  lse.size(0) == B && lse.size(1) == H && lse.size(2) == Nq,
              "group_causal_attention (CPU kernel): lse must be a contiguous fp32 (B, H, Nq) tensor, got ",
              lse.scalar_type(), " ", lse.sizes());
  Problem p{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
            lse.data_ptr<float>(), q_order ? q_order->data_ptr<int64_t>() : nullptr,
            k_order ? k_order->data_ptr<int64_t>() : nullptr, k_visible.data_ptr<int64_t>(),
            B, H, Nq, Nk, D, G,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), static_cast<float>(scale)};
  const int64_t blocks = (Nq + kBlockM - 1) / kBlockM;
  const bool gather_keys = p.k_order != nullptr;
  const int64_t per_thread = Scratch::floats(Nk, D, gather_keys);
  at::Tensor scratch = at::empty({at::get_num_threads(), per_thread}, q.options());
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(scratch.data_ptr<float>() + at::get_thread_num() * per_thread, Nk, D, gather_keys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, blk = task % blocks;
      attend_block(p, bh / H, bh % H, blk * kBlockM, w);
    }
  });
}

}  // namespace
}  // namespace nova_cpu

TORCH_LIBRARY_FRAGMENT(nova_fast_cpu, m) {
  m.def("group_causal_attention_out(Tensor q, Tensor k, Tensor v, Tensor? q_order, Tensor? k_order, "
        "Tensor k_visible, float scale, Tensor(a!) out, Tensor(b!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(nova_fast_cpu, CPU, m) {
  m.impl("group_causal_attention_out", &nova_cpu::group_causal_attention_out);
}
