"""SGLang sampling semantics of the embedded engine against independent float64 references.

Unit level: `sampler.adjust_logits` (penalties, min_new_tokens, logit_bias) and `sampler.filtered_probs`
(temperature, top_k, top_p, min_p) against per-token Python loops in float64 written from SGLang's
rules (penaltylib/*.py, layers/sampler.py); the sampled frequencies against the reference
distribution. Engine level (HTTP): logprobs under penalties equal an fp32 HF forward with the float64
rules applied on the engine's own output history; n, top_logprobs_num, input_token_logprobs
(logprob_start_len, max_new_tokens 0), return_text_in_logprobs, min_new_tokens, no_stop_trim.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from _engine_http import Engine, call

transformers = pytest.importorskip("transformers")

from megatron_rl.rollout.engine.sampler import adjust_logits, filtered_probs, sample  # noqa: E402
from megatron_rl.rollout.engine.sampling import SamplingParams  # noqa: E402

V = 40
EOS = {2}


@dataclass
class _Row:
    params: SamplingParams
    output_ids: list = field(default_factory=list)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))


def _ref_adjust(logits: list[float], p: SamplingParams, out: list[int]) -> list[float]:
    """SGLang's penalizers + logit_bias, one token at a time in float64."""
    res = []
    for v, l in enumerate(logits):
        c = out.count(v)
        if c and p.repetition_penalty != 1.0:
            l = l * p.repetition_penalty if l < 0 else l / p.repetition_penalty
        l -= p.frequency_penalty * c + p.presence_penalty * (1 if c else 0)
        if len(out) < p.min_new_tokens and (v in EOS or v in p.stop_token_ids):
            l = -math.inf
        l += p.logit_bias.get(v, 0.0)
        res.append(l)
    return res


def _ref_probs(adj: list[float], p: SamplingParams) -> dict[int, float]:
    """softmax(l / T), then SGLang's top_k / top_p / min_p truncation, renormalised: {token: prob}."""
    t = 1.0 if p.greedy else p.temperature
    m = max(adj)
    w = [math.exp((l - m) / t) if l > -math.inf else 0.0 for l in adj]
    z = sum(w)
    probs = sorted(((x / z, v) for v, x in enumerate(w)), key=lambda pv: (-pv[0], pv[1]))
    keep, cum = {}, 0.0
    for rank, (pr, v) in enumerate(probs):
        if (p.top_k <= 0 or rank < p.top_k) and cum <= p.top_p and pr >= p.min_p * probs[0][0] and pr > 0:
            keep[v] = pr
        cum += pr
    s = sum(keep.values())
    return {v: pr / s for v, pr in keep.items()}


CASES = [
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
    SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.2, temperature=0.6),
    SamplingParams(min_new_tokens=10, stop_token_ids=[7, 9], logit_bias={2: 5.0, 3: -2.5}),
    SamplingParams(logit_bias={0: 100.0}, top_k=3),
    SamplingParams(top_k=5, top_p=0.6, temperature=1.4),
    SamplingParams(min_p=0.2, temperature=0.8),
    SamplingParams(top_p=0.3, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.5),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_adjust_and_filter_match_float64_reference(case):
    p = CASES[case]
    g = torch.Generator().manual_seed(case)
    logits = torch.randn(3, V, generator=g) * 3
    histories = [[], [4, 4, 5, 30, 4, 2], [int(x) for x in torch.randint(0, V, (12,), generator=g)]]
    rows = [_Row(p, h) for h in histories]
    got = adjust_logits(logits, rows, EOS)
    kept, order = filtered_probs(got, rows)
    for i, h in enumerate(histories):
        ref = _ref_adjust(logits[i].double().tolist(), p, h)
        np.testing.assert_allclose(got[i].double().numpy(), ref, rtol=1e-6, atol=1e-5)
        want = _ref_probs(ref, p)
        have = {int(order[i, j]): float(kept[i, j]) / float(kept[i].sum()) for j in range(V) if kept[i, j] > 0}
        assert set(have) == set(want), (sorted(have), sorted(want))
        for v in want:
            assert abs(have[v] - want[v]) < 1e-5


def test_sampled_frequencies_follow_the_reference_distribution():
    p = SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.02, frequency_penalty=0.4)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    hist = [1, 1, 5]
    want = _ref_probs(_ref_adjust(logits[0].double().tolist(), p, hist), p)
    rows = [_Row(p, list(hist), torch.Generator().manual_seed(s)) for s in range(4000)]
    toks, _ = sample(logits.expand(len(rows), V), rows, EOS)
    freq = np.bincount(toks, minlength=V) / len(toks)
    assert set(np.nonzero(freq)[0].tolist()) <= set(want)
    assert max(abs(freq[v] - want[v]) for v in want) < 0.03


def test_reported_logprobs_are_of_the_adjusted_tempered_distribution():
    p = SamplingParams(temperature=0.5, repetition_penalty=1.3, logit_bias={11: 1.5})
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5))
    row = _Row(p, [11, 12])
    (tok,), lp = sample(logits, [row], EOS)
    adj = torch.tensor(_ref_adjust(logits[0].double().tolist(), p, row.output_ids), dtype=torch.float64)
    ref = torch.log_softmax(adj / 0.5, dim=-1)
    np.testing.assert_allclose(lp[0].double().numpy(), ref.numpy(), atol=1e-5)
    greedy = _Row(SamplingParams(temperature=0.0, presence_penalty=1.0), [3])
    (gt,), glp = sample(logits, [greedy], EOS)
    gadj = torch.tensor(_ref_adjust(logits[0].double().tolist(), greedy.params, [3]))
    assert gt == int(torch.argmax(gadj))
    np.testing.assert_allclose(glp[0].double().numpy(), torch.log_softmax(gadj, -1).numpy(), atol=1e-5)


# -- over HTTP, against HF -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(tiny_hf_dir):
    with Engine(tiny_hf_dir) as u:
        yield u


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)


def _gen(url, body):
    status, out = call(url, "/generate", body)
    assert status == 200, out
    return out


def _hf_logits(model, seq) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].double()


def test_penalised_logprobs_equal_hf_with_float64_rules(url, hf):
    model, tok = hf
    ids = tok.encode("12*3+5=")
    sp = {"temperature": 0.8, "max_new_tokens": 12, "sampling_seed": 5, "ignore_eos": True,
          "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.2, "logit_bias": {"7": 2.0}}
    out = _gen(url, {"input_ids": ids, "sampling_params": sp, "return_logprob": True})
    p = SamplingParams.from_dict(sp)
    logits = _hf_logits(model, ids + out["output_ids"])
    for i, (lp, t, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        adj = torch.tensor(_ref_adjust(logits[len(ids) - 1 + i].tolist(), p, out["output_ids"][:i]))
        assert abs(lp - torch.log_softmax(adj / 0.8, -1)[t].item()) < 1e-5


def test_min_new_tokens_and_eos(url, hf):
    _, tok = hf
    eos = tok.eos_token_id
    base = {"temperature": 0, "max_new_tokens": 10, "logit_bias": {str(eos): 50.0}}  # EOS would come first
    out = _gen(url, {"input_ids": [5, 6], "sampling_params": base})
    assert out["output_ids"] == [eos] and out["meta_info"]["finish_reason"]["type"] == "stop"
    out = _gen(url, {"input_ids": [5, 6], "sampling_params": {**base, "min_new_tokens": 4}})
    assert len(out["output_ids"]) == 5 and eos not in out["output_ids"][:4] and out["output_ids"][4] == eos
    out = _gen(url, {"input_ids": [5, 6], "sampling_params": {**base, "ignore_eos": True, "max_new_tokens": 3}})
    assert out["output_ids"] == [eos] * 3 and out["meta_info"]["finish_reason"]["type"] == "length"


def test_n_top_logprobs_and_text(url, hf):
    model, tok = hf
    ids = tok.encode("9*9=")
    outs = _gen(url, {"input_ids": ids, "sampling_params": {"n": 3, "max_new_tokens": 6, "sampling_seed": 1,
                                                             "ignore_eos": True},
                      "return_logprob": True, "top_logprobs_num": 4, "return_text_in_logprobs": True})
    assert isinstance(outs, list) and len(outs) == 3 and len({tuple(o["output_ids"]) for o in outs}) > 1
    for o in outs:
        logits = _hf_logits(model, ids + o["output_ids"])
        for i, (top, (lp, t, text)) in enumerate(zip(o["meta_info"]["output_top_logprobs"],
                                                     o["meta_info"]["output_token_logprobs"])):
            ref = torch.log_softmax(logits[len(ids) - 1 + i], -1)
            vals, idx = torch.topk(ref, 4)
            assert [x[1] for x in top] == idx.tolist()
            np.testing.assert_allclose([x[0] for x in top], vals.numpy(), atol=1e-5)
            assert text == tok.decode([t]) and top[0][2] == tok.decode([top[0][1]])


@pytest.mark.parametrize("start", [0, 3, -1])
def test_input_token_logprobs_for_scoring(url, hf, start):
    model, tok = hf
    ids = tok.encode("(1+2)*(3+4)=21")
    out = _gen(url, {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                     "logprob_start_len": start, "top_logprobs_num": 2})
    assert out["output_ids"] == [] and out["meta_info"]["output_token_logprobs"] == []
    got = out["meta_info"]["input_token_logprobs"]
    first = len(ids) - 1 if start < 0 else start
    assert [t for _, t, _ in got] == ids[first:]
    ref = torch.log_softmax(_hf_logits(model, ids), -1)
    for j, (lp, t, _) in zip(range(first, len(ids)), got):
        if j == 0:
            assert lp is None and out["meta_info"]["input_top_logprobs"][0] is None
        else:
            assert abs(lp - ref[j - 1, t].item()) < 1e-5


def test_no_stop_trim_keeps_the_stop(url, hf):
    _, tok = hf
    ids = tok.encode("7-2=")
    full = _gen(url, {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                             "ignore_eos": True}})["output_ids"]
    stop_tok = full[3]
    k = full.index(stop_tok)
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True, "stop_token_ids": [stop_tok]}
    trimmed = _gen(url, {"input_ids": ids, "sampling_params": sp})
    kept = _gen(url, {"input_ids": ids, "sampling_params": {**sp, "no_stop_trim": True}})
    assert trimmed["output_ids"] == kept["output_ids"] == full[: k + 1]
    assert trimmed["text"] == tok.decode(full[:k]) and kept["text"] == tok.decode(full[: k + 1])


def test_input_logprobs_of_a_mixed_batch(url, hf):
    model, tok = hf
    prompts = [tok.encode("(1+2)*(3+4)=21"), tok.encode("9="), tok.encode("12*3+5=41")]
    starts = [-1, 0, 2]
    outs = _gen(url, {"input_ids": prompts, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
                      "logprob_start_len": starts})
    for ids, start, out in zip(prompts, starts, outs):
        first = len(ids) - 1 if start < 0 else start
        ref = torch.log_softmax(_hf_logits(model, ids), -1)
        got = out["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in got] == ids[first:]
        for j, (lp, t, _) in zip(range(first, len(ids)), got):
            assert (lp is None) if j == 0 else abs(lp - ref[j - 1, t].item()) < 1e-5
