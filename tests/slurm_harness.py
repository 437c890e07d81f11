"""A throwaway one-node Slurm cluster for tests: start it, submit with ``sbatch --parsable``, wait
with a timeout, read the job's exit code and output file, stop it.

The cluster is the one of ``../shared/local-slurm/start_local_slurm.sh`` (relative to the repo root;
CI has it there), or the verbatim copy in ``scripts/local_slurm/`` when the shared one is absent.
``$MEGATRON_RL_LOCAL_SLURM`` may name another folder holding the two scripts. Starting installs
Debian's slurmctld/slurmd/slurm-client/munge with apt when missing (about 15 s), so it needs root
and a package mirror; when it cannot install them, :func:`start` raises :class:`SlurmUnavailable`
(the fixture turns that into a skip unless ``MEGATRON_RL_REQUIRE_SLURM=1``). Anything failing after
the packages are there is a real error.

    with LocalSlurm.start() as cluster:
        job = cluster.run("examples/sft_moe.sh", ["--train-steps", "4"], env={"RUN": run},
                          sbatch_opts=["--output=/tmp/x/job-%j.out"], timeout=600)
        assert job.exit_code == 0, job.tail()
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = os.environ.get("MEGATRON_RL_SLURM_DIR", "/tmp/slurm_local/megatron_rl_tests")
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged")

# Variables a test process may carry that would confuse the job (the job inherits the submitting
# environment with the default --export=ALL): torch.distributed rendezvous of an in-process
# distributed test, and Slurm's own job variables if pytest itself runs inside an allocation.
_JOB_ENV_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID", "GROUP_RANK")
_ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
           "RESIZING", "STAGE_OUT", "")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed/started here (not root, no apt, no network): skip, not fail."""


def scripts_dir() -> Path:
    """The folder with start_local_slurm.sh / stop_local_slurm.sh (shared one preferred)."""
    cands = [os.environ.get("MEGATRON_RL_LOCAL_SLURM"), ROOT.parent / "shared" / "local-slurm",
             ROOT / "scripts" / "local_slurm"]
    for c in cands:
        if c and (Path(c) / "start_local_slurm.sh").is_file():
            return Path(c)
    raise SlurmUnavailable(f"no start_local_slurm.sh in any of {[str(c) for c in cands if c]}")


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PATH", "/usr/bin:/bin")
    env["PATH"] = ":".join([path] + [p for p in SBIN.split(":") if p not in path.split(":")])
    env["SLURM_LOCAL_DIR"] = CLUSTER_DIR
    return env


def _installed(env) -> bool:
    return all(shutil.which(d, path=env["PATH"]) for d in DAEMONS)


@dataclass
class JobResult:
    job_id: str
    state: str            # COMPLETED, FAILED, CANCELLED, TIMEOUT, ... ("TIMEOUT(wait)" if we gave up)
    exit_code: int        # the job's exit code (124 when the wait timed out and we cancelled it)
    output: Path          # the job's --output file
    seconds: float

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def tail(self, n: int = 60) -> str:
        lines = self.text().splitlines()
        return f"job {self.job_id} {self.state} exit={self.exit_code} ({self.output}):\n" + \
            "\n".join(lines[-n:])


class LocalSlurm:
    def __init__(self, scripts: Path, start_log: str, start_seconds: float):
        self.scripts = scripts
        self.dir = Path(CLUSTER_DIR)
        self.start_log = start_log
        self.start_seconds = start_seconds
        self.env = _base_env()
        self.env["SLURM_CONF"] = str(self.dir / "etc" / "slurm.conf")
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def start(cls, timeout: float = 300) -> LocalSlurm:
        """Install (if needed) and start munged + slurmctld + slurmd; wait until the node is idle."""
        scripts = scripts_dir()
        env = _base_env()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm cluster needs root (apt, munge, slurm daemons)")
        if not _installed(env) and not shutil.which("apt-get", path=env["PATH"]):
            raise SlurmUnavailable("slurm is not installed and apt-get is absent")
        # a cluster left over by an earlier run killed before its teardown: stop it (by its PIDs)
        subprocess.run(["bash", str(scripts / "stop_local_slurm.sh")], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        t0 = time.monotonic()
        p = subprocess.run(["bash", str(scripts / "start_local_slurm.sh")], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        log = p.stdout + p.stderr
        cluster = cls(scripts, log, time.monotonic() - t0)
        if p.returncode != 0:
            cluster.stop()  # whatever it did start
            if not _installed(env):
                raise SlurmUnavailable("could not install slurm/munge with apt (no network or "
                                       "mirror?):\n" + log[-2000:])
            raise RuntimeError(f"start_local_slurm.sh failed (rc {p.returncode}):\n{log[-4000:]}")
        return cluster

    def stop(self) -> None:
        """Cancel jobs and stop the daemons start_local_slurm.sh started (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        subprocess.run(["bash", str(self.scripts / "stop_local_slurm.sh")], env=self.env,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)

    def __enter__(self) -> LocalSlurm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def daemons_alive(self) -> dict[str, bool]:
        out = {}
        for name in ("slurmctld", "slurmd"):
            f = self.dir / "pids" / name
            try:
                os.kill(int(f.read_text()), 0)
                out[name] = True
            except (OSError, ValueError):
                out[name] = False
        return out

    # --------------------------------------------------------------------- jobs
    def job_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in self.env.items()
               if k not in _JOB_ENV_DROP and not (k.startswith("SLURM_") and k != "SLURM_CONF")}
        env.update(extra or {})
        return env

    def submit(self, script: str | os.PathLike, args=(), *, sbatch_opts=(), env=None,
               cwd: str | os.PathLike = ROOT) -> str:
        """``sbatch --parsable [opts] script [args]`` from ``cwd`` (= SLURM_SUBMIT_DIR)."""
        cmd = ["sbatch", "--parsable", *sbatch_opts, str(script), *map(str, args)]
        p = subprocess.run(cmd, cwd=cwd, env=self.job_env(env), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {p.returncode}): {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        p = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env,
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {p.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def wait(self, job_id: str, timeout: float = 600, poll: float = 1.0) -> tuple[str, int]:
        """Poll until the job leaves the active states; return (state, exit code). On timeout
        cancel it and return ("TIMEOUT(wait)", 124)."""
        t0 = time.monotonic()
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state not in _ACTIVE:
                code = int(info.get("ExitCode", "0:0").split(":")[0])
                if state != "COMPLETED" and code == 0:
                    code = 1
                return state, code
            if time.monotonic() - t0 > timeout:
                subprocess.run(["scancel", job_id], env=self.env, capture_output=True, timeout=30)
                return "TIMEOUT(wait)", 124
            time.sleep(poll)

    def run(self, script, args=(), *, output: str | os.PathLike, sbatch_opts=(), env=None,
            cwd=ROOT, timeout: float = 600) -> JobResult:
        """Submit with ``--output=<output>`` (its folder is created: sbatch fails silently
        without it; ``%j`` is the job id), wait, return the result."""
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        job_id = self.submit(script, args, sbatch_opts=[f"--output={output}", *sbatch_opts],
                             env=env, cwd=cwd)
        state, code = self.wait(job_id, timeout)
        return JobResult(job_id, state, code, Path(str(output).replace("%j", job_id)),
                         time.monotonic() - t0)

    def slurmd_log(self) -> str:
        f = self.dir / "log" / "slurmd.log"
        return f.read_text(errors="replace") if f.exists() else ""
