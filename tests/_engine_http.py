"""Helpers of the engine tests: start `python -m megatron_rl.rollout.engine` on a free port, call it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body=None, timeout: float = 120, headers: dict | None = None,
         raw: bytes | None = None) -> tuple[int, object]:
    """POST `body` as JSON (or `raw` bytes) / GET when both are None -> (status, parsed JSON or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        out, status = e.read(), e.code
    try:
        return status, json.loads(out) if out else None
    except ValueError:
        return status, out.decode()


class Engine:
    """A running engine subprocess (`with Engine(model_dir, "--api-key", "k") as url:`)."""

    def __init__(self, model_dir: str, *args: str, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path or os.devnull, "w+b")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.rollout.engine", "--model", model_dir,
                                      "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0", *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}")
            try:
                if call(self.url, "/health", timeout=2)[0] == 200:
                    return self.url
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError("engine did not become healthy")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __exit__(self, *exc) -> None:
        self.close()
