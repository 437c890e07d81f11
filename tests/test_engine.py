"""Embedded engine (megatron_rl.rollout.engine) over HTTP, checked against HF transformers directly.

One server subprocess per module on a free 127.0.0.1 port (shut down by a finalizer). References are
independent of the engine: HF `generate(do_sample=False)`, a float64 full forward for logprobs, and
softmax+top-k of router logits captured from that forward for routed experts.
"""

import base64
import copy
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")
pytest.importorskip("aiohttp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def server(tiny_hf_dir, request, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("engine") / "engine.log", "w+b")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.rollout.engine", "--model", tiny_hf_dir,
                             "--host", "127.0.0.1", "--port", str(port), "--seed", "0"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop():
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"engine exited: {log.read().decode()[-2000:]}")
        try:
            if _call(url, "/health", timeout=2)[0] == 200:
                return url
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail("engine did not become healthy")


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    return model, tok


def _gen(url, ids, **sp):
    extra = {k: sp.pop(k) for k in ("return_logprob", "return_routed_experts", "rid") if k in sp}
    status, out = _call(url, "/generate", {"input_ids": ids, "sampling_params": sp, **extra})
    assert status == 200, out
    return out


def _prompt(tok, text="3+4*2="):
    return tok.encode(text)


def test_greedy_matches_hf_generate(server, hf):
    model, tok = hf
    ids = _prompt(tok)
    out = _gen(server, ids, temperature=0.0, max_new_tokens=16)
    ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16)[0, len(ids):].tolist()
    assert out["output_ids"] == ref
    assert out["meta_info"]["prompt_tokens"] == len(ids)
    assert out["meta_info"]["completion_tokens"] == len(ref)
    if out["meta_info"]["finish_reason"]["type"] == "length":
        assert out["text"] == tok.decode(ref, skip_special_tokens=True)


def _router_reference(model64, seq):
    """float64 logits [S, V] and top-k expert indices [S, L, K] from one full forward."""
    logits_per_layer = []
    gates = [m for m in model64.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks = [g.register_forward_hook(lambda m, i, o: logits_per_layer.append(o[0])) for g in gates]
    try:
        with torch.no_grad():
            logits = model64(torch.tensor([seq])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    probs = torch.softmax(torch.stack(logits_per_layer, dim=1), dim=-1)  # [S, L, E]
    k = model64.config.num_experts_per_tok
    top = torch.topk(probs, k + 1, dim=-1)
    return logits, top.indices[..., :k], top.values


def test_logprobs_and_routed_experts_match_reference(server, hf):
    model, tok = hf
    ids = _prompt(tok, "12*3+5=")
    out = _gen(server, ids, temperature=0.7, max_new_tokens=12, sampling_seed=7, ignore_eos=True,
               return_logprob=True, return_routed_experts=True)
    gen = out["output_ids"]
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == gen and all(x is None for _, _, x in lps)
    seq = ids + gen
    model64 = copy.deepcopy(model).double()
    model64.set_experts_implementation("eager")  # grouped_mm (the default) has no float64 kernel
    ref_logits, ref_idx, ref_val = _router_reference(model64, seq)
    # SGLang's default: logprobs of the sampled distribution softmax(logits / T)
    ref_lp = torch.log_softmax(ref_logits / 0.7, dim=-1)
    want = [ref_lp[len(ids) - 1 + i, t].item() for i, t in enumerate(gen)]
    np.testing.assert_allclose([lp for lp, _, _ in lps], want, atol=1e-5, rtol=0)
    raw = torch.log_softmax(ref_logits, dim=-1)
    assert max(abs(raw[len(ids) - 1 + i, t].item() - w) for i, (t, w) in enumerate(zip(gen, want))) > 1e-2
    # greedy requests report the raw (temperature-1) logprobs, like SGLang's greedy path
    g = _gen(server, ids, temperature=0.0, max_new_tokens=4, ignore_eos=True, return_logprob=True)
    graw = torch.log_softmax(model64(torch.tensor([ids + g["output_ids"]])).logits[0].detach(), dim=-1)
    np.testing.assert_allclose([lp for lp, _, _ in g["meta_info"]["output_token_logprobs"]],
                               [graw[len(ids) - 1 + i, t].item() for i, t in enumerate(g["output_ids"])],
                               atol=1e-5, rtol=0)

    cfg = model.config
    routes = np.frombuffer(base64.b64decode(out["meta_info"]["routed_experts"]), dtype=np.int32)
    routes = routes.reshape(len(seq) - 1, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    k = cfg.num_experts_per_tok
    ref = ref_idx[: len(seq) - 1].numpy()
    gap = (ref_val[: len(seq) - 1, :, :k].min(-1).values - ref_val[: len(seq) - 1, :, k]).numpy()  # [S-1, L]
    diff = (routes != ref).any(-1)
    assert not (diff & (gap > 1e-4)).any(), "routes differ where the top-k choice is not a near-tie"
    assert diff.mean() < 0.05


def test_stop_conditions(server, hf):
    model, tok = hf
    ids = _prompt(tok, "7-2=")
    full = _gen(server, ids, temperature=0.0, max_new_tokens=12, ignore_eos=True)["output_ids"]
    # stop_token_ids: ends at the first occurrence, token kept in output_ids, trimmed from text
    target = full[5]
    first = full.index(target)
    out = _gen(server, ids, temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[target])
    assert out["output_ids"] == full[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert out["text"] == tok.decode(full[:first], skip_special_tokens=True)
    # stop string: a piece of the greedy text; output ends at the token completing it, text excludes it
    full_text = tok.decode(full, skip_special_tokens=True)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 2]
    out = _gen(server, ids, temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=stop)
    got = out["output_ids"]
    assert got == full[: len(got)]
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == full_text[: full_text.find(stop)]
    # length, and the empty completion
    out = _gen(server, ids, temperature=0.0, max_new_tokens=3, ignore_eos=True)
    assert out["output_ids"] == full[:3] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    out = _gen(server, ids, max_new_tokens=0, return_routed_experts=True)
    assert out["output_ids"] == [] and out["text"] == "" and out["meta_info"]["finish_reason"]["type"] == "length"
    assert len(base64.b64decode(out["meta_info"]["routed_experts"])) == 4 * (len(ids) - 1) * 4 * 2


def test_context_limits(server, hf):
    ctx = hf[0].config.max_position_embeddings
    status, out = _call(server, "/generate", {"input_ids": [5] * ctx, "sampling_params": {"max_new_tokens": 1}})
    assert status == 400 and "context length" in out["error"]["message"]
    assert _call(server, "/generate", {"input_ids": [], "sampling_params": {}})[0] == 400
    assert _call(server, "/generate", {"input_ids": [10**6]})[0] == 400
    out = _gen(server, [5] * (ctx - 3), temperature=0.0, max_new_tokens=10, ignore_eos=True)
    assert len(out["output_ids"]) == 3 and out["meta_info"]["finish_reason"]["type"] == "length"


def test_sampling_seeded_and_topk(server, hf):
    model, tok = hf
    ids = _prompt(tok, "9+9=")
    sp = dict(temperature=1.0, max_new_tokens=10, ignore_eos=True)
    with ThreadPoolExecutor(3) as ex:  # concurrent requests must not disturb each other's streams
        a, b, c = ex.map(lambda s: _gen(server, ids, sampling_seed=s, **sp)["output_ids"], [11, 11, 12])
    assert a == b and a != c
    greedy = _gen(server, ids, temperature=0.0, max_new_tokens=10, ignore_eos=True)["output_ids"]
    assert _gen(server, ids, top_k=1, sampling_seed=3, **sp)["output_ids"] == greedy
    out = _gen(server, ids, top_k=3, sampling_seed=5, temperature=2.0, max_new_tokens=10, ignore_eos=True)["output_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1: -1]
    top3 = torch.topk(logits, 3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(out))


def test_batch_and_text_input(server, hf):
    _, tok = hf
    p1, p2 = _prompt(tok, "1+1="), _prompt(tok, "2*8-3=")
    sp = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    status, outs = _call(server, "/generate", {"input_ids": [p1, p2], "sampling_params": sp, "rid": ["r1", "r2"]})
    assert status == 200 and [o["meta_info"]["id"] for o in outs] == ["r1", "r2"]
    for p, o in zip((p1, p2), outs):
        assert o["output_ids"] == _gen(server, p, **sp)["output_ids"]
    status, out = _call(server, "/generate", {"text": "1+1=", "sampling_params": sp})
    assert status == 200 and out["output_ids"] == outs[0]["output_ids"]


def test_update_weights_from_tensor(server, hf, tiny_hf_dir):
    from megatron_rl.rollout.engine import encode_named_tensors

    model, tok = hf
    ids = _prompt(tok)
    vocab = model.config.vocab_size
    zero = {"lm_head.weight": torch.zeros_like(model.lm_head.weight)}
    status, res = _call(server, "/update_weights_from_tensor",
                        {"serialized_named_tensors": [encode_named_tensors(zero)], "weight_version": "v1",
                         "flush_cache": True})
    assert status == 200 and res["success"], res
    try:
        out = _gen(server, ids, temperature=0.0, max_new_tokens=4, ignore_eos=True, return_logprob=True)
        assert out["output_ids"] == [0, 0, 0, 0]  # all logits equal: argmax picks index 0
        np.testing.assert_allclose([x[0] for x in out["meta_info"]["output_token_logprobs"]],
                                   [-math.log(vocab)] * 4, atol=1e-5)
        assert out["meta_info"]["weight_version"] == "v1"
        assert _call(server, "/get_server_info")[1]["weight_version"] == "v1"
        bad = encode_named_tensors({"no.such.weight": torch.zeros(2)})
        status, res = _call(server, "/update_weights_from_tensor", {"serialized_named_tensors": bad})
        assert status == 400 and res["success"] is False
    finally:
        orig = {"lm_head.weight": model.lm_head.weight.detach()}
        _call(server, "/update_weights_from_tensor",
              {"serialized_named_tensors": encode_named_tensors(orig), "weight_version": "default"})
    ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=4, min_new_tokens=4)[0, len(ids):]
    assert _gen(server, ids, temperature=0.0, max_new_tokens=4, ignore_eos=True)["output_ids"] == ref.tolist()


def test_hub_expert_names_load_like_transformers(hf, tiny_hf_dir):
    """Hub per-expert tensors from model.safetensors, loaded by our name conversion, rebuild transformers' own."""
    from safetensors.torch import load_file

    from megatron_rl.rollout.engine.weights import load_named_tensors

    model, _ = hf
    blank = copy.deepcopy(model)
    hub = {k: v for k, v in load_file(os.path.join(tiny_hf_dir, "model.safetensors")).items() if ".experts." in k}
    for name, p in blank.named_parameters():
        if ".experts." in name:
            p.data.zero_()
    assert load_named_tensors(blank, hub) == len(hub)
    want = model.state_dict()
    for name, t in blank.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=0)


def _wait_state(url, key, value, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _call(url, "/get_server_info")[1]["internal_states"][0][key] == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{key} never became {value}")


def test_abort_pause_continue(server, hf):
    _, tok = hf
    ids = _prompt(tok)
    long = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(2) as ex:
        fut = ex.submit(_gen, server, ids, rid="long", **long)
        _wait_state(server, "num_running_reqs", 1)
        assert _call(server, "/abort_request", {"rid": "long"})[0] == 200
        out = fut.result(timeout=30)
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert out["meta_info"]["completion_tokens"] < 400
        # paused: a new request waits; continue lets it finish
        assert _call(server, "/pause_generation", {"mode": "in_place"})[0] == 200
        fut = ex.submit(_gen, server, ids, rid="waits", temperature=0.0, max_new_tokens=2)
        _wait_state(server, "num_waiting_reqs", 1)
        time.sleep(0.2)
        assert not fut.done()
        assert _call(server, "/continue_generation", {})[0] == 200
        assert fut.result(timeout=30)["meta_info"]["finish_reason"]["type"] in ("length", "stop")
        # a queued request can be aborted too
        _call(server, "/pause_generation", {"mode": "in_place"})
        fut = ex.submit(_gen, server, ids, rid="queued", temperature=0.0, max_new_tokens=2)
        _wait_state(server, "num_waiting_reqs", 1)
        _call(server, "/abort_request", {"rid": "queued"})
        assert fut.result(timeout=30)["meta_info"]["finish_reason"]["type"] == "abort"
        _call(server, "/continue_generation", {})


def test_info_endpoints(server, tiny_hf_dir):
    assert _call(server, "/health_generate")[0] == 200
    for path in ("/get_model_info", "/model_info"):
        status, info = _call(server, path)
        assert status == 200 and info["is_generation"] is True and info["model_path"] == tiny_hf_dir
    for path in ("/get_server_info", "/server_info"):
        status, info = _call(server, path)
        assert status == 200 and info["model_path"] == tiny_hf_dir and info["num_moe_layers"] == 4
    assert _call(server, "/flush_cache", {})[0] == 200
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        status, body = _call(server, path, {})
        assert status == 200 and body["success"] is True, path


# --- edge cases: partial UTF-8 outputs, stop strings across tokens, empty completion with logprobs ---------
# Byte-level BPE (GPT-2 byte->unicode map): bytes 0xA1..0xAC and 0xAE..0xFF are their own code points,
# so the single-character tokens "Ã" and "©" are the lone bytes 0xC3 (a 2-byte lead) and 0xA9 (a
# continuation); together they are "é". Independent reference for the text: Python's UTF-8 decoder.
LEAD, CONT = "\u00c3", "\u00a9"


def _byte_lm_head(model, tok, src: int = 3) -> tuple[dict, dict[int, bytes]]:
    """lm_head whose greedy choice is always the lone-byte token 0xC3 or 0xA9 (logits +-w_src.h, 0 elsewhere)."""
    vocab = tok.get_vocab()
    lead, cont = vocab[LEAD], vocab[CONT]
    w = torch.zeros_like(model.lm_head.weight)
    w[lead], w[cont] = model.lm_head.weight[src].detach(), -model.lm_head.weight[src].detach()
    return {"lm_head.weight": w}, {lead: b"\xc3", cont: b"\xa9"}


def _hf_greedy_with(model, named, ids, n):
    m = copy.deepcopy(model)
    m.lm_head.weight.data.copy_(named["lm_head.weight"])
    return m.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n)[0, len(ids):].tolist()


def test_partial_utf8_outputs_and_stop_across_byte_tokens(server, hf):
    from megatron_rl.rollout.engine import encode_named_tensors

    model, tok = hf
    ids = _prompt(tok, "3+4*2=")
    named, byte_of = _byte_lm_head(model, tok)
    ref = _hf_greedy_with(model, named, ids, 10)
    ref_text = b"".join(byte_of[t] for t in ref).decode("utf-8", errors="replace")
    assert set(ref) <= set(byte_of) and "\ufffd" in ref_text and "\u00e9" in ref_text, (ref, ref_text)
    status, res = _call(server, "/update_weights_from_tensor",
                        {"serialized_named_tensors": [encode_named_tensors(named)], "weight_version": "bytes"})
    assert status == 200 and res["success"], res
    try:
        out = _gen(server, ids, temperature=0.0, max_new_tokens=10, ignore_eos=True, return_logprob=True)
        assert out["output_ids"] == ref and out["text"] == ref_text
        assert [t for _, t, _ in out["meta_info"]["output_token_logprobs"]] == ref
        # ends inside a multi-byte sequence: the lone lead byte(s) at the end are U+FFFD, ids exact
        cut = next(k for k, t in enumerate(ref) if byte_of[t] == b"\xa9")  # first continuation byte
        out = _gen(server, ids, temperature=0.0, max_new_tokens=cut, ignore_eos=True)
        assert out["output_ids"] == ref[:cut] and out["text"] == "\ufffd" * cut
        # stop "é" spans a lead-byte token and a continuation token; neither decodes to it alone
        i = next(k for k in range(len(ref) - 1) if (byte_of[ref[k]], byte_of[ref[k + 1]]) == (b"\xc3", b"\xa9"))
        out = _gen(server, ids, temperature=0.0, max_new_tokens=10, ignore_eos=True, stop="\u00e9")
        assert out["output_ids"] == ref[: i + 2]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "\u00e9"}
        assert out["text"] == b"".join(byte_of[t] for t in ref[:i]).decode("utf-8", errors="replace")
    finally:
        orig = {"lm_head.weight": model.lm_head.weight.detach()}
        _call(server, "/update_weights_from_tensor",
              {"serialized_named_tensors": encode_named_tensors(orig), "weight_version": "default"})


def test_stop_string_spanning_two_tokens(server, hf):
    model, tok = hf
    ids = _prompt(tok, "12*3+5=")
    full = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16)[0, len(ids):]
    full = full.tolist()
    full_text = tok.decode(full, skip_special_tokens=True)
    picks = []
    for i in range(len(full) - 1):  # boundary after token i; stop = last char before + first char after
        head = tok.decode(full[: i + 1], skip_special_tokens=True)
        b = len(head)
        if full_text.startswith(head) and 0 < b < len(full_text) and tok.decode(full[i + 1: i + 2]) \
                and full_text.find(full_text[b - 1: b + 1]) == b - 1:
            picks.append((i, full_text[b - 1: b + 1]))
    assert picks, f"no two-token stop string in {full_text!r}"
    i, stop = picks[0]
    out = _gen(server, ids, temperature=0.0, max_new_tokens=16, ignore_eos=True, stop=[stop, "NEVER-THERE"])
    assert out["output_ids"] == full[: i + 2]  # the token completing the stop string is kept
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == full_text[: full_text.find(stop)]
    out = _gen(server, ids, temperature=0.0, max_new_tokens=16, ignore_eos=True, stop=stop, no_stop_trim=True)
    assert out["output_ids"] == full[: i + 2] and out["text"] == tok.decode(full[: i + 2], skip_special_tokens=True)


def test_empty_completion_has_no_logprobs(server, hf):
    _, tok = hf
    out = _gen(server, _prompt(tok), max_new_tokens=0, return_logprob=True)
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["output_token_logprobs"] == [] and out["meta_info"]["completion_tokens"] == 0
