"""CPU backend for Megatron-Core 0.19.2: every CUDA assumption we patch, in one place.

Legend: each ``_patch_*`` function covers one upstream code path, named in its docstring.
``apply_cpu_patches()`` applies all of them, is idempotent, and refuses to run when the selected
device is CUDA (none of these patches may touch a GPU run). ``tests/test_device.py`` re-reads the
upstream source of every patched function and fails when upstream changes it, so a Megatron-Core
upgrade cannot silently invalidate a workaround.

Left out on purpose: CUDA graphs, TE, fused kernels, NCCL streams and FSDP on CPU; the CPU path uses
the "local" Megatron-Core spec (torch attention, torch norms) and gloo collectives.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from typing import Callable

import torch

_APPLIED = False

# Upstream functions each patch replaces or wraps, with the sha1 of their source at the pinned
# megatron-core version. Checked by tests/test_device.py (see `upstream_fingerprints`).
PATCHED_UPSTREAM: dict[str, str] = {}


def resolve_device(device: str | None = None) -> str:
    """Return the compute device name: ``"cuda"`` or ``"cpu"``.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None``/``"auto"`` (CUDA if available, else CPU).
    Raises:
        ValueError: unknown name, or ``"cuda"`` requested on a machine without a usable GPU.
    """
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
    return device


def dist_backend(device: str) -> str:
    """torch.distributed backend for a device: nccl on CUDA, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


# --------------------------------------------------------------------------------------------
# Patches. Each names the upstream code it covers.
# --------------------------------------------------------------------------------------------


def _patch_current_device() -> None:
    """megatron.core.utils.GlobalMemoryBuffer.get_tensor and ~100 other sites (tensor_parallel.
    mappings/layers, distributed.param_and_grad_buffer, optimizer, router, p2p_communication, ...)
    allocate with ``device=torch.cuda.current_device()``. With no GPU that call raises, so on the
    CPU backend it returns the CPU device. ``torch.cuda.is_available()`` stays False."""
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


class _CpuRNGStatesTracker:
    """Drop-in for megatron.core.tensor_parallel.random.CudaRNGStatesTracker on CPU.

    Keeps named CPU generator states (data-parallel / model-parallel / expert-parallel) and forks
    the global CPU generator into them, which is what the CUDA tracker does with the GPU
    generator. Used by TP weight init and by activation recompute."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch_rng() -> None:
    """megatron.core.tensor_parallel.random: ``_get_cuda_rng_state``, ``_set_cuda_rng_state``,
    ``initialize_rng_tracker`` (CudaRNGStatesTracker) and ``model_parallel_cuda_manual_seed`` all
    drive the CUDA generator. On CPU they drive the CPU generator instead; the seed offsets
    (2718 + tp_rank, 1024 + 100*ep_rank + etp_rank) are upstream's."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def _init_tracker(*args, force_reset: bool = False, **kwargs):
        if mrandom._CUDA_RNG_STATE_TRACKER is None or force_reset or not isinstance(
            mrandom._CUDA_RNG_STATE_TRACKER, _CpuRNGStatesTracker
        ):
            mrandom._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    orig_seed = mrandom.model_parallel_cuda_manual_seed

    def _seed(seed: int, *args, **kwargs):
        torch.manual_seed(seed)
        kwargs.pop("te_rng_tracker", None)
        with _cuda_seed_is_cpu_seed():
            orig_seed(seed, *args, **kwargs)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    mrandom.initialize_rng_tracker = _init_tracker
    mrandom.model_parallel_cuda_manual_seed = _seed
    tensor_parallel.model_parallel_cuda_manual_seed = _seed
    _init_tracker(force_reset=True)


@contextlib.contextmanager
def _cuda_seed_is_cpu_seed():
    """Within upstream ``model_parallel_cuda_manual_seed``, ``torch.cuda.manual_seed(dp_seed)``
    seeds the default CUDA generator; on CPU that becomes the CPU generator."""
    orig = torch.cuda.manual_seed
    torch.cuda.manual_seed = torch.manual_seed  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.manual_seed = orig


def _patch_alltoall_dispatcher() -> None:
    """megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher: ``__init__``
    creates ``torch.cuda.Stream()`` and ``_maybe_dtoh_and_synchronize`` copies split sizes on that
    stream and records a ``torch.cuda.Event``. On CPU there is nothing to copy or synchronise, but
    gloo's ``all_to_all_single`` needs the split sizes as Python lists (not tensors), so we turn
    them into lists here."""
    from megatron.core.transformer.moe import token_dispatcher as td

    cls = td.MoEAlltoAllTokenDispatcher
    if cls.cuda_dtoh_stream is None:
        cls.cuda_dtoh_stream = "cpu-no-stream"

    def _as_list(x):
        if torch.is_tensor(x):
            return x.tolist()
        if hasattr(x, "tolist"):
            return x.tolist()
        return x

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            self.input_splits = _as_list(self.input_splits)
            self.output_splits = _as_list(self.output_splits)
            # upstream calls .tolist() on output_splits_tp itself: keep it an array
            if torch.is_tensor(self.output_splits_tp):
                self.output_splits_tp = self.output_splits_tp.numpy()
        return tokens_per_expert

    cls._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


class SequenceParallelTorchNorm:
    """Replacement for megatron.core.transformer.torch_norm.WrappedTorchNorm (which asserts
    ``not config.sequence_parallel``). Builds ``torch.nn.RMSNorm``/``LayerNorm`` and tags its
    parameters with ``sequence_parallel=True`` so Megatron's ``finalize_model_grads`` all-reduces
    their gradients over the TP group, exactly as TENorm/FusedLayerNorm do on GPU."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r} on CPU")
        if config.sequence_parallel:
            for p in norm.parameters():
                setattr(p, "sequence_parallel", True)
        return norm


def _patch_norm() -> None:
    """megatron.core.models.backends.LNImpl / gpt_layer_specs.LNImpl / torch_norm.WrappedTorchNorm
    (chosen when Apex is absent) refuse ``sequence_parallel``; TP > 1 with MoE needs it."""
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import torch_norm

    torch_norm.WrappedTorchNorm = SequenceParallelTorchNorm
    backends.WrappedTorchNorm = SequenceParallelTorchNorm  # LocalSpecProvider.layer_norm(rms)
    if getattr(backends, "LNImpl", None) is not None and not _is_apex_norm(backends.LNImpl):
        backends.LNImpl = SequenceParallelTorchNorm
    if getattr(gpt_layer_specs, "LNImpl", None) is not None and not _is_apex_norm(
        gpt_layer_specs.LNImpl
    ):
        gpt_layer_specs.LNImpl = SequenceParallelTorchNorm


def _is_apex_norm(cls) -> bool:
    return "apex" in getattr(cls, "__module__", "") or cls.__name__ == "FusedLayerNorm"


def _patch_default_causal_mask() -> None:
    """megatron.core.transformer.utils.get_default_causal_mask builds the [sq, sq] causal mask
    with ``device="cuda"`` (used by FusedScaleMaskSoftmax.forward_torch_softmax when no mask is
    passed). Same mask, on CPU."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _patch_fp32_optimizer_state_load() -> None:
    """megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.
    _set_main_param_and_optimizer_states copies loaded state into the main params. With fp32
    model params (our CPU default) the main param is a *view* of the model param, which
    requires grad, so the in-place ``copy_`` outside ``no_grad`` is refused by autograd. Run it
    under ``no_grad`` (what the bf16 path effectively does)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(orig, "_megatron_rl_no_grad", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        with torch.no_grad():
            return orig(self, model_param, tensors)

    _set_main_param_and_optimizer_states._megatron_rl_no_grad = True
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


# Literal CUDA device/type spellings in upstream source and their CPU equivalents.
_CUDA_LITERALS = (
    ("device='cuda'", "device='cpu'"),
    ('device="cuda"', 'device="cpu"'),
    ("'torch.cuda.FloatTensor'", "'torch.FloatTensor'"),
    ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"),
    ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'"),
    ("torch.cuda.synchronize()", "None"),
    ("torch.cuda.empty_cache()", "None"),
    ("torch.cuda.current_stream()", "__import__('megatron_rl.device').device.NULL_STREAM"),
    ("torch.cuda.stream(", "__import__('contextlib').nullcontext("),
    ("send_tensor.cuda()", "send_tensor"),
    ("weight.data.cuda()", "weight.data"),
    ("output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)",
     "output = output + output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"),
)


class _NullStream:
    """Stands in for a CUDA stream on CPU: every operation is already synchronous."""

    def wait_event(self, *_):
        return None

    def wait_stream(self, *_):
        return None

    def record_event(self, *_):
        return None

    def synchronize(self):
        return None


NULL_STREAM = _NullStream()

# Upstream functions whose bodies hard-code a CUDA device or CUDA tensor type names. On CPU they
# are recompiled from their own source with ``_CUDA_LITERALS`` substituted (same logic, CPU
# device), which is less invasive than re-implementing them and breaks loudly (the rewrite
# refuses when no literal is found) when upstream changes them.
_REWRITTEN = (
    # MixedPrecisionOptimizer.__init__: found_inf / _dummy_overflow_buf / _scale_one on 'cuda'.
    "megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.__init__",
    # MegatronOptimizer.has_grad_norm_group: all-reduces a flag tensor made on 'cuda'.
    "megatron.core.optimizer.optimizer:MegatronOptimizer.has_grad_norm_group",
    # FP32Optimizer.__init__: _scale on 'cuda'.
    "megatron.core.optimizer.optimizer:FP32Optimizer.__init__",
    # DistributedOptimizer: accepts only 'torch.cuda.*Tensor' params.
    "megatron.core.optimizer.distrib_optimizer:"
    "DistributedOptimizer._build_model_and_main_param_groups",
    # torch_dist save: synchronises CUDA after the (no-op on CPU) device-to-host copies.
    "megatron.core.dist_checkpointing.strategies.filesystem_async:"
    "FileSystemWriterAsync.preload_tensors",
    # DistributedOptimizer.get_parameter_state_dp_zero: gathers state shards via .cuda().
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero",
    # Float16OptimizerWithFloat16Params.__init__: same type check for the non-distributed path.
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
    # clip_grads: total norm buffers on 'cuda'.
    "megatron.core.optimizer.clip_grads:get_grad_norm_fp32",
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.clip_grads:count_zeros_fp32",
    # schedules: total_num_tokens accumulator on 'cuda' (per-token loss).
    "megatron.core.pipeline_parallel.schedules:forward_backward_no_pipelining",
    "megatron.core.pipeline_parallel.schedules:forward_backward_pipelining_without_interleaving",
    # expert MLP with add_bias_linear: the bias is added in place to the output of the
    # row-parallel fc2, a view returned by a custom autograd Function (refused by autograd).
    "megatron.core.transformer.mlp:MLP.forward",
    # pipeline p2p: torch.cuda.synchronize() after batched isend/irecv (batch_p2p_sync).
    "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate",
    "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate_shapes",
    # tied embeddings with PP > 1: the last stage's output weight is moved with .cuda().
    "megatron.core.models.common.language_module.language_module:"
    "LanguageModule.setup_embeddings_and_output_layer",
    # local fallback for amp_C.multi_tensor_l2norm returns its result on "cuda".
    "megatron.core.utils:local_multi_tensor_l2_norm",
    # grad-sync: waits on torch.cuda.current_stream() / communication stream.
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync",
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.finish_grad_sync",
)


def _rewrite_function(qualname: str) -> None:
    """Recompile ``qualname`` from its source with ``_CUDA_LITERALS`` substituted."""
    import importlib
    import re
    import textwrap

    mod_name, _, attr_path = qualname.partition(":")
    module = importlib.import_module(mod_name)
    *owner_path, name = attr_path.split(".")
    owner = module
    for part in owner_path:
        owner = getattr(owner, part)
    raw = owner.__dict__[name] if owner is not module else getattr(module, name)
    fn = inspect.unwrap(raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw)
    src = textwrap.dedent(inspect.getsource(fn))
    new = src
    for old, rep in _CUDA_LITERALS:
        new = new.replace(old, rep)
    if new == src:
        raise RuntimeError(f"CPU rewrite of {qualname}: no CUDA literal found; upstream changed")
    if owner_path:  # zero-argument super() needs the class cell: make it explicit
        new = re.sub(r"super\(\)", f"super({owner_path[-1]}, self)", new)
    namespace: dict = {}
    exec(compile(new, f"<megatron_rl.device CPU rewrite of {qualname}>", "exec"),
         module.__dict__, namespace)
    old_obj = getattr(owner, name)
    setattr(owner, name, namespace[name])
    if not owner_path:  # re-point `from x import fn [as alias]` copies in megatron modules
        import sys

        for mname, mod in list(sys.modules.items()):
            if not mname.startswith("megatron") or mod is None:
                continue
            for attr, val in list(vars(mod).items()):
                if val is old_obj:
                    setattr(mod, attr, namespace[name])


def _patch_cuda_literals() -> None:
    """See ``_REWRITTEN``."""
    for qualname in _REWRITTEN:
        _rewrite_function(qualname)


# (upstream qualified name, patch function). The qualified names are fingerprinted by the tests.
_PATCHES: list[tuple[tuple[str, ...], Callable[[], None]]] = [
    (
        (
            "megatron.core.utils:GlobalMemoryBuffer.get_tensor",
            "megatron.core.tensor_parallel.mappings:_gather_along_first_dim",
            "megatron.core.tensor_parallel.mappings:_AllToAll.forward",
        ),
        _patch_current_device,
    ),
    (
        (
            "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
            "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
            "megatron.core.tensor_parallel.random:initialize_rng_tracker",
            "megatron.core.tensor_parallel.random:model_parallel_cuda_manual_seed",
            "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add",
            "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork",
        ),
        _patch_rng,
    ),
    (
        (
            "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.__init__",
            "megatron.core.transformer.moe.token_dispatcher:"
            "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
        ),
        _patch_alltoall_dispatcher,
    ),
    (
        (
            "megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",
            "megatron.core.models.backends:LocalSpecProvider.layer_norm",
        ),
        _patch_norm,
    ),
    (("megatron.core.transformer.utils:get_default_causal_mask",), _patch_default_causal_mask),
    (_REWRITTEN, _patch_cuda_literals),
    (
        ("megatron.core.optimizer.distrib_optimizer:"
         "DistributedOptimizer._set_main_param_and_optimizer_states",),
        _patch_fp32_optimizer_state_load,
    ),
]


def _resolve(qualname: str):
    import importlib

    mod_name, _, attr_path = qualname.partition(":")
    obj = importlib.import_module(mod_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def upstream_fingerprints() -> dict[str, str]:
    """sha1 of the source of every upstream function a CPU patch covers (unpatched state).

    Must be called before ``apply_cpu_patches`` in the process (the test runs it in a fresh
    interpreter). Returns ``{qualname: sha1_hex}``."""
    if _APPLIED:
        raise RuntimeError("upstream_fingerprints() must run before apply_cpu_patches()")
    out = {}
    for names, _ in _PATCHES:
        for name in names:
            src = inspect.getsource(_resolve(name))
            out[name] = hashlib.sha1(src.encode()).hexdigest()
    return out


def apply_cpu_patches(device: str = "cpu") -> None:
    """Make Megatron-Core 0.19.2 run on CPU with gloo. Idempotent.

    Args:
        device: the resolved device; the call is refused unless it is ``"cpu"``.
    Raises:
        RuntimeError: when called for ``"cuda"`` (the patches must never touch a GPU run) or
            when ``torch.cuda.is_available()`` and ``MEGATRON_RL_FORCE_CPU`` is not set.
    """
    global _APPLIED
    if device != "cpu":
        raise RuntimeError(f"CPU patches requested for device {device!r}; refusing")
    if torch.cuda.is_available() and os.environ.get("MEGATRON_RL_FORCE_CPU") != "1":
        raise RuntimeError(
            "CUDA is available: refusing to patch Megatron-Core for CPU. Pass --device cuda, or set "
            "MEGATRON_RL_FORCE_CPU=1 to debug the CPU path on a GPU machine."
        )
    if _APPLIED:
        return
    for _, patch in _PATCHES:
        patch()
    _APPLIED = True


def cpu_patches_applied() -> bool:
    """True once ``apply_cpu_patches`` has run in this process."""
    return _APPLIED
