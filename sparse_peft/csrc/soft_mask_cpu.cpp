// Fused CPU kernels of the Gumbel-softmax soft mask (see sparse_peft/fused.py for the contract).
//
// Per group g of M weights with C candidate patterns S [C, M] (0/1) and logits l [C]:
//   u_c   = uniform of candidate pair c / 2: 23 bits of splitmix64(seed, (c / 2) * G + g), two per hash
//   y     = softmax((kappa * l + gumbel(u)) / tau)   gumbel(u) = -log(-log(u))
//   m_j   = sum_c y_c S_cj                            the soft mask
//   W'_j  = W_j * m_j                                 the masked weight
// Backward, from dL/dW' (grad_masked) and the sparse regulariser -lam * ||W'||^2:
//   gm_j  = (grad_masked_j - 2 lam W'_j) * W_j        dL/dm
//   gy_c  = sum_j S_cj gm_j                           dL/dy
//   dl_c  = (kappa / tau) * y_c * (gy_c - sum_k y_k gy_k)
// One pass over the logits per call; the noise is regenerated from (seed, index), never stored. Forward can keep the
// sample's y [C, G] (float32) for backward, which then reads it instead of regenerating it.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/extension.h>

#include "splitmix64.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrain = 2048;  // groups per parallel chunk
constexpr int kBlock = 64;      // groups per vectorised block
// Candidate weights below exp(kLogProbCut) of the group's largest are exactly 0: sparse_peft.patterns.LOG_PROB_CUT
// (it keeps subnormal floats out of W * mask and the logits' gradient).
constexpr float kLogProbCut = -44.0f;

// A block's group count: kBlock as a compile-time constant for full blocks (every loop over the block then has a
// constant trip count, which the vectoriser needs for the strided [groups, M] accesses), an int for the last one.
using FullBlock = std::integral_constant<int, kBlock>;
template <typename Count>
constexpr bool is_full_block = std::is_same<Count, FullBlock>::value;

// Uniform in (0, 1) from 23 bits k of a hash as (k + 0.5) / 2^23: exact in float32, so never 0 or 1. Converted
// through int32 (exact for 23 bits): AVX2 has no vector uint64 -> float conversion, and without one GCC leaves the
// whole hash loop scalar.
inline float bits_to_uniform(uint64_t k) {
  return (static_cast<float>(static_cast<int32_t>(k)) + 0.5f) * (1.0f / 8388608.0f);
}

// The two uniforms of hash index h: the top 23 bits of splitmix64(seed, h) and the 23 bits below them.
inline void uniform_pair(uint64_t seed, uint64_t h, float& first, float& second) {
  const uint64_t z = splitmix64(seed, h);
  first = bits_to_uniform(z >> 41);
  second = bits_to_uniform((z >> 18) & 0x7FFFFF);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// The [groups, K] rows of a tensor (K = C logits or gradients per group) and the [K][kBlock] columns that the block
// loops work on. GCC vectorises neither direction for K = 6 (2:4), so with AVX512 full blocks are transposed in
// registers, 16 groups at a time: column c of 16 groups is ceil(K / 2) two-register permutes of the 16 K row
// values, merged by lane masks (and the reverse for rows). Values are only moved, so both ways give the same bits.
constexpr bool transposes_in_registers(int K) {
#if defined(__AVX512F__)
  return K <= 8;
#else
  return K < 0;
#endif
}

#if defined(__AVX512F__)
template <int K>
struct Transpose16 {
  static constexpr int kPairs = (K + 1) / 2;
  // rows -> columns: lane b of column c is row value f = b K + c, in register f / 16 of the pair f / 32
  alignas(64) int32_t to_column[K][kPairs][16];
  __mmask16 to_column_lanes[K][kPairs];
  // columns -> rows: lane l of row register r is f = 16 r + l, value (group f / K, column f % K)
  alignas(64) int32_t to_row[K][kPairs][16];
  __mmask16 to_row_lanes[K][kPairs];

  Transpose16() {
    for (int c = 0; c < K; ++c) {
      for (int p = 0; p < kPairs; ++p) {
        to_column_lanes[c][p] = to_row_lanes[c][p] = 0;
        for (int lane = 0; lane < 16; ++lane) {
          const int f = lane * K + c, pair = f / 32;
          to_column[c][p][lane] = pair == p ? f % 32 : 0;
          if (pair == p) to_column_lanes[c][p] |= static_cast<__mmask16>(1u << lane);
          const int g = 16 * c + lane, column = g % K;  // here c is the row register
          to_row[c][p][lane] = column / 2 == p ? (column % 2) * 16 + g / K : 0;
          if (column / 2 == p) to_row_lanes[c][p] |= static_cast<__mmask16>(1u << lane);
        }
      }
    }
  }
};

template <int K>
const Transpose16<K> kTranspose{};

// One pass of the permutes: out[i] = merge over pairs p of permute(in[2p], in[2p + 1]) on the lanes of p.
template <int K>
inline void permute_pairs(const __m512* in, const int32_t (*index)[(K + 1) / 2][16],
                          const __mmask16 (*lanes)[(K + 1) / 2], __m512* out) {
  constexpr int kPairs = (K + 1) / 2;
  for (int i = 0; i < K; ++i) {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < kPairs; ++p) {
      const __m512 both = _mm512_permutex2var_ps(in[2 * p], _mm512_load_si512(index[i][p]), in[2 * p + 1]);
      acc = _mm512_mask_blend_ps(lanes[i][p], acc, both);
    }
    out[i] = acc;
  }
}

// columns[k][offset .. offset + 15] = rows[b * K + k] of 16 groups b.
template <int K>
inline void rows_to_columns16(const float* rows, float (*columns)[kBlock], int offset) {
  __m512 in[K + 1], out[K];
  for (int r = 0; r < K; ++r) in[r] = _mm512_loadu_ps(rows + 16 * r);
  in[K] = in[K - 1];  // the odd K's last pair
  permute_pairs<K>(in, kTranspose<K>.to_column, kTranspose<K>.to_column_lanes, out);
  for (int k = 0; k < K; ++k) _mm512_storeu_ps(&columns[k][offset], out[k]);
}

// rows[b * K + k] = columns[k][offset + b] of 16 groups b.
template <int K>
inline void columns_to_rows16(const float (*columns)[kBlock], int offset, float* rows) {
  __m512 in[K + 1], out[K];
  for (int k = 0; k < K; ++k) in[k] = _mm512_loadu_ps(&columns[k][offset]);
  in[K] = in[K - 1];
  permute_pairs<K>(in, kTranspose<K>.to_row, kTranspose<K>.to_row_lanes, out);
  for (int r = 0; r < K; ++r) _mm512_storeu_ps(rows + 16 * r, out[r]);
}
#endif

// columns[k][b] = rows[b * K + k] for the block's groups b, as float.
template <int K, typename L, typename Count>
inline void load_columns(const L* rows, Count count, float (*columns)[kBlock]) {
#if defined(__AVX512F__)
  if constexpr (is_full_block<Count> && transposes_in_registers(K)) {
    if constexpr (std::is_same<L, float>::value) {
      for (int b = 0; b < kBlock; b += 16) rows_to_columns16<K>(rows + b * K, columns, b);
    } else {
      float values[kBlock * K];
      for (int i = 0; i < kBlock * K; ++i) values[i] = to_float(rows[i]);
      for (int b = 0; b < kBlock; b += 16) rows_to_columns16<K>(values + b * K, columns, b);
    }
    return;
  }
#endif
  for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) columns[k][b] = to_float(rows[b * K + k]);
  }
}

// rows[b * K + k] = columns[k][b] for the block's groups b, rounded to L.
template <int K, typename L, typename Count>
inline void store_columns(const float (*columns)[kBlock], Count count, L* rows) {
#if defined(__AVX512F__)
  if constexpr (is_full_block<Count> && transposes_in_registers(K)) {
    if constexpr (std::is_same<L, float>::value) {
      for (int b = 0; b < kBlock; b += 16) columns_to_rows16<K>(columns, b, rows + b * K);
    } else {
      float values[kBlock * K];
      for (int b = 0; b < kBlock; b += 16) columns_to_rows16<K>(columns, b, values + b * K);
      for (int i = 0; i < kBlock * K; ++i) rows[i] = static_cast<L>(values[i]);
    }
    return;
  }
#endif
  for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) rows[b * K + k] = static_cast<L>(columns[k][b]);
  }
}

// The loops below keep the groups of a block innermost (or, for the [groups, M] tensors, the M members of a group
// fully unrolled inside the loop over groups), so that the compiler vectorises every one of them.

// y [C][kBlock] of the groups g0 .. g0 + count - 1, the same arithmetic order as
// sparse_peft.patterns.soft_mask_probs.
template <int C, typename L, typename Count>
inline void block_probs(const L* logits, int64_t g0, Count count, int64_t num_groups, uint64_t seed, float kappa,
                        float inv_tau, float (*y)[kBlock]) {
  float top[kBlock], total[kBlock];
  if (g0 + 2 * kBlock <= num_groups) {  // the next block's logits, while this one computes
    const char* next = reinterpret_cast<const char*>(logits + (g0 + kBlock) * C);
    for (int i = 0; i < kBlock * C * static_cast<int>(sizeof(L)); i += 64) __builtin_prefetch(next + i);
  }
  load_columns<C>(logits + g0 * C, count, y);
  for (int b = 0; b < count; ++b) top[b] = -INFINITY;
  // The uniforms in a loop of their own: GCC vectorises the hash (64-bit multiplies) and the logs (libmvec) each
  // alone, but leaves one loop doing both scalar where the CPU lacks AVX512DQ (2.5x slower on AVX2).
  float u[2][kBlock];
  for (int c = 0; c < C; c += 2) {  // C is even for every compiled layout
    const uint64_t base = static_cast<uint64_t>(c / 2) * num_groups + g0;
    for (int b = 0; b < count; ++b) uniform_pair(seed, base + b, u[0][b], u[1][b]);
    for (int b = 0; b < count; ++b) {
      const float z0 = -std::log(-std::log(u[0][b])) + kappa * y[c][b];
      const float z1 = -std::log(-std::log(u[1][b])) + kappa * y[c + 1][b];
      y[c][b] = z0;
      y[c + 1][b] = z1;
      top[b] = std::max(top[b], std::max(z0, z1));
    }
  }
  for (int b = 0; b < count; ++b) total[b] = 0.0f;
  for (int c = 0; c < C; ++c) {
    for (int b = 0; b < count; ++b) {
      const float a = (y[c][b] - top[b]) * inv_tau;
      const float e = a > kLogProbCut ? std::exp(std::max(a, kLogProbCut)) : 0.0f;
      y[c][b] = e;
      total[b] += e;
    }
  }
  for (int b = 0; b < count; ++b) total[b] = 1.0f / total[b];
  for (int c = 0; c < C; ++c)
    for (int b = 0; b < count; ++b) y[c][b] *= total[b];
}

// The soft mask m [M][kBlock] of a block from its probabilities y [C][kBlock]: m_j = sum_c y_c S_cj.
template <int C, int M, typename Count>
inline void block_mask(const float (*y)[kBlock], const float* patterns, Count count, float (*m)[kBlock]) {
  for (int j = 0; j < M; ++j) {
    for (int b = 0; b < count; ++b) m[j][b] = 0.0f;
    for (int c = 0; c < C; ++c) {
      const float s = patterns[c * M + j];
      for (int b = 0; b < count; ++b) m[j][b] += s * y[c][b];
    }
  }
}

// y [C][kBlock] and m [M][kBlock] of a block. Not inlined: forward and backward run the same machine code, so that
// backward regenerates the forward's sample bit for bit (-ffast-math lets each inlined copy round differently).
template <int C, int M, typename L, typename Count>
__attribute__((noinline)) void block_soft_mask(const L* logits, int64_t g0, Count count, int64_t num_groups,
                                               uint64_t seed, float kappa, float inv_tau, const float* patterns,
                                               float (*y)[kBlock], float (*m)[kBlock]) {
  block_probs<C>(logits, g0, count, num_groups, seed, kappa, inv_tau, y);
  block_mask<C, M>(y, patterns, count, m);
}

// Calls body(g0, count) for every block of [begin, end): count a FullBlock for full blocks, an int for the last.
template <typename F>
inline void for_each_block(int64_t begin, int64_t end, F&& body) {
  for (int64_t g0 = begin; g0 < end; g0 += kBlock) {
    if (end - g0 >= kBlock) {
      body(g0, FullBlock{});
    } else {
      body(g0, static_cast<int>(end - g0));
    }
  }
}

// probs (nullptr: not kept): the sample's y as float32 [C, G], for a backward that reads it instead of regenerating.
template <int C, int M, typename L>
double forward_impl(const float* weight, const L* logits, const float* patterns, int64_t num_groups, uint64_t seed,
                    float kappa, float tau, float* masked, bool with_reg, float* probs) {
  const float inv_tau = 1.0f / tau;
  return at::parallel_reduce(
      0, num_groups, kGrain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        float y[C][kBlock], m[M][kBlock];
        for_each_block(begin, end, [&](int64_t g0, auto count) {
          block_soft_mask<C, M>(logits, g0, count, num_groups, seed, kappa, inv_tau, patterns, y, m);
          if (probs != nullptr) {
            for (int c = 0; c < C; ++c)
              for (int b = 0; b < count; ++b) probs[c * num_groups + g0 + b] = y[c][b];
          }
          const float* w = weight + g0 * M;
          float* out = masked + g0 * M;
          for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
            for (int j = 0; j < M; ++j) out[b * M + j] = w[b * M + j] * m[j][b];
          }
          if (with_reg) {
            float sq = 0.0f;
            for (int i = 0; i < count * M; ++i) sq += out[i] * out[i];
            acc += sq;
          }
        });
        return acc;
      },
      [](double a, double b) { return a + b; });
}

// probs (nullptr: regenerate the sample): forward's kept y, float32 [C, G].
template <int C, int M, typename L>
void backward_impl(const float* grad_masked, const float* weight, const L* logits, const float* patterns,
                   int64_t num_groups, uint64_t seed, float kappa, float tau, float lam, float* masked,
                   L* grad_logits, const float* probs) {
  const float inv_tau = 1.0f / tau;
  const float scale = kappa * inv_tau;
  at::parallel_for(0, num_groups, kGrain, [&](int64_t begin, int64_t end) {
    float y[C][kBlock], m[M][kBlock], gm[M][kBlock], gy[C][kBlock], dot[kBlock];
    for_each_block(begin, end, [&](int64_t g0, auto count) {
      if (probs == nullptr) {
        block_soft_mask<C, M>(logits, g0, count, num_groups, seed, kappa, inv_tau, patterns, y, m);
      } else {
        for (int c = 0; c < C; ++c)
          for (int b = 0; b < count; ++b) y[c][b] = probs[c * num_groups + g0 + b];
        block_mask<C, M>(y, patterns, count, m);
      }
      const float* w = weight + g0 * M;
      const float* grad = grad_masked + g0 * M;
      if (masked != nullptr) {
        float* out = masked + g0 * M;
        for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
          for (int j = 0; j < M; ++j) out[b * M + j] = w[b * M + j] * m[j][b];
        }
      }
      for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          const float wm = w[b * M + j] * m[j][b];
          gm[j][b] = (grad[b * M + j] - 2.0f * lam * wm) * w[b * M + j];
        }
      }
      for (int b = 0; b < count; ++b) dot[b] = 0.0f;
      for (int c = 0; c < C; ++c) {
        for (int b = 0; b < count; ++b) gy[c][b] = 0.0f;
        for (int j = 0; j < M; ++j) {
          const float s = patterns[c * M + j];
          for (int b = 0; b < count; ++b) gy[c][b] += s * gm[j][b];
        }
        for (int b = 0; b < count; ++b) dot[b] += gy[c][b] * y[c][b];
      }
      for (int c = 0; c < C; ++c)
        for (int b = 0; b < count; ++b) gy[c][b] = (gy[c][b] - dot[b]) * y[c][b] * scale;
      store_columns<C>(gy, count, grad_logits + g0 * C);
    });
  });
}

void check(const torch::Tensor& weight, const torch::Tensor& logits, const torch::Tensor& patterns) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat && weight.is_contiguous(),
              "weight must be a contiguous float32 CPU tensor");
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous() &&
                  (logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16),
              "logits must be a contiguous [G, C] float32 or bfloat16 CPU tensor");
  TORCH_CHECK(patterns.scalar_type() == torch::kFloat && patterns.dim() == 2 && patterns.is_contiguous() &&
                  patterns.size(0) == logits.size(1),
              "patterns must be a contiguous [C, M] float32 tensor");
  TORCH_CHECK(weight.numel() == logits.size(0) * patterns.size(1), "weight must hold G * M elements");
}

// The N:M layouts with a compiled kernel, as (candidates C, group size M): 2:4, 1:4, 1:2, 4:8.
#define SPARSE_PEFT_LAYOUTS(X) X(6, 4) X(4, 4) X(2, 2) X(70, 8)

// Calls f(std::integral_constant<int, C>, std::integral_constant<int, M>) for a compiled layout; false otherwise.
template <typename F>
bool dispatch(int64_t num_candidates, int64_t m, F&& f) {
#define SPARSE_PEFT_CASE(C_, M_)                                                   \
  if (num_candidates == C_ && m == M_) {                                           \
    f(std::integral_constant<int, C_>{}, std::integral_constant<int, M_>{});        \
    return true;                                                                    \
  }
  SPARSE_PEFT_LAYOUTS(SPARSE_PEFT_CASE)
#undef SPARSE_PEFT_CASE
  return false;
}

}  // namespace

bool supports(int64_t num_candidates, int64_t m) {
  return dispatch(num_candidates, m, [](auto, auto) {});
}

// Returns (W * soft_mask [out, in] float32, sum of squares of it (0 unless with_reg) as a float32 scalar, the
// sample's softmax weights y [C, G] float32 if keep_probs else an empty tensor).
std::vector<torch::Tensor> forward(torch::Tensor weight, torch::Tensor logits, torch::Tensor patterns, int64_t seed,
                                   double kappa, double tau, bool with_reg, bool keep_probs) {
  check(weight, logits, patterns);
  auto masked = torch::empty_like(weight);
  const int64_t G = logits.size(0), C_ = patterns.size(0), M_ = patterns.size(1);
  auto probs = keep_probs ? torch::empty({C_, G}, weight.options()) : torch::empty({0}, weight.options());
  float* kept = keep_probs ? probs.data_ptr<float>() : nullptr;
  const uint64_t s = static_cast<uint64_t>(seed);
  double reg = 0.0;
  const bool compiled = dispatch(C_, M_, [&](auto c_, auto m_) {
    constexpr int C = decltype(c_)::value, M = decltype(m_)::value;
    if (logits.scalar_type() == torch::kFloat) {
      reg = forward_impl<C, M>(weight.data_ptr<float>(), logits.data_ptr<float>(), patterns.data_ptr<float>(), G, s,
                               kappa, tau, masked.data_ptr<float>(), with_reg, kept);
    } else {
      reg = forward_impl<C, M>(weight.data_ptr<float>(), logits.data_ptr<c10::BFloat16>(), patterns.data_ptr<float>(),
                               G, s, kappa, tau, masked.data_ptr<float>(), with_reg, kept);
    }
  });
  TORCH_CHECK(compiled, "no fused kernel for ", C_, " candidates of ", M_, " weights");
  return {masked, torch::full({}, reg, weight.options()), probs};
}

// Returns (W * soft_mask [out, in] float32, or an empty tensor unless want_masked; dL/dlogits [G, C] in the logits'
// dtype). probs: forward's kept y [C, G] (float32, contiguous), or an empty tensor to regenerate the sample from seed.
std::vector<torch::Tensor> backward(torch::Tensor grad_masked, torch::Tensor weight, torch::Tensor logits,
                                    torch::Tensor patterns, int64_t seed, double kappa, double tau, double lam,
                                    bool want_masked, torch::Tensor probs) {
  check(weight, logits, patterns);
  TORCH_CHECK(grad_masked.scalar_type() == torch::kFloat && grad_masked.is_contiguous() &&
                  grad_masked.numel() == weight.numel(),
              "grad_masked must be a contiguous float32 tensor shaped like weight");
  const int64_t G = logits.size(0), C_ = patterns.size(0), M_ = patterns.size(1);
  const bool kept = probs.numel() > 0;
  TORCH_CHECK(!kept || (probs.scalar_type() == torch::kFloat && probs.is_contiguous() && probs.dim() == 2 &&
                        probs.size(0) == C_ && probs.size(1) == G),
              "probs must be empty or forward's contiguous [C, G] float32 tensor");
  auto masked = want_masked ? torch::empty_like(weight) : torch::empty({0}, weight.options());
  auto grad_logits = torch::empty_like(logits);
  const uint64_t s = static_cast<uint64_t>(seed);
  float* out = want_masked ? masked.data_ptr<float>() : nullptr;
  const float* y = kept ? probs.data_ptr<float>() : nullptr;
  const bool compiled = dispatch(C_, M_, [&](auto c_, auto m_) {
    constexpr int C = decltype(c_)::value, M = decltype(m_)::value;
    if (logits.scalar_type() == torch::kFloat) {
      backward_impl<C, M>(grad_masked.data_ptr<float>(), weight.data_ptr<float>(), logits.data_ptr<float>(),
                          patterns.data_ptr<float>(), G, s, kappa, tau, lam, out, grad_logits.data_ptr<float>(), y);
    } else {
      backward_impl<C, M>(grad_masked.data_ptr<float>(), weight.data_ptr<float>(),
                          logits.data_ptr<c10::BFloat16>(), patterns.data_ptr<float>(), G, s, kappa, tau, lam, out,
                          grad_logits.data_ptr<c10::BFloat16>(), y);
    }
  });
  TORCH_CHECK(compiled, "no fused kernel for ", C_, " candidates of ", M_, " weights");
  return {masked, grad_logits};
}

// The uniforms u [C, G] of a (seed, G, C): u[c, g] is the first (c even) or second (c odd) uniform of hash index
// (c / 2) * G + g (for an odd C the last pair's second is unused). For tests and the PyTorch path.
torch::Tensor uniforms(int64_t seed, int64_t num_groups, int64_t num_candidates) {
  auto u = torch::empty({num_candidates, num_groups}, torch::kFloat);
  float* p = u.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const int64_t pairs = (num_candidates + 1) / 2;
  at::parallel_for(0, pairs * num_groups, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const int64_t c = 2 * (h / num_groups), g = h % num_groups;
      float first, second;
      uniform_pair(s, static_cast<uint64_t>(h), first, second);
      p[c * num_groups + g] = first;
      if (c + 1 < num_candidates) p[(c + 1) * num_groups + g] = second;
    }
  });
  return u;
}
