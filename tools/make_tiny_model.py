"""Write a tiny, real Qwen3-MoE HF checkpoint (config, safetensors, tokenizer) for CPU tests and demos.

    python tools/make_tiny_model.py --out DIR [--seed N] [--data-seed N] [--overwrite]

Model (defaults, ~2M params, float32): Qwen3MoeForCausalLM, 4 layers, hidden 128, 4 heads / 2 KV
heads of dim 32, every layer MoE with 8 experts top-2 (norm_topk_prob), moe_intermediate_size 128,
untied embeddings, rope_theta 1e4, 512 positions. Weights are transformers' own init after
torch.manual_seed(seed): the same seed gives a byte-identical model.safetensors.

Tokenizer: byte-level BPE trained here with `tokenizers` on the synthetic task
(megatron_rl.data.synthetic, ops 1..8, seed --data-seed) plus role words; digits are always single
tokens (pre-tokenizer Digits(individual_digits=True) before ByteLevel). BPE runs out of merges on
this small corpus at ~380 tokens (cap 1024); config vocab_size is that padded to a multiple of 64
(384 for the defaults). Specials: <|endoftext|> (pad, config bos), <|im_start|>, <|im_end|>
(eos, end of turn) -- as in Qwen3. ChatML template without a default system prompt, stored inline
in tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast, meant to load in 4.x and 5.x).

On-disk format, checked against transformers 5.23: in memory Qwen3-MoE experts are fused
(`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and `mlp.experts.down_proj` [E, H, I]),
but save_pretrained writes the hub layout, per expert:
    model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj}.weight  [I, H]
    model.layers.{l}.mlp.experts.{e}.down_proj.weight            [H, I]
    model.layers.{l}.mlp.gate.weight                             [E, H]  (router)
config.json is rewritten in the hub's key style (as in Qwen/Qwen3-30B-A3B): transformers 5 writes
`num_local_experts`, `rope_parameters` and `dtype`; we store `num_experts`, `rope_theta`,
`rope_scaling` and `torch_dtype`, which transformers 5 reads back to the same config.

Written to a temp dir next to --out, then os.replace'd; a non-empty --out is refused unless
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL_DEFAULTS = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=128,
    intermediate_size=256, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-6, attention_bias=False,
)


def train_tokenizer(data_seed: int = 0, vocab_size: int = 1024, n_rows: int = 2000):
    """Byte-level BPE (single-digit tokens) trained on synthetic problems; an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_rl.data.synthetic import MAX_OP, generate

    rows = generate((1, MAX_OP), n_rows, data_seed)
    texts = [f"{role}\n" for role in ("system", "user", "assistant") for _ in range(8)]
    texts += [f"{r['prompt']}\n{r['solution']}\n" for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", model_max_length=512)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _hub_style_config(path: Path) -> None:
    """Rename transformers-5 config keys to the hub's Qwen3-MoE names (see module docstring)."""
    cfg = json.loads(path.read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    rope = cfg.pop("rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is written hub-style, got {rope}")
    cfg["rope_theta"], cfg["rope_scaling"] = rope["rope_theta"], None
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def _write_checkpoint(tmp: Path, seed: int, data_seed: int, overrides: dict) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = train_tokenizer(data_seed)
    vocab = tokenizer.get_vocab()
    params = {**MODEL_DEFAULTS, "vocab_size": -(-len(tokenizer) // 64) * 64,
              "bos_token_id": vocab["<|endoftext|>"], "eos_token_id": vocab["<|im_end|>"],
              "pad_token_id": vocab["<|endoftext|>"], **overrides}
    config = Qwen3MoeConfig(**params)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    model.generation_config.eos_token_id = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(tmp, safe_serialization=True)
    _hub_style_config(tmp / "config.json")
    tokenizer.save_pretrained(tmp, save_jinja_files=False)
    tok_cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, *, data_seed: int = 0,
                    overwrite: bool = False, **overrides) -> Path:
    """Write the tiny checkpoint to out_dir; `overrides` replace Qwen3MoeConfig fields. Returns the path.

    Raises FileExistsError if out_dir exists and is non-empty (unless overwrite).
    """
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True / --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        _write_checkpoint(tmp, seed, data_seed, overrides)
        os.chmod(tmp, 0o755)  # mkdtemp and safetensors create owner-only entries
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old"))
            os.replace(out, old)  # renaming onto the empty mkdtemp dir is allowed
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="model init seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the tokenizer training text")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a = p.parse_args(argv)
    try:
        out = make_tiny_model(a.out, a.seed, data_seed=a.data_seed, overwrite=a.overwrite)
    except FileExistsError as e:
        p.error(str(e))
    print(out)


if __name__ == "__main__":
    main()
