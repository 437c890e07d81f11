// The math of the fused RL loss ops, shared by the CPU (fused_loss_cpu.cpp) and CUDA
// (fused_loss_cuda.cu) implementations: every function here is __host__ __device__, so the
// algorithm the GPU runs is the one the CPU tests exercise.
//
// Legend: T tokens (rows), V_local = this rank's vocabulary shard, z = logit * inv_temperature.
// Per-token partial statistics over one shard (relative to the running max m):
//   s = sum_v exp(z_v - m),  w = sum_v (z_v - m) exp(z_v - m)
// so that, after merging every shard: lse = m + log s, entropy H = log s - w / s,
// logprob = z_target - lse. Merges are exact up to rounding and done in a fixed order by the
// callers (deterministic, independent of the batch composition).
// Gradient (per logit, H = -sum p log p):
//   dL/dz_v = g_lp * (1[v = target] - p_v) - g_H * p_v * (log p_v + H),  dL/dx = inv_t * dL/dz.
// PPO per token: Schulman et al. 2017 eq. 7, clip-higher (DAPO, arXiv 2503.14476 eq. 10), dual
// clip (Ye et al. 2020, arXiv 1912.09729 eq. 5), TIS (Yao et al. 2025), IcePop (Ling team 2025);
// the same semantics as megatron_rl/losses/policy.py + mismatch.py (the references).
// No ATen / CUDA headers: plain C++ that nvcc and g++ both compile.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MRL_HD __host__ __device__ __forceinline__
#else
#define MRL_HD inline
#endif

namespace megatron_rl {
namespace fused {

// ------------------------------------------------------------------ scalar helpers
MRL_HD float mrl_exp(float x) { return ::expf(x); }
MRL_HD double mrl_exp(double x) { return ::exp(x); }
MRL_HD float mrl_log(float x) { return ::logf(x); }
MRL_HD double mrl_log(double x) { return ::log(x); }
MRL_HD double mrl_expm1(double x) { return ::expm1(x); }

// The running max starts at the lowest finite value, not -inf, so that (m - z) * s stays 0
// (never inf * 0) for the first element. Logits must be finite with |x| < 1e30.
template <typename acc_t> MRL_HD acc_t lowest_finite();
template <> MRL_HD float lowest_finite<float>() { return -3.402823466e38f; }
template <> MRL_HD double lowest_finite<double>() { return -1.7976931348623157e308; }

// ------------------------------------------------------------------ log-sum-exp statistics
template <typename acc_t>
struct LseStats {
  acc_t m;  // running max of z
  acc_t s;  // sum exp(z - m)
  acc_t w;  // sum (z - m) exp(z - m)
};

template <typename acc_t>
MRL_HD LseStats<acc_t> lse_init() {
  return {lowest_finite<acc_t>(), acc_t(0), acc_t(0)};
}

// Online update with one scaled logit z (one exp per element: exp(-|z - m|)).
template <typename acc_t>
MRL_HD void lse_add(LseStats<acc_t>& st, acc_t z) {
  if (z > st.m) {
    const acc_t a = mrl_exp(st.m - z);
    st.w = a * (st.w + (st.m - z) * st.s);
    st.s = a * st.s + acc_t(1);
    st.m = z;
  } else {
    const acc_t e = mrl_exp(z - st.m);
    st.s += e;
    st.w += (z - st.m) * e;
  }
}

// Merge two partial statistics (a first, then b: callers keep the order fixed).
template <typename acc_t>
MRL_HD LseStats<acc_t> lse_merge(const LseStats<acc_t>& a, const LseStats<acc_t>& b) {
  if (b.s == acc_t(0)) return a;
  if (a.s == acc_t(0)) return b;
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t ea = mrl_exp(a.m - m), eb = mrl_exp(b.m - m);
  return {m, a.s * ea + b.s * eb, ea * (a.w + (a.m - m) * a.s) + eb * (b.w + (b.m - m) * b.s)};
}

// Number of per-token statistics written by the forward op: [m, s, w, target z, has target].
constexpr int kStatsWidth = 5;

// Column of the global target id in this shard, or -1 when it is not one of its n_valid columns.
MRL_HD int64_t local_target(int64_t target, int64_t vocab_start, int64_t n_valid) {
  const int64_t v = target - vocab_start;
  return (v >= 0 && v < n_valid) ? v : int64_t(-1);
}

// dL/dx for one logit x of a row with global lse and entropy H (see the file header).
template <typename acc_t>
MRL_HD acc_t grad_logit(acc_t x, acc_t inv_t, acc_t lse, acc_t entropy, acc_t g_lp, acc_t g_h,
                        bool is_target) {
  const acc_t logp = x * inv_t - lse;
  const acc_t p = mrl_exp(logp);
  acc_t g = -p * (g_lp + g_h * (logp + entropy));
  if (is_target) g += g_lp;
  return g * inv_t;
}

// ------------------------------------------------------------------ PPO log-ratio / clipping
// Settings: a value <= 0 switches the feature off (dual_clip_c, tis_cap, icepop_*, seq_*).
struct PpoSettings {
  double eps_low, eps_high, dual_clip_c, tis_cap, icepop_low, icepop_high, seq_low, seq_high;
  bool has_rollout, has_weights;
};

// Counters (float64 sums over the chunk / batch), in this order:
enum PpoCounter : int {
  kValid = 0,     // tokens in the input loss mask
  kKept,          // tokens left after IcePop / sequence masking (the policy loss' tokens)
  kClipLow,       // kept, A < 0 and ratio < 1 - eps_low
  kClipHigh,      // kept, A > 0 and ratio > 1 + eps_high
  kDualClip,      // kept, A < 0 and the dual clip bound -A c is the loss
  kTisClip,       // valid and rho = pi_old / mu > tis_cap
  kMasked,        // valid but dropped (IcePop / sequence mask)
  kRatioSum,      // sum of the (clamped) ratio over kept tokens
  kRatioMax,      // max ratio over kept tokens (lowest when none)
  kRatioMin,      // min ratio over kept tokens (max when none)
  kApproxKl,      // sum over kept tokens of expm1(lr) - lr, lr = logp - old_logp (k3)
  kAbsLogpDiff,   // sum over valid tokens of |old - rollout|
  kMismatchK3,    // sum over valid tokens of expm1(log rho) - log rho
  kNumCounters
};

constexpr double kMaxLogRatio = 20.0;  // exp() overflow guard; gradient 0 beyond it

MRL_HD void counters_init(double* c) {
  for (int k = 0; k < kNumCounters; ++k) c[k] = 0.0;
  c[kRatioMax] = -1.7976931348623157e308;
  c[kRatioMin] = 1.7976931348623157e308;
}

MRL_HD void counters_merge(double* into, const double* c) {
  for (int k = 0; k < kNumCounters; ++k) {
    if (k == kRatioMax) {
      into[k] = c[k] > into[k] ? c[k] : into[k];
    } else if (k == kRatioMin) {
      into[k] = c[k] < into[k] ? c[k] : into[k];
    } else {
      into[k] += c[k];
    }
  }
}

// Sequence mask of one row: keep when seq_low <= exp(mean log rho over valid tokens) <= seq_high.
MRL_HD bool seq_keep(double sum_log_rho, double n_valid, const PpoSettings& st) {
  if (!(st.has_rollout && st.seq_low > 0.0)) return true;
  const double g = mrl_exp(sum_log_rho / (n_valid > 1.0 ? n_valid : 1.0));
  return g >= st.seq_low && g <= st.seq_high;
}

struct PpoOut {
  double loss, dlogp;
  bool keep;
};

// One token: loss contribution (before aggregation), d loss / d logprob, whether it is kept,
// and its counter increments. valid = in the input loss mask; row_keep = the row's sequence mask.
MRL_HD PpoOut ppo_token(double lp, double old, double rollout, double adv, double iw, bool valid,
                        bool row_keep, const PpoSettings& st, double* c) {
  PpoOut out{0.0, 0.0, false};
  if (!valid) return out;
  c[kValid] += 1.0;
  double w = st.has_weights ? iw : 1.0;
  bool keep = row_keep;
  if (st.has_rollout) {
    const double log_rho = old - rollout, rho = mrl_exp(log_rho);
    c[kAbsLogpDiff] += log_rho < 0 ? -log_rho : log_rho;
    c[kMismatchK3] += mrl_expm1(log_rho) - log_rho;
    if (st.icepop_low > 0.0 && !(rho >= st.icepop_low && rho <= st.icepop_high)) keep = false;
    if (st.tis_cap > 0.0) {
      if (rho > st.tis_cap) c[kTisClip] += 1.0;
      w *= rho < st.tis_cap ? rho : st.tis_cap;
    }
  }
  if (!keep) {
    c[kMasked] += 1.0;
    return out;
  }
  c[kKept] += 1.0;
  const double lr = lp - old;
  const bool in_range = lr >= -kMaxLogRatio && lr <= kMaxLogRatio;
  const double lrc = lr < -kMaxLogRatio ? -kMaxLogRatio : (lr > kMaxLogRatio ? kMaxLogRatio : lr);
  const double r = mrl_exp(lrc), dr = in_range ? r : 0.0;
  const double lo = 1.0 - st.eps_low, hi = 1.0 + st.eps_high;
  const double rc = r < lo ? lo : (r > hi ? hi : r);
  const double pg1 = -adv * r, pg2 = -adv * rc;
  double loss = pg1 >= pg2 ? pg1 : pg2;
  double d = pg1 >= pg2 ? -adv * dr : 0.0;  // a tie means r is inside the clip range (or A = 0)
  if (st.dual_clip_c > 0.0 && adv < 0.0) {
    const double pg3 = -adv * st.dual_clip_c;
    if (pg3 < loss) {
      loss = pg3;
      d = 0.0;
      c[kDualClip] += 1.0;
    } else if (pg3 == loss) {
      d *= 0.5;  // torch.minimum splits the gradient of a tie
    }
  }
  if (adv < 0.0 && r < lo) c[kClipLow] += 1.0;
  if (adv > 0.0 && r > hi) c[kClipHigh] += 1.0;
  c[kRatioSum] += r;
  c[kRatioMax] = r > c[kRatioMax] ? r : c[kRatioMax];
  c[kRatioMin] = r < c[kRatioMin] ? r : c[kRatioMin];
  c[kApproxKl] += mrl_expm1(lr) - lr;
  out.loss = loss * w;
  out.dlogp = d * w;
  out.keep = true;
  return out;
}

}  // namespace fused
}  // namespace megatron_rl
