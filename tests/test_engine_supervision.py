"""Engine supervision with real processes: SIGKILLed engines (tests/_fake_sglang.py servers) and a
SIGKILLed sglang-router (0.3.2), during rollout and during a weight sync.

The weights pushed are one tensor per version (the trainer side of ``iter_hf_tensors`` is
replaced; everything from WeightSync to the engines is real). Reference: the fake engine's
documented toy generator (``toy_token``) with shift = the pushed tensor's sum, so a restarted
engine that missed the current weights would produce different tokens.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys

import pytest
import torch

from megatron_rl.rollout.client import SamplingParams, SGLangClient
from megatron_rl.rollout.launcher import EngineLauncher, LaunchConfig, kill_engine
from megatron_rl.rollout.rollout import generate_groups
from megatron_rl.rollout.supervisor import EngineSupervisor
from megatron_rl.rollout.weight_sync import WeightSync, WeightSyncError

from _fake_sglang import toy_token

FAKE = os.path.join(os.path.dirname(__file__), "_fake_sglang.py")
HAS_ROUTER = importlib.util.find_spec("sglang_router") is not None
PROMPTS, N, SEED = [[i, i + 1] for i in range(4)], 3, 100


@pytest.fixture()
def world1(tmp_path, monkeypatch):
    """One gloo rank in this process; ``iter_hf_tensors`` yields {"w": [version]} (model=version)."""
    import torch.distributed as dist

    import megatron_rl.rollout.weight_sync as ws

    monkeypatch.setattr(ws, "iter_hf_tensors", lambda model, hf_config, **kw: iter([{"w": torch.tensor([float(model)])}]))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _launcher(n: int, *args: str, router: bool, cmd: tuple[str, ...] | None = None) -> EngineLauncher:
    cfg = LaunchConfig(model_path="unused", num_engines=n, engine_cmd=cmd or (sys.executable, FAKE, *args),
                       router=router, health_timeout_s=30, stop_timeout_s=5)
    return EngineLauncher(cfg)


def _weights(launcher: EngineLauncher, client_cls=SGLangClient, **kw) -> WeightSync:
    return WeightSync(client_cls(launcher.engine_urls, drop_failed_engines=True),
                      supervisor=EngineSupervisor(launcher, **kw))


def _rollout(launcher: EngineLauncher, kill=None):
    """All PROMPTS x N samples through the router (or the engines), optionally SIGKILLing a process
    once requests are in flight; returns the groups."""
    async def go():
        async with SGLangClient(launcher.engine_urls, router_url=launcher.router_url, retries=6) as c:
            roll = asyncio.ensure_future(generate_groups(c, PROMPTS, N, SamplingParams(max_new_tokens=20, seed=SEED),
                                                         rid_prefix="r"))
            if kill is not None:
                await asyncio.sleep(0.1)
                assert not roll.done()
                kill()
            return await roll
    return asyncio.run(go())


def _assert_current(groups, shift: int) -> None:
    """Every sample is complete, unique, and generated from the weights of version ``shift``."""
    rids = [r.rid for g in groups for r in g]
    assert len(set(rids)) == len(rids) == len(PROMPTS) * N
    for i, g in enumerate(groups):
        for j, r in enumerate(g):
            assert r.output_ids == [toy_token(PROMPTS[i], SEED + i * N + j, shift, t) for t in range(20)], (i, j)


def _kill_router(launcher: EngineLauncher) -> None:
    os.killpg(launcher.router.popen.pid, signal.SIGKILL)
    launcher.router.popen.wait()


@pytest.mark.skipif(not HAS_ROUTER, reason="sglang_router is not installed")
def test_engine_killed_during_rollout_is_restarted_synced_and_rerouted(world1):
    with _launcher(2, "--token-delay-s", "0.01", router=True) as launcher:
        weights = _weights(launcher)
        weights.sync(1, {}, version=1)
        pid0 = launcher.engines[0].popen.pid
        groups = _rollout(launcher, kill=lambda: kill_engine(launcher, 0))
        _assert_current(groups, 1)  # the router retried the killed engine's requests on the survivor
        assert launcher.dead_engines() == [launcher.engine_urls[0]]
        m = weights.sync(2, {}, version=2)
        assert m["rollout/engine_restarts"] == 1 and m["rollout/dead_engines"] == 0
        assert launcher.engines[0].popen.pid != pid0 and launcher.dead_engines() == []
        assert weights.check_versions(2) == {u: "2" for u in launcher.engine_urls}
        assert sorted(w["url"] for w in launcher.router_workers()) == sorted(launcher.engine_urls)
        _assert_current(_rollout(launcher), 2)  # whichever engine served: version 2's tokens


@pytest.mark.skipif(not HAS_ROUTER, reason="sglang_router is not installed")
def test_engine_killed_during_weight_sync(world1):
    with _launcher(2, router=True) as launcher:
        class KillingClient(SGLangClient):  # SIGKILL engine 1 as the weights start to flow
            async def update_weights_from_tensor(self, named_tensors, weight_version, **kw):
                if weight_version == "2":
                    kill_engine(launcher, 1)
                return await super().update_weights_from_tensor(named_tensors, weight_version, **kw)

        weights = _weights(launcher, KillingClient)
        weights.sync(1, {}, version=1)
        m = weights.sync(2, {}, version=2)  # completes on the survivor
        assert m["rollout/engine_restarts"] == 0 and weights.version == 2
        assert weights.client.dead_engines == [launcher.engine_urls[1]]
        _assert_current(_rollout(launcher), 2)  # served by engine 0 only (engine 1 is dead)
        m = weights.sync(3, {}, version=3)  # engine 1 restarted, given version 3, back on the router
        assert m["rollout/engine_restarts"] == 1 and weights.client.dead_engines == []
        assert weights.check_versions(3) == {u: "3" for u in launcher.engine_urls}
        _assert_current(_rollout(launcher), 3)


@pytest.mark.skipif(not HAS_ROUTER, reason="sglang_router is not installed")
def test_router_killed_is_restarted(world1):
    with _launcher(2, "--token-delay-s", "0.01", router=True) as launcher:
        weights = _weights(launcher)
        weights.sync(1, {}, version=1)
        url = launcher.router_url
        groups = _rollout(launcher, kill=lambda: _kill_router(launcher))  # client falls back to the engines
        _assert_current(groups, 1)
        m = weights.sync(2, {}, version=2)
        assert m["rollout/router_restarts"] == 1 and launcher.router_url == url
        assert launcher.router.popen.poll() is None
        assert sorted(w["url"] for w in launcher.router_workers()) == sorted(launcher.engine_urls)
        _assert_current(_rollout(launcher), 2)


def test_all_engines_dead_stop_with_an_error_naming_them(world1, tmp_path):
    """Both engines SIGKILLed and every restart exits at once: the sync waits max_wait_s, then
    stops with an error naming both engines (and their log tails)."""
    flag = tmp_path / "refuse"
    prog = (f"import os, runpy, sys\nif os.path.exists({str(flag)!r}):\n"
            f"    print('refusing to start (test)'); sys.exit(3)\nrunpy.run_path({FAKE!r}, run_name='__main__')\n")
    with _launcher(2, router=False, cmd=(sys.executable, "-c", prog)) as launcher:
        weights = _weights(launcher, max_wait_s=3, retry_s=0.5)
        weights.sync(1, {}, version=1)
        flag.write_text("")
        urls = [kill_engine(launcher, 0), kill_engine(launcher, 1)]
        with pytest.raises(WeightSyncError, match="AllEnginesDeadError: all 2 engines dead") as e:
            weights.sync(2, {}, version=2)
        assert all(u in str(e.value) for u in urls) and "refusing to start (test)" in str(e.value)
        assert weights.version == 1


def test_rollout_recovers_when_every_engine_dies(world1):
    """Every engine SIGKILLed mid-rollout: the producer restarts them through the sync (current
    weights) and re-produces the step from the same prompts; the batch equals an undisturbed one."""
    from megatron_rl.train.rl_batch import PromptStream
    from megatron_rl.train.rl_rollout import RolloutProducer, RolloutService

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return str(ids[0] % 2)

    def producer(launcher):
        svc = RolloutService(engine_urls=launcher.engine_urls, router_url=None, tokenizer=Tok(),
                             verifier=lambda response, label: float(response))
        rows = [{"prompt": f"p{i}", "label": "1", "id": i} for i in range(8)]
        return RolloutProducer(svc, PromptStream(rows, seed=3), lambda row: [row["id"], 1], prompts_per_step=2, n=2,
                               sampling=lambda step: SamplingParams(max_new_tokens=30, seed=10 * step))

    with _launcher(2, "--token-delay-s", "0.01", router=False) as launcher:
        weights = _weights(launcher)
        weights.sync(5, {}, version=5)
        prod = producer(launcher)
        prod.recover = lambda: weights.sync(weights.version, {}, version=weights.version)
        import threading

        # SIGKILL both process groups from outside (no wait here: the supervisor reaps them)
        killer = threading.Timer(0.15, lambda: [os.killpg(p.popen.pid, signal.SIGKILL) for p in launcher.engines])
        killer.start()
        batch = prod.get(1, last_step=2)
        killer.join()
        assert weights.supervisor.restarts == 2 and launcher.dead_engines() == []
        ref = producer(launcher).get(1, last_step=2)  # undisturbed, same engines (version 5)
        assert [(s.output_ids, s.reward) for s in batch.samples] == [(s.output_ids, s.reward) for s in ref.samples]
        assert batch.rows == ref.rows and prod.stream.state_dict() == {"epoch": 0, "pos": 2}


def test_an_exiting_engine_counts_as_dead(tmp_path):
    """An engine whose port already refuses connections but whose process has not exited yet (as
    right after a SIGKILL under load) is waited for and reported dead, so a restart after "every
    engine failed" covers every engine. Reference: the process's own exit (it closes its socket,
    then exits 1 s later); a poll()-only check reports nothing here."""
    import socket
    import subprocess
    import time
    from types import SimpleNamespace

    ready = tmp_path / "ready"
    prog = ("import socket, sys, time\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            f"open({str(ready)!r}, 'w').write(str(s.getsockname()[1]))\n"
            "time.sleep(0.5); s.close(); time.sleep(1.0); sys.exit(0)\n")
    proc = subprocess.Popen([sys.executable, "-c", prog])
    try:
        while not ready.exists() or not ready.read_text():
            time.sleep(0.05)
        url = f"http://127.0.0.1:{ready.read_text()}"
        engine = SimpleNamespace(popen=proc, url=url)
        sup = EngineSupervisor(SimpleNamespace(engines=[engine]), exit_grace_s=10)
        assert sup.dead_engines() == []  # listening: alive, not waited for
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the socket is closed, the process still up
            try:
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        assert proc.poll() is None
        assert sup.dead_engines() == [0] and proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()
