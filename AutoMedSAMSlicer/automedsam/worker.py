"""Start, health-check, restart and stop a local worker process (e.g. with Slicer's ``PythonSlicer``).

The token is random and handed over in a file readable only by the user (not on the command line,
where other users could read it); the worker binds 127.0.0.1 and reports its port on stdout.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .client import RemoteEngine, ServiceUnavailableError
from .processes import pid_alive, start_group, stop_tree

log = logging.getLogger(__name__)


class LocalWorker:
    """A worker child process.

    Args:
        python: the interpreter to run ``-m automedsam serve`` with (default: this one).
        device: ``auto``, ``cpu`` or ``cuda``.
        extra_args: more ``serve`` options (e.g. ``["--max-upload-mb", "512"]``).
        env: environment for the child (default: this process's).
    """

    def __init__(self, python: str | None = None, device: str = "auto", extra_args: list[str] | None = None,
                 env: dict | None = None):
        self.python = python or sys.executable
        self.device = device
        self.extra_args = list(extra_args or [])
        self.env = env
        self.token = secrets.token_urlsafe(32)
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.server_pid: int | None = None
        self._token_dir = tempfile.mkdtemp(prefix="automedsam-worker-")
        self._token_file = Path(self._token_dir) / "token"
        #: The worker's last stderr lines (its log), kept for error messages.
        self.log_tail: collections.deque[str] = collections.deque(maxlen=200)
        fd = os.open(self._token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def start(self, timeout: float = 180.0) -> str:
        """Start the process, wait for its ready line and health; returns the URL."""
        # It ends with this process, however this one ends (a crash included): no orphan keeps the GPU.
        cmd = [self.python, "-m", "automedsam", "serve", "--port", "0", "--token-file", str(self._token_file),
               "--device", self.device, "--exit-with-pid", str(os.getpid()), *self.extra_args]
        # A group of its own, so stop() reaches the whole tree (see automedsam.processes).
        self.process = start_group(cmd, env=self.env)
        self.server_pid = None
        # Both pipes are read for the worker's whole life: an unread pipe fills (~64 KB) and then
        # blocks the worker on its next log line while alive() still says True.
        self.log_tail.clear()
        threading.Thread(target=_drain, args=(self.process.stderr, self.log_tail), daemon=True).start()
        line: list[str] = []

        def read_ready_line(stdout) -> None:
            line.append(stdout.readline())
            _drain(stdout, None)

        threading.Thread(target=read_ready_line, args=(self.process.stdout,), daemon=True).start()
        ready_by = time.monotonic() + timeout
        while not line and time.monotonic() < ready_by and self.process.poll() is None:
            time.sleep(0.02)
        if not line:
            time.sleep(0.05)  # a worker that just exited may still be writing its last line
        if not line or not line[0].strip():
            err = self._stderr_tail()
            self.stop()
            raise ServiceUnavailableError(f"the worker did not start within {timeout:.0f} s: {err}")
        ready = json.loads(line[0])
        self.url = ready["url"]
        self.server_pid = ready.get("pid")
        RemoteEngine(self.url, self.token).check_protocol()
        return self.url

    def _stderr_tail(self) -> str:
        time.sleep(0.1)  # let the drain thread take the last lines of a process that just ended
        tail = "".join(self.log_tail).strip()[-500:]
        if tail:
            return tail
        if self.process is None or self.process.poll() is None:
            return "no ready line"
        return f"exit code {self.process.returncode}"

    def alive(self) -> bool:
        """Whether the server itself runs (not only the launcher that started it)."""
        if self.process is None or self.process.poll() is not None:
            return False
        return self.server_pid is None or pid_alive(self.server_pid)

    def restart(self, timeout: float = 180.0) -> str:
        self.stop()
        return self.start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """End the whole process tree (launcher and server): terminate, then kill after ``timeout``."""
        if self.process is None:
            return
        if not stop_tree(self.process, [self.server_pid] if self.server_pid else [], timeout):
            log.error("AutoMedSAM worker process %s did not end", self.process.pid)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.process = None
        self.server_pid = None

    def client(self, **kwargs) -> RemoteEngine:
        """A :class:`RemoteEngine` on this worker."""
        return RemoteEngine(self.url, self.token, **kwargs)

    def __enter__(self) -> LocalWorker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        try:
            self.stop(timeout=2)
            os.unlink(self._token_file)
            os.rmdir(self._token_dir)
        except (OSError, AttributeError):
            pass


def _drain(stream, keep: collections.deque | None) -> None:
    """Read ``stream`` until it closes, keeping the last lines in ``keep``."""
    try:
        for text in stream:
            if keep is not None:
                keep.append(text)
                log.info("worker: %s", text.rstrip())  # into Slicer's log
    except (OSError, ValueError):  # closed by stop()
        pass


def wait_until(predicate, timeout: float, every: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
