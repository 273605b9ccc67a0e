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
// One pass over the logits per call; the noise is regenerated from (seed, index), never stored.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/extension.h>

#include "splitmix64.h"

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrain = 2048;  // groups per parallel chunk
constexpr int kBlock = 64;      // groups per vectorised block
// Candidate weights below exp(kLogProbCut) of the group's largest are exactly 0: sparse_peft.patterns.LOG_PROB_CUT
// (it keeps subnormal floats out of W * mask and the logits' gradient).
constexpr float kLogProbCut = -44.0f;

// Uniform in (0, 1) from 23 bits k of a hash as (k + 0.5) / 2^23: exact in float32, so never 0 or 1.
inline float bits_to_uniform(uint64_t k) { return (static_cast<float>(k) + 0.5f) * (1.0f / 8388608.0f); }

// The two uniforms of hash index h: the top 23 bits of splitmix64(seed, h) and the 23 bits below them.
inline void uniform_pair(uint64_t seed, uint64_t h, float& first, float& second) {
  const uint64_t z = splitmix64(seed, h);
  first = bits_to_uniform(z >> 41);
  second = bits_to_uniform((z >> 18) & 0x7FFFFF);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// The loops below keep the groups of a block innermost (or, for the [groups, C] / [groups, M] tensors, the C or M
// members of a group fully unrolled inside the loop over groups), so that the compiler vectorises every one of them.

// y [C][kBlock] of the groups g0 .. g0 + count - 1, the same arithmetic order as
// sparse_peft.patterns.soft_mask_probs.
template <int C, typename L>
inline void block_probs(const L* logits, int64_t g0, int count, int64_t num_groups, uint64_t seed, float kappa,
                        float inv_tau, float (*y)[kBlock]) {
  float top[kBlock], total[kBlock];
  const L* block = logits + g0 * C;
  for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) y[c][b] = to_float(block[b * C + c]);
  }
  for (int b = 0; b < count; ++b) top[b] = -INFINITY;
  for (int c = 0; c < C; c += 2) {  // C is even for every compiled layout
    const uint64_t base = static_cast<uint64_t>(c / 2) * num_groups + g0;
    for (int b = 0; b < count; ++b) {
      float u0, u1;
      uniform_pair(seed, base + b, u0, u1);
      const float z0 = -std::log(-std::log(u0)) + kappa * y[c][b];
      const float z1 = -std::log(-std::log(u1)) + kappa * y[c + 1][b];
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
template <int C, int M>
inline void block_mask(const float (*y)[kBlock], const float* patterns, int count, float (*m)[kBlock]) {
  for (int j = 0; j < M; ++j) {
    for (int b = 0; b < count; ++b) m[j][b] = 0.0f;
    for (int c = 0; c < C; ++c) {
      const float s = patterns[c * M + j];
      for (int b = 0; b < count; ++b) m[j][b] += s * y[c][b];
    }
  }
}

template <int C, int M, typename L>
double forward_impl(const float* weight, const L* logits, const float* patterns, int64_t num_groups, uint64_t seed,
                    float kappa, float tau, float* masked, bool with_reg) {
  const float inv_tau = 1.0f / tau;
  return at::parallel_reduce(
      0, num_groups, kGrain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        float y[C][kBlock], m[M][kBlock];
        for (int64_t g0 = begin; g0 < end; g0 += kBlock) {
          const int count = static_cast<int>(std::min<int64_t>(kBlock, end - g0));
          block_probs<C>(logits, g0, count, num_groups, seed, kappa, inv_tau, y);
          block_mask<C, M>(y, patterns, count, m);
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
        }
        return acc;
      },
      [](double a, double b) { return a + b; });
}

template <int C, int M, typename L>
void backward_impl(const float* grad_masked, const float* weight, const L* logits, const float* patterns,
                   int64_t num_groups, uint64_t seed, float kappa, float tau, float lam, float* masked,
                   L* grad_logits) {
  const float inv_tau = 1.0f / tau;
  const float scale = kappa * inv_tau;
  at::parallel_for(0, num_groups, kGrain, [&](int64_t begin, int64_t end) {
    float y[C][kBlock], m[M][kBlock], gm[M][kBlock], gy[C][kBlock], dot[kBlock];
    for (int64_t g0 = begin; g0 < end; g0 += kBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kBlock, end - g0));
      block_probs<C>(logits, g0, count, num_groups, seed, kappa, inv_tau, y);
      block_mask<C, M>(y, patterns, count, m);
      const float* w = weight + g0 * M;
      const float* grad = grad_masked + g0 * M;
      for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          const float wm = w[b * M + j] * m[j][b];
          if (masked != nullptr) masked[g0 * M + b * M + j] = wm;
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
      L* out = grad_logits + g0 * C;
      for (int b = 0; b < count; ++b) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) out[b * C + c] = static_cast<L>((gy[c][b] - dot[b]) * y[c][b] * scale);
      }
    }
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

// Returns (W * soft_mask [out, in] float32, sum of squares of it (0 unless with_reg) as a float32 scalar).
std::vector<torch::Tensor> forward(torch::Tensor weight, torch::Tensor logits, torch::Tensor patterns, int64_t seed,
                                   double kappa, double tau, bool with_reg) {
  check(weight, logits, patterns);
  auto masked = torch::empty_like(weight);
  const int64_t G = logits.size(0), C_ = patterns.size(0), M_ = patterns.size(1);
  const uint64_t s = static_cast<uint64_t>(seed);
  double reg = 0.0;
  const bool compiled = dispatch(C_, M_, [&](auto c_, auto m_) {
    constexpr int C = decltype(c_)::value, M = decltype(m_)::value;
    if (logits.scalar_type() == torch::kFloat) {
      reg = forward_impl<C, M>(weight.data_ptr<float>(), logits.data_ptr<float>(), patterns.data_ptr<float>(), G, s,
                               kappa, tau, masked.data_ptr<float>(), with_reg);
    } else {
      reg = forward_impl<C, M>(weight.data_ptr<float>(), logits.data_ptr<c10::BFloat16>(), patterns.data_ptr<float>(),
                               G, s, kappa, tau, masked.data_ptr<float>(), with_reg);
    }
  });
  TORCH_CHECK(compiled, "no fused kernel for ", C_, " candidates of ", M_, " weights");
  return {masked, torch::full({}, reg, weight.options())};
}

// Returns (W * soft_mask [out, in] float32, or an empty tensor unless want_masked; dL/dlogits [G, C] in the logits'
// dtype).
std::vector<torch::Tensor> backward(torch::Tensor grad_masked, torch::Tensor weight, torch::Tensor logits,
                                    torch::Tensor patterns, int64_t seed, double kappa, double tau, double lam,
                                    bool want_masked) {
  check(weight, logits, patterns);
  TORCH_CHECK(grad_masked.scalar_type() == torch::kFloat && grad_masked.is_contiguous() &&
                  grad_masked.numel() == weight.numel(),
              "grad_masked must be a contiguous float32 tensor shaped like weight");
  auto masked = want_masked ? torch::empty_like(weight) : torch::empty({0}, weight.options());
  auto grad_logits = torch::empty_like(logits);
  const int64_t G = logits.size(0), C_ = patterns.size(0), M_ = patterns.size(1);
  const uint64_t s = static_cast<uint64_t>(seed);
  float* out = want_masked ? masked.data_ptr<float>() : nullptr;
  const bool compiled = dispatch(C_, M_, [&](auto c_, auto m_) {
    constexpr int C = decltype(c_)::value, M = decltype(m_)::value;
    if (logits.scalar_type() == torch::kFloat) {
      backward_impl<C, M>(grad_masked.data_ptr<float>(), weight.data_ptr<float>(), logits.data_ptr<float>(),
                          patterns.data_ptr<float>(), G, s, kappa, tau, lam, out, grad_logits.data_ptr<float>());
    } else {
      backward_impl<C, M>(grad_masked.data_ptr<float>(), weight.data_ptr<float>(),
                          logits.data_ptr<c10::BFloat16>(), patterns.data_ptr<float>(), G, s, kappa, tau, lam, out,
                          grad_logits.data_ptr<c10::BFloat16>());
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
