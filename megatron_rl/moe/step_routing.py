"""Everything MoE routing does in one RL step, behind two passes: routing replay (R3 / R2), the
trainer's recorded routes and their flip rate against the engine's, and load balancing (router
metrics, LBL, expert bias) from the exact routed-token counts.

Legend: B rows, S tokens per row, L MoE layers, K top-k, E experts, T tokens one router sees in a
micro-batch (seq-first [S_local, B], S_local = S / tp under sequence parallelism); a micro-batch is
anything with ``tokens`` / ``position_ids`` / ``attention_mask`` / ``loss_mask`` [B, S] and one
``routes`` [B, S, L, K] field (``train.rl_batch.MicroBatch``).

The step, as ``train.grpo.rl_step`` runs it::

    with routing.old_logprob_pass(mbs) as route:    # R3: replay mb.routes; else record (R2 /
        for mb in mbs:                              # flip rate); router counts recorded
            old = compute_logprobs(tr, mb.tokens, ..., **route(mb))
    ...mismatch masking may shrink mb.loss_mask...
    for j, mini in enumerate(minis):
        with routing.train_pass(tr, mini, j, forward_step, grad_divisor=D) as p:
            train_step(tr, mini, forward_step=p.forward_step)  # replay + LBL attached
        metrics |= p.metrics                        # moe/* router metrics, bias update

Router counts: the old-logprob pass already runs a forward over every row of the step, so the
routing map of each router is kept there (valid tokens only) and counted at the training pass
with the final ``loss_mask`` (mismatch masking comes after the forward). Those counts are the
training pass's own whenever its routes are the old pass's: under replay (R3 replays the same
engine routes, R2 the routes recorded there) and for the first mini-batch (same weights). The
one case that still runs ``GlobalLBL.collect_counts``' extra no-grad forward is an LBL gradient
(mode micro / global) without replay on mini-batches j >= 1, whose weights have moved; router
metrics alone (LBL off) of those mini-batches describe the routing of the rollout policy.
Memory: the kept maps are [T_valid, E] bits (``np.packbits``: ceil(E / 8) bytes per valid token)
per MoE layer and micro-batch, on CPU, until the next old-logprob pass.
Source: Megatron-Core 0.19.2 ``TopKRouter.forward`` returns ``(probs, routing_map)``; see
``routing_replay`` (R3: arXiv 2510.11370) and ``balance`` / ``global_lbl`` (arXiv 2501.11873).
Left out: MTP routers, context parallelism (as in the modules it drives).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from megatron_rl.moe.balance import LoadBalance
from megatron_rl.moe.global_lbl import _routers, token_validity
from megatron_rl.moe.routing_replay import RoutingReplay, flip_rate_metrics, moe_layer_ids, routing_flip_counts

ROUTES = "routes"  # the one micro-batch field (dict key of compute_logprobs' batch) of replayed routes


@dataclass
class TrainPass:
    """What ``MoERouting.train_pass`` yields: the forward step to train with and the moe/* metrics
    of the pass (router load metrics on enter; the expert-bias metric added on exit)."""

    forward_step: Callable
    metrics: dict[str, float] = field(default_factory=dict)


class _RouteMaps:
    """Router hooks keeping, per micro-batch of a pass, each local router's routing map over the
    tokens valid at forward time; counted later under a (possibly smaller) final mask."""

    def __init__(self, model, config):
        self.model, self.config = model, config
        self.maps: list[dict[int, np.ndarray]] = []  # per micro-batch: layer -> [T_valid, ceil(E/8)] uint8 bits
        self.valid: list[torch.Tensor] = []  # per micro-batch: [T] bool validity at forward time
        self._handles: list = []

    def start(self, mask: torch.Tensor) -> None:
        """The next forward is a new micro-batch with this [B, S] loss mask."""
        self.valid.append(token_validity(mask, self.config).cpu())
        self.maps.append({})

    def __enter__(self) -> "_RouteMaps":
        def hook(router, inputs, output):
            _, routing_map = output  # [T, E] bool
            valid = self.valid[-1]
            if valid.numel() != routing_map.shape[0]:
                raise RuntimeError(f"router saw {routing_map.shape[0]} tokens, mask has {valid.numel()}")
            kept = routing_map.detach()[valid.to(routing_map.device)].cpu().numpy()  # [T_valid, E] bool
            self.maps[-1][router.layer_number - 1] = np.packbits(kept, axis=1)

        self._handles = [r.register_forward_hook(hook) for r in _routers(self.model)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def counts(self, index: int, mask: torch.Tensor) -> torch.Tensor:
        """[num_layers, E] float64 routed counts of micro-batch ``index`` over ``mask`` [B, S]
        (a subset of its forward-time mask); rows of layers not on this rank stay 0."""
        keep = token_validity(mask, self.config).cpu()[self.valid[index]]
        out = torch.zeros(self.config.num_layers, self.config.num_moe_experts, dtype=torch.float64)
        e = self.config.num_moe_experts
        for layer, bits in self.maps[index].items():
            out[layer] = torch.from_numpy(np.unpackbits(bits[keep.numpy()], axis=1, count=e).sum(0, dtype=np.int64)).double()
        return out


class MoERouting:
    """Routing replay + route recording + load balancing of the RL step (see module docstring).

    Args:
        model: this rank's policy chunk (DDP-wrapped or not); config: its TransformerConfig.
        replay: "off" | "r3" (replay the engine's routes in every pass) | "r2" (replay the
            routes recorded in the old-logprob pass during training).
        engine_routes: the engines return routes (R3, or the flip-rate metric).
        balance: ``LoadBalance`` (router metrics / LBL / expert bias), None = no counts.
        count_in_old_pass: False restores the extra counting forward (benchmark baseline).
    A dense model (``num_moe_experts`` unset) gets no-ops in every pass.
    """

    def __init__(self, model, config, *, replay: str = "off", engine_routes: bool = False,
                 balance: LoadBalance | None = None, count_in_old_pass: bool = True):
        moe = bool(getattr(config, "num_moe_experts", None))
        self.model, self.config = model, config
        self.replay = replay if moe else "off"
        self.balance = balance if moe else None
        self.route_layout = ((len(moe_layer_ids(config)), config.moe_router_topk)
                             if moe and engine_routes else None)  # (L, K) of the engine's routes
        self.count_in_old_pass = count_in_old_pass
        self.metrics: dict[str, float] = {}  # of the last old-logprob pass (flip rate)
        self._maps: _RouteMaps | None = None
        self._index: dict[int, int] = {}

    @contextlib.contextmanager
    def old_logprob_pass(self, mbs: list) -> Iterator[Callable[[object], dict]]:
        """Yields ``route(mb) -> compute_logprobs keywords`` for the no-grad pass over ``mbs``
        (call it once per micro-batch, in order, right before its forward). On exit: R2 stores
        the recorded routes in ``mb.routes``; with engine routes and recording,
        ``self.metrics`` = ``flip_rate_metrics`` over the loss tokens, DP-reduced (collective).
        """
        from megatron.core import parallel_state as ps

        engine = any(mb.routes is not None for mb in mbs)
        mode = "replay" if self.replay == "r3" else ("record" if self.replay == "r2" or engine else None)
        rr = RoutingReplay(self.model, mode=mode, key=ROUTES) if mode else None
        maps = _RouteMaps(self.model, self.config) if self.balance is not None and self.count_in_old_pass else None
        self._maps, self._index, self.metrics = maps, {id(mb): i for i, mb in enumerate(mbs)}, {}

        def route(mb) -> dict:
            if maps is not None:
                maps.start(mb.loss_mask)
            if rr is None:
                return {}
            return {"wrap_step": rr.wrap_forward_step, "extra": {ROUTES: mb.routes} if mode == "replay" else {}}

        with rr or contextlib.nullcontext(), maps or contextlib.nullcontext():
            yield route
            recorded = rr.recorded_routes() if mode == "record" else None
        if recorded is None:
            return
        flips, n_valid = torch.zeros(0, dtype=torch.float64), 0.0
        for mb, rec in zip(mbs, recorded):
            if engine:  # both [B, S, L, K]
                f, n_v = routing_flip_counts(mb.routes, rec, mb.loss_mask > 0)
                flips, n_valid = (f if not flips.numel() else flips + f), n_valid + n_v
            if self.replay == "r2":
                mb.routes = rec
        if engine:
            self.metrics = flip_rate_metrics(flips, n_valid, layer_ids=moe_layer_ids(self.config),
                                             group=ps.get_data_parallel_group())

    @contextlib.contextmanager
    def reference_pass(self, ref_model) -> Iterator[Callable[[object], dict]]:
        """Yields ``route(mb)`` for the reference model's no-grad pass: under R3 the reference
        routes like the engine (and the policy); otherwise it routes freely."""
        if self.replay != "r3":
            yield lambda mb: {}
            return
        with RoutingReplay(ref_model, mode="replay", key=ROUTES) as rr:
            yield lambda mb: {"wrap_step": rr.wrap_forward_step, "extra": {ROUTES: mb.routes}}

    @contextlib.contextmanager
    def train_pass(self, trainer, mini: list, index: int, forward_step: Callable, *,
                   grad_divisor: float) -> Iterator[TrainPass]:
        """The training pass of mini-batch ``index`` (0-based) over its micro-batches ``mini``.

        Yields a ``TrainPass`` whose ``forward_step`` replays ``mb.routes`` (R3 / R2) and carries
        the LBL gradient (``LoadBalance.forward_step``; ``grad_divisor`` = D, the global
        loss-token count). ``metrics`` holds the router load metrics of the exact counts
        (``LoadBalance.prepare``; collective) and, after the block, ``LoadBalance.after_step``'s.
        Without a balancer, or with no loss token in the global mini-batch, only the replay.
        """
        replay = (RoutingReplay(self.model, mode="replay", key=ROUTES) if self.replay != "off"
                  else contextlib.nullcontext())
        with replay as rr:
            step = forward_step if rr is None else rr.wrap_forward_step(forward_step)
            if self.balance is None or grad_divisor <= 0:
                yield TrainPass(forward_step=step)
                return
            counts = self._recorded_counts(mini, index)  # {} -> prepare runs the counting forward
            out = TrainPass(forward_step=step, metrics=self.balance.prepare(trainer, mini, **counts))
            with self.balance.forward_step(trainer, step, grad_divisor=grad_divisor) as lb_step:
                out.forward_step = lb_step
                yield out
            out.metrics |= self.balance.after_step(trainer)

    def _recorded_counts(self, mini: list, index: int) -> dict:
        """``prepare`` keywords from the old pass's maps: ``local_counts`` [num_layers, E] and
        ``mb_counts`` [M_local, num_layers, E] under the final loss masks; {} (the extra counting
        forward) where they are not the training routes (see module docstring)."""
        stale = self.replay == "off" and index > 0 and self.balance.lbl_on
        if self._maps is None or stale or any(id(mb) not in self._index for mb in mini):
            return {}
        per_mb = torch.stack([self._maps.counts(self._index[id(mb)], mb.loss_mask) for mb in mini])
        return {"local_counts": per_mb.sum(0), "mb_counts": per_mb}
