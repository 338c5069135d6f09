"""The worker's wire protocol, stated once for the server (:mod:`.app`) and the client
(:mod:`automedsam.client`): the protocol version, the route paths, the request models, the binary
headers and the error codes.

``PROTOCOL`` changes whenever a request or response changes incompatibly; the client refuses a
server of another protocol and says which side to upgrade.

Coordinates in requests are the engine's (see :mod:`automedsam.contract`): slice index k, points
(i, j), boxes (i0, j0, i1, j1), masks and label maps in KJI order on the session volume's grid.
Volumes, label maps and masks travel as raw C-order bytes (:mod:`.codec`), JSON bodies are checked
strictly (NaN and Infinity are bad input, unknown fields are refused).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..classes import ClassInfo
from ..contract import (
    DEFAULT_PROMPT_NETWORK,
    TEACH_DECODER_LR,
    TEACH_EPOCHS,
    TEACH_NAME,
    TEACH_VAL_SLICES,
    CancelledError,
    SegmentationResult,
)
from ..errors import (
    AutoMedSAMError,
    BodyTooLargeError,
    InvalidInputError,
    NotFoundError,
    ServiceError,
    ServiceLimitError,
    StorageError,
    WeightsLoadError,
    WeightsUnavailableError,
)
from ..prompt_networks import PROMPT_NETWORK_KINDS
from ..volume import Volume

PROTOCOL = "3"

# Routes: every path the server serves and the client calls.
HEALTH = "/health"
OPENAPI = "/openapi.json"
INFO = "/v1/info"
MODELS = "/v1/models"
MODEL_DOWNLOAD = "/v1/models/{backbone_id}/download"
BUNDLES = "/v1/bundles"
SESSIONS = "/v1/sessions"
SESSION = "/v1/sessions/{sid}"
VOLUME = "/v1/sessions/{sid}/volume"
LABELS = "/v1/sessions/{sid}/labels"
SEGMENT = "/v1/sessions/{sid}/segment"
PROPAGATE = "/v1/sessions/{sid}/propagate"
TEACH = "/v1/sessions/{sid}/teach"
REFINE = "/v1/sessions/{sid}/refine"
JOB = "/v1/jobs/{jid}"
JOB_BUNDLE = "/v1/jobs/{jid}/bundle"
#: A finished segmentation or propagation job's masks of one class (the session's latest job only).
JOB_MASKS = "/v1/jobs/{jid}/masks/{class_name}"

#: JSON volume metadata (:class:`VolumeMeta`) next to a volume's raw bytes.
VOLUME_META_HEADER = "X-Volume-Meta"
#: JSON ``[K, J, I]`` next to a mask's packed bits.
SHAPE_HEADER = "X-Shape"

#: Session routes whose PUT bodies are raw bytes (the path segment after the session id).
UPLOAD_PARTS = ("volume", "labels")
MAX_NAME_CHARS = 200
#: Longest bundle name a request may give (a file name in the worker's bundle folders).
MAX_BUNDLE_NAME_CHARS = 1024

_STRICT = ConfigDict(allow_inf_nan=False, extra="forbid")  # NaN / Infinity are bad input, never numbers
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Point = Annotated[list[Finite], Field(min_length=2, max_length=2)]
ClassName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class SessionRequest(BaseModel):
    model_config = _STRICT
    bundle: str | None = Field(None, max_length=MAX_BUNDLE_NAME_CHARS,
                               description="a bundle in the worker's bundle folders (see GET /v1/bundles)")
    backbone: str | None = Field(None, max_length=200, description="backbone id for manual-only sessions")
    device: str | None = Field(None, pattern="^(auto|cpu|cuda(:[0-9]+)?)$")


class VolumeMeta(BaseModel):
    model_config = _STRICT
    shape: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(..., min_length=3, max_length=3,
                                                                 description="(K, J, I)")
    dtype: Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
    spacing: list[Positive] = Field(..., min_length=3, max_length=3, description="(s_i, s_j, s_k) mm")
    origin: list[Finite] = Field(..., min_length=3, max_length=3, description="LPS mm of voxel (0, 0, 0)")
    direction: list[Finite] = Field(..., min_length=9, max_length=9, description="3x3 row-major, columns = axes")
    name: str = Field("", max_length=1000)


class SegmentRequest(BaseModel):
    model_config = _STRICT
    classes: list[ClassName] = Field(..., min_length=1, max_length=1000)
    slices: list[Annotated[int, Field(ge=0)]] | None = None
    cleanup: Literal["largest_component", "none"] | None = None


class SliceMask(BaseModel):
    """A ``(J, I)`` bool slice mask: ``np.packbits`` of its C-order bits, base64 (see :mod:`.codec`)."""

    model_config = _STRICT
    shape: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(..., min_length=2, max_length=2, description="(J, I)")
    bits: str = Field(..., max_length=1 << 26)


class RefineRequest(BaseModel):
    model_config = _STRICT
    class_name: ClassName
    slice_index: int = Field(..., ge=0)
    points: list[Point] | None = Field(None, max_length=1000)
    point_labels: list[Literal[0, 1]] | None = Field(None, max_length=1000)
    box: list[Finite] | None = Field(None, min_length=4, max_length=4)
    mode: Literal["semi", "manual"] | None = None
    reset: bool = False
    mask: SliceMask | None = Field(None, description="the slice's mask as the caller has it now (none: no mask yet)")


class TeachRequest(BaseModel):
    model_config = _STRICT
    classes: dict[ClassName, Annotated[int, Field(ge=1, le=65535)]] = Field(
        ..., min_length=1, max_length=200, description="class name -> label value (1..65535) in the labels")
    prompt_network: Literal[PROMPT_NETWORK_KINDS] = DEFAULT_PROMPT_NETWORK
    epochs: int = Field(TEACH_EPOCHS, ge=1, le=10000)
    train_slices: str | None = Field(None, max_length=1000)
    val_slices: str | None = Field(TEACH_VAL_SLICES, max_length=1000)
    lr: Positive | None = None
    decoder_lr: Positive = TEACH_DECODER_LR
    use_now: bool = Field(True, description="switch this session to the new bundle when teaching ends")
    name: str = Field(TEACH_NAME, min_length=1, max_length=200)


class DownloadRequest(BaseModel):
    model_config = _STRICT
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    url: str | None = Field(None, max_length=2048, description="the catalog's URL or one under a configured mirror")


class PropagateRequest(BaseModel):
    model_config = _STRICT
    class_name: ClassName
    from_slice: int = Field(..., ge=0)
    seed: SliceMask = Field(..., description="the class's mask on from_slice as the caller has it now")
    direction: Literal["forward", "backward", "both"] = "both"
    max_slices: int | None = Field(None, ge=1)


def result_to_json(result: SegmentationResult) -> dict:
    """What a finished segmentation or propagation job reports (its masks are fetched from
    :data:`JOB_MASKS`)."""
    return {"summary": result.summary(), "classes": [c.name for c in result.classes], "slices": result.slices,
            "present_slices": result.present_slices, "seconds": result.seconds}


def result_from_json(d: dict, volume: Volume, classes: list[ClassInfo], masks: dict) -> SegmentationResult:
    """The :class:`SegmentationResult` of a finished job, with ``masks`` fetched for ``classes``."""
    return SegmentationResult(volume, masks, classes, list(d["slices"]),
                              {n: list(ks) for n, ks in d["present_slices"].items()}, float(d["seconds"]))


def body(model: type[BaseModel], **fields) -> dict:
    """A request body, checked by the same model the server checks it with: bad values are an
    :class:`InvalidInputError` on the caller's side, before anything is sent."""
    try:
        return model(**fields).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInputError(f"{where}: {first['msg']}") from None


#: Named errors and how they travel: (error class, HTTP status, stable code). The first class an
#: error is an instance of decides, so subclasses come before their bases.
ERRORS: tuple[tuple[type[AutoMedSAMError], int, str], ...] = (
    (NotFoundError, 404, "not_found"),
    (ServiceLimitError, 429, "busy"),
    (BodyTooLargeError, 413, "too_large"),
    (InvalidInputError, 422, "invalid_input"),
    (WeightsLoadError, 422, "weights_invalid"),
    (StorageError, 507, "storage_unavailable"),
    (WeightsUnavailableError, 424, "weights_unavailable"),
    (CancelledError, 409, "cancelled"),
)
#: Codes the server answers without a named error behind them, and what the client raises for them.
REQUEST_INVALID = "invalid_request"  # a body or parameter the request models refuse


def error_status(exc: AutoMedSAMError) -> tuple[int, str]:
    """HTTP status and stable code of an error raised on purpose (routes answer it, jobs report it)."""
    for cls, status, code in ERRORS:
        if isinstance(exc, cls):
            return status, code
    return 500, "error"


def error_from(status: int, code: str, message: str) -> AutoMedSAMError:
    """The named error a code stands for (the error the worker raised), else a :class:`ServiceError`."""
    if code == REQUEST_INVALID:
        return InvalidInputError(message)
    for cls, _status, known in ERRORS:
        if code == known:
            return cls(message)
    return ServiceError(status, code, message)
