"""Ends a ``--ray local`` cluster with the run that started it, even when the run is killed.

Ray's GCS server and raylet notice their driver's death, but its dashboard and runtime-env agents
live on for up to a minute and a half after a SIGKILL (measured here), and a SLURM job or a
container that is killed must not leave processes behind. Right after the cluster starts, the run
notes every process under it (Ray names them with ``setproctitle``, so their command lines do not
say which session they belong to; their pid and start time do) and starts this module as a small
process of its own (``python -m automedsam.batch.reaper RUN_PID PID:START ...``): when the run is
gone it kills those processes, then exits. Linux only (it reads ``/proc``); the run stops it when
it ends normally.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time in clock ticks)`` of a process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> list[tuple[int, int]]:
    """``(pid, start time)`` of every process under ``root`` (children, their children, ...);
    empty where there is no ``/proc``."""
    if not Path("/proc").is_dir():
        return []
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def start(package_root: str, before: list[tuple[int, int]]) -> subprocess.Popen | None:
    """Start the reaper of the processes under this one that were not there ``before`` (call it
    right after ``ray.init`` started the local cluster, with :func:`descendants` of this process
    from just before); None where there is no ``/proc``."""
    if not sys.platform.startswith("linux"):
        return None
    noted = [f"{pid}:{started}" for pid, started in set(descendants(os.getpid())) - set(before)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "automedsam.batch.reaper", str(os.getpid()), *noted],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop(reaper: subprocess.Popen | None) -> None:
    """The run ended normally (Ray shut down): the reaper has nothing left to do."""
    if reaper is not None and reaper.poll() is None:
        reaper.terminate()
        reaper.wait(10)


def main(argv: list[str]) -> int:
    run_pid = int(argv[0])
    noted = [tuple(int(x) for x in item.split(":")) for item in argv[1:]]
    while os.getppid() == run_pid:  # the run is alive while it is still our parent
        time.sleep(0.5)
    for pid, started in noted:
        stat = _stat(pid)
        if stat is not None and stat[1] == started:  # the same process, not a later one with its pid
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
