"""tools/sample_policy.py: derivation-line counts and the per-op table, against the task generator."""

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_rl.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sample_policy", ROOT / "tools" / "sample_policy.py")
sp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sp)


def test_reference_solutions_count_their_ops_and_are_all_correct():
    rows = generate((1, 8), 16, seed=3)
    assert [sp.count_steps(r["solution"]) for r in rows] == [r["op"] for r in rows]
    table = sp.summarize(rows, [r["solution"] for r in rows])
    for op in range(1, 9):
        assert f"| {op} | 2 | 100.0% | {op} x2 |" in table
    # a three-line shortcut on a 5-op row: counted as 3 lines and (wrong answer) 0%
    row = next(r for r in rows if r["op"] == 5)
    short = "\n".join(row["solution"].splitlines()[2:])
    assert sp.count_steps(short) == 3
    wrong = short.replace(f"\\boxed{{{row['label']}}}", f"\\boxed{{{int(row['label']) + 1}}}")
    assert "| 5 | 1 | 0.0% | 3 x1 |" in sp.summarize([row], [wrong])


def test_cli_on_the_tiny_model(tiny_hf_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate((4, 5), 3, seed=1)))
    table = sp.main(["--hf", tiny_hf_dir, "--data", str(data), "--n", "2", "--max-new-tokens", "8",
                     "--show", "1"])
    rows = [line for line in table.splitlines()[2:]]
    assert sum(int(line.split("|")[2]) for line in rows) == 2
    assert "--- op 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sp.main(["--hf", str(tmp_path), "--data", str(data)])
