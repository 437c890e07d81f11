"""Workers for tests/test_faults.py: SFT runs (the cheapest loop that saves full training
checkpoints) inside a spawned rank; a failing run returns its error instead of raising, so one
launch can try several faults in turn."""

from __future__ import annotations


def damage(action: tuple) -> None:
    """Real file damage: ("zero", path, nbytes) zeroes nbytes in the middle of the file,
    ("truncate", path) cuts it to half, ("copy", src, dst) copies a file, ("mkdir", path) makes a
    non-empty dir."""
    import os
    import shutil

    kind, path = action[0], action[1]
    if kind == "zero":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\0" * action[2])
    elif kind == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif kind == "copy":
        shutil.copy(path, action[2])
    elif kind == "mkdir":  # e.g. the temp dir a killed save left
        os.makedirs(os.path.join(path, "sub"))
    else:
        raise ValueError(kind)


def sft_attempts(rank: int, world: int, attempts: list[tuple[list[tuple], list[str]]]) -> list[str | None]:
    """For each (damage actions, argv): apply the actions, run ``sft.main(argv)``; returns None or
    "Type: message" per run."""
    from megatron_rl.parallel import destroy_parallel
    from megatron_rl.train.sft import main

    out = []
    for actions, argv in attempts:
        for a in actions:
            damage(a)
        try:
            main(argv)
            out.append(None)
        except Exception as e:  # noqa: BLE001 - the message is the result
            out.append(f"{type(e).__name__}: {e}")
            destroy_parallel()
    return out


def engine_pids() -> list[int]:
    """PIDs of this process's child engine processes (``python -m megatron_rl.rollout.engine``)."""
    import os

    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"megatron_rl.rollout.engine" in cmd:
            out.append(int(d))
    return sorted(out)


_calls = {"n": 0}


def killing_verifier(response: str, label: str) -> float:
    """The parity reward of tests/_grpo_runs.py; its 3rd call (step 1's scoring, after the
    rollout, before the weight sync) SIGKILLs the first engine process."""
    import os
    import signal

    _calls["n"] += 1
    if _calls["n"] == 3:
        pid = engine_pids()[0]
        print(f"[fault] SIGKILL engine pid {pid}", flush=True)
        os.kill(pid, signal.SIGKILL)
    return float(len(response) % 2 == 0)


def grpo_with_engine_kill(rank: int, world: int, argv: list[str]) -> dict:
    from megatron_rl.train.grpo import main

    return main(argv, verifier=killing_verifier)
