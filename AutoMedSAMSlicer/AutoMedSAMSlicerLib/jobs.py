"""Long-running work (segment, propagate, teach) as a steppable job.

The core yields progress events from generators. A :class:`Job` advances such a generator one event
at a time: the panel calls :meth:`Job.step` from a ``qt.QTimer`` (each step is a short HTTP poll of
the worker, so the GUI stays responsive), the console and batch scripts call :meth:`Job.wait`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator


def eventFraction(event) -> float:
    """Progress 0..1 of a core ``ProgressEvent``/``TrainEvent`` or a worker ``RemoteEvent``."""
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
    """

    def __init__(self, name: str, events: Iterator, finish: Callable, progressCallback: Callable | None = None,
                 cancelEvent: threading.Event | None = None):
        self.name = name
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
            return self._step()
        finally:
            self._stepping = False

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
        self.lastEvent = event
        if eventStage(event) == "cancelled":
            self.cancelled = True
        keepGoing = None if self.progressCallback is None else self.progressCallback(eventFraction(event),
                                                                                   eventMessage(event))
        if keepGoing is False:
            self.cancel()
        return True

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
        :class:`automedsam.engine.CancelledError` when cancelled."""
        while self.step():
            pass
        if self.error is not None:
            raise self.error
        if self.cancelled:
            from automedsam.engine import CancelledError

            raise CancelledError(f"{self.name} was cancelled; nothing was changed")
        return self.result
