"""Child processes as whole trees: start one in a process group of its own, stop every process in
it, and read its output line by line without ever blocking the caller.

Standard library only: Slicer's layer imports this before any of AutoMedSAM's dependencies are
installed (it runs the installers through :class:`StreamedProcess`).

Why groups: Slicer's ``PythonSlicer`` is a launcher (CTK AppLauncher, Base/ctkAppLauncher.cpp) that
runs ``python-real`` as a child and forwards no signals to it, and ``pip`` runs build back-ends in
children of its own. Ending only the process we started would leave the real work running.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from .errors import AutoMedSAMError


class ProcessFailedError(AutoMedSAMError):
    """A child process ended with a non-zero exit code; ``tail`` holds its last output lines."""

    def __init__(self, message: str, returncode: int, tail: Sequence[str]):
        super().__init__(message)
        self.returncode = returncode
        self.tail = list(tail)


def start_group(cmd: Sequence[str], *, env: dict | None = None, merge_stderr: bool = False) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group (a new session on POSIX; on Windows a new
    group with no console window). stdout (and stderr, merged into stdout or separate) are text pipes
    the caller must keep reading: a full pipe blocks the child."""
    if os.name == "nt":
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    else:
        group = {"start_new_session": True}
    return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace", env=env, **group)


def lower_priority() -> bool:
    """Run this process below normal priority (POSIX nice +10, Windows BELOW_NORMAL), so an
    interactive program beside it (Slicer's GUI) gets the CPU first. Returns whether it worked."""
    try:
        if os.name == "nt":
            import ctypes

            kernel32 = ctypes.windll.kernel32
            return bool(kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), 0x00004000))  # BELOW_NORMAL
        os.nice(10)
        return True
    except (OSError, AttributeError):
        return False


def signal_tree(process: subprocess.Popen, kill: bool) -> None:
    """Terminate (or kill) the process group that :func:`start_group` started.

    On Windows both are ``taskkill /T /F``: without ``/F`` taskkill only posts WM_CLOSE, which a
    process without a window (``CREATE_NO_WINDOW``) never receives. Once the leader has exited,
    taskkill can no longer find its tree (a Job object would; not used here)."""
    if process.poll() is not None and os.name == "nt":
        return
    try:
        if os.name == "nt":  # /T ends the children too
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                           capture_output=True, check=False, creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def kill_pid(pid: int) -> None:
    """Kill one process (e.g. a server that left its group); a missing process is not an error."""
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/PID", str(pid)], capture_output=True, check=False,
                           creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def group_alive(process: subprocess.Popen) -> bool:
    """Whether any process of the group :func:`start_group` made is left (POSIX; on Windows, the
    leader). The leader is reaped first, so it does not count as a zombie."""
    process.poll()
    if os.name == "nt":
        return process.poll() is None
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_tree(process: subprocess.Popen, other_pids: Sequence[int] = (), timeout: float = 10.0) -> bool:
    """End ``process``'s group and ``other_pids``: terminate, then kill what is left after
    ``timeout`` seconds (every member of the group, not only the leader). Returns whether
    everything ended."""
    pids = [p for p in other_pids if p]

    def left() -> bool:
        return group_alive(process) or any(pid_alive(p) for p in pids)

    signal_tree(process, kill=False)
    end = time.monotonic() + timeout
    while left() and time.monotonic() < end:
        time.sleep(0.05)
    if left():
        signal_tree(process, kill=True)
        for p in pids:
            if pid_alive(p):
                kill_pid(p)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


class StreamedProcess:
    """A command run as a process group whose merged stdout/stderr is read on a thread, so
    :meth:`read` never waits longer than asked, however long the child stays silent.

    Args:
        cmd: the command line.
        env: its environment (default: this process's).
        keep: how many of the last output lines :attr:`tail` keeps (for error messages).
    """

    #: Seconds the output may stay open after the child exited (a grandchild that inherited the
    #: pipe and lives on must not keep :attr:`finished` False for ever).
    EXIT_GRACE_S = 2.0

    def __init__(self, cmd: Sequence[str], env: dict | None = None, keep: int = 40):
        self.cmd = list(cmd)
        self._exited_at: float | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._eof = threading.Event()
        self.process = start_group(self.cmd, env=env, merge_stderr=True)
        threading.Thread(target=self._read, name="AutoMedSAM process output", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):  # the pipe was closed by stop()
            pass
        finally:
            self._eof.set()

    def read(self, timeout: float) -> list[str]:
        """The output lines that arrived, waiting at most ``timeout`` seconds for the first one."""
        lines = []
        try:
            lines.append(self._lines.get(timeout=timeout))
            while True:
                lines.append(self._lines.get_nowait())
        except queue.Empty:
            pass
        self.tail.extend(lines)
        return lines

    @property
    def finished(self) -> bool:
        """The child has exited and its output has been read by :meth:`read` (to its end, or for
        :attr:`EXIT_GRACE_S` after the exit when something else still holds the pipe open)."""
        if self.process.poll() is None or not self._lines.empty():
            return False
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        return self._eof.is_set() or time.monotonic() - self._exited_at > self.EXIT_GRACE_S

    @property
    def output_closed(self) -> bool:
        """Every process that could write to the output has closed it."""
        return self._eof.is_set()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def check(self, what: str) -> None:
        """Raise :class:`ProcessFailedError` (naming ``what`` and the last output) on a non-zero exit."""
        code = self.process.wait()
        if code != 0:
            last = "\n".join(line for line in self.tail if line.strip())[-2000:]
            raise ProcessFailedError(f"{what} failed (exit code {code}). Its last output:\n{last}", code, self.tail)

    def stop(self, timeout: float = 10.0) -> None:
        """End the child and everything it started."""
        stop_tree(self.process, timeout=timeout)  # the reader thread then sees the pipe's end
