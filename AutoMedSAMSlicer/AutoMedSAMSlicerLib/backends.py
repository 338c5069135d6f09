"""Backends: where inference runs. In this process, in a local worker process, or on a remote server.

All three hand the Logic engines with one API, :class:`automedsam.contract.SegmentationEngine`
(an in-process :class:`~automedsam.engine.Engine` or a :class:`~automedsam.client.RemoteEngine`), and
offer the same methods themselves, so the Logic never asks which one it has. The worker keeps
Slicer responsive: heavy work runs in another process and the GUI only polls. A crashed local
worker is restarted and its session restored (volume and masks re-uploaded), so nothing the user
sees is lost.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

#: Folder that holds the ``automedsam`` package (the module's folder in Slicer, the checkout in tests).
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def slicerPythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` (next to the running interpreter in a Slicer install), else this Python."""
    folder = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (folder / name).exists():
            return str(folder / name)
    return sys.executable


class _EngineCache:
    """Engines by (model, backbone, device); :meth:`adopt` files an engine under a new model (a
    bundle just taught, which the engine now runs) and forgets its old key."""

    def __init__(self):
        self._engines: dict[tuple, object] = {}

    @staticmethod
    def _key(model, device, backbone=None) -> tuple:
        return (str(model) if model else None, backbone, device)

    def adopt(self, model: str, device: str, engine) -> None:
        for key in [k for k, e in self._engines.items() if e is engine]:
            del self._engines[key]
        self._engines[self._key(model, device)] = engine


class InProcessBackend(_EngineCache):
    """Engines in this process (console, batch runs, tests). Blocks while it computes."""

    def engine(self, model: str | None, device: str = "auto", backbone: str | None = None):
        key = self._key(model, device, backbone)
        if key not in self._engines:
            from automedsam.engine import Engine
            from automedsam.errors import InvalidInputError

            if model:
                self._engines[key] = Engine.from_bundle(model, device)
            elif backbone:
                self._engines[key] = Engine.manual(backbone, device)
            else:
                raise InvalidInputError(
                    "no model: choose a model bundle (.zip or folder), or a backbone for manual mode")
        return self._engines[key]

    def call(self, engine, fn):
        return fn(engine)

    def verify(self, engine) -> None:
        """Nothing to check in this process (see :meth:`RemoteBackend.verify`)."""

    def info(self) -> dict:
        from automedsam.backbones import gpu_info

        gpu = gpu_info()
        return {"device": "cuda" if gpu else "cpu", "gpu": gpu}

    def shutdown(self) -> None:
        self._engines.clear()


class RemoteBackend(_EngineCache):
    """Engines on a server at ``url`` (a shared GPU workstation running ``automedsam serve``).

    A model bundle on this machine is uploaded to the server when its session opens; any other model
    name is a bundle in the server's bundle folders (the server reads no other path).
    """

    def __init__(self, url: str, token: str, pollSeconds: float = 0.05):
        super().__init__()
        self.url, self.token, self.pollSeconds = url, token, pollSeconds

    def _newClient(self, model, device, backbone):
        from automedsam.client import RemoteEngine

        return RemoteEngine(self.url, self.token, bundle=str(model) if model else None, backbone=backbone,
                            device=device, poll_s=self.pollSeconds)

    def engine(self, model: str | None, device: str = "auto", backbone: str | None = None):
        key = self._key(model, device, backbone)
        if key not in self._engines:
            self._engines[key] = self.call(None, lambda _: self._newClient(model, device, backbone))
        return self._engines[key]

    def verify(self, engine) -> None:
        """Check the server still answers in this client's protocol (a crashed local worker is
        restarted and its sessions restored here, before anything is sent)."""
        self.call(engine, lambda e: e.check_protocol())

    def recover(self) -> bool:
        """Called after the server stopped answering; True if calls may be retried."""
        return False

    def _restoreSessions(self) -> None:
        for client in self._engines.values():
            client.reconnect()

    def call(self, engine, fn):
        """``fn(engine)``; after a lost connection, recover and retry once (sessions restored)."""
        from automedsam.client import ServiceUnavailableError

        try:
            return fn(engine)
        except ServiceUnavailableError:
            if not self.recover():
                raise
            logging.warning("AutoMedSAM: the worker was restarted; session restored")
            self._restoreSessions()
            return fn(engine)

    def info(self) -> dict:
        from automedsam.client import RemoteEngine

        return self.call(None, lambda _: RemoteEngine(self.url, self.token).info())

    def shutdown(self) -> None:
        for client in self._engines.values():
            client.close()
        self._engines.clear()


class WorkerBackend(RemoteBackend):
    """Engines in a local worker process started on first use with Slicer's Python
    (``PythonSlicer -m automedsam serve``: 127.0.0.1, a random token handed over in a 0600 file),
    restarted when it crashed, stopped on :meth:`shutdown` (Slicer exit)."""

    def __init__(self, python: str | None = None, device: str = "auto", pollSeconds: float = 0.05):
        from automedsam.backbones.runtime import THREADS_ENV, threads_beside_gui
        from automedsam.worker import LocalWorker

        env = dict(os.environ)
        # The worker imports the automedsam package shipped inside the module folder.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
        # It computes beside Slicer's GUI: a core left free where there are enough, lower priority always.
        env.setdefault(THREADS_ENV, str(threads_beside_gui()))
        # Sessions of the local worker never expire: Slicer may sit idle for hours, and the worker
        # ends with Slicer anyway (LocalWorker passes --exit-with-pid).
        self.worker = LocalWorker(python or slicerPythonExecutable(), device=device, env=env,
                                  extra_args=["--lower-priority", "--session-ttl-s", str(10**9)])
        self.closing = False
        super().__init__("", self.worker.token, pollSeconds)

    def _started(self) -> None:
        if self.closing:  # never (re)start a worker while Slicer or the module is shutting down
            from automedsam.client import ServiceUnavailableError

            raise ServiceUnavailableError("AutoMedSAM is shutting down: the worker is not started again")
        if self.worker.process is None:
            self.url = self.worker.start()
        elif not self.worker.alive():
            self.recover()
            self._restoreSessions()

    def _restoreSessions(self) -> None:
        """After a restart: every client's session re-created with its volume and masks."""
        for client in self._engines.values():
            client.url = self.url
            client.reconnect()

    def engine(self, model: str | None, device: str = "auto", backbone: str | None = None):
        self._started()
        return super().engine(model, device, backbone)

    def recover(self) -> bool:
        if self.closing or self.worker.alive():
            return False  # it is up but did not answer: not a crash, do not hide it
        logging.warning("AutoMedSAM: the worker process ended unexpectedly; restarting it")
        self.url = self.worker.restart()
        return True

    def info(self) -> dict:
        self._started()
        return super().info()

    def shutdown(self) -> None:
        self.closing = True
        try:
            super().shutdown()
        finally:
            self.worker.stop()


def makeBackend(backend: str = "worker", serverUrl: str = "", token: str = "", device: str = "auto"):
    """``backend``: ``worker`` (default for the panel), ``inprocess`` (console/batch) or ``remote``."""
    from automedsam.errors import InvalidInputError

    if backend == "inprocess":
        return InProcessBackend()
    if backend == "worker":
        return WorkerBackend(device=device)
    if backend == "remote":
        if not serverUrl or not token:
            raise InvalidInputError("a remote server needs its URL and token (set both in the panel's Worker section)")
        return RemoteBackend(serverUrl, token)
    raise InvalidInputError(f"backend must be worker, inprocess or remote, got {backend!r}")
