"""Named exceptions. Everything the package raises on purpose derives from :class:`AutoMedSAMError`.

The CLI maps them to exit codes: :class:`InvalidInputError` -> 2, :class:`UnavailableError` (weights,
network, a cluster) -> 3, any other :class:`AutoMedSAMError` -> 1.
"""

from __future__ import annotations


class AutoMedSAMError(Exception):
    """Base class of every error AutoMedSAM raises on purpose."""


class InvalidInputError(AutoMedSAMError, ValueError):
    """Bad input from the user: a missing or unreadable file, an array of the wrong shape, etc.

    The message says what is wrong, where (file or argument) and how to fix it.
    """


class GeometryError(InvalidInputError):
    """Two images (e.g. an image and its label map) do not describe overlapping physical space."""


class CatalogError(AutoMedSAMError):
    """A model or class catalog file is malformed or does not match its JSON schema."""


class UnavailableError(AutoMedSAMError):
    """Something the command needs from outside is not there: weights, the network, a cluster."""


class ClusterUnreachableError(UnavailableError):
    """A Ray cluster address that does not answer."""


class WeightsUnavailableError(UnavailableError):
    """Model weights are missing and cannot be obtained (no network, unknown id, no file)."""


class DownloadError(WeightsUnavailableError):
    """A download failed (network error, HTTP error status, timeout)."""


class ChecksumMismatchError(DownloadError):
    """A downloaded or imported file does not have the sha256 the catalog pins."""


class WeightsLoadError(AutoMedSAMError):
    """A weights file exists but does not fit the model (missing/unexpected keys, wrong shapes)."""


class RuntimeUnavailableError(AutoMedSAMError):
    """A CPU inference runtime (OpenVINO, ONNX Runtime) asked for is not installed, or a part compiled
    for it does not compute what PyTorch computes."""


class TrainingFailedError(AutoMedSAMError):
    """Training stopped with an error after it had trained; the message says where its work was kept."""


class ServiceError(AutoMedSAMError):
    """The worker answered with an error no named error stands for (``code`` is its stable code)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"worker error {status} ({code}): {message}")
        self.status, self.code, self.message = status, code, message


class ServiceUnavailableError(AutoMedSAMError):
    """The worker cannot be reached (not started, crashed, or another address)."""


class ProtocolMismatchError(AutoMedSAMError):
    """Client and worker speak different protocol versions."""


class ServiceLimitError(AutoMedSAMError):
    """A configured limit of the worker (sessions, queued jobs) is reached; retry later."""


class NotFoundError(AutoMedSAMError):
    """No such session, job or route on the worker."""


class StorageError(AutoMedSAMError):
    """The worker cannot write where it was configured to (its bundle folder is read-only or full).
    The message names no server path."""


class BodyTooLargeError(AutoMedSAMError):
    """A request body is larger than the worker's limit for it."""
