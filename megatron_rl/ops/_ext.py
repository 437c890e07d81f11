"""Loading the compiled ops: ``megatron_rl._C`` (CPU, defines the schemas) and
``megatron_rl._C_cuda`` (CUDA implementations). Both are built by setup.py (see its docstring).

``available(device)`` says whether ``torch.ops.megatron_rl`` can run on that device; callers fall
back to the pure-PyTorch references in ``ops/reference.py`` / ``losses/`` when it cannot.
"""

from __future__ import annotations

import functools


@functools.cache
def has_cpu_op() -> bool:
    """``megatron_rl._C`` imports (registers the schemas and the CPU kernels)."""
    from megatron_rl import _optional

    return _optional.has_cpu_ext()


@functools.cache
def has_cuda_op() -> bool:
    """``megatron_rl._C_cuda`` imports (the CUDA kernels; needs ``_C`` first)."""
    from megatron_rl import _optional

    return _optional.has_cuda_ext()


def available(device) -> bool:
    """Whether the fused ops run on ``device`` (torch.device or str): CPU needs ``_C``,
    CUDA needs ``_C_cuda``; other devices never."""
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return has_cpu_op()
    if kind == "cuda":
        return has_cuda_op()
    return False


def require(device) -> None:
    """Raise RuntimeError naming the missing extension when the fused ops can't run on ``device``."""
    if not available(device):
        from megatron_rl import _optional

        info = _optional.describe_ext()
        raise RuntimeError(f"megatron_rl fused ops are not available on {device}: {info} "
                           "(rebuild with `pip install --no-build-isolation -e .`, or use "
                           "--loss-impl torch)")
