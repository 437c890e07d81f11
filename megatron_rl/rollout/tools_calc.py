"""A calculator tool environment for the synthetic arithmetic task (``data.synthetic``).

Tool-call format (Qwen2.5 / Qwen3 function calling, as their chat templates render it): the
assistant turn contains

    <tool_call>
    {"name": "calc", "arguments": {"expr": "14 + 3"}}
    </tool_call>

and the result comes back as a tool message {"role": "tool", "content": "17"} (Qwen's template
renders it inside <tool_response>; a plain ChatML template as a "tool" turn). A turn without a
<tool_call> is the final answer, scored by ``synthetic.verify`` (last \\boxed{...} etc.).

Documented outcomes (``EnvStep.outcome``; counted by the rollout as rollout/env/<outcome>_frac):
    answer          no tool call: done, reward = verify(turn, label)
    tool_ok         calc evaluated; the result goes back as a tool message
    malformed_call  unclosed <tool_call>, invalid JSON, or missing "name" / "arguments.expr":
                    an error message goes back ("error: malformed tool call: ...")
    unknown_tool    a name other than "calc": error message back
    tool_error      the expression is not arithmetic on numbers (+ - * / // % **, parentheses),
                    divides by zero, or is too large: error message back
The turn limit and the token budget are the rollout's (outcomes "turn_limit" / "token_budget";
``truncated_reward`` = 0). Only the first tool call of a turn is executed.
Left out: several tool calls per turn, tools other than calc.
"""

from __future__ import annotations

import ast
import json
import operator
import re

from megatron_rl.data.synthetic import verify
from megatron_rl.rollout.env import EnvStep

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_ABS = 10**12  # larger intermediate results are a tool error (and ** is capped by it)


class CalcError(ValueError):
    """An expression calc refuses (the message goes back to the model)."""


def calc(expr: str) -> str:
    """Evaluate an arithmetic expression of int/float literals with + - * / // % ** and
    parentheses (Python's precedence); returns the result as text ("17", "2.5").
    Raises CalcError for anything else, division by zero, or |value| > MAX_ABS."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise CalcError(f"cannot parse {expr!r}: {e.msg}") from None

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise CalcError("exponent too large")
            try:
                v = _OPS[type(node.op)](a, b)
            except ZeroDivisionError:
                raise CalcError("division by zero") from None
            if isinstance(v, complex) or abs(v) > MAX_ABS:
                raise CalcError("result out of range")
            return v
        raise CalcError(f"unsupported expression element {type(node).__name__}")

    v = ev(tree.body)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def tool_call_text(expr: str) -> str:
    """The assistant text of one calc call, in the documented format (also used for SFT traces)."""
    return "<tool_call>\n" + json.dumps({"name": "calc", "arguments": {"expr": expr}}) + "\n</tool_call>"


def parse_call(text: str) -> tuple[str, str | None]:
    """(outcome, expr or error text) of a policy turn: ("answer", None), ("call", expr), or
    ("malformed_call" | "unknown_tool", message)."""
    start = text.find("<tool_call>")
    if start < 0:
        return "answer", None
    m = _CALL.search(text, start)
    if m is None:
        return "malformed_call", "malformed tool call: no closing </tool_call>"
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        return "malformed_call", f"malformed tool call: invalid JSON ({e.msg})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return "malformed_call", 'malformed tool call: expected {"name": ..., "arguments": {...}}'
    if call["name"] != "calc":
        return "unknown_tool", f"unknown tool {call['name']!r:.40}; available: calc"
    args = call.get("arguments")
    if not isinstance(args, dict) or not isinstance(args.get("expr"), str):
        return "malformed_call", 'malformed tool call: calc needs {"arguments": {"expr": "<arithmetic>"}}'
    return "call", args["expr"]


class CalcEnv:
    """The calculator environment (implements ``rollout.env.Environment``); see the module docstring."""

    def step(self, messages: list[dict], label: str) -> EnvStep:
        text = messages[-1]["content"]
        kind, arg = parse_call(text)
        if kind == "answer":
            return EnvStep(done=True, reward=verify(text, label), outcome="answer")
        if kind == "call":
            try:
                return EnvStep(messages=[{"role": "tool", "content": calc(arg)}], outcome="tool_ok")
            except CalcError as e:
                return EnvStep(messages=[{"role": "tool", "content": f"error: {e}"}], outcome="tool_error")
        return EnvStep(messages=[{"role": "tool", "content": f"error: {arg}"}], outcome=kind)

    def truncated_reward(self, messages: list[dict], label: str) -> float:
        return 0.0
