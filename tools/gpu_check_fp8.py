"""FP8 part of the GPU check: ``python tools/gpu_check_fp8.py OUT_DIR`` -> ``OUT_DIR/fp8.json``.

Contract (as ``tools/gpu_check.sh``): writes ``{"status": "pass"|"fail"|"skipped", "figures":
{name: {"value", "unit"}}, "skipped": {part: why}}`` and exits 1 when a check failed (0 otherwise).
Parts:
1. quantiser on the device: ``quant.fp8`` on CUDA equals the CPU result bit for bit; then the
   blockwise FP8 GEMM ``torch._scaled_mm`` (activations 1x128, weights 128x128 scales, as SGLang's
   W8A8 block FP8) against the float64 product of our dequantised operands (relative error).
2. ModelOpt fake quant on CUDA (``quant.qat.fp8_qat_config`` on an ``nn.Linear``): its weights
   equal ``quant.fp8``'s quantise/dequantise.
3. Transformer Engine, if importable: 8 steps of a small TE MLP regression under FP8 autocast vs
   bf16, final loss within 5%; else "skipped: no TE".
Without CUDA the whole check is "skipped" ("no CUDA device").
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def check_quantiser(fig: dict, skipped: dict) -> bool:
    from megatron_rl.quant.fp8 import dequantize_block_fp8, fake_quant_activations, quantize_block_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 768, generator=g) * torch.exp(torch.randn(1024, 768, generator=g))
    q_cpu, s_cpu = quantize_block_fp8(w)
    q_gpu, s_gpu = quantize_block_fp8(w.cuda())
    same = torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)) and torch.equal(s_gpu.cpu(), s_cpu)
    fig["fp8_quantiser_cuda_equals_cpu"] = {"value": int(same), "unit": "bool"}
    ok = same
    x = torch.randn(256, 768, generator=g).cuda()
    xs = x.reshape(256, 6, 128).abs().amax(-1) / 448.0  # [M, K/128] per-token-group scales
    xq = (x / xs.repeat_interleave(128, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    ref = fake_quant_activations(x).double() @ dequantize_block_fp8(q_gpu, s_gpu).double().T
    errors = []
    for name, sa, sb in (("outer-major", xs.t().contiguous().t(), s_gpu.t().contiguous()),
                         ("row-major", xs.contiguous(), s_gpu.t().contiguous()),
                         ("outer-major-both", xs.t().contiguous().t(), s_gpu.t()),
                         ("row-major-a", xs.contiguous(), s_gpu.t())):
        try:
            y = torch._scaled_mm(xq, q_gpu.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - layout / support varies by torch & cuBLAS
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
            continue
        rel = float((y.double() - ref).abs().max() / ref.abs().max())
        fig["fp8_scaled_mm_blockwise_rel_err"] = {"value": rel, "unit": "max|y-ref|/max|ref|"}
        fig["fp8_scaled_mm_scale_layout"] = {"value": name, "unit": "layout"}
        return ok and rel < 1e-2
    skipped["scaled_mm_blockwise"] = "torch._scaled_mm blockwise not supported here: " + " | ".join(errors)
    return ok


def check_modelopt(fig: dict, skipped: dict) -> bool:
    from megatron_rl._optional import has_modelopt

    if not has_modelopt():
        skipped["modelopt"] = "no modelopt"
        return True
    import modelopt.torch.quantization as mtq

    from megatron_rl.quant.fp8 import dequantize_block_fp8, quantize_block_fp8
    from megatron_rl.quant.qat import fp8_qat_config

    lin = torch.nn.Linear(768, 1024, bias=False).cuda()
    mtq.quantize(lin, fp8_qat_config(), forward_loop=None)
    with torch.no_grad():
        got = lin.weight_quantizer(lin.weight.detach())
        want = dequantize_block_fp8(*quantize_block_fp8(lin.weight.detach()))
    rel = float((got - want).abs().max() / want.abs().max())
    fig["modelopt_fp8_block_vs_ours_rel_err"] = {"value": rel, "unit": "max|d|/max|w|"}
    return rel < 1e-6


def check_te(fig: dict, skipped: dict) -> bool:
    from megatron_rl._optional import has_te

    if not has_te():
        skipped["te"] = "skipped: no TE"
        return True
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    def run(fp8: bool) -> float:
        torch.manual_seed(0)
        net = torch.nn.Sequential(te.Linear(256, 512, params_dtype=torch.bfloat16),
                                  te.Linear(512, 256, params_dtype=torch.bfloat16)).cuda()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
        target = torch.roll(x, 1, dims=1)
        for _ in range(8):
            with te.fp8_autocast(enabled=fp8, fp8_recipe=recipe.DelayedScaling()):
                loss = torch.nn.functional.mse_loss(net(x).float(), target.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss)

    bf16, fp8 = run(False), run(True)
    fig["te_fp8_vs_bf16_loss_ratio"] = {"value": fp8 / bf16, "unit": "ratio after 8 steps"}
    return abs(fp8 / bf16 - 1) <= 0.05


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    fig: dict = {}
    skipped: dict = {}
    status = "pass"
    if not torch.cuda.is_available():
        status, skipped["all"] = "skipped", "no CUDA device"
    else:
        for name, fn in (("quantiser", check_quantiser), ("modelopt", check_modelopt), ("te", check_te)):
            try:
                if not fn(fig, skipped):
                    status = "fail"
                    fig.setdefault("failed", {"value": [], "unit": "checks"})["value"].append(name)
            except Exception:  # noqa: BLE001 - reported, the check goes on
                status = "fail"
                fig[f"{name}_error"] = {"value": traceback.format_exc()[-1500:], "unit": "traceback"}
    path = os.path.join(out_dir, "fp8.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump({"status": status, "figures": fig, "skipped": skipped}, f, indent=2)
    os.replace(f"{path}.tmp", path)
    print(json.dumps({"status": status, "figures": fig, "skipped": skipped}, indent=2))
    return 1 if status == "fail" else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tools/gpu_check_fp8.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
