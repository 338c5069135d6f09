"""Long-running work (segment, propagate, teach) as a steppable job.

The core yields progress events from generators. A :class:`Job` advances such a generator one event
at a time: the panel calls :meth:`Job.step` from a ``qt.QTimer`` (each step is a short HTTP poll of
the worker, so the GUI stays responsive), the console and batch scripts call :meth:`Job.wait`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator


def eventFraction(event) -> float:
    """Progress 0..1 of a core ``ProgressEvent``/``TrainEvent`` or one of the Logic's own dict events."""
    if isinstance(event, dict):
        done, total = event.get("done") or 0, event.get("total") or 0
    elif hasattr(event, "epochs"):
        done, total = event.epoch, event.epochs
    else:
        done, total = event.done, event.total
    return min(1.0, done / total) if total else 0.0


def eventStage(event) -> str:
    return event.get("stage", "") if isinstance(event, dict) else event.stage


def eventMessage(event) -> str:
    message = event.get("message") if isinstance(event, dict) else getattr(event, "message", "")
    return message or eventStage(event)


class Job:
    """One long run. ``events`` is the core generator; ``finish(lastEvent)`` turns its last event into
    the job's result (it runs once, after the generator ends, and may write MRML nodes).

    ``progressCallback(fraction, message)`` is called for every event; if it returns ``False`` the
    job is cancelled (nothing is written).

    With ``background=True`` (the panel) the generator runs on a thread of its own and
    :meth:`step` only collects the events that arrived, so a step never waits for the model or the
    worker; ``progressCallback`` and ``finish`` still run on the thread that calls :meth:`step`
    (Slicer's main thread, the only one that may touch MRML).
    """

    def __init__(self, name: str, events: Iterator, finish: Callable, progressCallback: Callable | None = None,
                 cancelEvent: threading.Event | None = None, background: bool = False):
        self.name = name
        self.background = background
        self._thread: threading.Thread | None = None
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()
        self._events = events
        self._finish = finish
        self.progressCallback = progressCallback
        self.cancelEvent = cancelEvent or threading.Event()
        self.lastEvent = None
        self.result = None
        self.error: BaseException | None = None
        self.finished = False
        self.cancelled = False
        self.doneCallbacks: list[Callable[[Job], None]] = []
        # True while a step runs: a modal prompt inside ``finish`` runs Qt's event loop, and a timer
        # firing then must not step (and finish) the job a second time.
        self._stepping = False

    def cancel(self) -> None:
        """Ask the run to stop at its next event; nothing is written to the scene."""
        self.cancelEvent.set()

    def step(self) -> bool:
        """Advance by one event; returns True while the job is still running. Re-entrant calls
        (from an event loop run inside this step) do nothing."""
        if self.finished:
            return False
        if self._stepping:
            return True
        self._stepping = True
        try:
            return self._collect() if self.background else self._step()
        finally:
            self._stepping = False

    def _produce(self) -> None:
        """The generator, run to its end on the job's thread; its events go to the queue."""
        try:
            for event in self._events:
                self._arrived.put(("event", event))
        except Exception as exc:
            self._arrived.put(("error", exc))
            return
        self._arrived.put(("end", None))

    def _collect(self) -> bool:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name=f"AutoMedSAM {self.name}", daemon=True)
            self._thread.start()
        while True:
            try:
                kind, payload = self._arrived.get_nowait()
            except queue.Empty:
                return True
            if kind == "event":
                self._take(payload)
            elif kind == "error":
                self.error = payload
                self._end()
                return False
            else:
                self._complete()
                return False

    def _step(self) -> bool:
        try:
            event = next(self._events)
        except StopIteration:
            self._complete()
            return False
        except Exception as exc:  # handed to the caller through .error / wait()
            self.error = exc
            self._end()
            return False
        self._take(event)
        return True

    def _take(self, event) -> None:
        self.lastEvent = event
        if eventStage(event) == "cancelled":
            self.cancelled = True
        keepGoing = None if self.progressCallback is None else self.progressCallback(eventFraction(event),
                                                                                   eventMessage(event))
        if keepGoing is False:
            self.cancel()

    def _complete(self) -> None:
        try:
            if self.cancelled or (self.cancelEvent.is_set() and eventStage(self.lastEvent or {}) != "done"):
                self.cancelled = True
            else:
                self.result = self._finish(self.lastEvent)
        except Exception as exc:
            self.error = exc
        self._end()

    def _end(self) -> None:
        self.finished = True
        for callback in self.doneCallbacks:
            try:
                callback(self)
            except Exception:
                logging.exception("AutoMedSAM: a job completion callback failed")

    def wait(self):
        """Run to the end (blocking); returns the result, raises the run's error, or
        :class:`automedsam.contract.CancelledError` when cancelled."""
        while self.step():
            if self.background:
                time.sleep(0.01)  # the work runs on the job's thread
        if self.error is not None:
            raise self.error
        if self.cancelled:
            from automedsam.contract import CancelledError

            raise CancelledError(f"{self.name} was cancelled; nothing was changed")
        return self.result
