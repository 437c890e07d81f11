// CUDA implementation of the fused RL loss ops (schemas: csrc/fused_loss_cpu.cpp; math:
// csrc/fused_loss.h, shared with the CPU implementation).
//   vocab_stats:     one block per token row; thread k folds columns k, k + 256, ... with the
//                    online update, then a fixed shuffle tree + in-order warp merge (deterministic).
//   vocab_backward_: one block per row, writes dL/dlogits into grad_logits (may alias the logits).
//   ppo_token_loss:  per-row sequence-mask sums, then 1024-token chunks (fixed tree reduction of
//                    the counters), then one thread merges the chunks in order.
// int64 indexing throughout (T * V may exceed 2^31).
//
// Build time: .cu files include the narrow ATen headers, never <torch/extension.h> (all of
// libtorch's C++ API plus pybind11: about 3 minutes of nvcc per file instead of 40 s).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "fused_loss.h"
#include "fused_loss_checks.h"

namespace megatron_rl {
namespace fused {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kPpoChunk = 1024;  // tokens per counter chunk (as on CPU)

template <typename acc_t>
__device__ LseStats<acc_t> block_merge(LseStats<acc_t> st) {
  __shared__ acc_t sm[kWarps], ss[kWarps], sw[kWarps];
  for (int off = 16; off > 0; off >>= 1) {  // lane i merges lane i + off: fixed order
    LseStats<acc_t> o{__shfl_down_sync(0xffffffffu, st.m, off),
                      __shfl_down_sync(0xffffffffu, st.s, off),
                      __shfl_down_sync(0xffffffffu, st.w, off)};
    st = lse_merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sw[warp] = st.w;
  }
  __syncthreads();
  LseStats<acc_t> out = lse_init<acc_t>();
  if (threadIdx.x == 0) {
    for (int k = 0; k < kWarps; ++k) out = lse_merge(out, LseStats<acc_t>{sm[k], ss[k], sw[k]});
  }
  return out;  // valid in thread 0
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) vocab_stats_kernel(
    const scalar_t* __restrict__ base, int64_t s0, int64_t s1, int64_t rows_b, int64_t n_valid,
    acc_t inv_t, const int64_t* __restrict__ target, int64_t vocab_start, acc_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const scalar_t* x = base + (r / rows_b) * s0 + (r % rows_b) * s1;
  LseStats<acc_t> st = lse_init<acc_t>();
  for (int64_t v = threadIdx.x; v < n_valid; v += kThreads) {
    lse_add(st, static_cast<acc_t>(x[v]) * inv_t);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const int64_t t = local_target(target[r], vocab_start, n_valid);
    acc_t* row = out + r * kStatsWidth;
    row[0] = st.m;
    row[1] = st.s;
    row[2] = st.w;
    row[3] = t >= 0 ? static_cast<acc_t>(x[t]) * inv_t : acc_t(0);
    row[4] = t >= 0 ? acc_t(1) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) vocab_backward_kernel(
    const scalar_t* x_base, scalar_t* g_base, int64_t s0, int64_t s1, int64_t rows_b,
    int64_t v_local, int64_t n_valid, acc_t inv_t, const int64_t* __restrict__ target,
    int64_t vocab_start, const acc_t* __restrict__ lse, const acc_t* __restrict__ entropy,
    const acc_t* __restrict__ g_lp, const acc_t* __restrict__ g_h) {
  const int64_t r = blockIdx.x;
  const int64_t off = (r / rows_b) * s0 + (r % rows_b) * s1;
  const scalar_t* x = x_base + off;  // may alias g
  scalar_t* g = g_base + off;
  const acc_t glp = g_lp[r], gh = g_h[r], l = lse[r], h = entropy[r];
  const bool zero = glp == acc_t(0) && gh == acc_t(0);  // masked token: no exp
  const int64_t t = local_target(target[r], vocab_start, n_valid);
  for (int64_t v = threadIdx.x; v < v_local; v += kThreads) {
    acc_t val = acc_t(0);
    if (!zero && v < n_valid) {
      val = grad_logit<acc_t>(static_cast<acc_t>(x[v]), inv_t, l, h, glp, gh, v == t);
    }
    g[v] = static_cast<scalar_t>(val);
  }
}

__global__ void row_log_rho_kernel(const double* old, const double* roll, const bool* mask,
                                   int64_t rows, int64_t len, double* sums, double* counts) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= rows) return;
  double s = 0.0, c = 0.0;
  for (int64_t j = b * len; j < (b + 1) * len; ++j) {
    if (mask[j]) {
      s += old[j] - roll[j];
      c += 1.0;
    }
  }
  sums[b] = s;
  counts[b] = c;
}

__global__ void __launch_bounds__(kThreads) ppo_chunk_kernel(
    const double* lp, const double* old, const double* roll, const double* adv, const double* w,
    const bool* mask, const double* sums, const double* counts, int64_t n, int64_t len,
    PpoSettings st, double* loss, double* dlogp, bool* keep, double* partial) {
  __shared__ double sh[kThreads][kNumCounters];
  double c[kNumCounters];
  counters_init(c);
  const int64_t start = blockIdx.x * kPpoChunk;
  for (int64_t i = start + threadIdx.x; i < (n < start + kPpoChunk ? n : start + kPpoChunk); i += kThreads) {
    const int64_t b = i / len;
    const bool row_keep = st.seq_low > 0.0 ? seq_keep(sums[b], counts[b], st) : true;
    const PpoOut o = ppo_token(lp[i], old[i], roll[i], adv[i], w[i], mask[i], row_keep, st, c);
    loss[i] = o.loss;
    dlogp[i] = o.dlogp;
    keep[i] = o.keep;
  }
  for (int k = 0; k < kNumCounters; ++k) sh[threadIdx.x][k] = c[k];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {  // fixed tree
    if (threadIdx.x < half) counters_merge(sh[threadIdx.x], sh[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int k = 0; k < kNumCounters; ++k) partial[blockIdx.x * kNumCounters + k] = sh[0][k];
  }
}

__global__ void merge_chunks_kernel(const double* partial, int64_t chunks, double* out) {
  double c[kNumCounters];
  counters_init(c);
  for (int64_t k = 0; k < chunks; ++k) counters_merge(c, partial + k * kNumCounters);
  for (int k = 0; k < kNumCounters; ++k) out[k] = c[k];
}

at::Tensor vocab_stats_cuda(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                            int64_t n_valid, double inv_t) {
  const at::Tensor x3 = check_vocab_args(logits, target, vocab_start, n_valid, inv_t, "vocab_stats");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows_b = x3.size(1), rows = x3.size(0) * x3.size(1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lead = logits.sizes().vec();
  lead.back() = kStatsWidth;
  at::Tensor out = at::empty(lead, logits.options().dtype(acc_dtype));
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT32_MAX, "megatron_rl::vocab_stats: at most 2^31 - 1 token rows");
  const at::Tensor tgt = target.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "vocab_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    vocab_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        x3.const_data_ptr<scalar_t>(), x3.stride(0), x3.stride(1), rows_b, n_valid,
        static_cast<acc_t>(inv_t), tgt.const_data_ptr<int64_t>(), vocab_start,
        out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void vocab_backward_cuda(const at::Tensor& logits, const at::Tensor& grad_logits,
                         const at::Tensor& target, int64_t vocab_start, int64_t n_valid,
                         double inv_t, const at::Tensor& lse, const at::Tensor& entropy,
                         const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy) {
  const char* op = "vocab_backward_";
  const at::Tensor x3 = check_vocab_args(logits, target, vocab_start, n_valid, inv_t, op);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.strides() == logits.strides() &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "megatron_rl::", op, ": argument 'grad_logits' must match 'logits' in shape, strides "
              "and dtype (got ", grad_logits.sizes(), " / ", grad_logits.strides(), ")");
  check_device(grad_logits, logits, op, "grad_logits");
  check_row_tensor(lse, target, logits, op, "lse");
  check_row_tensor(entropy, target, logits, op, "entropy");
  check_row_tensor(grad_logprobs, target, logits, op, "grad_logprobs");
  check_row_tensor(grad_entropy, target, logits, op, "grad_entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g3 = grad_logits.dim() == 2 ? grad_logits.unsqueeze(0) : grad_logits;
  const int64_t rows_b = x3.size(1), rows = x3.size(0) * x3.size(1);
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "megatron_rl::vocab_backward_: at most 2^31 - 1 token rows");
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor tgt = target.contiguous();
  const at::Tensor l = lse.to(acc_dtype).contiguous(), h = entropy.to(acc_dtype).contiguous();
  const at::Tensor gl = grad_logprobs.to(acc_dtype).contiguous();
  const at::Tensor gh = grad_entropy.to(acc_dtype).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "vocab_backward_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    vocab_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        x3.const_data_ptr<scalar_t>(), g3.data_ptr<scalar_t>(), x3.stride(0), x3.stride(1), rows_b,
        x3.size(2), n_valid, static_cast<acc_t>(inv_t), tgt.const_data_ptr<int64_t>(), vocab_start,
        l.const_data_ptr<acc_t>(), h.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(),
        gh.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_token_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs,
    const std::optional<at::Tensor>& rollout_logprobs, const at::Tensor& advantages,
    const at::Tensor& loss_mask, const std::optional<at::Tensor>& is_weights, double eps_low,
    double eps_high, double dual_clip_c, double tis_cap, double icepop_low, double icepop_high,
    double seq_low, double seq_high) {
  const PpoSettings st = check_ppo_args(logprobs, old_logprobs, rollout_logprobs, advantages,
                                        loss_mask, is_weights, eps_low, eps_high, dual_clip_c,
                                        tis_cap, icepop_low, icepop_high, seq_low, seq_high);
  const bool has_roll = st.has_rollout, has_w = st.has_weights;
  const c10::cuda::CUDAGuard guard(logprobs.device());
  auto d = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  const at::Tensor lp = d(logprobs), old = d(old_logprobs), adv = d(advantages);
  const at::Tensor roll = has_roll ? d(*rollout_logprobs) : old;
  const at::Tensor w = has_w ? d(*is_weights) : old;
  const at::Tensor mask = loss_mask.to(at::kBool).contiguous();
  const int64_t rows = logprobs.size(0), len = logprobs.size(1), n = rows * len;
  at::Tensor loss = at::empty({rows, len}, lp.options()), dlogp = at::empty({rows, len}, lp.options());
  at::Tensor keep = at::empty({rows, len}, mask.options());
  at::Tensor counters = at::empty({kNumCounters}, lp.options());
  const int64_t chunks = (n + kPpoChunk - 1) / kPpoChunk;
  at::Tensor partial = at::empty({std::max<int64_t>(chunks, 1), kNumCounters}, lp.options());
  at::Tensor sums = at::zeros({std::max<int64_t>(rows, 1)}, lp.options());
  at::Tensor counts = at::zeros({std::max<int64_t>(rows, 1)}, lp.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (has_roll && seq_low > 0.0 && rows > 0) {
    row_log_rho_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(
        old.const_data_ptr<double>(), roll.const_data_ptr<double>(), mask.const_data_ptr<bool>(),
        rows, len, sums.data_ptr<double>(), counts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (chunks > 0) {
    ppo_chunk_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        lp.const_data_ptr<double>(), old.const_data_ptr<double>(), roll.const_data_ptr<double>(),
        adv.const_data_ptr<double>(), w.const_data_ptr<double>(), mask.const_data_ptr<bool>(),
        sums.const_data_ptr<double>(), counts.const_data_ptr<double>(), n, len, st,
        loss.data_ptr<double>(), dlogp.data_ptr<double>(), keep.data_ptr<bool>(),
        partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  merge_chunks_kernel<<<1, 1, 0, stream>>>(partial.const_data_ptr<double>(), chunks,
                                           counters.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto dt = logprobs.scalar_type();
  return {loss.to(dt), dlogp.to(dt), keep, counters};
}

}  // namespace
}  // namespace fused
}  // namespace megatron_rl

TORCH_LIBRARY_IMPL(megatron_rl, CUDA, m) {
  m.impl("vocab_stats", &megatron_rl::fused::vocab_stats_cuda);
  m.impl("vocab_backward_", &megatron_rl::fused::vocab_backward_cuda);
  m.impl("ppo_token_loss", &megatron_rl::fused::ppo_token_loss_cuda);
}
