"""tools/compare_runs.py: before/after means and spreads from hand-written metrics files."""

import json
import sys

import pytest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import compare_runs  # noqa: E402


def _run(d: Path, before: float, after: float, viol: list[float]) -> str:
    d.mkdir(parents=True)
    recs = [{"step": 0, "eval/a/pass@1": before}]
    recs += [{"step": i + 1, "moe/max_violation": v} for i, v in enumerate(viol)]
    recs[-1]["eval/a/pass@1"] = after
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(d)


def test_mean_change_and_spread(tmp_path, capsys):
    r1 = _run(tmp_path / "s1" / "grpo", 0.10, 0.20, [2.0, 3.0])
    r2 = _run(tmp_path / "s2" / "grpo", 0.12, 0.16, [1.0, 1.0])
    compare_runs.main([r1, r2])
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| eval/a/pass@1")][0]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:] == ["11.0%", "18.0%", "+10.0, +4.0", "+7.0", "6.0"]
    compare_runs.main(["--per-run", "--key", "moe/max_violation", "--last", "2", r1, r2])
    out = capsys.readouterr().out
    assert "| moe/max_violation (mean of last 2 steps) | 2.500 | 1.000 |" in out
    assert "10.0% -> 20.0% (step 2)" in out


def test_key_without_per_run_is_refused(tmp_path, capsys):
    r1 = _run(tmp_path / "s1" / "grpo", 0.10, 0.20, [2.0, 3.0])
    with pytest.raises(SystemExit):
        compare_runs.main(["--key", "moe/max_violation", r1])
    assert "--key is shown per run only" in capsys.readouterr().err
