"""Multi-turn, token-in / token-out rollouts against an ``Environment`` (agentic RL).

Legend: P prompts, n samples per prompt, T = len(output_ids) of an episode (policy + environment
tokens after the prompt), L MoE layers, K top-k.

One episode, turn by turn on SGLang's ``/generate`` with ``input_ids``:
    ids = prompt_ids
    turn t: the engine continues ids (max_new_tokens = min(per-turn cap, budget left), stop at the
            end-of-turn token) -> output ids + their logprobs; appended as policy tokens (mask 1)
            the environment sees the turn as text (decoded without special tokens) and returns
            messages or done; its messages are rendered with the tokenizer's chat template
            (``ChatRenderer``) and appended as environment tokens (mask 0, logprob 0)
The token sequence is never re-tokenised: the engine's ids are kept as they are and only the
environment's messages are tokenised, so the trainer sees exactly the engine's tokens per turn.
An episode ends when the environment says done (its reward), or at the turn limit / the token
budget (``sampling.max_new_tokens``, counting policy and environment tokens; reward =
``env.truncated_reward``; finish_reason "length"). The sequence always ends with a policy turn,
so the last call's routes (R3) cover every token: [len(prompt) + T - 1, L, K].

Rendering an environment message exactly as a chat would (``ChatRenderer.env_ids``): with a
reference conversation R = [user, assistant], ``ids(R + env, generation prompt) = ids(R) + delta``
must hold (the template's prefix property, else TemplateError); the environment tokens are
[end-of-turn, if the policy's turn was cut before it] + the template tokens that follow an
assistant's end-of-turn in ids(R) (ChatML: "\\n") + delta (the env turns and "<|im_start|>assistant\\n").
Left out: templates that rewrite earlier turns (Qwen3 dropping old <think> blocks) -- they are
refused by the prefix check only when the reference conversation shows it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass

from megatron_rl.data.chat import TemplateError, _ids, end_of_turn_id
from megatron_rl.rollout.client import SamplingParams, SGLangClient
from megatron_rl.rollout.env import Environment

TURN_SEED_STRIDE = 100_003  # turn t of a sample seeded s samples with s + t * stride


@dataclass(frozen=True, kw_only=True)
class MultiTurnConfig:
    """max_turns: policy turns per episode (>= 1); max_tokens_per_turn: cap of one policy turn
    (0 = only the episode budget, ``max_new_tokens``)."""

    max_turns: int = 4
    max_tokens_per_turn: int = 0

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"--max-turns must be >= 1, got {self.max_turns}")
        if self.max_tokens_per_turn < 0:
            raise ValueError(f"--max-tokens-per-turn must be >= 0, got {self.max_tokens_per_turn}")


class ChatRenderer:
    """Environment messages -> the token ids a chat would hold after a policy turn (see module doc).

    Raises TemplateError when the template breaks the prefix property for environment messages, or
    when the tokenizer has no end-of-turn token."""

    _REF = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]

    def __init__(self, tokenizer):
        self.tokenizer, self.eot = tokenizer, end_of_turn_id(tokenizer)
        if self.eot is None:
            raise TemplateError("multi-turn rollouts need an end-of-turn token (<|im_end|> or eos)")
        base = _ids(tokenizer, self._REF, add_generation_prompt=False)
        if self.eot not in base:
            raise TemplateError("the chat template does not close an assistant turn with the end-of-turn token")
        self._base = base
        self._tail = base[len(base) - base[::-1].index(self.eot):]  # template tokens after the eot

    def env_ids(self, messages: list[dict], policy_closed: bool) -> list[int]:
        """Token ids of ``messages`` (the environment's turns) plus the next generation prompt, to
        append after a policy turn that ended with the end-of-turn token (``policy_closed``) or was
        cut before it (then the end-of-turn token is supplied here, as a chat would render it)."""
        full = _ids(self.tokenizer, self._REF + list(messages), add_generation_prompt=True)
        if full[: len(self._base)] != self._base:
            raise TemplateError("chat template breaks the prefix property when environment messages follow "
                                "an assistant turn; cannot render them as tokens")
        return ([] if policy_closed else [self.eot]) + self._tail + full[len(self._base):]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(kw_only=True)
class Episode:
    """One multi-turn sample. output_ids / loss_mask / logprobs: [T] (mask 1 and the engine's
    logprob on policy tokens; 0 and 0.0 on environment tokens); turns: [start, end) of each policy
    turn in output_ids; outcomes: the environment's outcome per turn (+ "turn_limit" /
    "token_budget" when cut); routed_experts int32 [len(prompt) + T - 1, L, K] or None."""

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    turns: list[tuple[int, int]]
    outcomes: list[str]
    reward: float
    finish_reason: str
    weight_version: str | None
    routed_experts: object = None
    messages: list[dict] = dataclasses.field(default_factory=list)


async def run_episode(client: SGLangClient, prompt_ids: list[int], label: str, env: Environment,
                      renderer: ChatRenderer, sampling: SamplingParams, cfg: MultiTurnConfig, *, rid: str,
                      return_routed_experts: bool = False) -> Episode:
    """Run one episode (see the module docstring); turn t's request id is f"{rid}-t{t}".

    Raises what ``client.generate`` raises, ValueError for an invalid ``EnvStep``, and
    RuntimeError if the engine's routes do not cover the final sequence.
    """
    budget = sampling.max_new_tokens
    ep = Episode(rid=rid, prompt_ids=list(prompt_ids), output_ids=[], loss_mask=[], logprobs=[], turns=[],
                 outcomes=[], reward=float("nan"), finish_reason="length", weight_version=None)
    reward, last = None, None
    for t in range(cfg.max_turns):
        left = budget - len(ep.output_ids)
        cap = min(left, cfg.max_tokens_per_turn) if cfg.max_tokens_per_turn else left
        seed = None if sampling.seed is None else sampling.seed + t * TURN_SEED_STRIDE
        sp = dataclasses.replace(sampling, max_new_tokens=cap, seed=seed)
        last = await client.generate(ep.prompt_ids + ep.output_ids, sp, return_logprob=True,
                                     return_routed_experts=return_routed_experts, rid=f"{rid}-t{t}")
        start = len(ep.output_ids)
        ep.output_ids += last.output_ids
        ep.loss_mask += [1] * len(last.output_ids)
        ep.logprobs += list(last.logprobs)
        ep.turns.append((start, len(ep.output_ids)))
        ep.weight_version = last.weight_version
        if last.finish_reason == "abort":
            ep.outcomes.append("aborted")
            ep.finish_reason = "abort"
            break
        ep.messages.append({"role": "assistant", "content": renderer.decode(last.output_ids)})
        step = env.step(ep.messages, label)
        step.check(f"environment {type(env).__name__}")
        ep.outcomes.append(step.outcome)
        if step.done:
            reward, ep.finish_reason = float(step.reward), last.finish_reason
            break
        if t == cfg.max_turns - 1:
            ep.outcomes.append("turn_limit")
            break
        closed = bool(last.output_ids) and last.output_ids[-1] == renderer.eot
        env_ids = renderer.env_ids(step.messages, closed)
        if len(ep.output_ids) + len(env_ids) >= budget:  # no room for the policy's next token
            ep.outcomes.append("token_budget")
            break
        ep.messages += step.messages
        ep.output_ids += env_ids
        ep.loss_mask += [0] * len(env_ids)
        ep.logprobs += [0.0] * len(env_ids)
    ep.reward = reward if reward is not None else float(env.truncated_reward(ep.messages, label))
    if return_routed_experts:
        n_pos = len(ep.prompt_ids) + len(ep.output_ids) - 1
        if last.routed_experts is None or len(last.routed_experts) != n_pos:
            raise RuntimeError(f"request {rid}: the last turn's routes do not cover the {n_pos} positions")
        ep.routed_experts = last.routed_experts
    return ep


async def generate_episode_groups(client: SGLangClient, prompts: list[list[int]], labels: list[str], n: int,
                                  sampling: SamplingParams, env: Environment, renderer: ChatRenderer,
                                  cfg: MultiTurnConfig, *, rid_prefix: str,
                                  return_routed_experts: bool = False) -> list[list[Episode]]:
    """n episodes per prompt ([P][n], episode (i, j) has rid f"{rid_prefix}-p{i}-s{j}" and, with
    ``sampling.seed``, seed + i * n + j like ``rollout.generate_groups``). Raises the first
    episode's error after cancelling the others."""
    from megatron_rl.rollout.rollout import gather_grid

    async def one(i: int, j: int, sp: SamplingParams) -> Episode:
        return await run_episode(client, prompts[i], labels[i], env, renderer, sp, cfg,
                                 rid=f"{rid_prefix}-p{i}-s{j}", return_routed_experts=return_routed_experts)

    return await gather_grid(one, len(prompts), n, sampling)


def generate_and_score_episodes(svc, prompts: list[list[int]], labels: list[str], n: int,
                                sampling: SamplingParams, tag: str):
    """``RolloutService.generate_and_score`` with ``svc.env`` set: the P * n multi-turn samples
    (group-major), rewarded by the environment, and {"perf/rollout_time_s", "perf/reward_time_s"}
    (the environment's time is inside the rollout's; reward time 0)."""
    from megatron_rl.train.rl_batch import Sample

    t0 = time.perf_counter()

    async def go():
        async with svc._client() as c:
            return await generate_episode_groups(c, prompts, labels, n, sampling, svc.env, svc.renderer,
                                                 svc.multiturn, rid_prefix=tag,
                                                 return_routed_experts=svc.return_routed_experts)

    groups = asyncio.run(go())
    samples = [Sample(prompt_ids=e.prompt_ids, output_ids=e.output_ids, rollout_logprobs=e.logprobs,
                      reward=e.reward, finish_reason=e.finish_reason, weight_version=e.weight_version,
                      loss_mask=e.loss_mask, turns=[list(x) for x in e.turns], env_outcomes=e.outcomes,
                      **({"routed_experts": e.routed_experts} if svc.return_routed_experts else {}))
               for g in groups for e in g]
    return samples, {"perf/rollout_time_s": time.perf_counter() - t0, "perf/reward_time_s": 0.0}


def multiturn_stats(samples) -> dict[str, float]:
    """rollout/{turns_mean, turns_max, env_token_frac} and rollout/env/<outcome>_count (outcomes of
    every turn of the batch, plus turn_limit / token_budget cuts) over the multi-turn samples."""
    eps = [s for s in samples if s.turns is not None]
    if not eps:
        return {}
    turns = [len(s.turns) for s in eps]
    tokens = sum(len(s.loss_mask) for s in eps)
    env_tokens = sum(len(s.loss_mask) - sum(s.loss_mask) for s in eps)
    out = {"rollout/turns_mean": sum(turns) / len(turns), "rollout/turns_max": float(max(turns)),
           "rollout/env_token_frac": env_tokens / max(tokens, 1)}
    for k, v in Counter(o for s in eps for o in (s.env_outcomes or [])).items():
        out[f"rollout/env/{k}_count"] = float(v)
    return out


# ---------------------------------------------------------------- CLI (train.grpo)
def check_multiturn_args(p, args, cfg) -> None:
    """Sets ``args.env_obj`` / ``args.multiturn`` (None without --env); ``p.error`` naming the flag
    for bad values, an environment that does not load, or --env with --partial-rollout."""
    from megatron_rl.rollout.env import load_env

    args.env_obj, args.multiturn = None, None
    if args.env is None:
        return
    if cfg.partial_rollout:
        p.error("--partial-rollout with --env (multi-turn) is not supported")
    try:
        args.multiturn = MultiTurnConfig(max_turns=args.max_turns, max_tokens_per_turn=args.max_tokens_per_turn)
        args.env_obj = load_env(args.env)
    except ValueError as e:
        p.error(str(e))


def multiturn_service_fields(args, tok) -> dict:
    """``RolloutService`` keywords of --env (environment, limits, chat renderer); {} without."""
    if args.env_obj is None:
        return {}
    return {"env": args.env_obj, "multiturn": args.multiturn, "renderer": ChatRenderer(tok),
            "eval_without_env": args.eval_without_env}
