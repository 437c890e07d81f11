"""Streaming /generate and the OpenAI-compatible endpoints of the embedded engine, driven by the
official `openai` client. References: the engine's own non-streamed /generate for the same request
(a separate code path: streams must concatenate to it), HF `generate` for greedy text, an fp32 HF
forward for logprobs, and the tokenizer's chat template rendered directly by transformers.
"""

import json
import urllib.request

import numpy as np
import pytest
import torch

from _engine_http import Engine, call

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def url(tiny_hf_dir):
    with Engine(tiny_hf_dir, "--api-key", "sk-test") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)


AUTH = {"Authorization": "Bearer sk-test"}


def _sse(url, path, body) -> list:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **AUTH})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.read().decode().split("\n\n"):
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def test_generate_stream_matches_the_plain_answer(url, hf):
    _, tok = hf
    body = {"input_ids": [tok.encode("12*3+5="), tok.encode("7-2=")],
            "sampling_params": {"temperature": 0.8, "sampling_seed": 3, "max_new_tokens": 10, "ignore_eos": True},
            "return_logprob": True}
    status, plain = call(url, "/generate", body, headers=AUTH)
    assert status == 200
    events = _sse(url, "/generate", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for i, ref in enumerate(plain):
        mine = [c for c in chunks if c["index"] == i]
        assert len(mine) == 10  # one event per token, the last one final
        assert mine[-1]["output_ids"] == ref["output_ids"] and mine[-1]["text"] == ref["text"]
        assert mine[-1]["meta_info"]["output_token_logprobs"] == ref["meta_info"]["output_token_logprobs"]
        assert all(c["meta_info"]["finish_reason"] is None for c in mine[:-1])
        assert [len(c["output_ids"]) for c in mine] == list(range(1, 11))


def test_completions_greedy_logprobs_n_and_stop(client, hf):
    model, tok = hf
    prompt = "(1+2)*(3+4)="
    ids = tok.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)[0, len(ids):].tolist()
    c = r.choices[0]
    assert c.text == tok.decode(ref, skip_special_tokens=True) and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + ref])).logits[0, len(ids) - 1:-1].double(), -1)
    np.testing.assert_allclose(c.logprobs.token_logprobs, [lp[i, t].item() for i, t in enumerate(ref)], atol=1e-5)
    assert c.logprobs.tokens == [tok.decode([t]) for t in ref]
    assert all(len(d) <= 3 for d in c.logprobs.top_logprobs)
    # n and stop
    r = client.completions.create(model="tiny", prompt=[prompt, "9*9="], max_tokens=6, n=2, seed=4,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    full = c.text
    stop = full[2:4] if len(full) >= 4 else None
    if stop:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_completions_stream_concatenates_to_the_plain_text(client):
    kw = dict(model="tiny", prompt="12*3+5=", max_tokens=12, temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    parts = list(client.completions.create(stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts) == plain.text
    assert parts[-1].choices[0].finish_reason == plain.finish_reason


def test_chat_uses_the_template(client, hf, url):
    model, tok = hf
    msgs = [{"role": "system", "content": "You add."}, {"role": "user", "content": "2+2="}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10)[0, len(ids):].tolist()
    eos = tok.eos_token_id
    trimmed = ref[: ref.index(eos)] if eos in ref else ref
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == tok.decode(trimmed, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)
    assert [x.token for x in c.logprobs.content] == [tok.decode([t]) for t in ref[: len(c.logprobs.content)]]
    assert all(len(x.top_logprobs) == 2 for x in c.logprobs.content)
    # streaming, multi-turn
    msgs2 = msgs + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3="}]
    kw = dict(model="tiny", messages=msgs2, max_tokens=8, temperature=0.7, seed=2)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    parts = list(client.chat.completions.create(stream=True, **kw))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == plain


def test_openai_refusals_and_auth(client, url):
    for kw in [dict(echo=True), dict(suffix="x"), dict(extra_body={"regex": "[0-9]"}), dict(temperature=-1),
               dict(logprobs=50)]:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="1+1=", max_tokens=2, **kw)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="1", max_tokens=1)
