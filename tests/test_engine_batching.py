"""Continuous batching of the embedded engine, checked against HF transformers run one sequence at a time.

References: fp32 HF forward of prompt + output (batch 1, no padding) for logprobs; HF
`generate(do_sample=False)` per prompt for greedy; a float64 forward's router top-k for routed
experts; the same request sent alone for seeded sampling. Requests of different lengths, sampling
parameters and finishing times share the batch, and later ones join while earlier ones decode.
"""

import base64
import copy
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from _engine_http import Engine, call

transformers = pytest.importorskip("transformers")

PROMPTS = ["3+4*2=", "12*3+5=", "7-2=", "(1+2)*(3+4)=", "9*9=", "100-37+2=", "5+5+5+5=", "8/2="]


@pytest.fixture(scope="module")
def url(tiny_hf_dir):
    with Engine(tiny_hf_dir, "--max-running-requests", "16") as u:
        yield u


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    return model, tok


def _post(url, ids, sp, **extra):
    status, out = call(url, "/generate", {"input_ids": ids, "sampling_params": sp, **extra})
    assert status == 200, out
    return out


def _concurrent(url, bodies, stagger_s=0.0):
    """Send each (ids, sp, extra) from its own thread, the i-th after i * stagger_s seconds."""
    def one(i):
        time.sleep(i * stagger_s)
        ids, sp, extra = bodies[i]
        return _post(url, ids, sp, **extra)
    with ThreadPoolExecutor(len(bodies)) as ex:
        return list(ex.map(one, range(len(bodies))))


def _mixed_bodies(tok):
    bodies = []
    for i, text in enumerate(PROMPTS * 2):
        t = [0.0, 0.7, 1.0, 1.3][i % 4]
        sp = {"temperature": t, "max_new_tokens": 4 + 3 * (i % 5), "sampling_seed": 100 + i, "ignore_eos": i % 3 == 0}
        if i % 4 == 2:
            sp["top_k"] = 5
        if i % 4 == 3:
            sp["top_p"] = 0.8
        bodies.append((tok.encode(text), sp, {"return_logprob": True}))
    return bodies


def test_logprobs_equal_hf_forward_whatever_shares_the_batch(url, hf):
    model, tok = hf
    bodies = _mixed_bodies(tok)
    outs = _concurrent(url, bodies, stagger_s=0.05)  # later requests join a running batch
    for (ids, sp, _), out in zip(bodies, outs):
        gen = out["output_ids"]
        assert gen, out
        with torch.no_grad():
            logits = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1:-1].double()
        t = sp["temperature"] if sp["temperature"] > 0 else 1.0
        ref = torch.log_softmax(logits / t, dim=-1)
        want = [ref[i, g].item() for i, g in enumerate(gen)]
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_greedy_batch_equals_hf_greedy(url, hf):
    model, tok = hf
    prompts = [tok.encode(p) for p in PROMPTS]
    status, outs = call(url, "/generate", {"input_ids": prompts,
                                           "sampling_params": {"temperature": 0, "max_new_tokens": 12}})
    assert status == 200, outs
    for ids, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
        eos = model.generation_config.eos_token_id
        if eos in ref:  # HF keeps generating pad after EOS in a batch of one: compare up to EOS
            ref = ref[: ref.index(eos) + 1]
        assert out["output_ids"] == ref


def test_seeded_tokens_do_not_depend_on_the_batch(url, hf):
    _, tok = hf
    sp = {"temperature": 1.0, "max_new_tokens": 16, "sampling_seed": 1234, "ignore_eos": True, "top_p": 0.95}
    ids = tok.encode("12*3+5=")
    alone = _post(url, ids, sp)["output_ids"]
    crowd = [(tok.encode(p), {"temperature": 1.0, "max_new_tokens": 3 + i, "sampling_seed": i}, {})
             for i, p in enumerate(PROMPTS)]
    outs = _concurrent(url, crowd[:4] + [(ids, sp, {})] + crowd[4:], stagger_s=0.02)
    assert outs[4]["output_ids"] == alone
    # and in a /generate batch together with different requests
    status, batch = call(url, "/generate", {"input_ids": [tok.encode("9*9="), ids, tok.encode("1+1=")],
                                            "sampling_params": [{"max_new_tokens": 5}, sp, {"temperature": 0.5}]})
    assert status == 200 and batch[1]["output_ids"] == alone


def _router_topk(model, seq):
    """float64 top-k expert ids [S, L, K] and the (k+1)-th margin from one unpadded forward."""
    model64 = copy.deepcopy(model).double()
    model64.set_experts_implementation("eager")
    logits = []
    gates = [m for m in model64.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks = [g.register_forward_hook(lambda m, i, o: logits.append(o[0])) for g in gates]
    with torch.no_grad():
        model64(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    probs = torch.softmax(torch.stack(logits, dim=1), dim=-1)  # [S, L, E]
    k = model64.config.num_experts_per_tok
    top = torch.topk(probs, k + 1, dim=-1)
    return top.indices[..., :k], top.values


def test_routed_experts_per_request_in_a_batch(url, hf):
    model, tok = hf
    bodies = [(tok.encode(p), {"temperature": 0.9, "max_new_tokens": 3 + 2 * i, "sampling_seed": i},
               {"return_routed_experts": True}) for i, p in enumerate(PROMPTS[:6])]
    outs = _concurrent(url, bodies, stagger_s=0.03)
    L, K = model.config.num_hidden_layers, model.config.num_experts_per_tok
    for (ids, _, _), out in zip(bodies, outs):
        seq = ids + out["output_ids"]
        got = np.frombuffer(base64.b64decode(out["meta_info"]["routed_experts"]), np.int32).reshape(-1, L, K)
        assert got.shape[0] == len(seq) - 1
        ref, vals = _router_topk(model, seq)
        clear = (vals[..., K - 1] - vals[..., K]) > 1e-4  # positions whose top-k is not a near tie
        same = np.sort(got, -1) == np.sort(ref[: len(seq) - 1].numpy(), -1)
        assert same.all(-1)[clear[: len(seq) - 1].numpy()].all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_matches_cpu_hf(tiny_hf_dir):
    from conftest import load_tool

    figures = {}
    assert load_tool("gpu_check_engine").check_parity(tiny_hf_dir, figures) == []
    assert figures["cuda_vs_cpu_logprob_max_abs_diff"]["value"] < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer of the GPU check")
def test_gpu_check_engine_says_skipped_without_cuda(tmp_path):
    from conftest import load_tool

    assert load_tool("gpu_check_engine").main([str(tmp_path)]) == 0
    rec = __import__("json").loads((tmp_path / "engine.json").read_text())
    assert rec == {"status": "skipped", "figures": {}, "skipped": {"engine": "no CUDA device"}}
