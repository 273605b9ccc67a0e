// Fused CPU AdamW step for bfloat16 parameters (see sparse_peft/optim.py for the contract).
//
// Per element, in float32 (torchao's _AdamW with bf16_stochastic_round=True, the same order of operations):
//   p  <- p - lr * wd * p
//   m  <- lerp(m, g, 1 - beta1)        v <- lerp(v, g^2, 1 - beta2)          stored rounded to nearest bfloat16
//   p  <- p - lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)                    with the float32 m and v
//   p is stored rounded to bfloat16 stochastically: 16 random bits added to its float32 bits, then truncated, so it
//   rounds up with probability (distance to the lower bfloat16) / (bfloat16 step); element i's bits are the 16-bit
//   piece i % 4 (from the lowest) of splitmix64(seed, i / 4).
// One pass over p, g, m and v.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/extension.h>

#include "splitmix64.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline c10::BFloat16 round_stochastic(float x, uint32_t random16) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return c10::BFloat16(static_cast<uint16_t>((bits + random16) >> 16), c10::BFloat16::from_bits());
}

}  // namespace

void adamw_bf16(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, double lr,
                double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                double bias_correction2, int64_t seed) {
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 && t->is_contiguous() &&
                    t->numel() == param.numel(),
                "param, grad, exp_avg and exp_avg_sq must be contiguous bfloat16 CPU tensors of one size");
  c10::BFloat16* p = param.data_ptr<c10::BFloat16>();
  const c10::BFloat16* g = grad.data_ptr<c10::BFloat16>();
  c10::BFloat16* m = exp_avg.data_ptr<c10::BFloat16>();
  c10::BFloat16* v = exp_avg_sq.data_ptr<c10::BFloat16>();
  const float decay = static_cast<float>(lr * weight_decay), step = static_cast<float>(lr / bias_correction1);
  const float w1 = static_cast<float>(1.0 - beta1), w2 = static_cast<float>(1.0 - beta2);
  const float sqrt_bc2 = static_cast<float>(std::sqrt(bias_correction2)), epsilon = static_cast<float>(eps);
  const uint64_t s = static_cast<uint64_t>(seed);
  const int64_t n = param.numel();
  // Blocks of 64 elements: their 64 random 16-bit pieces first (16 hashes), then the elements; both loops
  // vectorise.
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 256, [&](int64_t begin, int64_t end) {
    uint32_t random16[kBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kBlock, count = std::min(kBlock, n - first);
      for (int h = 0; h < kBlock / 4; ++h) {
        const uint64_t z = splitmix64(s, static_cast<uint64_t>(first / 4 + h));
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) random16[4 * h + k] = static_cast<uint32_t>((z >> (16 * k)) & 0xFFFFu);
      }
      for (int64_t j = 0; j < count; ++j) {
        const int64_t i = first + j;
        float x = static_cast<float>(p[i]);
        const float gi = static_cast<float>(g[i]);
        x = x - decay * x;
        const float mi = static_cast<float>(m[i]), vi = static_cast<float>(v[i]);
        const float m32 = mi + w1 * (gi - mi), v32 = vi + w2 * (gi * gi - vi);
        m[i] = static_cast<c10::BFloat16>(m32);
        v[i] = static_cast<c10::BFloat16>(v32);
        x = x - step * m32 / (std::sqrt(v32) / sqrt_bc2 + epsilon);
        p[i] = round_stochastic(x, random16[j]);
      }
    }
  });
}
