"""Worker for the global-batch LBL tests (module-level so spawn can import it)."""

from __future__ import annotations

import torch

SEQ = 32
VALID = [30, 4, 17, 32, 9, 25, 2, 20]  # valid (loss-mask) prefix per row: uneven micro-batches


def make_rows(vocab: int, seed: int = 0) -> list[dict]:
    """Causal rows whose loss mask is a prefix of VALID[r] tokens (the rest is padding)."""
    g = torch.Generator().manual_seed(seed)
    causal = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))
    rows = []
    for n in VALID:
        tokens = torch.randint(0, vocab, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < n).float()
        rows.append({"tokens": tokens, "labels": torch.roll(tokens, -1), "loss_mask": mask,
                     "position_ids": torch.arange(SEQ), "attention_mask": (~causal)[None]})
    return rows


def zero_lm_step(data_iterator, model):
    """LM forward whose loss has weight 0 but the true token count (so finalize divides by N)."""
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                labels=batch["labels"])
    m = batch["loss_mask"].float()

    def loss(output):
        zero = (output.float() * m).sum() * 0.0
        return zero, m.sum().to(torch.int), {"lm_loss": torch.stack([zero.detach(), m.sum()])}

    return out, loss


def _router_grads(tr, microbatches, forward_step) -> dict[int, torch.Tensor]:
    """Run train_step; grab each router's main_grad [E, H] right before the optimizer step."""
    from megatron_rl.train.engine import train_step

    routers = {n: p for n, p in tr.model.named_parameters() if n.endswith("mlp.router.weight")}
    grads = {}
    step = tr.optimizer.step

    def grab_then_step():
        for n, p in routers.items():
            grads[int(n.split("layers.")[1].split(".")[0])] = p.main_grad.detach().double().clone()
        return step()

    tr.optimizer.step = grab_then_step
    train_step(tr, microbatches, forward_step=forward_step)
    tr.optimizer.step = step
    return grads


def run(rank: int, world: int, hf_dir: str, runs: list[dict], alpha: float) -> list[dict]:
    """Each run: {"lbl": "ours" | "megatron", "detach": bool, "capture": bool, "frozen": bool}.
    DP = world; with world > 1 each rank gets 4 one-row micro-batches, else one 8-row batch."""
    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.moe import GlobalLBL
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer
    from megatron_rl.train.sft_data import collate, dp_microbatches

    hf = load_hf_config(hf_dir)
    rows = make_rows(hf["vocab_size"])
    out = []
    for spec in runs:
        init_parallel(ParallelConfig(), device="cpu", seed=7)
        meg = spec["lbl"] == "megatron"
        opts = ModelOptions(moe_aux_loss_coeff=alpha if meg else 0.0,
                            overrides={"moe_router_load_balancing_type": "global_aux_loss"}
                            if meg else {})
        cfg = transformer_config_from_hf(hf, opts)
        tr = build_trainer(hf, cfg, OptimConfig(lr=1e-4, warmup_steps=0, train_steps=10,
                                                use_distributed_optimizer=False))
        load_hf_weights(tr.model, hf_dir, hf)
        tr.optimizer.reload_model_params()
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mbs = [collate(rows)] if dp == 1 else dp_microbatches(rows, dpr, dp, 1)
        res: dict = {}
        if spec.get("capture"):
            res["inputs"], res["weights"] = _capture(tr, mbs)
        if meg:
            res["grads"] = _router_grads(tr, mbs, zero_lm_step)
        else:
            lbl = GlobalLBL(alpha=alpha, detach_router_input=spec.get("detach", False))
            res["metrics"] = lbl.collect_counts(tr, mbs)
            res["counts"], res["n_tokens"] = lbl.counts.clone(), lbl.n_tokens
            if spec.get("frozen"):
                res["frozen_error"] = _frozen_error(tr, lbl)
            with lbl.attached(tr, zero_lm_step) as fwd:
                res["grads"] = _router_grads(tr, mbs, fwd)
        out.append(res)
        destroy_parallel(keep_process_group=True)
    return out


def _capture(tr, mbs) -> tuple[dict, dict]:
    """Router inputs [S*B, H] (seq-first) and weights [E, H] per layer, from a no-grad forward."""
    from megatron.core.transformer.moe.router import TopKRouter

    inputs, weights, hooks = {}, {}, []
    for m in tr.model.modules():
        if isinstance(m, TopKRouter):
            i = m.layer_number - 1
            weights[i] = m.weight.detach().double().clone()
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, i=i: inputs.__setitem__(i, a[0].detach().reshape(
                    -1, a[0].shape[-1]).double().clone())))
    with torch.no_grad():
        b = mbs[0]
        tr.model(b["tokens"], b["position_ids"], b["attention_mask"])
    for h in hooks:
        h.remove()
    return inputs, weights


def _frozen_error(tr, lbl) -> str:
    r = next(p for n, p in tr.model.named_parameters() if n.endswith("router.weight"))
    r.requires_grad_(False)
    try:
        with lbl.attached(tr, zero_lm_step):
            return ""
    except ValueError as e:
        return str(e)
    finally:
        r.requires_grad_(True)


# -- LoadBalance modes and layouts (tests/test_balance.py) -----------------------------------------
BIAS_OVERRIDES = {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                  "moe_router_bias_update_rate": 0.0}


def _grads_by_layer(tr, microbatches, forward_step) -> dict[int, torch.Tensor]:
    """Like ``_router_grads`` but keyed by the router's global layer (PP-safe)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_rl.train.engine import train_step

    routers = [m for m in tr.model.modules() if isinstance(m, TopKRouter)]
    grads, step = {}, tr.optimizer.step

    def grab_then_step():
        for m in routers:
            grads[m.layer_number - 1] = m.weight.main_grad.detach().double().clone()
        return step()

    tr.optimizer.step = grab_then_step
    train_step(tr, microbatches, forward_step=forward_step)
    tr.optimizer.step = step
    return grads


def _biases(tr) -> dict[int, torch.Tensor]:
    from megatron.core.transformer.moe.router import TopKRouter

    return {m.layer_number - 1: m.expert_bias.detach().double().clone()
            for m in tr.model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None}


def run_balance(rank: int, world: int, hf_dir: str, specs: list[dict], alpha: float) -> list[dict]:
    """Each spec: {"layout": {tp, pp, ep, sp}, "mode": off|micro|global, "rate": bias rate,
    "bias": sigmoid router with expert bias, "capture": full-batch router inputs (tp=pp=ep=1
    only)}. The 8 rows of ``make_rows`` are split over DP, 4 micro-batches per DP rank."""
    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.moe import LoadBalance
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer
    from megatron_rl.train.sft_data import collate, dp_microbatches

    hf = load_hf_config(hf_dir)
    rows = make_rows(hf["vocab_size"])
    out = []
    for spec in specs:
        lay = spec.get("layout", {})
        pc = ParallelConfig(tp=lay.get("tp", 1), pp=lay.get("pp", 1), ep=lay.get("ep", 1),
                            sequence_parallel=lay.get("sp", False))
        init_parallel(pc, device="cpu", seed=7)
        opts = ModelOptions(sequence_parallel=pc.sequence_parallel,
                            overrides=dict(BIAS_OVERRIDES) if spec.get("bias") else {})
        cfg = transformer_config_from_hf(hf, opts, tp=pc.tp, pp=pc.pp, ep=pc.ep)
        tr = build_trainer(hf, cfg, OptimConfig(lr=1e-4, warmup_steps=0, train_steps=10,
                                                use_distributed_optimizer=False))
        load_hf_weights(tr.model, hf_dir, hf)
        tr.optimizer.reload_model_params()
        res: dict = {}
        if spec.get("bias"):
            from megatron.core.transformer.moe.router import TopKRouter

            g = torch.Generator().manual_seed(3)
            for m in tr.model.modules():
                if isinstance(m, TopKRouter):
                    m.expert_bias.copy_(0.05 * torch.randn(m.expert_bias.shape, generator=g))
            res["bias_before"] = _biases(tr)
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mbs = dp_microbatches(rows, dpr, dp, len(rows) // (4 * dp))
        if spec.get("capture"):
            res["inputs"], res["weights"] = _capture(tr, [collate(rows)])
        lb = LoadBalance(mode=spec.get("mode", "global"),
                         alpha=alpha if spec.get("mode", "global") != "off" else 0.0,
                         bias_update_rate=spec.get("rate", 0.0), detach_router_input=True)
        res["metrics"] = lb.prepare(tr, mbs)
        res["counts"], res["n_tokens"] = lb.lbl.counts.clone(), lb.lbl.n_tokens
        if spec.get("given_counts"):  # DP ranks hold equal halves of the global counts
            given = LoadBalance(mode=lb.mode, alpha=lb.alpha)
            res["given_metrics"] = given.prepare(tr, mbs, local_counts=lb.lbl.counts / dp)
        with lb.forward_step(tr, zero_lm_step, grad_divisor=lb.lbl.n_tokens) as fwd:
            res["grads"] = _grads_by_layer(tr, mbs, fwd)
        res["after"] = lb.after_step(tr)
        if spec.get("bias"):
            res["bias_after"] = _biases(tr)
            res["errors"] = _refusals(tr)
        out.append(res)
        destroy_parallel(keep_process_group=True)
    return out


def _refusals(tr) -> list[str]:
    """Error messages of the settings LoadBalance must refuse on this (expert-bias) model."""
    from megatron_rl.moe import LoadBalance

    errs = []
    tr.config.moe_router_bias_update_rate = 1e-3  # Megatron's own update would also run
    for make in (lambda: LoadBalance(bias_update_rate=1e-3).check(tr),
                 lambda: LoadBalance(mode="seq"), lambda: LoadBalance(mode="micro", alpha=-1.0)):
        try:
            make()
            errs.append("")
        except ValueError as e:
            errs.append(str(e))
    tr.config.moe_router_bias_update_rate = 0.0
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for m in tr.model.modules() if isinstance(m, TopKRouter)]
    routers[0].weight.requires_grad_(False)
    try:
        LoadBalance(mode="global", alpha=1e-2).check(tr)
        errs.append("")
    except ValueError as e:
        errs.append(str(e))
    routers[0].weight.requires_grad_(True)
    tr.config.moe_aux_loss_coeff = 1e-3
    for r in routers:
        r.routing_type = "seq_aux_loss"
    try:
        LoadBalance(mode="micro", alpha=1e-2).check(tr)
        errs.append("")
    except ValueError as e:
        errs.append(str(e))
    return errs
