// The Python module of the CPU kernels (sparse_peft/fused.py builds the three sources into one extension).

#include <torch/extension.h>

#include <vector>

// soft_mask_cpu.cpp
bool supports(int64_t num_candidates, int64_t m);
std::vector<torch::Tensor> forward(torch::Tensor weight, torch::Tensor logits, torch::Tensor patterns, int64_t seed,
                                   double kappa, double tau, bool with_reg, bool keep_probs);
std::vector<torch::Tensor> backward(torch::Tensor grad_masked, torch::Tensor weight, torch::Tensor logits,
                                    torch::Tensor patterns, int64_t seed, double kappa, double tau, double lam,
                                    bool want_masked, torch::Tensor probs);
torch::Tensor uniforms(int64_t seed, int64_t num_groups, int64_t num_candidates);

// adamw_bf16_cpu.cpp
void adamw_bf16(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, double lr,
                double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                double bias_correction2, int64_t seed);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports", &supports);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("uniforms", &uniforms);
  m.def("adamw_bf16", &adamw_bf16);
}
