"""Workers for the routing-replay tests (module-level so spawn can import them).

A "sample" here is a dict {prompt_ids, output_ids, logprobs (engine, per output token),
routes (engine int32 [P + C - 1, L, K] or None)}; rows of a micro-batch are right-padded samples.
"""

from __future__ import annotations

import torch

SEQ = 32


def make_batch(samples: list[dict], seq: int = SEQ) -> dict:
    """Right-padded causal rows (the layout of rl_batch.collate), pad id 0."""
    from megatron_rl.train.logprobs import causal_mask

    b = len(samples)
    tokens = torch.zeros(b, seq, dtype=torch.long)
    mask = torch.zeros(b, seq)
    for i, s in enumerate(samples):
        ids = s["prompt_ids"] + s["output_ids"]
        tokens[i, :len(ids)] = torch.tensor(ids)
        mask[i, len(s["prompt_ids"]) - 1:len(ids) - 1] = 1.0
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(seq).expand(b, seq).contiguous(),
            "attention_mask": causal_mask(b, seq)}


def random_routes(samples: list[dict], layers: int, topk: int, experts: int, seed: int = 0):
    """Distinct random experts per token, [n - 1, L, K] per sample (an arbitrary routing)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        n = len(s["prompt_ids"]) + len(s["output_ids"]) - 1
        out.append(torch.rand(n, layers, experts, generator=g).argsort(-1)[..., :topk].int())
    return out


def _ce_step(data_iterator, model):
    batch = next(data_iterator)
    ce = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
               labels=batch["labels"])  # [B, S]
    return ce, lambda output, non_loss_data=True: output.detach()


def logprobs(tr, batch: dict, rr=None) -> torch.Tensor:
    """[B, S] log p(labels) (no grad, eval mode) on every rank; ``rr`` wraps the forward step."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batch["tokens"].shape
    step = rr.wrap_forward_step(_ce_step) if rr is not None else _ce_step
    tr.model.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=[tr.model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
            collect_non_loss_data=True)
    tr.model.train()
    lp = -out[0].float() if ps.is_pipeline_last_stage() else torch.zeros(b, s)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(lp, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return lp


def used_routes(tr, fn) -> tuple[object, list[torch.Tensor]]:
    """Run ``fn()`` with a forward hook on every router; returns (fn's result, per router the
    expert sets actually used, sorted [T, K] int64) -- independent of RouterReplay."""
    from megatron_rl.moe.routing_replay import replay_routers

    k = tr.config.moe_router_topk
    seen = {}

    def hook(router, inputs, output):
        rmap = output[1].int()  # [T, E]
        order = torch.sort(rmap, dim=-1, descending=True, stable=True).indices[:, :k]
        seen[router.layer_number] = order.sort(-1).values
    hs = [r.register_forward_hook(hook) for r in replay_routers(tr.model)]
    try:
        res = fn()
    finally:
        for h in hs:
            h.remove()
    return res, [seen[n] for n in sorted(seen)]


def to_rows(per_layer: list[torch.Tensor], b: int, s: int) -> torch.Tensor:
    """Per-layer [S*B, K] seq-first router indices -> [B, S, L, K]."""
    return torch.stack([x.view(s, b, -1).transpose(0, 1) for x in per_layer], dim=2)


def _trainer(hf_dir, lay: dict, replay: bool = True, recompute: str = "none"):
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.moe.routing_replay import enable_routing_replay
    from megatron_rl.parallel import ParallelConfig, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer

    hf = load_hf_config(hf_dir)
    pc = ParallelConfig(tp=lay.get("tp", 1), pp=lay.get("pp", 1), ep=lay.get("ep", 1),
                        sequence_parallel=lay.get("sp", False))
    init_parallel(pc, device="cpu", seed=7)
    cfg = transformer_config_from_hf(hf, ModelOptions(sequence_parallel=pc.sequence_parallel,
                                                      recompute=recompute),
                                     tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
    if replay:
        enable_routing_replay(cfg)
    tr = build_trainer(hf, cfg, OptimConfig(lr=1e-4, warmup_steps=0, train_steps=10,
                                            use_distributed_optimizer=False, clip_grad=0.0))
    load_hf_weights(tr.model, hf_dir, hf)
    tr.optimizer.reload_model_params()
    return tr


def engine_compare(rank: int, world: int, hf_dir: str, samples: list[dict]) -> dict:
    """Single rank: trainer routes/logprobs of engine samples with and without replaying the
    engine's routes. Returns RECORD routes (free routing), hook routes (free and replayed),
    logprobs (free and replayed) as [B, S] / [B, S, L, K] tensors, and the no-replay error."""
    from megatron_rl.moe.routing_replay import RoutingReplay, build_replay_routes, replay_routers
    from megatron_rl.parallel import destroy_parallel

    tr = _trainer(hf_dir, {}, replay=False)
    try:
        replay_routers(tr.model)
        err = None
    except RuntimeError as e:
        err = str(e)
    destroy_parallel(keep_process_group=True)
    tr = _trainer(hf_dir, {})
    batch = make_batch(samples)
    b, s = batch["tokens"].shape
    cfg = tr.config
    batch["replay_routes"] = build_replay_routes([x["routes"] for x in samples], s,
                                                 cfg.num_layers, cfg.moe_router_topk,
                                                 num_experts=cfg.num_moe_experts)
    with RoutingReplay(tr.model, mode="record") as rec:
        lp_free, free_used = used_routes(tr, lambda: logprobs(tr, batch, rec))
        recorded = rec.recorded_routes()[0]
    with RoutingReplay(tr.model, mode="replay") as rr:
        lp_rep, rep_used = used_routes(tr, lambda: logprobs(tr, batch, rr))
    lp_plain = logprobs(tr, batch)  # after exit: free routing again
    destroy_parallel(keep_process_group=True)
    return {"err": err, "recorded": recorded, "free_used": to_rows(free_used, b, s),
            "replay_used": to_rows(rep_used, b, s), "lp_free": lp_free, "lp_replay": lp_rep,
            "lp_plain": lp_plain, "loss_mask": batch["loss_mask"]}


def router_grads(tr, batch: dict, rr=None) -> dict[str, torch.Tensor]:
    """Gradient of sum(masked logp) wrt every router weight (one train_step-style fwd/bwd)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        mb = next(data_iterator)
        ce = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])
        m = mb["loss_mask"]

        def loss(output):
            val = (output.float() * m).sum()
            return val, m.sum().to(torch.int), {"lm_loss": torch.stack([val.detach(), m.sum()])}
        return ce, loss

    b, s = batch["tokens"].shape
    tr.model.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=rr.wrap_forward_step(step) if rr is not None else step,
        data_iterator=iter([batch]), model=[tr.model], num_microbatches=1, seq_length=s,
        micro_batch_size=b, forward_only=False)
    return {n: p.main_grad.detach().double().clone() for n, p in tr.model.named_parameters()
            if n.endswith("mlp.router.weight")}


def grad_runs(rank: int, world: int, hf_dir: str, samples: list[dict]) -> dict:
    """Router grads: free routing (recording its own routes in the same pass), replay of those
    recorded routes, replay of the given (engine) routes, and the latter with full recompute."""
    from megatron_rl.moe.routing_replay import RoutingReplay, build_replay_routes
    from megatron_rl.parallel import destroy_parallel

    out = {}
    for recompute in ("none", "full"):
        tr = _trainer(hf_dir, {}, recompute=recompute)
        cfg = tr.config
        batch = make_batch(samples)
        s = batch["tokens"].shape[1]
        batch["replay_routes"] = build_replay_routes([x["routes"] for x in samples], s,
                                                     cfg.num_layers, cfg.moe_router_topk)
        if recompute == "none":
            with RoutingReplay(tr.model, mode="record") as rec:
                out["free"] = router_grads(tr, batch, rec)
                own = rec.recorded_routes()[0]
            with RoutingReplay(tr.model, mode="replay") as rr:
                out["own"] = router_grads(tr, dict(batch, replay_routes=own), rr)
        with RoutingReplay(tr.model, mode="replay") as rr:
            out[f"engine_{recompute}"] = router_grads(tr, batch, rr)
        destroy_parallel(keep_process_group=True)
    return out


def layout_runs(rank: int, world: int, hf_dir: str, samples: list[dict], routes: list,
                layouts: list[dict]) -> list[dict]:
    """Per layout: replay ``routes`` of ``samples`` (logprobs), and record free routes."""
    from megatron_rl.moe.routing_replay import RoutingReplay, build_replay_routes
    from megatron_rl.parallel import destroy_parallel

    out = []
    for lay in layouts:
        tr = _trainer(hf_dir, lay)
        cfg = tr.config
        batch = make_batch(samples)
        batch["replay_routes"] = build_replay_routes(routes, batch["tokens"].shape[1],
                                                     cfg.num_layers, cfg.moe_router_topk)
        with RoutingReplay(tr.model, mode="replay") as rr:
            lp_replay = logprobs(tr, batch, rr)
        with RoutingReplay(tr.model, mode="record") as rec:
            lp_free = logprobs(tr, batch, rec)
            recorded = rec.recorded_routes()[0]
        destroy_parallel(keep_process_group=True)
        out.append({"lp_replay": lp_replay, "lp_free": lp_free, "recorded": recorded})
    return out
