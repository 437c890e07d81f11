"""The embedded engine's FP8 side: load a blockwise-FP8 HF checkpoint on CPU (dequantised at load),
dequantise FP8 weight updates, and optionally fake-quantise activations per 1x128 token group.

Legend: see ``quant.fp8`` (bn, bk = weight block; e4m3 = float8_e4m3fn).

What SGLang does with such a checkpoint (``Fp8LinearMethod`` with ``weight_block_size``): keeps the
e4m3 weights and scales and runs a block-FP8 GEMM whose inputs are the weights dequantised per
128x128 block and the activations quantised per token per 1 x bk group (``activation_scheme:
dynamic``), accumulating in fp32. We emulate it: weights are dequantised once at load / update to
the engine dtype (exactly ``q * scale``), and with ``MEGATRON_RL_FP8_ACT_FAKE_QUANT=1`` (or
``fake_quant_activations=True``) a forward pre-hook fake-quantises the input of every quantised
``nn.Linear`` and of the routed-experts block (its gate/up input) per 1 x bk group.
Left out: the input of the stacked experts' down projection (inside transformers' fused expert
forward, no hook point), fp32-accumulation order differences, FP8 KV cache.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_rl.quant.fp8 import (dequantize_named, fake_quant_activations, fp8_block_of, is_quantized_name,
                                   scale_name)

ACT_ENV = "MEGATRON_RL_FP8_ACT_FAKE_QUANT"


def read_config(model_path: str) -> dict:
    """config.json of an HF dir as a dict (ValueError naming the file when absent/invalid)."""
    path = os.path.join(model_path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config.json: {e}") from e


def read_safetensors_dir(model_path: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF dir (``model.safetensors.index.json`` shards, else ``*.safetensors``)."""
    from safetensors.torch import load_file

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{model_path}: no .safetensors files")
    out: dict[str, torch.Tensor] = {}
    for fn in files:
        out.update(load_file(os.path.join(model_path, fn)))
    return out


def from_pretrained(model_path: str, dtype: torch.dtype, fake_quant_activations: bool | None = None,
                    local_files_only: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` that also reads blockwise-FP8 checkpoints on CPU.

    Non-FP8 dirs: plain ``from_pretrained(model_path, dtype=dtype)``. FP8 dirs (config.json with
    ``quantization_config.quant_method == "fp8"``): the model is built from the config without the
    quantization_config, every parameter set to NaN, then every tensor loaded dequantised
    (``q * weight_scale_inv`` per block, cast to ``dtype``); a parameter left NaN (no tensor in
    the checkpoint) is an error naming it. The model gets ``fp8_weight_block`` = (bn, bk).

    ``local_files_only``: never reach a hub (transformers' flag; the engine's disk-update path).
    Returns the model in eval mode with requires_grad False.
    Raises: ValueError (unsupported FP8 variant naming the config field; a parameter not in the
    checkpoint); KeyError (an FP8 tensor without its ``weight_scale_inv``, naming it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from megatron_rl.rollout.engine.weights import load_named_tensors

    block = fp8_block_of(read_config(model_path))
    if block is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=local_files_only)
    else:
        config = AutoConfig.from_pretrained(model_path, local_files_only=local_files_only)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            pass
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        named = dequantize_named(read_safetensors_dir(model_path), block, dtype)
        if model.config.tie_word_embeddings:
            named.pop("lm_head.weight", None)
        load_named_tensors(model, named)
        unset = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
        if unset:
            raise ValueError(f"{model_path}: FP8 checkpoint has no tensor for {unset[:5]}")
        model.fp8_weight_block = block
    model.eval().requires_grad_(False)
    if fake_quant_activations is None:
        fake_quant_activations = os.environ.get(ACT_ENV, "0") == "1"
    if fake_quant_activations:
        add_activation_fake_quant(model, (block or (128, 128))[1])
    return model


def dequantize_update(model, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 weight-update payload -> plain tensors (no-op without float8 tensors / scales).

    A uint8 tensor with a ``*_scale_inv`` beside it is read as float8_e4m3fn bytes (what
    "distributed" sync over gloo sends). Raises KeyError naming an FP8 tensor without its
    ``weight_scale_inv`` (or the reverse)."""
    block = getattr(model, "fp8_weight_block", (128, 128))
    named = {k: (t.view(torch.float8_e4m3fn) if t.dtype == torch.uint8 and scale_name(k) in named else t)
             for k, t in named.items()}  # gloo broadcasts carry FP8 weights as uint8 bytes
    return dequantize_named(named, block, torch.float32)


def add_activation_fake_quant(model: torch.nn.Module, group: int = 128) -> list:
    """Register pre-hooks that fake-quantise (e4m3, per token per ``group``) the inputs of every
    ``nn.Linear`` whose HF weight name ``is_quantized_name`` selects and of every stacked-experts
    module (``*.mlp.experts`` with ``gate_up_proj``). Returns the hook handles."""
    def hook(_module, args):
        return (fake_quant_activations(args[0], group), *args[1:])

    handles = []
    for name, mod in model.named_modules():
        linear = isinstance(mod, torch.nn.Linear) and is_quantized_name(f"{name}.weight")
        experts = hasattr(mod, "gate_up_proj") and is_quantized_name(f"{name}.gate_up_proj")
        if linear or experts:
            handles.append(mod.register_forward_pre_hook(hook))
    model.fp8_activation_hooks = len(handles)
    return handles


def write_fp8_hf_dir(src: str, dst: str, block=(128, 128)) -> str:
    """Write a blockwise-FP8 copy of the HF dir ``src`` into ``dst`` (temp dir + rename): the
    tensors ``quant.fp8.quantize_named`` selects become float8_e4m3fn + ``weight_scale_inv``,
    config.json gets ``quantization_config``, tokenizer / generation files are copied. This is
    what ``--rollout-fp8`` starts the engines from (SGLang sizes its FP8 layers from it).

    Returns ``dst``. Raises ValueError for a source that is already FP8, or naming a tensor with
    NaN/inf values.
    """
    import shutil

    from safetensors.torch import save_file

    from megatron_rl.quant.fp8 import quantization_config, quantize_named

    cfg = read_config(src)
    if cfg.get("quantization_config"):
        raise ValueError(f"{src}: already quantised (quantization_config present)")
    named = read_safetensors_dir(src)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for n in os.listdir(src):
        if not n.endswith(".safetensors") and n != "model.safetensors.index.json" and os.path.isfile(
                os.path.join(src, n)):
            shutil.copy2(os.path.join(src, n), os.path.join(tmp, n))
    save_file({k: v.contiguous() for k, v in quantize_named(named, block).items()},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    cfg["quantization_config"] = quantization_config({k: t.dim() for k, t in named.items()}, block)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def rollout_model_path(hf_dir: str, out_dir: str, rollout_fp8: str) -> str:
    """What the engines load: ``hf_dir``, or with ``rollout_fp8 == "block128"`` an FP8 copy of it
    written to ``<out_dir>/rollout_fp8_hf`` (so SGLang builds FP8 block layers)."""
    if rollout_fp8 == "off":
        return hf_dir
    if rollout_fp8 != "block128":
        raise ValueError(f"--rollout-fp8 {rollout_fp8!r}: expected 'off' or 'block128'")
    return write_fp8_hf_dir(hf_dir, os.path.join(out_dir, "rollout_fp8_hf"))
