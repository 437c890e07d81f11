"""Rollout routing replay (R3), R2, and the top-k flip rate, on Megatron-Core's ``RouterReplay``.

Legend: B = rows, S = tokens per row, L = MoE layers of the whole model (the engine's layer axis),
K = router top-k, E = experts, T = tokens one router sees in a micro-batch (seq-first flattening of
[S_local, B]; S_local = S / tp under sequence parallelism, else S).

Source: Ma et al., "Stabilizing MoE Reinforcement Learning by Aligning Training and Inference
Routers" (Rollout Routing Replay, R3; arXiv 2510.11370), on Megatron-Core 0.19.2's
``megatron/core/transformer/moe/router_replay.py``. With ``moe_enable_routing_replay`` every
``TopKRouter`` owns a ``RouterReplay``; under ``REPLAY_FORWARD`` the top-k *indices* are taken from
``target_topk_idx`` while the gate weights are recomputed from the live logits
(``softmax(logits.gather(1, idx))`` for the softmax score function, ``moe_utils.py``), so the router
keeps its gradient. ``RECORD`` stores the indices the router chose.

Engine convention (embedded engine and SGLang): a sample of P prompt + C output tokens comes back
with routes int [P + C - 1, L, K]: row t is the route of the token at position t; the last token is
never fed to the engine, so it has no route. ``build_replay_routes`` lays those out as a
micro-batch tensor [B, S, L, K] (right-padded rows, optionally packed segments); positions without
a route (each sample's last token, padding) get the filler route ``0..K-1``. Those positions are
loss-masked in ``rl_batch.collate`` (the last token predicts nothing; padding is masked), and a
token's route never changes any other token's output (no capacity dropping), so the filler is
harmless -- except for Megatron's own aux loss, which would count it (keep it off; ``GlobalLBL``
counts loss-masked tokens only).

Usage (the routes travel in the batch dict under ``"replay_routes"``)::

    tconfig = enable_routing_replay(tconfig)          # before build_trainer / build_model
    mb["replay_routes"] = build_replay_routes(rows, S, L, K)     # per micro-batch [B, S, L, K]
    with RoutingReplay(tr.model, mode="replay") as rr:           # R3 / R2
        train_step(tr, mbs, forward_step=rr.wrap_forward_step(step))
    with RoutingReplay(tr.model, mode="record") as rr:           # trainer's own routes
        ...forward-only pass with rr.wrap_forward_step(step)...
        recorded = rr.recorded_routes()                          # per micro-batch [B, S, L, K]

Recompute: full or selective-"moe" activation recompute runs the router twice (a no-grad forward
inside the checkpoint, then a grad-enabled recompute in backward, in the same micro-batch order
per layer). Each replayed no-grad training forward queues its indices in Megatron's
``replay_backward_list`` and the recompute pops them with ``REPLAY_BACKWARD``.

Left out: MTP routers (never replayed; they route freely), sinkhorn / quantile-balancing routing
and the fused TE top-k (refused: they bypass ``RouterReplay``), context parallelism, capacity
dropping (the filler would then compete for capacity), CUDA-graph static buffers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from megatron_rl.moe.global_lbl import batch_field

REPLAY_KEY = "replay_routes"


# -- configuration --------------------------------------------------------------------------------
def enable_routing_replay(tconfig):
    """Set ``moe_enable_routing_replay=True`` on a Megatron ``TransformerConfig`` (in place; returned).

    Call before ``build_trainer`` / ``build_model`` (routers create their ``RouterReplay`` at
    construction). Equivalent: ``ModelOptions(overrides={"moe_enable_routing_replay": True})``.
    Raises:
        ValueError: routing the replay cannot control -- ``moe_router_fusion`` (TE fused top-k),
            ``moe_router_load_balancing_type`` "sinkhorn", quantile balancing, or a model without
            MoE layers.
    """
    if not getattr(tconfig, "num_moe_experts", None):
        raise ValueError("routing replay needs a MoE model (num_moe_experts is not set)")
    if getattr(tconfig, "moe_router_fusion", False):
        raise ValueError("routing replay: moe_router_fusion (TE fused top-k) bypasses RouterReplay")
    lbt = getattr(tconfig, "moe_router_load_balancing_type", "none")
    lbt = lbt if isinstance(lbt, (list, tuple)) else [lbt]
    if any(t in ("sinkhorn", "quantile_balancing") for t in lbt):
        raise ValueError(f"routing replay: load balancing type {lbt} bypasses RouterReplay")
    tconfig.moe_enable_routing_replay = True
    return tconfig


def moe_layer_ids(config) -> list[int]:
    """0-based decoder indices of the MoE layers (``moe_layer_freq`` int or 0/1 list), in order;
    the engine's route axis L follows this order."""
    freq, n = config.moe_layer_freq, config.num_layers
    pattern = [int(i % freq == 0) for i in range(n)] if isinstance(freq, int) else list(freq)
    return [i for i, p in enumerate(pattern) if p]


def replay_routers(model) -> list:
    """This PP stage's ``TopKRouter`` modules of ``model`` (DDP-wrapped or not), in layer order,
    MTP routers excluded. Walks ``model``'s own modules, so several models built in one process
    (whose instances all pile up in ``RouterReplay.global_router_replay_instances``) never mix.

    Raises:
        RuntimeError: the model has routers built without ``moe_enable_routing_replay``.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and not m.is_mtp_layer]
    if any(r.router_replay is None for r in routers):
        raise RuntimeError("model built without moe_enable_routing_replay: call "
                           "enable_routing_replay(tconfig) before build_trainer/build_model")
    return sorted(routers, key=lambda r: r.layer_number)


# -- layouts --------------------------------------------------------------------------------------
def _segments(row) -> list[tuple[int, object]]:
    if row is None:
        return []
    if isinstance(row, (np.ndarray, torch.Tensor)):
        return [(0, row)]
    return [(int(o), r) for o, r in row]


def build_replay_routes(rows: Sequence, seq_len: int, num_moe_layers: int, topk: int, *,
                        num_experts: int | None = None) -> torch.Tensor:
    """Lay per-sample engine routes out as one micro-batch's replay tensor.

    Args:
        rows: B entries, one per row of the micro-batch: ``None`` (no sample, e.g. a padding row),
            an int array [n - 1, L, K] (the routes of a sample of n tokens at offset 0, as
            ``SGLangClient`` returns ``routed_experts``), or for packed rows a list of
            ``(offset, routes [n_j - 1, L, K])`` segments (sample j's tokens at
            ``[offset, offset + n_j)``).
        seq_len: S. num_moe_layers: L. topk: K.
        num_experts: E, to range-check the ids (optional).
    Returns:
        [B, S, L, K] int32: ``out[b, offset + t] = routes[t]``; every other position holds the
        filler ``0..K-1`` (each sample's last token and padding: loss-masked positions).
    Raises:
        ValueError: a routes array that is not [n, L, K], a segment past S or overlapping
            another, or an expert id outside [0, E).
    """
    out = torch.arange(topk, dtype=torch.int32).expand(len(rows), seq_len, num_moe_layers,
                                                       topk).clone()
    for b, row in enumerate(rows):
        taken = torch.zeros(seq_len, dtype=torch.bool)
        for off, r in _segments(row):
            r = torch.as_tensor(np.asarray(r) if not isinstance(r, torch.Tensor) else r)
            if r.dim() != 3 or tuple(r.shape[1:]) != (num_moe_layers, topk):
                raise ValueError(f"row {b}: routes shape {tuple(r.shape)}, expected "
                                 f"[n, {num_moe_layers}, {topk}]")
            n = r.shape[0]
            if off < 0 or off + n + 1 > seq_len:  # n routes + the route-less last token
                raise ValueError(f"row {b}: segment at {off} with {n + 1} tokens exceeds S={seq_len}")
            if bool(taken[off:off + n + 1].any()):
                raise ValueError(f"row {b}: segment at {off} overlaps another")
            if n and (int(r.min()) < 0 or (num_experts is not None and int(r.max()) >= num_experts)):
                raise ValueError(f"row {b}: expert id outside [0, {num_experts})")
            taken[off:off + n + 1] = True
            out[b, off:off + n] = r.to(torch.int32)
    return out


def split_routes(routes: torch.Tensor, rows: Sequence) -> list[list[np.ndarray]]:
    """Inverse of ``build_replay_routes``: per-sample routes in the engine's layout.

    Args:
        routes: [B, S, L, K] int (e.g. ``RoutingReplay.recorded_routes()[i]``).
        rows: B entries: an int n (one sample of n tokens at offset 0), None / 0 (no sample),
            or a list of ``(offset, n_tokens)`` segments.
    Returns:
        per row, a list (one per segment) of int32 arrays [n - 1, L, K].
    """
    out = []
    for b, row in enumerate(rows):
        segs = [] if not row else ([(0, row)] if isinstance(row, int) else list(row))
        out.append([routes[b, o:o + n - 1].to(torch.int32).numpy() for o, n in segs])
    return out


def local_replay_indices(replay_routes: torch.Tensor, ordinals: Sequence[int], *,
                         sequence_parallel: bool = False, tp_rank: int = 0,
                         tp_size: int = 1) -> list[torch.Tensor]:
    """Per local router, the [T, K] int64 indices in Megatron's token order.

    Args:
        replay_routes: [B, S, L, K] int (``build_replay_routes``).
        ordinals: for each local router, its index on the L axis (``moe_layer_ids`` order).
        sequence_parallel / tp_rank / tp_size: under SP a TP rank routes rows
            ``[r * S/tp, (r + 1) * S/tp)`` of the sequence.
    Returns:
        list of [S_local * B, K] int64, row ``s * B + b`` = token (b, s) (seq-first, as the router
        flattens its [S_local, B, H] input).
    """
    r = replay_routes.permute(1, 0, 2, 3)  # [S, B, L, K]
    if sequence_parallel and tp_size > 1:
        s = r.shape[0] // tp_size
        r = r[tp_rank * s:(tp_rank + 1) * s]
    k = r.shape[-1]
    return [r[:, :, o].reshape(-1, k).long().contiguous() for o in ordinals]


# -- replay / record ------------------------------------------------------------------------------
class RoutingReplay:
    """Context manager driving this model's ``RouterReplay`` instances for one pass.

    Args:
        model: this rank's model chunk (DDP-wrapped or not), built with replay enabled.
        mode: "replay" (REPLAY_FORWARD with the batch's ``key`` routes; R3 / R2) or "record"
            (RECORD; read with ``recorded_routes``).
        key: batch key (dict batches) or attribute (typed micro-batches) of the [B, S, L, K]
            replay tensor (mode "replay").
    One context per pass (a forward-only pass or one ``train_step``): queued recompute indices
    and recordings are dropped on exit. On exit (also on exceptions) every instance is back to
    no action, no indices, and its original ``get_replay_topk``.
    Raises:
        RuntimeError (on enter): model built without replay (see ``replay_routers``).
        ValueError: unknown mode.
        KeyError (in the forward step): a replay batch without ``key``.
    """

    def __init__(self, model, *, mode: str = "replay", key: str = REPLAY_KEY):
        if mode not in ("replay", "record"):
            raise ValueError(f"mode must be 'replay' or 'record', got {mode!r}")
        self.model, self.mode, self.key = model, mode, key
        self._recorded: list[tuple[tuple[int, int], list[torch.Tensor]]] = []
        self.routers: list = []

    def __enter__(self) -> "RoutingReplay":
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        self.routers = replay_routers(self.model)
        cfg = self.routers[0].config if self.routers else self.model.config
        self.config = cfg
        ids = moe_layer_ids(cfg)
        self.ordinals = [ids.index(r.layer_number - 1) for r in self.routers]
        self.num_moe_layers, self.topk = len(ids), cfg.moe_router_topk
        recompute = cfg.recompute_granularity == "full" or (
            cfg.recompute_granularity == "selective" and "moe" in (cfg.recompute_modules or []))
        action = A.REPLAY_FORWARD if self.mode == "replay" else A.RECORD
        for router in self.routers:
            inst = router.router_replay
            inst.clear_indices()
            inst.set_router_replay_action(action)
            if self.mode == "replay":
                inst.get_replay_topk = self._replay_topk(router, inst, recompute)
        self._recorded = []
        return self

    def __exit__(self, *exc) -> None:
        for router in self.routers:
            inst = router.router_replay
            inst.__dict__.pop("get_replay_topk", None)  # back to the class method
            inst.clear_indices()
            inst.clear_router_replay_action()
        return None

    @staticmethod
    def _replay_topk(router, inst, recompute: bool) -> Callable:
        """``get_replay_topk`` that checks shapes and maps recompute onto REPLAY_BACKWARD."""
        from megatron.core.transformer.moe.router_replay import RouterReplay
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        def topk_fn(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            if inst.target_topk_idx is None:
                raise RuntimeError("RoutingReplay: no indices installed; run the model through "
                                   "wrap_forward_step")
            if inst.target_topk_idx.shape != (scores.shape[0], topk):
                raise RuntimeError(f"RoutingReplay: layer {router.layer_number} routes "
                                   f"{scores.shape[0]} tokens x top-{topk}, replay indices are "
                                   f"{tuple(inst.target_topk_idx.shape)}")
            args = (scores, topk, num_groups, group_topk, default_compute_topk)
            if recompute and router.training:
                if not torch.is_grad_enabled():  # first forward inside a checkpoint: queue
                    inst.replay_backward_list.append(inst.target_topk_idx)
                elif inst.replay_backward_list:  # recompute in backward: FIFO per layer
                    inst.router_replay_action = A.REPLAY_BACKWARD
                    try:
                        return RouterReplay.get_replay_topk(inst, *args)
                    finally:
                        inst.router_replay_action = A.REPLAY_FORWARD
            return RouterReplay.get_replay_topk(inst, *args)

        return topk_fn

    def _install(self, batch: dict) -> None:
        from megatron.core import parallel_state as ps

        routes = batch_field(batch, self.key)
        if routes.dim() != 4 or tuple(routes.shape[2:]) != (self.num_moe_layers, self.topk):
            raise ValueError(f"batch[{self.key!r}] must be [B, S, {self.num_moe_layers}, "
                             f"{self.topk}], got {tuple(routes.shape)}")
        device = next(self.model.parameters()).device
        idx = local_replay_indices(
            routes, self.ordinals, sequence_parallel=bool(self.config.sequence_parallel),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size())
        for router, i in zip(self.routers, idx):
            router.router_replay.target_topk_idx = i.to(device)

    def wrap_forward_step(self, forward_step: Callable) -> Callable:
        """Megatron ``forward_step_func`` that installs (replay) or collects (record) the routes
        of the micro-batch it runs. It peeks the batch from the iterator and hands
        ``forward_step`` an iterator yielding that batch (composes with
        ``GlobalLBL.wrap_forward_step``). The model forward runs inside ``forward_step``, so the
        indices follow the schedule's micro-batch order (forward-only, no-pipelining, 1F1B)."""

        def step(data_iterator, model):
            batch = next(data_iterator)
            if self.mode == "replay":
                self._install(batch)
            out = forward_step(iter([batch]), model)
            if self.mode == "record":
                recs = [r.router_replay.get_recorded_indices() for r in self.routers]
                if any(x is None for x in recs):
                    raise RuntimeError("RoutingReplay: a router recorded nothing")
                self._recorded.append((tuple(batch_field(batch, "tokens").shape),
                                       [x.detach().long().cpu() for x in recs]))
            return out

        return step

    def recorded_routes(self) -> list[torch.Tensor]:
        """The trainer's own routes of every recorded micro-batch, whole model and sequence.

        Collective over the pipeline group (and the TP group under sequence parallelism): every
        rank of the model replica calls it after the same pass. Returns, in micro-batch order,
        [B, S, L, K] int64 tensors (the layout of ``build_replay_routes``; top-k order as the
        router produced it, sorted only when grad was enabled); ``split_routes`` gives the
        per-sample engine layout. Raises RuntimeError in "replay" mode.
        """
        from megatron.core import parallel_state as ps

        if self.mode != "record":
            raise RuntimeError("recorded_routes needs mode='record'")
        sp = bool(self.config.sequence_parallel)
        tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        out = []
        for (b, s), recs in self._recorded:
            full = torch.zeros(s, b, self.num_moe_layers, self.topk, dtype=torch.int64)
            lo, hi = (tpr * (s // tp), (tpr + 1) * (s // tp)) if sp and tp > 1 else (0, s)
            for o, x in zip(self.ordinals, recs):
                full[lo:hi, :, o] = x.view(hi - lo, b, self.topk)
            if sp and tp > 1:
                torch.distributed.all_reduce(full, group=ps.get_tensor_model_parallel_group())
            if ps.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.all_reduce(full, group=ps.get_pipeline_model_parallel_group())
            out.append(full.permute(1, 0, 2, 3).contiguous())
        return out


# -- flip rate ------------------------------------------------------------------------------------
def routing_flip_counts(engine_routes, trainer_routes, valid) -> tuple[torch.Tensor, float]:
    """Per layer, the number of valid tokens whose top-k expert *set* differs.

    Args:
        engine_routes / trainer_routes: int [T, L, K] (any order within K; numpy or torch), or
            any leading dims, e.g. two ``build_replay_routes`` / ``recorded_routes`` tensors
            [B, S, L, K].
        valid: bool (or 0/1) of the leading dims ([T] or [B, S]), the tokens that count (e.g.
            positions with an engine route, or the loss mask).
    Returns:
        ``(flips [L] float64, n_valid float)``.
    Raises:
        ValueError: shapes differ or valid does not match the leading dims.
    """
    a, b = torch.as_tensor(engine_routes), torch.as_tensor(trainer_routes)
    v = torch.as_tensor(valid).bool()
    if a.shape != b.shape or a.dim() < 3 or v.shape != a.shape[:-2]:
        raise ValueError(f"routes {tuple(a.shape)} vs {tuple(b.shape)}, valid {tuple(v.shape)}")
    a, b, v = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), v.reshape(-1)
    differ = (a.long().sort(-1).values != b.long().sort(-1).values).any(-1)  # [T, L]
    return (differ & v[:, None]).sum(0).double(), float(v.sum())


def flip_rate_metrics(flips: torch.Tensor, n_valid: float, *, layer_ids: Sequence[int] | None = None,
                      group=None) -> dict[str, float]:
    """Metrics from ``routing_flip_counts`` (summed over samples), optionally all-reduced.

    Args:
        flips: [L] float64 flipped-token counts. n_valid: valid tokens.
        layer_ids: key index of each layer (default 0..L-1, the MoE ordinal).
        group: process group to sum flips and n_valid over (e.g. the DP group); None = local.
    Returns:
        ``moe/layer{i}/routing_flip_rate`` = flips_i / n and ``moe/routing_flip_rate`` =
        sum_i flips_i / (L n) (token-weighted mean over layers); 0 when n = 0.
    """
    t = torch.cat([flips.double().reshape(-1), torch.tensor([float(n_valid)], dtype=torch.float64)])
    if group is not None:
        torch.distributed.all_reduce(t, group=group)
    f, n = t[:-1], float(t[-1])
    ids = list(range(f.numel())) if layer_ids is None else list(layer_ids)
    out = {f"moe/layer{i}/routing_flip_rate": float(x) / n if n else 0.0 for i, x in zip(ids, f)}
    out["moe/routing_flip_rate"] = float(f.sum()) / (n * f.numel()) if n and f.numel() else 0.0
    return out


def routing_flip_rate(engine_routes, trainer_routes, valid, *,
                      layer_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Top-k flip rate between rollout (engine) and trainer routes of the same tokens.

    Args / shapes as ``routing_flip_counts`` ([T, L, K] int twice, [T] bool); local (use
    ``flip_rate_metrics(..., group=dp_group)`` on summed counts for a DP-reduced value).
    Returns: see ``flip_rate_metrics``.
    """
    flips, n = routing_flip_counts(engine_routes, trainer_routes, valid)
    return flip_rate_metrics(flips, n, layer_ids=layer_ids)
