"""Benchmark of the RL loss hot path: token logprobs + entropy + PPO clipping, forward + backward
to dL/dlogits, on the same tensors in one process.

Variants (all: token-mean PPO loss, eps 0.2 / 0.28, entropy as a metric or with a bonus 0.01):
  fused  ours, ``--loss-impl fused``: ``ops.vocab_parallel_logprobs_entropy`` (one pass, gradient
         written in place into the logits) + ``ops.fused_policy_loss``.
  torch  ours, ``--loss-impl torch``: ``train.rl_batch._logprobs_entropy`` (Megatron's
         ``vocab_parallel_cross_entropy`` + ``losses.kl.vocab_parallel_entropy``) + ``policy_loss``.
  slime  re-implemented from THUDM/slime ``slime/utils/ppo_utils.py`` @ 06787cf5798525d9af068135ade88dc795d75821:
         ``compute_log_probs`` (Megatron ``fused_vocab_parallel_cross_entropy``) and ``_VocabParallelEntropy``
         (its ``mul_reduce`` without torch.compile), each on ``logits.clone()`` as slime's
         ``get_log_probs_and_entropy`` calls them, ``compute_policy_loss``;
         the entropy always enters the loss (``pg_loss - entropy_coef * entropy_loss``, as slime's loss.py).
  verl   re-implemented from volcengine/verl ``verl/utils/torch_functional.py`` @ 03c8cca18c827405ad726f7f90b2e0c3823b7830:
         ``logprobs_from_logits_v2`` (gather - per-row logsumexp) and ``entropy_from_logits``
         (softmax, logsumexp, sum p*x) computed with grad, the bonus added only when on.
Reported per variant: median of ``--repeats`` timed runs (s), its ratio to ``fused``, peak extra
memory in units of the logits' bytes (measured in a fresh subprocess per variant: peak RSS, or
``torch.cuda.max_memory_allocated`` on CUDA, minus the inputs), and the one-read floor: logits
bytes / copy bandwidth (bandwidth = (bytes read + written) / time of ``dst.copy_(src)``).

    python tools/bench_loss.py --tokens 2048 --vocab 151936 --threads 1 --repeats 5
    python tools/bench_loss.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPS_LOW, EPS_HIGH, BONUS = 0.2, 0.28, 0.01
VARIANTS = ("fused", "torch", "slime", "verl")


def make_inputs(tokens: int, vocab: int, dtype, device, seed: int = 0) -> dict:
    """logits [B, S, V] (B = 4 rows), labels / old_logprobs / advantages / loss_mask [B, S]."""
    b = 4 if tokens % 4 == 0 else 1
    s = tokens // b
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(b, s, vocab).normal_(generator=g).mul_(2)  # no temporary: RSS baseline
    logits = logits if dtype == torch.float32 and device == "cpu" else logits.to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (b, s), generator=g).to(device)
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, :8].float(), -1)  # a few rows: old logprobs near current
    old = torch.full((b, s), -float(torch.log(torch.tensor(float(vocab)))), device=device)
    old[:, :8] = lp.gather(-1, labels[:, :8, None]).squeeze(-1)
    old = old + 0.1 * torch.randn(b, s, generator=g).to(device)
    adv = torch.randn(b, s, generator=g).to(device)
    mask = (torch.rand(b, s, generator=g) < 0.9).to(device)
    return {"logits": logits, "labels": labels, "old": old, "adv": adv, "mask": mask}


def _token_mean(x, mask):
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def run_fused(logits, t: dict, bonus: bool):
    from megatron_rl.ops import fused_policy_loss, vocab_parallel_logprobs_entropy

    lp, h = vocab_parallel_logprobs_entropy(logits, t["labels"])
    loss, _ = fused_policy_loss(lp, t["old"], t["adv"], t["mask"], eps_low=EPS_LOW, eps_high=EPS_HIGH)
    if bonus:
        loss = loss - BONUS * _token_mean(h, t["mask"])
    metric = _token_mean(h.detach(), t["mask"])
    return loss, metric


def run_torch(logits, t: dict, bonus: bool):
    from megatron_rl.losses.policy import policy_loss
    from megatron_rl.train.rl_batch import PolicyLossSettings, _logprobs_entropy

    st = PolicyLossSettings(eps_low=EPS_LOW, eps_high=EPS_HIGH, agg="token-mean", max_response_len=1,
                            entropy_coef=BONUS if bonus else 0.0, loss_impl="torch")
    lp, h = _logprobs_entropy(logits, t["labels"], st, fused=False)
    loss, _ = policy_loss(lp, t["old"], t["adv"], t["mask"], eps_low=EPS_LOW, eps_high=EPS_HIGH)
    if bonus:
        loss = loss - BONUS * _token_mean(h, t["mask"])
    return loss, _token_mean(h.detach(), t["mask"])


class _SlimeVocabParallelEntropy(torch.autograd.Function):
    """slime ppo_utils._VocabParallelEntropy (from verl's megatron tensor_parallel.py), re-typed."""

    @staticmethod
    def forward(ctx, x, group):
        x_max = x.max(dim=-1, keepdim=True).values
        torch.distributed.all_reduce(x_max, op=torch.distributed.ReduceOp.MAX, group=group)
        e = (x - x_max).exp_()
        z = e.sum(dim=-1, keepdim=True)
        torch.distributed.all_reduce(z, group=group)
        p = e.div_(z)
        sum_px = (p * x).sum(dim=-1, keepdim=True)
        torch.distributed.all_reduce(sum_px, group=group)
        ctx.save_for_backward(x, p, sum_px)
        return (x_max + z.log() - sum_px).squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        x, p, sum_px = ctx.saved_tensors
        x.sub_(sum_px)
        p.mul_(x)
        p.mul_(g.unsqueeze(-1))
        x.add_(sum_px)
        p.mul_(-1)
        return p, None


def run_slime(logits, t: dict, bonus: bool):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    group = torch.distributed.group.WORLD
    b, s, v = logits.shape
    flat, labels = logits.reshape(b * s, v), t["labels"].reshape(-1)
    lp = -fused_vocab_parallel_cross_entropy(flat.clone().unsqueeze(1), labels.unsqueeze(1), group).squeeze(1)
    ent = _SlimeVocabParallelEntropy.apply(flat.clone(), group)
    ppo_kl = t["old"].reshape(-1) - lp
    ratio = (-ppo_kl).exp()
    adv, mask = t["adv"].reshape(-1), t["mask"].reshape(-1)
    pg1, pg2 = -ratio * adv, -ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * adv
    pg = torch.maximum(pg1, pg2)
    loss = _token_mean(pg, mask) - (BONUS if bonus else 0.0) * _token_mean(ent, mask)
    return loss, _token_mean(ent.detach(), mask)


def run_verl(logits, t: dict, bonus: bool):
    labels = t["labels"]
    x_lab = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # verl's per-row loop
    lp = x_lab - lse
    pd = torch.nn.functional.softmax(logits, dim=-1)
    ent = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    ratio = torch.exp(lp - t["old"])
    pg = torch.maximum(-t["adv"] * ratio, -t["adv"] * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    loss = _token_mean(pg, t["mask"])
    if bonus:
        loss = loss - BONUS * _token_mean(ent, t["mask"])
    return loss, _token_mean(ent.detach(), t["mask"])


RUN = {"fused": run_fused, "torch": run_torch, "slime": run_slime, "verl": run_verl}


def step(name: str, leaf: torch.Tensor, t: dict, bonus: bool):
    """Forward + backward to dL/dlogits; returns (loss, entropy metric, grad)."""
    loss, metric = RUN[name](leaf, t, bonus)
    (grad,) = torch.autograd.grad(loss, leaf)
    return float(loss.detach()), float(metric), grad


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(x: torch.Tensor, repeats: int = 5) -> float:
    """Bytes read + written per second of ``dst.copy_(src)`` on a tensor the size of the logits."""
    dst = torch.empty_like(x)
    times = []
    for _ in range(repeats + 1):
        _sync(x.device)
        t0 = time.perf_counter()
        dst.copy_(x)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * x.element_size() / statistics.median(times[1:])


def time_variant(name: str, pristine: torch.Tensor, t: dict, bonus: bool, repeats: int) -> dict:
    """Median seconds of ``repeats`` runs after two warm-ups; the logits are restored (untimed)
    before each run because the fused backward overwrites them."""
    work = pristine.clone().requires_grad_()
    times, out = [], None
    for i in range(repeats + 2):
        with torch.no_grad():
            work.copy_(pristine)
        _sync(work.device)
        t0 = time.perf_counter()
        loss, metric, grad = step(name, work, t, bonus)
        _sync(work.device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        if out is None:
            out = {"loss": loss, "entropy": metric, "grad_sum": float(grad.double().abs().sum())}
        del grad
    return {"median_s": statistics.median(times), "runs_s": times, **out}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> int:
    """Reset the peak-RSS watermark (Linux: write 5 to /proc/self/clear_refs); return current RSS
    bytes (the baseline). Elsewhere: the lifetime peak, which can only under-report."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args) -> dict:
    """In a fresh process: peak extra bytes of one forward + backward of ``args.variant``."""
    t = _setup(args)
    leaf = t.pop("logits").requires_grad_()
    _sync(args.device)
    if args.device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _reset_peak_rss()
    loss, metric, grad = step(args.variant, leaf, t, args.entropy_bonus)
    _sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _peak_rss_bytes()
    in_place = grad.data_ptr() == leaf.data_ptr()
    return {"extra_bytes": peak - base, "logits_bytes": leaf.numel() * leaf.element_size(),
            "grad_in_place": in_place}


def measure_memory(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", "--variant", name, "--mem-tokens", str(args.mem_tokens),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device,
           "--threads", str(args.threads)] + (["--entropy-bonus"] if args.entropy_bonus else [])
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env | {"PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["extra_x_logits"] = res["extra_bytes"] / res["logits_bytes"]
    return res


def _setup(args) -> dict:
    torch.set_num_threads(args.threads)
    if not torch.distributed.is_initialized():
        from megatron_rl.parallel import ParallelConfig, init_parallel

        init_parallel(ParallelConfig(), device=args.device, seed=0)  # TP group of size 1
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = args.mem_tokens if args.child_memory else args.tokens
    return make_inputs(tokens, args.vocab, dtype, args.device)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the issue's setting)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--entropy-bonus", action="store_true", help="entropy bonus 0.01 in the loss")
    p.add_argument("--mem-tokens", type=int, default=512,
                   help="tokens of the memory subprocesses (the ratio to the logits' bytes does not depend on it)")
    p.add_argument("--json", default=None, help="also write the results here (temp file + rename)")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    args.names = names
    return args


def table(res: dict) -> str:
    ref = res["variants"].get("fused", {}).get("median_s")
    lines = ["| variant | median (s) | time / fused | x one-read floor | peak extra memory (x logits) |",
             "|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        mem = r.get("memory", {})
        m = f"{mem['extra_x_logits']:.2f}" if "extra_x_logits" in mem else mem.get("error", "-")
        ratio = f"{r['median_s'] / ref:.2f}" if ref else "-"
        lines.append(f"| {name} | {r['median_s']:.4f} | {ratio} | {r['median_s'] / res['floor_s']:.1f} | {m} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.child_memory:
        print(json.dumps(memory_child(args)))
        return {}
    t = _setup(args)
    pristine = t.pop("logits")
    bw = copy_bandwidth(pristine)
    nbytes = pristine.numel() * pristine.element_size()
    res = {"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, "device": args.device,
           "threads": args.threads, "entropy_bonus": args.entropy_bonus, "repeats": args.repeats,
           "logits_bytes": nbytes, "copy_bandwidth_GBps": bw / 1e9, "floor_s": nbytes / bw,
           "floor_2r1w_s": 3 * nbytes / bw, "mem_tokens": args.mem_tokens, "variants": {}}
    for name in args.names:
        r = time_variant(name, pristine, t, args.entropy_bonus, args.repeats)
        r["memory"] = measure_memory(args, name)
        res["variants"][name] = r
        print(f"[bench_loss] {name}: {r['median_s']:.4f} s, loss {r['loss']:.6f}, "
              f"entropy {r['entropy']:.6f}, memory {r['memory']}", file=sys.stderr, flush=True)
    print(table(res))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.json)
    return res


if __name__ == "__main__":
    main()
