"""megatron_rl.data: synthetic task, verifier, jsonl loading, atomic writes, packing.

References are independent of the code under test: a regex solver of the problem text, hand-written
verifier cases, per-position packing rules, and per-document SDPA for the packed mask.
"""

import json
import os
import random
import re

import pytest
import torch

from megatron_rl.data import synthetic
from megatron_rl.data.jsonl import DatasetError, load_jsonl, load_jsonl_with_lines, write_jsonl_atomic
from megatron_rl.data.packing import IGNORE_INDEX, pack_samples, packed_attention_mask
from megatron_rl.data.synthetic import generate, make_problem, verify


# ---------------------------------------------------------------- synthetic task
def solve(prompt: str) -> tuple[int, int]:
    """Independent solver: parse the problem text; return (answer, number of operations)."""
    values, ops = {}, 0
    for s in re.split(r"(?<=[.?]) ", prompt):
        if m := re.fullmatch(r"(\w+) has (\d+) \w+\.", s):
            values[m[1]] = int(m[2])
            continue
        ops += 1
        if m := re.fullmatch(r"(\w+) has (\d+) (more|fewer) \w+ than (\w+)\.", s):
            values[m[1]] = values[m[4]] + (int(m[2]) if m[3] == "more" else -int(m[2]))
        elif m := re.fullmatch(r"(\w+) has (twice|three times) as many \w+ as (\w+)\.", s):
            values[m[1]] = values[m[3]] * (2 if m[2] == "twice" else 3)
        elif m := re.fullmatch(r"(\w+) has as many \w+ as (\w+) and (\w+) together\.", s):
            values[m[1]] = values[m[2]] + values[m[3]]
        elif m := re.fullmatch(r"How many \w+ does (\w+) have\?", s):
            return values[m[1]], ops - 1
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    raise AssertionError("no question")


@pytest.mark.parametrize("max_value", [99, 20])
def test_problems_are_correct_and_bounded(max_value):
    rows = generate((1, 8), 400, seed=3, max_value=max_value)
    assert [r["op"] for r in rows[:9]] == [1, 2, 3, 4, 5, 6, 7, 8, 1]
    for r in rows:
        answer, ops = solve(r["prompt"])
        assert (str(answer), ops) == (r["label"], r["op"])
        lines = r["solution"].split("\n")
        assert len(lines) == r["op"] + 1 and lines[-1] == f"The answer is \\boxed{{{answer}}}."
        for line in lines[:-1]:  # every worked step is arithmetically right and in 0..99
            a, sign, b, c = re.fullmatch(r"\w+ has (\d+) ([-+*]) (\d+) = (\d+) \w+\.", line).groups()
            assert eval(f"{a} {sign} {b}") == int(c) and 0 <= int(c) <= max_value
        assert verify(r["solution"], r["label"]) == 1.0


def test_generation_is_deterministic_by_seed():
    a, b = generate("id", 30, seed=11), generate("id", 30, seed=11)
    assert a == b
    assert a != generate("id", 30, seed=12)
    assert a[4] == make_problem(11, a[4]["op"], 4 // 3)  # row r = (op lo + r % 3, index r // 3)
    with pytest.raises(ValueError):
        generate("nope", 1, 0)
    with pytest.raises(ValueError):
        make_problem(0, 0, 0)
    assert generate("id", 30, seed=11, max_value=20) != a


def test_generate_exclude_and_unique():
    base = generate((1, 1), 200, seed=5)
    again = generate((1, 1), 200, seed=5, exclude={r["prompt"] for r in base[:100]}, unique=True)
    assert not {r["prompt"] for r in again} & {r["prompt"] for r in base[:100]}
    assert len({r["prompt"] for r in again}) == 200


def test_write_splits_disjoint(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--seed", "1", "--n-train", "3000", "--n-eval", "150"])
    train = load_jsonl(tmp_path / "train.jsonl", require_solution=True)
    train_prompts = {r["prompt"] for r in train}
    assert len(train) == 3000 and {r["op"] for r in train} == {1, 2, 3}
    for name, ops in (("id", {1, 2, 3}), ("ood_mid", {4, 5}), ("ood_hard", {6, 7, 8})):
        rows = load_jsonl(tmp_path / f"eval_{name}.jsonl")
        prompts = [r["prompt"] for r in rows]
        assert len(rows) == 150 and {r["op"] for r in rows} == ops
        assert len(set(prompts)) == 150 and not set(prompts) & train_prompts
    assert sorted(os.listdir(tmp_path)) == [
        "eval_id.jsonl", "eval_ood_hard.jsonl", "eval_ood_mid.jsonl", "train.jsonl"]


def test_write_splits_edge_exposure(tmp_path):
    """--edge-ops/--edge-frac: that share of train.jsonl comes from the edge band, the id rows are
    the plain id rows' prefix, the rows are mixed, and no eval prompt is a train prompt."""
    synthetic.main(["--out", str(tmp_path), "--seed", "2", "--n-train", "2000", "--n-eval", "100",
                    "--edge-ops", "4-5", "--edge-frac", "0.05"])
    train = load_jsonl(tmp_path / "train.jsonl", require_solution=True)
    edge = [r for r in train if r["op"] >= 4]
    assert len(train) == 2000 and len(edge) == 100 and {r["op"] for r in edge} == {4, 5}
    assert all(verify(r["solution"], r["label"]) == 1.0 for r in edge)
    idrows = [r for r in train if r["op"] <= 3]
    assert sorted(r["prompt"] for r in idrows) == sorted(r["prompt"] for r in generate("id", 1900, 2))
    ops = [r["op"] >= 4 for r in train]
    assert any(ops[:1000]) and any(ops[1000:])  # shuffled in, not appended
    train_prompts = {r["prompt"] for r in train}
    for name in ("id", "ood_mid", "ood_hard"):
        assert not {r["prompt"] for r in load_jsonl(tmp_path / f"eval_{name}.jsonl")} & train_prompts
    with pytest.raises(ValueError, match="edge_frac must be in"):
        synthetic.write_splits(tmp_path / "x", 0, 10, 5, edge_ops=(4, 5), edge_frac=1.0)
    with pytest.raises(ValueError, match="needs edge_ops"):
        synthetic.write_splits(tmp_path / "x", 0, 10, 5, edge_frac=0.1)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "y"), "--edge-frac", "0.1"])


@pytest.mark.parametrize("response,label,expected", [
    ("so 3 + 4 = 7. The answer is \\boxed{7}.", "7", 1.0),
    ("\\boxed{5} no wait \\boxed{7}", "7", 1.0),
    ("\\boxed{7} no wait \\boxed{5}", "7", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
    ("\\boxed{\\frac{1}{2}}", "1", 0.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{ 1,234 }", "1234", 1.0),
    ("\\boxed{+12.}", "12", 1.0),
    ("\\boxed{-0}", "0", 1.0),
    ("\\boxed{7.0}", "7", 1.0),
    ("\\boxed{$42$}", "42", 1.0),
    ("\\boxed {9}", "9", 1.0),
    ("The answer is 12.", "12", 1.0),
    ("the answer is: -4", "-4", 1.0),
    ("The answer is 12. Then 3 more.", "12", 1.0),  # "answer is" beats the last number
    ("I think 7 - 3 = 4", "4", 1.0),  # last number, and "7-3" is no "-3"
    ("I think 7-3", "3", 1.0),
    ("x = -5", "-5", 1.0),
    ("\\boxed{12", "12", 1.0),  # unbalanced box falls through to the last number
    ("no number here", "0", 0.0),
    ("", "0", 0.0),
    ("The answer is \\boxed{17}.", "71", 0.0),
])
def test_verify(response, label, expected):
    assert verify(response, label) == expected


# ---------------------------------------------------------------- jsonl
def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,line,needle", [
    ('{"prompt": "a", "label": "1"}\n{"prompt": "b", "label": \n', 2, "malformed JSON"),
    ('{"prompt": "a", "label": "1"}\n\n[1, 2]\n', 3, "JSON object"),
    ('{"prompt": "a", "label": "1"}\n{"prompt": "b"}\n', 2, "no 'label'"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "a"}], "label": "1"}\n', 1, "both"),
    ('{"question": "a", "label": "1"}\n', 1, "neither"),
    ('{"prompt": "a", "label": 1}\n', 1, "'label' must be str"),
    ('{"prompt": "", "label": "1"}\n', 1, "non-empty"),
    ('{"messages": [{"role": "bot", "content": "a"}], "label": "1"}\n', 1, "role"),
    ('{"messages": [], "label": "1"}\n', 1, "non-empty list"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, text, line, needle):
    path = _write(tmp_path / "d.jsonl", text)
    with pytest.raises(DatasetError) as e:
        load_jsonl(path)
    assert f"{path}:{line}:" in str(e.value) and needle in str(e.value)


def test_jsonl_empty_and_options(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", "\n  \n")
    with pytest.raises(DatasetError, match=f"{empty}: empty"):
        load_jsonl(empty)
    text = '\n{"prompt": "a"}\n{"messages": [{"role": "user", "content": "q"}]}\n'
    path = _write(tmp_path / "d.jsonl", text)
    assert load_jsonl_with_lines(path, require_label=False) == [
        (2, {"prompt": "a"}), (3, {"messages": [{"role": "user", "content": "q"}]})]
    with pytest.raises(DatasetError, match=f"{path}:2: row has no 'solution'"):
        load_jsonl(path, require_label=False, require_solution=True)


def test_write_jsonl_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    rows = [{"prompt": "é", "label": "1"}, {"prompt": "b", "label": "2"}]
    write_jsonl_atomic(path, rows)
    assert load_jsonl(path) == rows
    with pytest.raises(TypeError):  # second row is not JSON-serialisable
        write_jsonl_atomic(path, [{"prompt": "c", "label": "3"}, {"prompt": object()}])
    assert load_jsonl(path) == rows  # old content intact
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left behind
    with pytest.raises(TypeError):
        write_jsonl_atomic(tmp_path / "new.jsonl", [{"x": {1, 2}}])
    assert os.listdir(tmp_path) == ["out.jsonl"]


# ---------------------------------------------------------------- packing
def _random_samples(n, seed, max_len=40):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        out.append({"input_ids": [rng.randrange(1000) for _ in range(length)],
                    "loss_mask": [rng.randint(0, 1) for _ in range(length)]})
    return out


def test_first_fit_decreasing_hand_example():
    samples = [{"input_ids": [7] * n, "loss_mask": [1] * n} for n in (5, 3, 4, 2, 6)]
    packs = pack_samples(samples, 8)
    assert [p.sample_indices for p in packs] == [(4, 3), (0, 1), (2,)]
    assert [p.cu_seqlens.tolist() for p in packs] == [[0, 6, 8], [0, 5, 8], [0, 4]]
    with pytest.raises(ValueError, match="sample 0 has length 5"):
        pack_samples(samples, 4)


def test_packing_matches_per_document_reference():
    samples = _random_samples(60, seed=0)
    packs = pack_samples(samples, 64)
    again = pack_samples(samples, 64)  # deterministic
    assert [p.sample_indices for p in packs] == [p.sample_indices for p in again]
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(packs, again))
    assert sorted(i for p in packs for i in p.sample_indices) == list(range(60))
    for p in packs:
        T = p.tokens.numel()
        assert T <= 64 and p.cu_seqlens.dtype == torch.int32 and p.tokens.dtype == torch.int64
        assert p.loss_mask.dtype == torch.float32 and p.cu_seqlens[-1] == T
        # reference: rebuild every position from its own document, position by position
        pos = 0
        for d, i in enumerate(p.sample_indices):
            ids, mask = samples[i]["input_ids"], samples[i]["loss_mask"]
            assert p.cu_seqlens[d] == pos
            for j in range(len(ids)):
                last = j == len(ids) - 1
                assert p.tokens[pos] == ids[j] and p.position_ids[pos] == j
                assert p.labels[pos] == (IGNORE_INDEX if last else ids[j + 1])
                assert p.loss_mask[pos] == (0 if last else mask[j + 1])
                pos += 1
        assert p.max_seqlen == max(len(samples[i]["input_ids"]) for i in p.sample_indices)
        # no label crosses a document boundary: the label of the last token of a doc is ignored
        assert (p.labels[p.cu_seqlens[1:].long() - 1] == IGNORE_INDEX).all()


def test_packed_attention_mask_block_diagonal():
    cu, T = torch.tensor([0, 3, 5, 6], dtype=torch.int32), 8  # 2 padding positions
    mask = packed_attention_mask(cu, T)
    assert mask.shape == (1, 1, T, T) and mask.dtype == torch.bool
    doc = [0, 0, 0, 1, 1, 2, None, None]
    for i in range(T):
        for j in range(T):
            allowed = (i == j) if doc[i] is None else (doc[i] == doc[j] and j <= i)
            assert mask[0, 0, i, j].item() == (not allowed), (i, j)
    with pytest.raises(ValueError):
        packed_attention_mask(torch.tensor([0, 5, 3]), 8)


def test_packed_attention_equals_per_document_attention():
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))  # [B, heads, T, d]
    packed = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=~packed_attention_mask(cu, 16))  # SDPA: True = attend
    for d, n in enumerate(lengths):
        s = slice(int(cu[d]), int(cu[d + 1]))
        ref = torch.nn.functional.scaled_dot_product_attention(q[..., s, :], k[..., s, :], v[..., s, :],
                                                               is_causal=True)
        torch.testing.assert_close(packed[..., s, :], ref)
