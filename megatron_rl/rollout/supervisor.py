"""Engine supervision: notice dead engine / router processes, restart them, bring them back only
once they hold the current weights.

Legend: engine i = ``launcher.engines[i]`` (embedded or SGLang: a process with an HTTP API);
version = the trainer's policy version pushed by ``WeightSync``.

``EngineSupervisor`` wraps the ``EngineLauncher`` on the driver and is driven by ``WeightSync`` at
each (collective) sync, the only moment a restarted engine can be given the current weights:
1. ``before_sync(client)``: every engine whose process exited is taken off the router and restarted on its port (same command; the log is appended to); it
   rejoins the sync client (``client.revive``) so this sync pushes the new version to it. An
   engine that cannot be restarted stays excluded (``client.mark_dead``) and is tried again at
   the next sync. If no engine is alive, restarts are retried for up to ``max_wait_s`` seconds,
   then ``AllEnginesDeadError`` names every engine with its log tail.
2. the sync runs over the live engines (a failure mid-sync drops that engine, see
   ``SGLangClient(drop_failed_engines=True)``) and checks their versions.
3. ``after_sync(client)``: a dead router is restarted on its port with the synced engines; the
   restarted engines (now at the current version) are registered with the router again. Engines
   that died during the sync are taken off the router (restarted at the next sync).
``restarts`` counts engine restarts (``rollout/engine_restarts``), ``router_restarts`` the
router's. Until then generation avoids a dead engine by itself (the client's retries in direct
mode, the router's health checks and retries, and a direct fallback when the router is down).
Left out: engines on other nodes (the launcher only starts local processes), hung-but-alive
engines (only exited or exiting processes count as dead: an engine whose port refuses connections
gets ``exit_grace_s`` to finish exiting, since a SIGKILLed process closes its sockets before its
exit status is visible).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import urllib.parse

from megatron_rl.rollout.launcher import EngineLauncher, EngineLaunchError

log = logging.getLogger(__name__)


class AllEnginesDeadError(RuntimeError):
    """No engine could be kept alive within the bounded wait; names each engine and its log."""


def _port_refuses(url: str) -> bool:
    """True when nothing listens on ``url``'s host:port (connection refused). A listening but busy
    server still accepts (the kernel's backlog), so this does not depend on the engine's load."""
    u = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((u.hostname, u.port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # timeout, unreachable: not evidence of a dead local engine
        return False
    return False


class EngineSupervisor:
    """See the module doc. max_wait_s: how long restarts are retried when no engine is alive;
    retry_s: the pause between those attempts; exit_grace_s: how long an engine whose port refuses
    connections is given to finish exiting before it is left for the next check."""

    def __init__(self, launcher: EngineLauncher, *, max_wait_s: float = 300.0, retry_s: float = 2.0,
                 exit_grace_s: float = 5.0):
        self.launcher, self.max_wait_s, self.retry_s = launcher, max_wait_s, retry_s
        self.exit_grace_s = exit_grace_s
        self.restarts = self.router_restarts = 0
        self._pending: list[str] = []  # restarted, not yet at the current version / on the router

    def dead_engines(self) -> list[int]:
        """Indices of engines whose process exited. An engine still running whose port refuses
        connections is exiting (e.g. SIGKILLed a moment ago: sockets close before the exit status
        shows): it is waited for up to ``exit_grace_s``. A busy engine may answer /health slowly,
        so no HTTP probe decides."""
        for p in self.launcher.engines:
            if p.popen.poll() is None and _port_refuses(p.url):
                try:
                    p.popen.wait(timeout=self.exit_grace_s)
                except subprocess.TimeoutExpired:
                    pass
        return [i for i, p in enumerate(self.launcher.engines) if p.popen.poll() is not None]

    def router_dead(self) -> bool:
        r = self.launcher.router
        return r is not None and r.popen.poll() is not None

    def _restart(self, i: int) -> str | None:
        p = self.launcher.engines[i]
        self.launcher.remove_worker(p.url)
        try:
            url = self.launcher.restart_engine(i)
        except EngineLaunchError as e:
            log.warning("restart of engine %s failed: %s", p.url, e)
            return None
        self.restarts += 1
        log.warning("engine %s restarted (%d restarts so far)", url, self.restarts)
        return url

    def before_sync(self, client) -> dict[str, float]:
        """Restart dead engines and let ``client`` (the sync's) reach them; see the module doc.
        Returns rollout/{engine_restarts, dead_engines}. Raises AllEnginesDeadError."""
        deadline = time.monotonic() + self.max_wait_s
        while True:
            for i in self.dead_engines():
                url = self._restart(i)
                if url is not None:
                    self._pending.append(url)
            dead = self.dead_engines()
            if len(dead) < len(self.launcher.engines):
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name} {p.url} (exit code {p.popen.poll()}):\n{p.tail(15)}"
                                  for p in self.launcher.engines)
                raise AllEnginesDeadError(f"all {len(dead)} engines dead and not restartable after "
                                          f"{self.max_wait_s:.0f}s: {[p.url for p in self.launcher.engines]}\n{tails}")
            time.sleep(self.retry_s)
        for i, p in enumerate(self.launcher.engines):
            (client.mark_dead(p.url, "process dead") if i in dead else client.revive(p.url))
        return {"rollout/engine_restarts": float(self.restarts), "rollout/dead_engines": float(len(dead))}

    def after_sync(self, client) -> dict[str, float]:
        """Register the engines restarted before this sync (and still alive) with the router,
        restarting the router itself if it died. Returns rollout/router_restarts."""
        synced = [u for u in self.launcher.engine_urls if u not in client.dead_engines]
        if self.launcher.router is not None:
            for u in client.dead_engines:
                self.launcher.remove_worker(u)
            if self.router_dead():
                self.launcher.restart_router(synced)
                self.router_restarts += 1
                log.warning("router restarted with %s", synced)
            else:
                for u in self._pending:
                    if u in synced:
                        self.launcher.add_worker(u)
        self._pending = []
        return {"rollout/router_restarts": float(self.router_restarts)}
