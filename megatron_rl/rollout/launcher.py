"""Start N rollout engines (embedded or real SGLang) and an sglang-router in front of them.

Commands (engine i on port p_i, the router on port r; free 127.0.0.1 ports when not given):
    embedded: python -m megatron_rl.rollout.engine --model HF_DIR --host H --port p_i  [extra_args]
    sglang:   python -m sglang.launch_server --model-path HF_DIR --host H --port p_i   [extra_args]
    router:   python -m sglang_router.launch_router --host H --port r --worker-urls URL... \
                  --policy POLICY --log-level warn  [router_args]
Workers added later: POST {router}/workers {"url": URL} (sglang-router 0.3.2 answers 202
"accepted" and registers in the background; GET /workers lists {"workers": [{"url", "is_healthy"}]};
the old POST /add_worker?url= answers 404 in 0.3.2). Router health: GET /health -> "OK".

Every process runs in its own session (process group) with its log in `log_dir`; `shutdown()`
(also on context exit, failure, and atexit) sends SIGTERM to each group, then SIGKILL after
`stop_timeout_s`. A start that fails (process exits or /health not 200 within `health_timeout_s`)
kills everything and raises EngineLaunchError with the log tail.

Modes: "colocated" (engines share GPUs with training: call release_memory / resume_memory around
the train step; the embedded CPU engine accepts these as no-ops) or "disaggregated" (own GPUs;
release/resume raise). Left out: multi-node placement (Slurm scripts do that), PD disaggregation.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence


class EngineLaunchError(RuntimeError):
    """An engine or the router did not come up healthy; the message carries its log tail."""


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """engine_env: per-engine extra env (e.g. CUDA_VISIBLE_DEVICES), len 0 or num_engines.
    engine_cmd: a full command base replacing the engine_kind one ("--host H --port P" appended)."""

    model_path: str
    num_engines: int = 1
    engine_kind: Literal["embedded", "sglang"] = "embedded"
    mode: Literal["colocated", "disaggregated"] = "disaggregated"
    host: str = "127.0.0.1"
    ports: tuple[int, ...] = ()
    router: bool = True
    router_port: int | None = None
    router_policy: str = "round_robin"
    extra_args: tuple[str, ...] = ()
    engine_cmd: tuple[str, ...] = ()  # overrides the engine_kind command base (tests, wrappers)
    router_args: tuple[str, ...] = ()
    engine_env: tuple[dict[str, str], ...] = ()
    health_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    log_dir: str | None = None
    # SGLang's --api-key for every engine and the router (Authorization: Bearer KEY); default from
    # $MEGATRON_RL_API_KEY, which SGLangClient reads too, so the trainer needs no flag of its own
    api_key: str | None = field(default_factory=lambda: os.environ.get("MEGATRON_RL_API_KEY") or None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http(method: str, url: str, payload: dict | None = None, timeout: float = 10.0,
         api_key: str | None = None) -> tuple[int, str]:
    """Blocking HTTP call -> (status, body text); status 0 on connection error."""
    data = None if payload is None else json.dumps(payload).encode()
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **auth})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


@dataclass
class _Proc:
    name: str
    url: str
    popen: subprocess.Popen
    log_path: Path
    _log: object = field(repr=False, default=None)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


class EngineLauncher:
    """Context manager: `with EngineLauncher(cfg) as L: SGLangClient(L.engine_urls, router_url=L.router_url)`."""

    def __init__(self, cfg: LaunchConfig):
        if cfg.engine_env and len(cfg.engine_env) != cfg.num_engines:
            raise ValueError(f"engine_env has {len(cfg.engine_env)} entries for {cfg.num_engines} engines")
        self.cfg = cfg
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="mrl-engines-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.engines: list[_Proc] = []
        self.router: _Proc | None = None

    @property
    def engine_urls(self) -> list[str]:
        return [p.url for p in self.engines]

    @property
    def router_url(self) -> str | None:
        return self.router.url if self.router else None

    def engine_command(self, port: int) -> list[str]:
        c = self.cfg
        if c.engine_cmd:
            base = list(c.engine_cmd)
        elif c.engine_kind == "embedded":
            base = [sys.executable, "-m", "megatron_rl.rollout.engine", "--model", c.model_path]
        else:
            base = [sys.executable, "-m", "sglang.launch_server", "--model-path", c.model_path]
        key = ["--api-key", c.api_key] if c.api_key else []
        return base + ["--host", c.host, "--port", str(port), *key, *c.extra_args]

    def router_command(self, port: int) -> list[str]:
        c = self.cfg
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", c.host, "--port", str(port),
                "--worker-urls", *self.engine_urls, "--policy", c.router_policy, "--log-level", "warn",
                # sglang-router binds its Prometheus exporter to 0.0.0.0:29000 by default: a second
                # router on the host (another job, a baseline eval) panics. A free port instead.
                *([] if "--prometheus-port" in c.router_args else
                  ["--prometheus-host", c.host, "--prometheus-port", str(free_port(c.host))]),
                *(["--api-key", c.api_key] if c.api_key else []), *c.router_args]

    def start(self) -> "EngineLauncher":
        atexit.register(self.shutdown)
        c = self.cfg
        try:
            ports = list(c.ports) or [free_port(c.host) for _ in range(c.num_engines)]
            for i, port in enumerate(ports[: c.num_engines]):
                env = c.engine_env[i] if c.engine_env else {}
                self.engines.append(self._spawn(f"engine{i}", self.engine_command(port), port, env))
            for p in self.engines:
                self._wait_healthy(p)
            if c.router:
                rport = c.router_port or free_port(c.host)
                self.router = self._spawn("router", self.router_command(rport), rport, {})
                self._wait_healthy(self.router)
                self._wait_router_workers(len(self.engines))
        except BaseException:
            self.shutdown()
            raise
        return self

    def restart_engine(self, index: int) -> str:
        """Start engine ``index`` again (same command, port and env; its log is appended to) after
        its process exited, and wait until /health answers. Returns its URL. Raises
        EngineLaunchError (with the log tail) when it exits again or stays unhealthy."""
        old = self.engines[index]
        if old.popen.poll() is None:
            raise RuntimeError(f"{old.name} ({old.url}) is still running")
        if old._log is not None:
            old._log.close()
        port = int(old.url.rsplit(":", 1)[1])
        env = self.cfg.engine_env[index] if self.cfg.engine_env else {}
        self.engines[index] = p = self._spawn(old.name, self.engine_command(port), port, env)
        self._wait_healthy(p)
        return p.url

    def restart_router(self, worker_urls: Sequence[str]) -> str:
        """Start the router again on its port with ``worker_urls`` (the engines that hold the
        current weights) and wait until it is healthy and lists them. Returns its URL."""
        old = self.router
        if old is None:
            raise RuntimeError("this launcher runs no router")
        _signal_group(old.popen, signal.SIGKILL)
        old.popen.wait()
        if old._log is not None:
            old._log.close()
        port = int(old.url.rsplit(":", 1)[1])
        cmd = self.router_command(port)
        i = cmd.index("--worker-urls")
        cmd[i + 1: i + 1 + len(self.engines)] = list(worker_urls)
        self.router = self._spawn("router", cmd, port, {})
        self._wait_healthy(self.router)
        self._wait_router_workers(len(worker_urls))
        return self.router.url

    def remove_worker(self, url: str) -> None:
        """Best effort: take ``url`` off the router (DELETE /workers/{url}); a no-op without router."""
        if self.router is not None:
            http("DELETE", f"{self.router_url}/workers/{urllib.parse.quote(url, safe='')}")

    def _spawn(self, name: str, cmd: list[str], port: int, env: dict[str, str]) -> _Proc:
        log_path = self.log_dir / f"{name}.log"
        f = open(log_path, "ab")  # a restarted process appends to the log of the one before
        popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **env}, preexec_fn=_die_with_parent)
        return _Proc(name, f"http://{self.cfg.host}:{port}", popen, log_path, f)

    def _wait_healthy(self, p: _Proc) -> None:
        deadline = time.monotonic() + self.cfg.health_timeout_s
        while time.monotonic() < deadline:
            if p.popen.poll() is not None:
                raise EngineLaunchError(f"{p.name} exited with code {p.popen.returncode}; log tail:\n{p.tail()}")
            if http("GET", f"{p.url}/health", timeout=2.0)[0] == 200:
                return
            time.sleep(0.1)
        raise EngineLaunchError(f"{p.name} not healthy after {self.cfg.health_timeout_s}s; log tail:\n{p.tail()}")

    def _wait_router_workers(self, expected: int) -> None:
        deadline = time.monotonic() + self.cfg.health_timeout_s
        while time.monotonic() < deadline:
            workers = self.router_workers()
            if sum(w.get("is_healthy", True) for w in workers) >= expected:
                return
            time.sleep(0.1)
        raise EngineLaunchError(f"router has {self.router_workers()} workers, expected {expected}; "
                                f"log tail:\n{self.router.tail()}")

    def router_workers(self) -> list[dict]:
        """GET {router}/workers -> the router's worker list ([] if unreachable)."""
        status, body = http("GET", f"{self.router_url}/workers", api_key=self.cfg.api_key)
        return json.loads(body).get("workers", []) if status == 200 else []

    def add_worker(self, url: str) -> None:
        """Register an already-running engine with the router (POST /workers) and wait until listed."""
        status, body = http("POST", f"{self.router_url}/workers", {"url": url}, api_key=self.cfg.api_key)
        if status not in (200, 202):
            raise EngineLaunchError(f"router refused worker {url}: HTTP {status} {body[:300]}")
        deadline = time.monotonic() + self.cfg.health_timeout_s
        while not any(w["url"] == url and w.get("is_healthy", True) for w in self.router_workers()):
            if time.monotonic() > deadline:
                raise EngineLaunchError(f"router did not list worker {url}; log tail:\n{self.router.tail()}")
            time.sleep(0.1)

    def dead_engines(self) -> list[str]:
        """URLs of engine processes that have exited."""
        return [p.url for p in self.engines if p.popen.poll() is not None]

    def release_memory(self) -> None:
        self._memory_call("/release_memory_occupation")

    def resume_memory(self) -> None:
        self._memory_call("/resume_memory_occupation")

    def _memory_call(self, path: str) -> None:
        if self.cfg.mode != "colocated":
            raise RuntimeError(f"{path} is only meaningful in colocated mode (mode={self.cfg.mode!r})")
        for url in self.engine_urls:
            status, body = http("POST", f"{url}{path}", {}, timeout=600.0, api_key=self.cfg.api_key)
            if status != 200:
                raise EngineLaunchError(f"{url}{path}: HTTP {status} {body[:300]}")

    def shutdown(self) -> None:
        """SIGTERM every process group, SIGKILL after stop_timeout_s; idempotent."""
        procs = ([self.router] if self.router else []) + self.engines
        for p in procs:
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_timeout_s
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.popen, signal.SIGKILL)
                p.popen.wait()
            if p._log is not None:
                p._log.close()
        atexit.unregister(self.shutdown)

    def __enter__(self) -> "EngineLauncher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the launching process dies, so a trainer
    killed without cleanup (SIGKILL, an unhandled SIGTERM) leaves no orphaned engine or router.
    A no-op where prctl is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            pass


def kill_engine(launcher: EngineLauncher, index: int, sig: int = signal.SIGKILL) -> str:
    """Kill engine `index`'s process group (fault injection for tests); returns its URL."""
    p = launcher.engines[index]
    _signal_group(p.popen, sig)
    p.popen.wait()
    return p.url


def wait_all(urls: Sequence[str], timeout_s: float = 30.0) -> None:
    """Poll GET /health on `urls` until all answer 200; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while not all(http("GET", f"{u}/health", timeout=2.0)[0] == 200 for u in urls):
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines not healthy: {list(urls)}")
        time.sleep(0.1)
