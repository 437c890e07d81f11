"""Exact global-batch load-balancing loss (LBL) for Megatron-Core MoE routers.

Legend: L = decoder layers, E = experts, K = top-k, T = tokens a router sees in one micro-batch
(seq-first flattening of [S_local, B], S_local = S / tp under sequence parallelism),
N = valid tokens in the whole optimizer step (all DP ranks, all micro-batches).

Source: Qiu et al., "Demons in the Detail: On Implementing Load Balancing Loss for Training
Specialized Mixture-of-Expert Models" (arXiv 2501.11873), Switch-Transformer LBL form, computed
over the global batch B instead of per micro-batch. Per MoE layer:

    C_i = #valid tokens routed to expert i,  f_i = C_i / (K N),  P_i = (1/N) sum_x p_{x,i}
    L   = alpha * E * sum_i f_i P_i                      (p = full softmax of the router logits)

Because f is a count (no gradient), dL/dtheta = alpha E / (K N^2) sum_i C_i sum_x dp_{x,i}/dtheta,
a sum over tokens. Two phases make the accumulated gradient exact for any micro-batching, DP,
PP schedule or TP+SP sharding:

  A. ``GlobalLBL.collect_counts``: a no-grad forward over the step's micro-batches with a forward
     hook on every ``TopKRouter`` counting the routes actually used (after capacity dropping) for
     valid tokens; all-reduced over DP (+TP under sequence parallelism, where each TP rank routes
     a disjoint sequence shard; without SP the TP ranks route the same tokens and are not summed)
     and over PP (each stage fills its own layers).
  B. ``GlobalLBL.attached``: each router's ``gating`` is wrapped so its logits carry the
     surrogate ``D * s * sum_i w_i sum_{x in b, valid} p_{x,i}`` (``w = global_lbl_coefficients``)
     through an identity autograd function that injects a gradient of 1 for it. Megatron then
     sums it over micro-batches and DP ranks (and TP ranks under SP) and ``finalize_model_grads``
     divides by D, the global loss-token count (``calculate_per_token_loss``); the optimizer
     divides by the loss scale s. The net gradient is exactly dL/dtheta.

Phase A also keeps each micro-batch's counts (``mb_counts``) for the per-micro-batch LBL of
``megatron_rl.moe.balance``, and ``set_local_counts`` takes counts the caller already has.
Tested against a float64 full-batch reference at DP2 x 4 uneven micro-batches, TP2 + sequence
parallel, PP2 and EP2 (tests/test_global_lbl.py).

Left out: context parallelism, MTP routers, activation recompute of the MoE layer (the recompute
would read the mask of the wrong micro-batch), sinkhorn/quantile routing. Megatron's own aux
losses must be off (the constructor of the hooks refuses otherwise).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


def global_lbl_coefficients(counts: torch.Tensor, n_tokens: float, topk: int,
                            alpha: float) -> torch.Tensor:
    """Per-layer, per-expert weights w with L_l = sum_i w_{l,i} * sum_x p_{x,i}.

    Args:
        counts: [L, E] routed valid-token counts C over the global batch (float or int).
        n_tokens: N, valid tokens in the global batch (> 0).
        topk: K.
        alpha: LBL coefficient.
    Returns:
        [L, E] float64 ``alpha * E * C / (K * N**2)`` (units: loss per unit of summed prob).
    Raises:
        ValueError: ``n_tokens <= 0`` or ``topk < 1``.
    """
    if n_tokens <= 0 or topk < 1:
        raise ValueError(f"need n_tokens > 0 and topk >= 1, got {n_tokens}, {topk}")
    e = counts.shape[-1]
    return alpha * e * counts.double() / (topk * float(n_tokens) ** 2)


def lbl_value(counts: torch.Tensor, probs_sum: torch.Tensor, n_tokens: float, topk: int,
              alpha: float) -> tuple[torch.Tensor, dict]:
    """Global-batch Switch LBL per layer from counts and summed router probabilities.

    Args:
        counts: [L, E] routed valid-token counts C.
        probs_sum: [L, E] sum over valid tokens of the full softmax router probs.
        n_tokens / topk / alpha: N, K, alpha.
    Returns:
        ``(loss [L] float64, {"moe/lbl": total over layers (float)})``; a perfectly uniform
        router gives alpha per layer.
    """
    loss = (global_lbl_coefficients(counts, n_tokens, topk, alpha) * probs_sum.double()).sum(-1)
    return loss, {"moe/lbl": float(loss.sum())}


def lbl_surrogate(probs: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Micro-batch term whose gradient is this micro-batch's share of dL/dtheta.

    Args:
        probs: [T, E] full softmax router probabilities (with grad).
        valid: [T] bool, tokens that count.
        weights: [E] ``global_lbl_coefficients`` row of this layer.
    Returns:
        [] ``sum_i w_i sum_{x valid} p_{x,i}`` in ``probs.dtype``.
    """
    return (probs * valid.to(probs.dtype)[:, None]).sum(0).mul(weights.to(probs.dtype)).sum()


def routed_counts(routing_map: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[E] float64 number of valid tokens routed to each expert; routing_map [T, E] bool,
    valid [T] bool."""
    return (routing_map & valid[:, None]).sum(0).double()


class _AttachGrad(torch.autograd.Function):
    """Identity on ``x``; backward gives ``aux`` a gradient of 1 (Megatron's
    ``MoEAuxLossAutoScaler`` without its global, schedule-set scale)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


def batch_field(batch, name: str):
    """``batch[name]`` of a dict batch, else the attribute (a typed micro-batch such as
    ``train.rl_batch.MicroBatch``); Megatron's schedules hand the forward step either."""
    return batch[name] if isinstance(batch, dict) else getattr(batch, name)


def token_validity(mask: torch.Tensor, config) -> torch.Tensor:
    """[T] bool validity of the tokens this rank's routers see, from a [B, S] 0/1 mask: seq-first
    flattening of [S_local, B], S_local the TP rank's shard under sequence parallelism."""
    from megatron.core import parallel_state as ps

    m = mask.bool().t()  # [S, B]
    if config.sequence_parallel:
        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        s = m.shape[0] // tp
        m = m[r * s:(r + 1) * s]
    return m.reshape(-1)


def _routers(model) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter) and not m.is_mtp_layer]


@dataclass
class GlobalLBL:
    """Exact global-batch LBL, installed on a Trainer's routers (see module docstring).

    Attributes:
        alpha: LBL coefficient (0 disables phase B; counts/metrics still work).
        detach_router_input: if True the LBL gradient reaches only the router weights (the
            router logits are recomputed from a detached input for the surrogate).
        mask_key: batch key of the [B, S] validity mask (1 = token counts).
    State after ``collect_counts``: ``counts`` [num_layers, E] float64 (rows of dense layers 0),
    ``moe_layers`` (0-based decoder indices of MoE layers), ``n_tokens`` N, ``topk``; per
    micro-batch of this rank: ``mb_counts`` [M_local, num_layers, E] float64 (summed over the
    TP ranks under sequence parallelism, this PP stage's rows only), ``mb_tokens`` [M_local]
    float64 valid tokens, and ``n_microbatches`` M (all DP ranks).
    """

    alpha: float
    detach_router_input: bool = False
    mask_key: str = "loss_mask"
    counts: torch.Tensor | None = None
    n_tokens: float = 0.0
    topk: int = 0
    moe_layers: list[int] = field(default_factory=list)
    mb_counts: torch.Tensor | None = None
    mb_tokens: torch.Tensor | None = None
    n_microbatches: int = 0
    _mask: torch.Tensor | None = None
    _mb: int = -1  # index of the micro-batch being run (set by wrap_forward_step)
    _present: torch.Tensor | None = None  # [num_layers] 1 where a MoE router exists

    # -- validity of the tokens a router sees -------------------------------------------------
    def wrap_forward_step(self, forward_step: Callable) -> Callable:
        """Forward step that records the micro-batch's mask for the router hooks. It peeks the
        batch from the iterator and hands ``forward_step`` an iterator yielding that batch."""

        def step(data_iterator, model):
            batch = next(data_iterator)
            self._mask = batch_field(batch, self.mask_key)
            self._mb += 1
            return forward_step(iter([batch]), model)

        return step

    def _valid(self, n_local: int, config) -> torch.Tensor:
        """[T] bool validity of this rank's router tokens (seq-first; SP shard of the rows)."""
        if self._mask is None:
            raise RuntimeError("GlobalLBL: no mask; run the model through wrap_forward_step")
        m = token_validity(self._mask, config)
        if m.numel() != n_local:
            raise RuntimeError(f"GlobalLBL: router saw {n_local} tokens, mask has {m.numel()}")
        return m

    # -- phase A ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self, trainer) -> Iterator[None]:
        """Count routes of every forward run inside (through ``wrap_forward_step``) into
        ``self.counts`` (local, unreduced); use ``collect_counts`` for the reduced result."""
        config = trainer.config
        e, nl = config.num_moe_experts, config.num_layers
        local = torch.zeros(nl, e, dtype=torch.float64)
        present = torch.zeros(nl, dtype=torch.float64)
        per_mb: list[torch.Tensor] = []
        self._mb = -1

        def hook(router, inputs, output):
            _, routing_map = output  # [T, E] bool
            i = router.layer_number - 1
            present[i] = 1.0
            c = routed_counts(routing_map.cpu(), self._valid(routing_map.shape[0], config).cpu())
            local[i] += c
            while len(per_mb) <= self._mb:
                per_mb.append(torch.zeros(nl, e, dtype=torch.float64))
            per_mb[self._mb][i] += c

        handles = [r.register_forward_hook(hook) for r in _routers(trainer.model)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.counts, self._present, self.topk = local, present, config.moe_router_topk
        self.mb_counts = (torch.stack(per_mb) if per_mb
                          else torch.zeros(0, nl, e, dtype=torch.float64))

    def collect_counts(self, trainer, microbatches: list[dict]) -> dict:
        """Phase A: no-grad forward over this rank's micro-batches, reduce counts and N.

        Returns ``router_metrics.router_load_metrics`` of the global counts. Collective: every
        rank of the model must call it with its own micro-batches (same order as the training
        step: the per-micro-batch counts are matched to micro-batches by position)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def fwd(data_iterator, model):
            batch = next(data_iterator)
            out = model(*(batch_field(batch, k) for k in ("tokens", "position_ids", "attention_mask")))
            return out, lambda output, non_loss_data=True: None

        b, s = batch_field(microbatches[0], "tokens").shape
        with self.counting(trainer), torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=self.wrap_forward_step(fwd), data_iterator=iter(microbatches),
                model=[trainer.model], num_microbatches=len(microbatches), seq_length=s,
                micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
        return self.reduce_counts(trainer, microbatches)

    def set_local_counts(self, trainer, microbatches: list[dict], counts: torch.Tensor, *,
                         mb_counts: torch.Tensor | None = None) -> dict:
        """Phase A without the extra forward: the caller already has this rank's routes.

        Args:
            counts: [num_layers, E] routed valid-token counts of this rank's micro-batches as the
                router hook of ``counting`` would count them (this rank's SP shard, this PP
                stage's MoE rows, other rows 0), e.g. from recorded / replayed routes.
            mb_counts: optional [M_local, num_layers, E] the same per micro-batch (the "micro"
                LBL needs them); None leaves ``mb_counts`` empty.
        Returns the metrics of ``collect_counts``. Collective."""
        cfg = trainer.config
        self.counts = counts.double().clone().cpu()
        self._present = torch.zeros(cfg.num_layers, dtype=torch.float64)
        for r in _routers(trainer.model):
            self._present[r.layer_number - 1] = 1.0
        self.topk = cfg.moe_router_topk
        self.mb_counts = None if mb_counts is None else mb_counts.double().clone().cpu()
        return self.reduce_counts(trainer, microbatches)

    def reduce_counts(self, trainer, microbatches: list[dict]) -> dict:
        """All-reduce the local ``counts`` to the global ones (DP, TP under SP, PP) and N, M;
        per-micro-batch counts over TP under SP. Returns the router load metrics. Collective."""
        from megatron.core import parallel_state as ps

        from megatron_rl.moe.router_metrics import router_load_metrics

        if self.mb_counts is not None and len(self.mb_counts) < len(microbatches):
            pad = torch.zeros(len(microbatches) - len(self.mb_counts), *self.counts.shape,
                              dtype=torch.float64)  # a stage without MoE layers saw none
            self.mb_counts = torch.cat([self.mb_counts, pad])
        dp = ps.get_data_parallel_group()
        self.mb_tokens = torch.tensor([float(batch_field(mb, self.mask_key).sum()) for mb in microbatches],
                                      dtype=torch.float64)
        n = torch.tensor([float(self.mb_tokens.sum()), float(len(microbatches))],
                         dtype=torch.float64)
        torch.distributed.all_reduce(n, group=dp)
        torch.distributed.all_reduce(self.counts, group=dp)
        if trainer.config.sequence_parallel:  # disjoint sequence shards per TP rank
            tp = ps.get_tensor_model_parallel_group()
            torch.distributed.all_reduce(self.counts, group=tp)
            if self.mb_counts is not None:
                torch.distributed.all_reduce(self.mb_counts, group=tp)
        pp = ps.get_pipeline_model_parallel_group()
        torch.distributed.all_reduce(self.counts, group=pp)
        torch.distributed.all_reduce(self._present, group=pp)
        self.n_tokens, self.n_microbatches = float(n[0]), int(n[1])
        self.moe_layers = [i for i in range(len(self._present)) if self._present[i] > 0]
        return router_load_metrics(self.counts[self.moe_layers], self.n_tokens, self.topk,
                                   layer_ids=self.moe_layers)

    # -- phase B ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self, trainer, forward_step: Callable, *, grad_divisor: float | None = None,
                 weights: torch.Tensor | None = None) -> Iterator[Callable]:
        """Phase B: wrap every router's ``gating`` to inject the LBL gradient; yields the forward
        step to hand to ``train_step`` (``forward_step`` wrapped by ``wrap_forward_step``).

        Gradient scale: each micro-batch's surrogate is multiplied by ``D * s`` where D =
        ``grad_divisor`` (default N: the global loss-token count that ``finalize_model_grads``
        divides every gradient by under ``calculate_per_token_loss``; pass it when the loss
        function's token count is not the ``mask_key`` sum) and s = ``grad_scale_func(1)`` (the
        fp16 loss scale the optimizer divides by; 1 for fp32/bf16). DDP sums over DP ranks, so
        the final gradient is ``sum_{ranks, micro-batches} d(surrogate) / (D s) * s = dL``.

        ``weights`` replaces the global coefficients: [num_layers, E] for every micro-batch, or
        [M_local, num_layers, E] one row per micro-batch of this rank in schedule order (the
        per-micro-batch LBL of ``megatron_rl.moe.balance``); float64, loss per unit of summed
        probability.

        Raises:
            RuntimeError: ``collect_counts`` was not run first.
            ValueError: alpha > 0 with a frozen router (weight.requires_grad False), with
                Megatron's own aux loss enabled, or without ``calculate_per_token_loss``.
        """
        if self.counts is None:
            raise RuntimeError("GlobalLBL.attached: run collect_counts first (phase A)")
        cfg = trainer.config
        routers = _routers(trainer.model) if self.alpha > 0 else []
        for r in routers:
            if not r.weight.requires_grad:
                raise ValueError(f"GlobalLBL: router of layer {r.layer_number} is frozen "
                                 "(requires_grad=False) but the LBL is on (alpha > 0)")
            if r.is_aux_loss_enabled():
                raise ValueError("GlobalLBL: Megatron's own aux loss is enabled "
                                 f"({cfg.moe_router_load_balancing_type}); set it to 'none'")
        if routers and not cfg.calculate_per_token_loss:
            raise ValueError("GlobalLBL needs calculate_per_token_loss=True (build_trainer)")
        w = (global_lbl_coefficients(self.counts, self.n_tokens, self.topk, self.alpha)
             if weights is None else weights.double())
        loss_scale = 1.0
        if cfg.grad_scale_func is not None:
            loss_scale = float(cfg.grad_scale_func(torch.ones(1)))
        scale = (grad_divisor if grad_divisor is not None else self.n_tokens) * loss_scale
        w = w * scale
        self._mb = -1
        for r in routers:
            i = r.layer_number - 1
            row = ((lambda i=i: w[self._mb, i]) if w.dim() == 3 else (lambda i=i: w[i]))
            r.gating = self._wrapped_gating(r, r.gating, row, cfg)
        try:
            yield self.wrap_forward_step(forward_step)
        finally:
            for r in routers:
                del r.gating  # back to the class method

    def _wrapped_gating(self, router, gating: Callable, weights: Callable[[], torch.Tensor],
                        cfg) -> Callable:
        """``gating`` whose logits [S, B, E] carry ``lbl_surrogate`` with ``weights()`` [E]
        (read at each call: the current micro-batch's row)."""
        detach = self.detach_router_input

        def wrapped(inp):
            logits = gating(inp)
            if not (torch.is_grad_enabled() and router.training):
                return logits
            src = gating(inp.detach()) if detach else logits
            e = src.shape[-1]
            probs = torch.softmax(src.reshape(-1, e), dim=-1)  # [T, E] router dtype
            valid = self._valid(probs.shape[0], cfg).to(probs.device)
            term = lbl_surrogate(probs, valid, weights().to(probs.device))
            return _AttachGrad.apply(logits, term)

        return wrapped
