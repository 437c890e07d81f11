"""Worker for the parallel-layout equivalence tests (module-level so spawn can import it)."""

from __future__ import annotations

import torch

SEQ, ROWS = 32, 4  # global batch: 4 packed rows of 32 tokens


def make_global_batch(vocab: int, seed: int = 0) -> list[dict]:
    """Packed rows with 2-3 documents each and partial loss masks (independent of our packer)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(ROWS):
        cuts = sorted(torch.randperm(SEQ - 2, generator=g)[:2].add(1).tolist())
        bounds = [0, *cuts, SEQ] if r % 2 else [0, cuts[0], SEQ]
        tokens = torch.randint(0, vocab, (SEQ,), generator=g)
        labels = torch.roll(tokens, -1)
        loss_mask = (torch.rand(SEQ, generator=g) > 0.3).float()
        pos = torch.zeros(SEQ, dtype=torch.long)
        allowed = torch.zeros(SEQ, SEQ, dtype=torch.bool)
        for a, b in zip(bounds, bounds[1:]):
            pos[a:b] = torch.arange(b - a)
            loss_mask[b - 1] = 0  # no prediction across documents
            allowed[a:b, a:b] = torch.tril(torch.ones(b - a, b - a, dtype=torch.bool))
        rows.append({"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                     "position_ids": pos, "attention_mask": (~allowed)[None]})
    return rows


def run_layouts(rank: int, world: int, hf_dir: str, layouts: list[dict]) -> list[dict]:
    """For each layout: logits before, loss/grad-norm of one step, full weights after."""
    from megatron.core import parallel_state as ps

    from megatron_rl.checkpoint.gather import gather_full_state_dict
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.train.engine import OptimConfig, build_trainer, forward_logits, train_step
    from megatron_rl.train.sft_data import dp_microbatches, collate

    hf = load_hf_config(hf_dir)
    rows = make_global_batch(hf["vocab_size"])
    results = []
    for lay in layouts:
        pc = ParallelConfig(tp=lay.get("tp", 1), pp=lay.get("pp", 1), ep=lay.get("ep", 1),
                            etp=lay.get("etp"), sequence_parallel=lay.get("sp", False))
        init_parallel(pc, device="cpu", seed=7)
        opts = ModelOptions(moe_token_dispatcher_type=lay.get("dispatcher", "alltoall"),
                            sequence_parallel=pc.sequence_parallel)
        cfg = transformer_config_from_hf(hf, opts, tp=pc.tp, pp=pc.pp, ep=pc.ep, etp=pc.etp)
        # Adam's first step is ~lr * sign(grad): fp32 reduction-order noise in a near-zero grad
        # moves a weight by up to ~lr, so lr=1e-4 keeps "same updated weights" testable at 1e-5.
        tr = build_trainer(hf, cfg, OptimConfig(lr=1e-4, warmup_steps=0, train_steps=10,
                                                decay_style="constant", clip_grad=1.0))
        load_hf_weights(tr.model, hf_dir, hf)
        tr.optimizer.reload_model_params()
        logits = forward_logits(tr, [collate(rows)])
        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        metrics = train_step(tr, dp_microbatches(rows, dpr, dp, 1))
        state = gather_full_state_dict(tr.model)
        keep_logits = logits is not None and ps.get_tensor_model_parallel_rank() == 0
        results.append({
            "loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"],
            "logits": logits[0][..., : hf["vocab_size"]] if keep_logits else None,
            "state": state,
        })
        destroy_parallel(keep_process_group=True)
    return results
