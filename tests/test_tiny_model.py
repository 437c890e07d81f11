"""tools/make_tiny_model.py and megatron_rl.data.chat against HF transformers as the reference."""

import json

import pytest
import torch
from conftest import load_tool
from safetensors import safe_open

from megatron_rl.data.chat import TemplateError, build_prompt_ids, build_sft_sample
from megatron_rl.data.jsonl import DatasetError
from megatron_rl.data.synthetic import generate, make_problem

transformers = pytest.importorskip("transformers")

make_tiny = load_tool("make_tiny_model")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny.make_tiny_model(root / name, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


@pytest.fixture(scope="module")
def tokenizer(ckpts):
    return transformers.AutoTokenizer.from_pretrained(ckpts["a"])


def test_hf_loads_checkpoint(ckpts, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpts["a"])
    cfg = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (8, 2, True)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (4, 128, 32)
    assert (cfg.moe_intermediate_size, cfg.num_key_value_heads) == (128, 2)
    assert cfg.rope_parameters["rope_theta"] == 10000.0 and not cfg.tie_word_embeddings
    assert cfg.vocab_size % 64 == 0 and len(tokenizer) <= cfg.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 5_000_000
    ids = torch.tensor([build_prompt_ids(tokenizer, make_problem(0, 2, 0))])
    assert model(ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)
    hub = json.loads((ckpts["a"] / "config.json").read_text())  # hub key style, see module doc
    assert hub["num_experts"] == 8 and hub["rope_theta"] == 10000.0 and "num_local_experts" not in hub
    with safe_open(ckpts["a"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.3.mlp.experts.7.gate_proj.weight").get_shape() == [128, 128]
    assert {f"model.layers.0.mlp.experts.{e}.{w}.weight" for e in range(8)
            for w in ("gate_proj", "up_proj", "down_proj")} <= keys


def test_deterministic_by_seed(ckpts):
    a, b, c = ((ckpts[k] / "model.safetensors").read_bytes() for k in "abc")
    assert a == b and a != c
    assert (ckpts["a"] / "tokenizer.json").read_bytes() == (ckpts["c"] / "tokenizer.json").read_bytes()


def test_refuses_non_empty_out(ckpts):
    with pytest.raises(FileExistsError):
        make_tiny.make_tiny_model(ckpts["b"], seed=0)
    before = (ckpts["b"] / "model.safetensors").read_bytes()
    make_tiny.make_tiny_model(ckpts["b"], seed=0, overwrite=True, num_hidden_layers=1)
    assert (ckpts["b"] / "model.safetensors").read_bytes() != before
    make_tiny.make_tiny_model(ckpts["b"], seed=0, overwrite=True)
    assert (ckpts["b"] / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in ckpts["b"].parent.iterdir()) == ["a", "b", "c"]  # no temp dirs


def test_tokenizer_splits_digits(tokenizer):
    ids = tokenizer("Ann has 1234 apples.", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["1", "2", "3", "4"]
    assert tokenizer.decode(ids) == "Ann has 1234 apples."
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert 256 < len(tokenizer) <= 1024


def test_sft_loss_mask_is_the_assistant_answer(tokenizer):
    row = make_problem(0, 3, 0)
    sample = build_sft_sample(tokenizer, row, 512)
    ids, mask = sample["input_ids"], sample["loss_mask"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    start = mask.index(1)
    assert mask[start:start + sum(mask)] == [1] * sum(mask)  # one contiguous span
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == row["solution"] + "<|im_end|>"
    prompt = f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids[:start]) == prompt
    assert ids[:start] == build_prompt_ids(tokenizer, row)
    assert tokenizer.decode(ids[start + sum(mask):]) == "\n"  # template newline after <|im_end|>


def test_sft_multi_turn_masks_every_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ann has 2 pens."},
                {"role": "assistant", "content": "Ok 2."}, {"role": "user", "content": "And 3?"},
                {"role": "assistant", "content": "The answer is \\boxed{3}."}]
    sample = build_sft_sample(tokenizer, {"messages": messages, "label": "3"}, 512)
    masked = tokenizer.decode([t for t, m in zip(sample["input_ids"], sample["loss_mask"]) if m])
    assert masked == "Ok 2.<|im_end|>The answer is \\boxed{3}.<|im_end|>"
    assert tokenizer.decode(build_prompt_ids(tokenizer, {"messages": messages})).endswith(
        "And 3?<|im_end|>\n<|im_start|>assistant\n")


def test_sft_errors(tokenizer):
    row = make_problem(0, 3, 0)
    n = len(build_sft_sample(tokenizer, row, 512)["input_ids"])
    with pytest.raises(DatasetError, match=rf"train.jsonl:7: sample has {n} tokens > max_len {n - 1}"):
        build_sft_sample(tokenizer, row, n - 1, path="train.jsonl", line=7)
    with pytest.raises(DatasetError, match="no assistant turn"):
        build_sft_sample(tokenizer, {"prompt": "hi", "label": "1"}, 512)
    broken = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    broken.chat_template = broken.chat_template.replace("'<|im_start|>assistant\\n'",
                                                        "'<|im_start|>assistant\\nThink.\\n'")
    with pytest.raises(TemplateError, match="d.jsonl:3: chat template breaks the prefix property"):
        build_sft_sample(broken, row, 512, path="d.jsonl", line=3)


def test_id_problems_fit_the_tiny_model_budget(tokenizer):
    lengths = [len(build_sft_sample(tokenizer, r, 512)["input_ids"]) for r in generate((3, 3), 200, 0)]
    assert max(lengths) <= 120  # op=3 problem + solution + ChatML stays short for a ~2M model
