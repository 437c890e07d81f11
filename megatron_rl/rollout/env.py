"""The environment protocol of multi-turn (agentic) rollouts, and loading a user's environment.

An ``Environment`` sees the episode so far as chat messages and answers each policy turn with an
``EnvStep``: either messages to append (a tool result, feedback) and the episode goes on, or
``done`` with the episode's reward. The rollout (``rollout.multiturn``) owns everything at the
token level: the environment never sees or returns token ids, its messages are rendered with the
model's own chat template, and the budget / turn limits are enforced outside it.

    class Echo:                                    # a user's environment, `--env my_envs:Echo`
        def step(self, messages, label):
            last = messages[-1]["content"]         # the policy's latest turn (text)
            if "<tool_call>" in last and len(messages) < 6:
                return EnvStep(messages=[{"role": "tool", "content": "42"}], outcome="tool_ok")
            return EnvStep(done=True, reward=float(label in last), outcome="answer")

        def truncated_reward(self, messages, label):
            return 0.0                             # out of turns / tokens before an answer

Left out: environments that need the token ids (e.g. to score logprobs), asynchronous
environments (``step`` is called from the rollout's event loop and should be quick), and
per-environment sampling parameters.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(kw_only=True)
class EnvStep:
    """The environment's answer to one policy turn.

    messages: chat messages to append after the policy's turn (role "tool" or "user"; content str);
        must be empty when ``done``. done: the episode ends; reward: its reward (required when done).
    outcome: a short name of what happened ("answer", "tool_ok", "malformed_call", "unknown_tool",
        "tool_error", ...), counted in ``rollout/env/<outcome>_frac``.
    """

    messages: list[dict] = field(default_factory=list)
    done: bool = False
    reward: float | None = None
    outcome: str = "ok"

    def check(self, where: str) -> None:
        """Raises ValueError naming ``where`` (the environment) for an inconsistent step."""
        if self.done and (self.reward is None or self.messages):
            raise ValueError(f"{where}: a done EnvStep needs a reward and no messages, got {self!r:.200}")
        if not self.done and not self.messages:
            raise ValueError(f"{where}: an EnvStep that is not done must carry >= 1 message")
        for m in self.messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages must be {{'role': str, 'content': str}}, got {m!r:.200}")


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment. One instance serves every episode: keep no per-episode state.

    ``step(messages, label)``: messages is the episode so far *after the prompt* (the policy's
    turns as {"role": "assistant", "content": text} and the environment's earlier messages, in
    order); label is the prompt row's reference answer. Returns an ``EnvStep``; must not raise
    for bad model output (report it as an outcome); an exception is a bug and fails the rollout.
    ``truncated_reward(messages, label)``: the reward of an episode cut by the turn limit or the
    token budget before ``step`` said done.
    """

    def step(self, messages: list[dict], label: str) -> EnvStep: ...

    def truncated_reward(self, messages: list[dict], label: str) -> float: ...


def load_env(spec: str) -> Environment:
    """The environment named by ``--env``: "calc" (the calculator of the synthetic task,
    ``rollout.tools_calc.CalcEnv``) or "package.module:factory" (a class or function called with no
    arguments). Raises ValueError naming the flag for a malformed spec, an import that fails, or an
    object that does not implement ``Environment``."""
    if spec == "calc":
        from megatron_rl.rollout.tools_calc import CalcEnv

        return CalcEnv()
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--env {spec!r}: expected 'calc' or 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--env {spec!r}: cannot load {attr!r} from {mod_name!r}: {e}") from e
    env = factory()
    if not isinstance(env, Environment):
        raise ValueError(f"--env {spec!r}: {type(env).__name__} lacks step(messages, label) / "
                         "truncated_reward(messages, label) (see megatron_rl.rollout.env.Environment)")
    return env
