"""Python side of the csrc/ kernels: autograd wrappers, the TP combine, pure-PyTorch references.

- ``vocab_parallel_logprobs_entropy``: fused token logprobs + entropy over a TP-sharded vocabulary
  (``torch.ops.megatron_rl.vocab_stats`` / ``vocab_backward_``), gradient written in place.
- ``fused_policy_loss``: the fused PPO log-ratio / clipping / TIS / IcePop / sequence-mask loss
  (``torch.ops.megatron_rl.ppo_token_loss``).
- ``available(device)``: whether the compiled op runs there (CPU: ``megatron_rl._C``, CUDA:
  ``megatron_rl._C_cuda``); ``resolve_loss_impl`` turns ``--loss-impl`` into "fused" / "torch".
- ``reference``: the pure-PyTorch twins (float64-capable), the tests' and fallbacks' side.
"""

from megatron_rl.ops._ext import available, has_cpu_op, has_cuda_op, require
from megatron_rl.ops.ppo import fused_policy_loss
from megatron_rl.ops.vocab import combine_stats, vocab_parallel_logprobs_entropy

LOSS_IMPLS = ("fused", "torch")


def resolve_loss_impl(impl: str | None, device) -> str:
    """``--loss-impl`` -> "fused" or "torch": None / "auto" = fused where the op is built for
    ``device``, else torch. Raises ValueError for an unknown name, RuntimeError for "fused" on a
    device without the op."""
    if impl in (None, "auto"):
        return "fused" if available(device) else "torch"
    if impl not in LOSS_IMPLS:
        raise ValueError(f"--loss-impl must be one of {LOSS_IMPLS} (or auto), got {impl!r}")
    if impl == "fused":
        require(device)
    return impl


__all__ = ["available", "combine_stats", "fused_policy_loss", "has_cpu_op", "has_cuda_op",
           "require", "resolve_loss_impl", "vocab_parallel_logprobs_entropy", "LOSS_IMPLS"]
