// Argument checks shared by the CPU and CUDA implementations of the fused loss ops (host only).
// Every error names the op and the argument, e.g. "megatron_rl::vocab_stats: argument 'target'".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "fused_loss.h"

namespace megatron_rl {
namespace fused {

inline void check_device(const at::Tensor& t, const at::Tensor& like, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device() == like.device(), "megatron_rl::", op, ": argument '", name,
              "' is on ", t.device(), ", expected ", like.device(), " (the device of the logits)");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name, bool half_ok) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble ||
                  (half_ok && (st == at::kHalf || st == at::kBFloat16));
  TORCH_CHECK(ok, "megatron_rl::", op, ": argument '", name, "' has dtype ", st, ", expected ",
              half_ok ? "float32 / float64 / bfloat16 / float16" : "float32 / float64");
}

// logits [T, V_local] or [A, B, V_local] (any leading strides, unit stride on the vocab dim);
// target int64 of the leading shape. Returns the 3-D view [A, B, V_local] of the logits.
inline at::Tensor check_vocab_args(const at::Tensor& logits, const at::Tensor& target,
                                   int64_t vocab_start, int64_t n_valid, double inv_t,
                                   const char* op) {
  check_float(logits, op, "logits", true);
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "megatron_rl::", op,
              ": argument 'logits' must be [T, V_local] or [S, B, V_local], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(-1) == 0 || logits.stride(-1) == 1, "megatron_rl::", op,
              ": argument 'logits' needs unit stride on the vocabulary dim, got strides ",
              logits.strides());
  TORCH_CHECK(target.scalar_type() == at::kLong, "megatron_rl::", op,
              ": argument 'target' must be int64, got ", target.scalar_type());
  check_device(target, logits, op, "target");
  TORCH_CHECK(target.sizes() == logits.sizes().slice(0, logits.dim() - 1), "megatron_rl::", op,
              ": argument 'target' has shape ", target.sizes(), ", expected ",
              logits.sizes().slice(0, logits.dim() - 1), " (the logits' leading dims)");
  TORCH_CHECK(n_valid >= 0 && n_valid <= logits.size(-1), "megatron_rl::", op,
              ": argument 'n_valid' must be in [0, V_local=", logits.size(-1), "], got ", n_valid);
  TORCH_CHECK(vocab_start >= 0, "megatron_rl::", op,
              ": argument 'vocab_start' must be >= 0, got ", vocab_start);
  TORCH_CHECK(inv_t > 0.0, "megatron_rl::", op,
              ": argument 'inv_temperature' must be > 0, got ", inv_t);
  return logits.dim() == 2 ? logits.unsqueeze(0) : logits;
}

// Per-token [leading] tensors of the backward: lse, entropy, grad_logprobs, grad_entropy.
inline void check_row_tensor(const at::Tensor& t, const at::Tensor& target, const at::Tensor& like,
                             const char* op, const char* name) {
  check_device(t, like, op, name);
  check_float(t, op, name, false);
  TORCH_CHECK(t.sizes() == target.sizes(), "megatron_rl::", op, ": argument '", name,
              "' has shape ", t.sizes(), ", expected ", target.sizes());
}

// PPO op: every per-token tensor [B, L] like logprobs (float32 / float64, same dtype).
inline void check_token_tensor(const at::Tensor& t, const at::Tensor& logprobs, const char* name) {
  const char* op = "ppo_token_loss";
  check_device(t, logprobs, op, name);
  TORCH_CHECK(t.sizes() == logprobs.sizes(), "megatron_rl::", op, ": argument '", name,
              "' has shape ", t.sizes(), ", expected ", logprobs.sizes(), " (like 'logprobs')");
  if (std::string(name) != "loss_mask") {
    TORCH_CHECK(t.scalar_type() == logprobs.scalar_type(), "megatron_rl::", op, ": argument '",
                name, "' has dtype ", t.scalar_type(), ", expected ", logprobs.scalar_type(),
                " (like 'logprobs')");
  }
}

inline void check_ppo_settings(double eps_low, double eps_high, double dual_clip_c,
                               double tis_cap, double icepop_low, double icepop_high,
                               double seq_low, double seq_high, bool has_rollout) {
  const char* p = "megatron_rl::ppo_token_loss: argument '";
  TORCH_CHECK(eps_low >= 0.0 && eps_low < 1.0, p, "eps_low' must be in [0, 1), got ", eps_low);
  TORCH_CHECK(eps_high >= 0.0, p, "eps_high' must be >= 0, got ", eps_high);
  TORCH_CHECK(dual_clip_c <= 0.0 || dual_clip_c > 1.0, p,
              "dual_clip_c' must be > 1 (or <= 0: off), got ", dual_clip_c);
  TORCH_CHECK(icepop_low <= 0.0 || icepop_low <= icepop_high, p,
              "icepop_low' must be <= icepop_high, got ", icepop_low, " > ", icepop_high);
  TORCH_CHECK(seq_low <= 0.0 || seq_low <= seq_high, p, "seq_low' must be <= seq_high, got ",
              seq_low, " > ", seq_high);
  TORCH_CHECK(has_rollout || (tis_cap <= 0.0 && icepop_low <= 0.0 && seq_low <= 0.0), p,
              "rollout_logprobs' is required by tis_cap / icepop / sequence mask");
}

// Every argument of ppo_token_loss, checked once for both backends (logprobs [B, L] float32 /
// float64; the other per-token tensors like it; the settings' ranges). Returns the settings.
inline PpoSettings check_ppo_args(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                  const std::optional<at::Tensor>& rollout_logprobs,
                                  const at::Tensor& advantages, const at::Tensor& loss_mask,
                                  const std::optional<at::Tensor>& is_weights, double eps_low,
                                  double eps_high, double dual_clip_c, double tis_cap,
                                  double icepop_low, double icepop_high, double seq_low,
                                  double seq_high) {
  check_float(logprobs, "ppo_token_loss", "logprobs", false);
  TORCH_CHECK(logprobs.dim() == 2, "megatron_rl::ppo_token_loss: argument 'logprobs' must be "
              "[B, L] (rows = sequences), got shape ", logprobs.sizes());
  const bool has_roll = rollout_logprobs.has_value() && rollout_logprobs->defined();
  const bool has_w = is_weights.has_value() && is_weights->defined();
  check_token_tensor(old_logprobs, logprobs, "old_logprobs");
  check_token_tensor(advantages, logprobs, "advantages");
  check_token_tensor(loss_mask, logprobs, "loss_mask");
  if (has_roll) check_token_tensor(*rollout_logprobs, logprobs, "rollout_logprobs");
  if (has_w) check_token_tensor(*is_weights, logprobs, "is_weights");
  check_ppo_settings(eps_low, eps_high, dual_clip_c, tis_cap, icepop_low, icepop_high, seq_low,
                     seq_high, has_roll);
  return PpoSettings{eps_low, eps_high, dual_clip_c, tis_cap, icepop_low, icepop_high,
                     seq_low, seq_high, has_roll, has_w};
}

}  // namespace fused
}  // namespace megatron_rl
