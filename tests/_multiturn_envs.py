"""Environments for the multi-turn tests: they answer any policy text, so an untrained tiny model
still plays several turns (its turns are usually cut by --max-tokens-per-turn)."""

from megatron_rl.rollout.env import EnvStep


class ProbeEnv:
    """Two tool turns ("obs 1", "obs 2"), then done with a parity reward on the last turn's text
    (about half the samples earn 1, so GRPO advantages are non-zero)."""

    def step(self, messages, label):
        k = sum(m["role"] == "assistant" for m in messages)
        if k < 3:
            return EnvStep(messages=[{"role": "tool", "content": f"obs {k}"}], outcome="tool_ok")
        return EnvStep(done=True, reward=float(len(messages[-1]["content"]) % 2 == 0), outcome="answer")

    def truncated_reward(self, messages, label):
        return float(len(messages[-1]["content"]) % 2)


def probe_env():
    return ProbeEnv()


def not_an_env():
    return object()
