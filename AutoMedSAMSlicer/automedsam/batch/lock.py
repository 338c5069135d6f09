"""One batch run per output folder.

Two runs writing one folder would remove each other's temporary files and replace each other's
records. :class:`OutputLock` takes an operating-system lock on ``<output>/.automedsam-batch.lock``
(``filelock``: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), which the system releases
when the holder dies, even by SIGKILL, so a stale lock never blocks a rerun. Who holds it (pid,
host, start time) is written beside it, for the refusal message.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from ..errors import InvalidInputError

LOCK_NAME = ".automedsam-batch.lock"
HOLDER_NAME = ".automedsam-batch.holder.json"


class OutputLock:
    """Held for the length of a run: ``with OutputLock(folder): ...``.

    Raises:
        InvalidInputError: on entry, when another run holds the folder (the message names its pid
            and host).
    """

    def __init__(self, folder: Path):
        from filelock import FileLock

        self.folder = Path(folder)
        self._lock = FileLock(str(self.folder / LOCK_NAME), timeout=0)

    def __enter__(self) -> OutputLock:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise InvalidInputError(
                f"another batch run ({self.holder()}) is writing to {self.folder}; wait for it to finish, stop it, "
                "or give this run another --output folder") from None
        except (OSError, NotImplementedError) as exc:  # NotImplementedError: a file system without locks
            raise InvalidInputError(
                f"cannot lock the output folder {self.folder} ({getattr(exc, 'strerror', None) or exc}); its file "
                "system may not support locks (some network and FUSE mounts): choose an output folder on a local or "
                "lock-capable file system") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # Without the note the lock still holds; only a second run's message is poorer.
        with contextlib.suppress(OSError):
            (self.folder / HOLDER_NAME).write_text(json.dumps(holder), encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        self._lock.release()

    def holder(self) -> str:
        """Who holds the lock, as far as its note says."""
        try:
            data = json.loads((self.folder / HOLDER_NAME).read_text(encoding="utf-8"))
            return f"pid {int(data['pid'])} on {data['host']}, started {data['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid unknown"
