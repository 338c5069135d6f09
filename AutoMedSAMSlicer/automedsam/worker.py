"""Start, health-check, restart and stop a local worker process (e.g. with Slicer's ``PythonSlicer``).

The token is random and handed over in a file readable only by the user (not on the command line,
where other users could read it); the worker binds 127.0.0.1 and reports its port on stdout.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .client import RemoteEngine, ServiceUnavailableError


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
        self._token_dir = tempfile.mkdtemp(prefix="automedsam-worker-")
        self._token_file = Path(self._token_dir) / "token"
        fd = os.open(self._token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def start(self, timeout: float = 180.0) -> str:
        """Start the process, wait for its ready line and health; returns the URL."""
        cmd = [self.python, "-m", "automedsam", "serve", "--port", "0", "--token-file", str(self._token_file),
               "--device", self.device, *self.extra_args]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=self.env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            err = self._stderr_tail()
            self.stop()
            raise ServiceUnavailableError(f"the worker did not start within {timeout:.0f} s: {err}")
        ready = json.loads(line[0])
        self.url = ready["url"]
        RemoteEngine(self.url, self.token).check_protocol()
        return self.url

    def _stderr_tail(self) -> str:
        if self.process is None or self.process.poll() is None:
            return "no ready line"
        return (self.process.stderr.read() or "").strip()[-500:] or f"exit code {self.process.returncode}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, timeout: float = 180.0) -> str:
        self.stop()
        return self.start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (then kill) the process."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.process = None

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


def wait_until(predicate, timeout: float, every: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
