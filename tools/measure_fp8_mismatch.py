"""Train / rollout mismatch of FP8 rollouts on a fixed batch (tiny model, CPU, one process).

    python tools/measure_fp8_mismatch.py --hf DIR --out OUT.json [--prompts 8 --new-tokens 40]

Per configuration (trainer numerics / engine numerics) on the SAME token batch (sampled once from
the HF fp32 model, T = 1): the trainer's response-token logprobs (Megatron-Core, local spec, one
gloo rank) and top-k routes (``RoutingReplay`` RECORD) against the embedded engine's (its HF
model: ``quant.fp8_engine.from_pretrained``, router hooks), then
``losses.mismatch.mismatch_correction`` metrics -- ``mismatch/abs_logp_diff`` (reported as
logprob_abs_diff), ``mismatch/k3_kl`` -- and ``moe/routing_flip_rate`` (top-k expert set differs,
token-weighted over MoE layers). For bf16 / FP8 the corrections are reported as what they do to
this batch: TIS (cap 2) clipped fraction; IcePop ([0.5, 2]) masked fraction and the mismatch of
the tokens it keeps.
Configurations: fp32/fp32 (floor), bf16/bf16, bf16/FP8 (none, TIS, IcePop), bf16/FP8 with the
engine's W8A8 activation fake-quant, FP8-QAT (ModelOpt, bf16 params)/FP8 (needs nvidia-modelopt),
and the last two in fp32 compute (isolates the weight quantisation from bf16 rounding).
Left out: multi-rank layouts, the GRPO training comparison (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sample_batch(hf_dir: str, prompts: int, new_tokens: int, seed: int) -> torch.Tensor:
    """[B, P + new_tokens] ids: random 8-token prompts + tokens sampled from the fp32 HF model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (prompts, 8), generator=g)
    with torch.no_grad():
        for _ in range(new_tokens):
            probs = torch.softmax(model(ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def engine_side(model_dir: str, dtype: str, ids: torch.Tensor, act_fake_quant: bool):
    """Engine logprobs [B, S-1] (float64) and routes [B, S, L, K] (int64) of ``ids``."""
    from megatron_rl.quant.fp8_engine import from_pretrained

    model = from_pretrained(model_dir, DT[dtype], fake_quant_activations=act_fake_quant)
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    routes: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: routes.append(out[2])) for r in routers]
    lps, rts = [], []
    with torch.no_grad():
        for row in ids:
            routes.clear()
            logits = model(row[None]).logits[0].double()
            lps.append(torch.log_softmax(logits[:-1], -1).gather(1, row[1:, None])[:, 0])
            rts.append(torch.stack(routes, 1).long())  # [S, L, K]
    for h in hooks:
        h.remove()
    return torch.stack(lps), torch.stack(rts)


def trainer_side(rank: int, world: int, hf_dir: str, dtype: str, qat: bool, ids: torch.Tensor):
    """(Run under run_distributed) Megatron logprobs [B, S-1] and recorded routes [B, S, L, K]."""
    from megatron_rl.checkpoint.hf_loader import load_hf_weights
    from megatron_rl.models import ModelOptions, build_model, load_hf_config, transformer_config_from_hf
    from megatron_rl.moe.routing_replay import RoutingReplay, enable_routing_replay
    from megatron_rl.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_rl.train.logprobs import compute_logprobs

    init_parallel(ParallelConfig(), device="cpu", seed=1)
    hf = load_hf_config(hf_dir)
    cfg = enable_routing_replay(transformer_config_from_hf(hf, ModelOptions(params_dtype=DT[dtype]),
                                                           tp=1, pp=1, ep=1, etp=1))
    model = build_model(hf, cfg)
    load_hf_weights(model, hf_dir, hf)
    if qat:
        from megatron_rl.quant.qat import apply_fp8_qat

        apply_fp8_qat(model)
    model.eval()
    with RoutingReplay(model, mode="record") as rec:
        lp = compute_logprobs(model, ids, wrap_step=rec.wrap_forward_step)
        routes = rec.recorded_routes()[0]
    destroy_parallel()
    return lp.double(), routes.long()


def metrics(train, engine, prompt_len: int) -> dict[str, float]:
    """Mismatch / correction / flip-rate metrics over the response tokens."""
    from megatron_rl.losses.mismatch import mismatch_correction
    from megatron_rl.moe.routing_replay import routing_flip_rate

    (lp_t, rt_t), (lp_e, rt_e) = train, engine
    mask = torch.zeros_like(lp_t, dtype=torch.bool)
    mask[:, prompt_len - 1:] = True  # positions predicting response tokens
    _, _, base = mismatch_correction(lp_t, lp_e, mask)
    _, _, tis = mismatch_correction(lp_t, lp_e, mask, tis_cap=2.0)
    _, keep, ice = mismatch_correction(lp_t, lp_e, mask, icepop_bounds=(0.5, 2.0))
    _, _, kept = mismatch_correction(lp_t, lp_e, keep)
    valid = torch.zeros(rt_t.shape[:2], dtype=torch.bool)
    valid[:, prompt_len:] = True  # routes of the response tokens
    flips = routing_flip_rate(rt_e, rt_t, valid)
    return {"logprob_abs_diff": float(base["mismatch/abs_logp_diff"]), "k3_kl": float(base["mismatch/k3_kl"]),
            "routing_flip_rate": flips["moe/routing_flip_rate"],
            "tis_clip_frac": float(tis["mismatch/tis_clip_frac"]),
            "icepop_masked_frac": float(ice["mismatch/masked_frac"]),
            "icepop_kept_logprob_abs_diff": float(kept["mismatch/abs_logp_diff"]),
            "icepop_kept_k3_kl": float(kept["mismatch/k3_kl"])}


def bf16_copy(src: str, dst: str) -> str:
    """The HF dir with every float tensor rounded to bf16: what a bf16 trainer syncs (the FP8
    rollout weights of the bf16 rows are quantised from it, as ``--rollout-fp8`` does at sync)."""
    import shutil

    from safetensors.torch import save_file

    from megatron_rl.quant.fp8_engine import read_safetensors_dir

    os.makedirs(dst)
    for n in os.listdir(src):
        if not n.endswith(".safetensors") and n != "model.safetensors.index.json":
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    named = {k: (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
             for k, t in read_safetensors_dir(src).items()}
    save_file(named, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


CONFIGS = [  # name, trainer dtype, QAT, engine dir, engine dtype, act fake-quant
    ("fp32 train / fp32 rollout", "fp32", False, "plain", "fp32", False),
    ("bf16 train / bf16 rollout", "bf16", False, "plain", "bf16", False),
    ("bf16 train / FP8 rollout", "bf16", False, "fp8_bf16", "bf16", False),
    ("bf16 train / FP8 rollout + W8A8 act fake-quant", "bf16", False, "fp8_bf16", "bf16", True),
    ("FP8-QAT train / FP8 rollout", "bf16", True, "fp8_bf16", "bf16", False),
    ("fp32 train / FP8 rollout (fp32 compute)", "fp32", False, "fp8", "fp32", False),
    ("FP8-QAT fp32 train / FP8 rollout (fp32 compute)", "fp32", True, "fp8", "fp32", False),
]


def main(argv=None) -> dict:
    from megatron_rl._optional import has_modelopt
    from megatron_rl.quant.fp8_engine import write_fp8_hf_dir
    from megatron_rl.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF dir of the (tiny) model")
    p.add_argument("--out", required=True, help="JSON file with every configuration's metrics")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ids = sample_batch(args.hf, args.prompts, args.new_tokens, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"plain": args.hf, "fp8": write_fp8_hf_dir(args.hf, os.path.join(tmp, "fp8")),
                "fp8_bf16": write_fp8_hf_dir(bf16_copy(args.hf, os.path.join(tmp, "bf16")),
                                             os.path.join(tmp, "fp8_bf16"))}
        trainer_cache: dict = {}
        for name, tdt, qat, edir, edt, act in CONFIGS:
            if qat and not has_modelopt():
                results[name] = {"skipped": "nvidia-modelopt not installed"}
                continue
            key = (tdt, qat)
            if key not in trainer_cache:
                trainer_cache[key] = run_distributed(trainer_side, 1, args.hf, tdt, qat, ids)[0]
            eng = engine_side(dirs[edir], edt, ids, act)
            results[name] = metrics(trainer_cache[key], eng, prompt_len=8)
            print(name, json.dumps(results[name]), flush=True)
    out = {"batch": {"prompts": args.prompts, "prompt_len": 8, "new_tokens": args.new_tokens, "seed": args.seed},
           "results": results}
    tmp_out = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp_out, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp_out, args.out)
    return out


if __name__ == "__main__":
    main()
