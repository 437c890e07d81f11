"""Multi-turn rollouts without a model: a scripted engine client, the tiny model's tokenizer.

Independent references: the engine's own requests and outputs (the trainer's sequence must be
them, per turn, by id), the tokenizer's chat template applied to the whole conversation as text
(the token sequence must decode to exactly that chat), Python's own arithmetic (calc), and a
per-token mask built directly from the turn spans (collate / pack_microbatches).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from megatron_rl.rollout.client import GenerateResult, SamplingParams
from megatron_rl.rollout.env import EnvStep, load_env
from megatron_rl.rollout.multiturn import ChatRenderer, MultiTurnConfig, multiturn_stats, run_episode
from megatron_rl.rollout.tools_calc import CalcEnv, calc, tool_call_text
from megatron_rl.train.rl_batch import Sample, collate, local_counts, pack_microbatches

LAYOUT = (2, 2)  # (MoE layers, top_k) of the fake routes


@pytest.fixture(scope="module")
def tok(tiny_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir)


class ScriptedClient:
    """An engine that answers turn t with script[t] (text, tokenised once, + <|im_end|> unless the
    text ends with "...") cut at max_new_tokens; logprobs and routes are functions of the request."""

    def __init__(self, tok, script: list[str]):
        self.eot = tok.convert_tokens_to_ids("<|im_end|>")
        self.turns = []
        for text in script:
            ids = tok(text.removesuffix("..."), add_special_tokens=False)["input_ids"]
            self.turns.append(ids if text.endswith("...") else ids + [self.eot])
        self.calls: list[tuple[list[int], list[int], SamplingParams]] = []

    async def generate(self, input_ids, sp, *, return_logprob=True, return_routed_experts=False, rid=""):
        out = self.turns[len(self.calls)][: sp.max_new_tokens]
        self.calls.append((list(input_ids), out, sp))
        fin = "stop" if out and out[-1] == self.eot else "length"
        lps = [-0.01 * (t % 7) - 1e-3 * (len(input_ids) + i) for i, t in enumerate(out)]
        n = len(input_ids) + len(out) - 1
        routes = np.arange(n * 4, dtype=np.int32).reshape(n, *LAYOUT) if return_routed_experts else None
        return GenerateResult(rid=rid, prompt_ids=list(input_ids), output_ids=out, text="", logprobs=lps,
                              finish_reason=fin, weight_version="3", routed_experts=routes)


def _prompt(tok, text="Ann has 3 apples. Bob has 4 more apples than Ann. How many apples does Bob have?"):
    from megatron_rl.data.chat import build_prompt_ids

    return [{"role": "user", "content": text}], build_prompt_ids(tok, {"prompt": text})


def _run(tok, script, *, budget=400, turns=4, per_turn=0, env=None, routes=False):
    client = ScriptedClient(tok, script)
    msgs, prompt_ids = _prompt(tok)
    sp = SamplingParams(max_new_tokens=budget, stop_token_ids=(client.eot,), seed=11)
    ep = asyncio.run(run_episode(client, prompt_ids, "7", env or CalcEnv(), ChatRenderer(tok), sp,
                                 MultiTurnConfig(max_turns=turns, max_tokens_per_turn=per_turn), rid="r",
                                 return_routed_experts=routes))
    return ep, client, msgs


CALL = tool_call_text("3 + 4")


def test_tokens_mask_and_logprobs_are_the_engines_per_turn(tok):
    ep, client, msgs = _run(tok, [CALL, "The answer is \\boxed{7}."], routes=True)
    assert ep.outcomes == ["tool_ok", "answer"] and ep.reward == 1.0 and ep.finish_reason == "stop"
    assert len(client.calls) == 2 == len(ep.turns)
    seq = ep.prompt_ids + ep.output_ids
    for (inp, out, sp), (a, b) in zip(client.calls, ep.turns):
        p = len(ep.prompt_ids)
        assert inp == seq[: p + a]  # the engine continued exactly the trainer's prefix
        assert ep.output_ids[a:b] == out  # and the trainer keeps exactly its ids
    policy = {i for a, b in ep.turns for i in range(a, b)}
    assert ep.loss_mask == [int(i in policy) for i in range(len(ep.output_ids))]
    assert 0 < sum(ep.loss_mask) < len(ep.loss_mask)
    # logprobs: the engine's on policy tokens (recomputed here from the request), 0 elsewhere
    for (inp, out, _), (a, b) in zip(client.calls, ep.turns):
        want = [-0.01 * (t % 7) - 1e-3 * (len(inp) + i) for i, t in enumerate(out)]
        assert ep.logprobs[a:b] == want
    assert all(ep.logprobs[i] == 0.0 for i in range(len(ep.output_ids)) if i not in policy)
    # the whole sequence is the chat of the conversation, rendered by the template as text
    conv = msgs + [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "7"},
                   {"role": "assistant", "content": "The answer is \\boxed{7}."}]
    chat = tok.apply_chat_template(conv, tokenize=False)
    assert tok.decode(seq) == chat[: chat.rindex("<|im_end|>") + len("<|im_end|>")]  # up to its last eot
    # routes: the last call's, one per position of the final sequence
    assert ep.routed_experts.shape == (len(seq) - 1, *LAYOUT)
    # per-turn seeds differ, so a turn does not replay the previous turn's random stream
    assert len({sp.seed for _, _, sp in client.calls}) == 2


@pytest.mark.parametrize("bad, outcome, message", [
    ("<tool_call>\n{\"name\": \"calc\", \"arguments\": {\"expr\": \"3 +", "malformed_call", "no closing"),
    ("<tool_call>{not json}</tool_call>", "malformed_call", "invalid JSON"),
    ("<tool_call>{\"name\": \"calc\", \"arguments\": {}}</tool_call>", "malformed_call", "needs"),
    ("<tool_call>{\"name\": \"search\", \"arguments\": {\"q\": \"x\"}}</tool_call>", "unknown_tool", "unknown tool"),
    (tool_call_text("7 / 0"), "tool_error", "division by zero"),
    (tool_call_text("__import__('os')"), "tool_error", "unsupported"),
    (tool_call_text("9 ** 99999"), "tool_error", "exponent"),
])
def test_bad_tool_calls_are_outcomes_not_crashes(tok, bad, outcome, message):
    ep, _, _ = _run(tok, [bad, "The answer is \\boxed{7}."])
    assert ep.outcomes == [outcome, "answer"] and ep.reward == 1.0
    env_text = tok.decode([t for t, m in zip(ep.output_ids, ep.loss_mask) if m == 0])
    assert "error:" in env_text and message in env_text
    stats = multiturn_stats([_sample(ep)])
    assert stats[f"rollout/env/{outcome}_count"] == 1.0 and stats["rollout/env/answer_count"] == 1.0


def test_turn_limit_token_budget_and_cut_turns(tok):
    ep, _, _ = _run(tok, [CALL, CALL, CALL], turns=2)
    assert ep.outcomes == ["tool_ok", "tool_ok", "turn_limit"] and ep.reward == 0.0
    assert ep.finish_reason == "length" and len(ep.turns) == 2
    # a budget that the environment's answer would overrun: the episode ends before it
    first = len(ScriptedClient(tok, [CALL]).turns[0])
    ep, _, _ = _run(tok, [CALL, CALL], budget=first + 5)
    assert ep.outcomes == ["tool_ok", "token_budget"] and ep.output_ids == ep.output_ids[: first]
    assert sum(ep.loss_mask) == len(ep.output_ids) == first
    # a turn cut by the per-turn cap: the chat's end-of-turn token is supplied as an env token
    ep, client, _ = _run(tok, ["The answer is 1 2 3 4 5 6 7 8 9...", "The answer is \\boxed{7}."],
                         per_turn=6, env=_AlwaysTool())
    a, b = ep.turns[0]
    assert b - a == 6 and ep.output_ids[b] == client.eot and ep.loss_mask[b] == 0
    assert len(ep.output_ids) <= 400


class _AlwaysTool:
    def step(self, messages, label):
        if len(messages) >= 3:
            return EnvStep(done=True, reward=0.5, outcome="answer")
        return EnvStep(messages=[{"role": "tool", "content": "go on"}], outcome="tool_ok")

    def truncated_reward(self, messages, label):
        return 0.0


def _sample(ep) -> Sample:
    return Sample(prompt_ids=ep.prompt_ids, output_ids=ep.output_ids, rollout_logprobs=ep.logprobs,
                  reward=ep.reward, finish_reason=ep.finish_reason, weight_version="3",
                  loss_mask=ep.loss_mask, turns=[list(t) for t in ep.turns], env_outcomes=ep.outcomes)


def test_collate_and_packing_mask_environment_tokens(tok):
    eps = [_run(tok, [CALL, "The answer is \\boxed{7}."])[0], _run(tok, [CALL, CALL, "x"])[0]]
    samples = [_sample(e) for e in eps] + [Sample(prompt_ids=[1, 2], output_ids=[5, 6, 7],
                                                  rollout_logprobs=[-1.0] * 3, reward=1.0,
                                                  finish_reason="stop", weight_version="3")]
    adv = torch.tensor([0.5, -1.5, 2.0])
    seq = max(len(s.prompt_ids) + len(s.output_ids) for s in samples)
    mb = collate(samples, adv, seq, pad_id=0)
    for r, s in enumerate(samples):
        p, mask = len(s.prompt_ids), s.loss_mask or [1] * len(s.output_ids)
        want = torch.zeros(seq)
        for i, m in enumerate(mask):  # label frame: position p - 1 + i scores output_ids[i]
            want[p - 1 + i] = m
        assert torch.equal(mb.loss_mask[r], want)
        assert torch.equal(mb.advantages[r], want * float(adv[r]))
        for i, m in enumerate(mask):
            if m:
                assert mb.rollout_logprobs[r, p - 1 + i] == pytest.approx(s.rollout_logprobs[i])
    assert local_counts(mb) == (sum(sum(s.loss_mask or [1] * len(s.output_ids)) for s in samples), 3)
    packed = pack_microbatches(samples, adv, seq + 8, pad_id=0, rows=1)
    for pmb in packed:
        for i, r, off, n in pmb.sample_index:
            assert torch.equal(pmb.loss_mask[r, off: off + n], mb.loss_mask[i, :n])
    assert sum(local_counts(p)[0] for p in packed) == local_counts(mb)[0]
    with pytest.raises(ValueError, match="loss_mask has"):
        collate([Sample(prompt_ids=[1], output_ids=[2, 3], rollout_logprobs=[0.0, 0.0], reward=1.0,
                        finish_reason="stop", weight_version=None, loss_mask=[1])], adv[:1], 4, 0)


def test_sample_survives_the_checkpoint_json_round_trip(tok):
    import dataclasses

    s = _sample(_run(tok, [CALL, "The answer is \\boxed{7}."])[0])
    back = Sample(**json.loads(json.dumps(dataclasses.asdict(s))))
    assert back == s


@pytest.mark.parametrize("expr", ["3 + 4", "14 - 3 * 2", "(7 + 5) // 5", "99 % 7", "-(3 - 10)", "2 ** 10",
                                  "7 / 2", "1.5 * 4"])
def test_calc_matches_python_arithmetic(expr):
    v = eval(expr)  # the reference: Python's own arithmetic on a literal expression
    want = str(int(v)) if float(v).is_integer() else f"{v:.6g}"
    assert calc(expr) == want


def test_tool_trace_sft_rows(tok):
    from megatron_rl.data.chat import build_sft_sample
    from megatron_rl.data.jsonl import validate_row
    from megatron_rl.data.synthetic import generate, verify, with_tool_trace
    from megatron_rl.rollout.tools_calc import parse_call

    for row in generate((1, 5), 10, seed=3):
        tr = with_tool_trace(row)
        validate_row(tr, require_solution=True)
        msgs = tr["messages"]
        calls = [m for m in msgs if m["role"] == "assistant"][:-1]
        assert len(calls) == row["op"]
        for call, res in zip(calls, [m for m in msgs if m["role"] == "tool"]):
            kind, expr = parse_call(call["content"])
            assert kind == "call" and calc(expr) == res["content"]  # the tool reproduces the generator
        assert verify(msgs[-1]["content"], row["label"]) == 1.0
        ids = build_sft_sample(tok, tr, 2048)
        text_on = tok.decode([t for t, m in zip(ids["input_ids"], ids["loss_mask"]) if m])
        # loss exactly on the assistant turns (each through its end-of-turn), none on user / tool
        assert text_on == "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")


def test_write_splits_tool_frac(tmp_path):
    from megatron_rl.data.jsonl import load_jsonl
    from megatron_rl.data.synthetic import write_splits

    paths = write_splits(tmp_path, 0, 40, 5, tool_frac=0.25)
    rows = load_jsonl(paths["train"])
    assert sum("messages" in r for r in rows) == 10 and len(rows) == 40


def test_load_env_errors():
    from _multiturn_envs import ProbeEnv

    assert isinstance(load_env("calc"), CalcEnv)
    assert isinstance(load_env("_multiturn_envs:probe_env"), ProbeEnv)
    for spec, msg in [("nope", "expected"), ("no_such_mod:f", "cannot load"),
                      ("_multiturn_envs:not_an_env", "lacks step")]:
        with pytest.raises(ValueError, match=msg):
            load_env(spec)
    with pytest.raises(ValueError, match="--max-turns"):
        MultiTurnConfig(max_turns=0)


@pytest.mark.parametrize("flags, msg", [
    (["--env", "nope"], "expected 'calc'"),
    (["--env", "calc", "--max-turns", "0"], "--max-turns must be >= 1"),
    (["--env", "calc", "--partial-rollout"], "not supported"),
    (["--partial-rollout", "--dynamic-sampling"], "--dynamic-sampling"),
])
def test_grpo_refuses_bad_multiturn_flags(flags, msg, capsys, tmp_path):
    from megatron_rl.train.grpo import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--hf", "x", "--train-data", "t.jsonl", "--out", str(tmp_path), *flags])
    assert msg in capsys.readouterr().err


def test_grpo_parses_env_calc(tmp_path):
    from megatron_rl.train.grpo import parse_args

    args, _ = parse_args(["--hf", "x", "--train-data", "t.jsonl", "--out", str(tmp_path), "--env", "calc",
                          "--max-turns", "6", "--eval-without-env"])
    assert isinstance(args.env_obj, CalcEnv) and args.multiturn.max_turns == 6 and args.eval_without_env


# Qwen2.5's way of rendering tool results (consecutive tool messages share one user turn, each in
# <tool_response>), as in its tokenizer_config.json, without the tools/system preamble
QWEN_TOOL_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


class _TwoResults:
    def step(self, messages, label):
        if len(messages) >= 3:
            return EnvStep(done=True, reward=1.0, outcome="answer")
        return EnvStep(messages=[{"role": "tool", "content": "7"}, {"role": "tool", "content": "8"}],
                       outcome="tool_ok")

    def truncated_reward(self, messages, label):
        return 0.0


def test_qwen_style_tool_turns_render_as_the_template_does(tok):
    import copy

    qtok = copy.deepcopy(tok)
    qtok.chat_template = QWEN_TOOL_TEMPLATE
    ep, client, msgs = _run(qtok, [CALL, "The answer is \\boxed{7}."], env=_TwoResults())
    a, b = ep.turns[0]
    env_text = qtok.decode(ep.output_ids[b: ep.turns[1][0]])
    assert env_text == ("\n<|im_start|>user\n<tool_response>\n7\n</tool_response>\n<tool_response>\n8\n"
                        "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    conv = msgs + [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "7"},
                   {"role": "tool", "content": "8"}, {"role": "assistant", "content": "The answer is \\boxed{7}."}]
    chat = qtok.apply_chat_template(conv, tokenize=False)
    assert qtok.decode(ep.prompt_ids + ep.output_ids) == chat[: chat.rindex("<|im_end|>") + len("<|im_end|>")]
