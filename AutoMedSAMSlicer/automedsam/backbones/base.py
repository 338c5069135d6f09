"""One interface over SAM-family backbones.

A :class:`Backbone` wraps a frozen ``segment_anything`` ``Sam`` or a ``sam2`` ``SAM2Base`` model and
exposes exactly what the prompt networks and the engine need:

- :meth:`Backbone.encode`: model-input images ``(B, S, S, 3)`` float in [0, 1] ->
  :class:`ImageFeatures` (``(B, 256, E, E)`` embeddings, plus SAM 2's high-resolution maps).
- :meth:`Backbone.embed_prompts`: manual prompts in *model pixel coordinates* (x, y) -> sparse
  ``(B, n, 256)`` and dense ``(B, 256, E, E)`` embeddings from the backbone's own prompt encoder.
- :meth:`Backbone.decode`: features + sparse/dense embeddings -> :class:`DecoderOutput` with mask
  logits ``(B, M, L, L)`` (``L = 4 E``, covering the padded S x S input), predicted IoU ``(B, M)``
  and, for SAM 2, an object-score logit ``(B, 1)``.

Image preprocessing into model space and the way back is :mod:`automedsam.preprocess`.

On the CPU, parts a backbone can export (:meth:`Backbone.export_spec`) run through OpenVINO or ONNX
Runtime (:mod:`automedsam.backbones.runtime`); CUDA, :meth:`Backbone.eager` and the decoder of a
:meth:`Backbone.trainable` view (gradients flow through it) use PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import WeightsLoadError
from ..models import BackboneSpec
from ..preprocess import SliceTransform

if TYPE_CHECKING:  # torch is imported lazily at run time
    import torch

    from .runtime import CompiledPart, ExportSpec

log = logging.getLogger(__name__)

#: Largest difference (relative to the output's magnitude) a compiled part may show against
#: PyTorch on its example inputs before it is refused: bf16 rounding stays well below it, a wrong
#: graph (a shape baked in by the tracer) does not.
_AGREEMENT_TOLERANCE = {"bf16": 0.15, "f16": 0.15, "bf16-linear": 0.15, "f32": 1e-3}

_PIXEL_NORMALIZATION = {
    # mean, std applied to 0..1 intensities
    "sam": ((123.675 / 255, 116.28 / 255, 103.53 / 255), (58.395 / 255, 57.12 / 255, 57.375 / 255)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass
class ImageFeatures:
    """Encoder output for a batch of B model-input images.

    Attributes:
        embeddings: ``(B, 256, E, E)`` float tensor (E = S / 16 for the stock models).
        high_res: SAM 2 only: ``((B, 32, 4E, 4E), (B, 64, 2E, 2E))``; empty for SAM.
    """

    embeddings: torch.Tensor
    high_res: tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def select(self, index) -> ImageFeatures:
        """Features of a subset of the batch (an int keeps the batch axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return ImageFeatures(self.embeddings[index], tuple(h[index] for h in self.high_res))

    def to(self, device=None, dtype=None) -> ImageFeatures:
        return ImageFeatures(self.embeddings.to(device=device, dtype=dtype),
                             tuple(h.to(device=device, dtype=dtype) for h in self.high_res))


@dataclass
class DecoderOutput:
    """Mask decoder output for B prompt sets.

    Attributes:
        mask_logits: ``(B, M, L, L)`` float logits over the padded model input (M = 1, or 3 with
            multimask output).
        iou: ``(B, M)`` predicted IoU of each mask.
        object_logits: ``(B, 1)`` SAM 2's object-presence logit (> 0: present); None for SAM.
    """

    mask_logits: torch.Tensor
    iou: torch.Tensor
    object_logits: torch.Tensor | None = None


#: The mask logit outside a decode window (see :meth:`Backbone.decode`): background at any usual
#: threshold, and finite, so bilinear sampling next to the window stays finite.
OUTSIDE_WINDOW_LOGIT = -1.0e4


def check_window(window, mask_size: int) -> tuple[int, int, int, int] | None:
    """``window`` as four ints ``(row0, row1, col0, col1)`` inside the ``mask_size`` grid, or None.

    Raises:
        ValueError: not four bounds with ``0 <= row0 < row1 <= L`` and ``0 <= col0 < col1 <= L``.
    """
    if window is None:
        return None
    bounds = tuple(int(v) for v in window)
    if len(bounds) != 4 or not (0 <= bounds[0] < bounds[1] <= mask_size and 0 <= bounds[2] < bounds[3] <= mask_size):
        raise ValueError(f"decode window must be (row0, row1, col0, col1) with 0 <= row0 < row1 <= {mask_size} and "
                         f"0 <= col0 < col1 <= {mask_size}, got {window}")
    return bounds


def keep_window(logits: torch.Tensor, window: tuple[int, int, int, int] | None) -> torch.Tensor:
    """``(..., L, L)`` logits with everything outside ``window`` set to :data:`OUTSIDE_WINDOW_LOGIT`
    (in place where the tensor allows it); unchanged when ``window`` is None."""
    if window is None:
        return logits
    r0, r1, c0, c1 = window
    out = logits.clone() if logits.requires_grad else logits
    out[..., :r0, :] = OUTSIDE_WINDOW_LOGIT
    out[..., r1:, :] = OUTSIDE_WINDOW_LOGIT
    out[..., :, :c0] = OUTSIDE_WINDOW_LOGIT
    out[..., :, c1:] = OUTSIDE_WINDOW_LOGIT
    return out


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``module`` with a strict key check; a :class:`WeightsLoadError` names the
    missing and unexpected keys and ``source`` (the file or bundle they came from)."""
    module_keys, file_keys = set(module.state_dict()), set(state)
    missing, unexpected = sorted(module_keys - file_keys), sorted(file_keys - module_keys)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        raise WeightsLoadError(
            f"weights in {source} do not fit the model: missing keys [{show(missing)}]; "
            f"unexpected keys [{show(unexpected)}]. Is the file for another backbone?"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsLoadError(f"weights in {source} do not fit the model: {exc}") from None


class StockPredictor:
    """A family library's own single-image predictor (``SamPredictor``, ``SAM2ImagePredictor``,
    LiteMedSAM's reference inference): ``set_image`` a ``(H, W, 3)`` uint8 slice, then ``click``
    one prompt as that library takes it (points ``(N, 2)`` x, y pixels with ``labels`` ``(N,)``; a
    box-only model takes the ``box`` ``(4,)``) or ``box``."""

    def __init__(self, predictor, box_only: bool = False):
        self.predictor, self.box_only = predictor, box_only

    def set_image(self, image) -> None:
        self.predictor.set_image(image)

    def click(self, points, labels, box):
        if self.box_only:
            return self.predictor.predict(box=box)
        return self.predictor.predict(point_coords=points, point_labels=labels, multimask_output=False)

    def box(self, box):
        return self.predictor.predict(box=box, multimask_output=False)


class Backbone(ABC):
    """A frozen SAM-family model with a uniform encode / embed-prompts / decode interface; each
    family's subclass is its one adapter (prompt kinds, box-only clicks, propagation, export, stock
    predictor), so code outside :mod:`automedsam.backbones` asks the backbone, never its family."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, device: torch.device,
                 amp_dtype: torch.dtype | None, weights_fingerprint: str = "random:seed=0", runtime: str = "torch"):
        import torch

        self.spec = spec
        #: Which weights the model holds: ``"random:seed=N"`` or ``"sha256:<hex of the file>"``.
        #: Model bundles record it so a bundle never runs on a backbone it was not trained with.
        self.weights_fingerprint = weights_fingerprint
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.amp_dtype = amp_dtype
        mean, std = _PIXEL_NORMALIZATION[spec.pixel_normalization]
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        #: CPU runtime of the exportable parts (see :mod:`automedsam.backbones.runtime`); "torch": none.
        self.runtime = runtime
        #: part -> (compiled part or None, the tensors of the module it was exported from, their
        #: versions then); see :meth:`compiled`.
        self._compiled: dict[str, tuple[CompiledPart | None, list | None, tuple]] = {}
        self._eager_depth = 0
        self._dense_pe: torch.Tensor | None = None
        #: A view's own mask decoder (a bundle's fine-tuned one, or training's copy); None: the model's.
        self._decoder: torch.nn.Module | None = None
        #: The backbone a view was made from: it compiles (and shares) the parts the view does not own.
        self._base: Backbone | None = None
        #: Training's view: its decoder runs in PyTorch (gradients flow through it).
        self._trains_decoder = False

    # ------------------------------------------------------------------------------ views
    def _view(self) -> Backbone:
        """A shallow copy sharing the model, the encoders and their compiled copies."""
        view = copy.copy(self)
        view._base = self._base or self
        view._compiled = {}
        view._eager_depth = 0
        return view

    def same_encoder(self, other: Backbone) -> bool:
        """Whether ``other`` encodes images with this backbone's image encoder (both are views of one
        backbone, or the same): embeddings made by one are the other's."""
        return (self._base or self) is (other._base or other)

    def with_decoder(self, state: dict) -> Backbone:
        """A view of this backbone whose mask decoder is its own copy holding ``state`` (a bundle's
        fine-tuned decoder); the image and prompt encoders stay shared, so the view costs one decoder.
        This backbone does not change."""
        view = self._view()
        decoder = copy.deepcopy(self.model_mask_decoder)
        load_state_strict(decoder, state, f"fine-tuned mask decoder for {self.id}")
        for p in decoder.parameters():
            p.requires_grad_(False)
        view._decoder = decoder.eval().to(self.device)
        return view

    def trainable(self, finetune_decoder: bool = False) -> Backbone:
        """A view for training: its mask decoder runs in PyTorch so gradients reach the prompt network
        through it; with ``finetune_decoder`` the decoder is the view's own copy, with gradients on,
        so this backbone (shared with every session) never changes. The image encoder stays shared
        (and compiled, where it is: it is frozen)."""
        view = self._view()
        view._trains_decoder = True
        if finetune_decoder:
            decoder = copy.deepcopy(self.mask_decoder)
            for p in decoder.parameters():
                p.requires_grad_(True)
            view._decoder = decoder
        return view

    # ------------------------------------------------------------------------------ facts
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def input_size(self) -> int:
        """S: side of the square model input in pixels."""
        return self.spec.input_size

    @property
    @abstractmethod
    def embedding_size(self) -> int:
        """E: side of the image embedding grid."""

    @property
    def mask_size(self) -> int:
        """L: side of the low-resolution mask logits and of mask prompts (4 E)."""
        return 4 * self.embedding_size

    prompt_dim: int = 256

    @property
    @abstractmethod
    def prompt_encoder(self) -> torch.nn.Module:
        """The backbone's own prompt encoder (frozen)."""

    @property
    @abstractmethod
    def model_mask_decoder(self) -> torch.nn.Module:
        """The model's own mask decoder (frozen)."""

    @property
    def mask_decoder(self) -> torch.nn.Module:
        """The mask decoder this backbone decodes with: the view's own (:meth:`with_decoder`,
        :meth:`trainable`), else the model's."""
        return self._decoder if self._decoder is not None else self.model_mask_decoder

    def autocast(self):
        """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
        import torch

        if self.device.type == "cuda" and self.amp_dtype is not None:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def slice_transform(self, height: int, width: int) -> SliceTransform:
        """The mapping between a ``(height, width)`` slice (J rows, I columns) and this backbone's
        padded ``S x S`` input, with the backbone's own resizing and per-slice normalisation."""
        return SliceTransform(height, width, self.input_size, self.spec.resize, self.spec.slice_minmax)

    # --------------------------------------------------------------------------- encoding
    def normalize(self, images) -> torch.Tensor:
        """``(B, S, S, 3)`` float in [0, 1] (numpy or tensor) -> ``(B, 3, S, S)`` normalised tensor."""
        import numpy as np
        import torch

        t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if t.ndim != 4 or t.shape[-1] != 3 or t.shape[1] != self.input_size or t.shape[2] != self.input_size:
            raise ValueError(
                f"{self.id} expects images of shape (B, {self.input_size}, {self.input_size}, 3), got {tuple(t.shape)}"
            )
        t = t.to(self.device, torch.float32).permute(0, 3, 1, 2)
        return (t - self._mean) / self._std

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> ImageFeatures:
        """Run the image encoder on normalised ``(B, 3, S, S)`` input."""

    def encode(self, images) -> ImageFeatures:
        """Encode model-input images ``(B, S, S, 3)`` in [0, 1]; returns float32 features on the
        backbone's device. No gradients (the image encoder is frozen)."""
        import torch

        # no_grad, not inference_mode: training feeds these features into autograd graphs.
        with torch.no_grad(), self.autocast():
            feats = self._encode(self.normalize(images))
        return feats.to(dtype=torch.float32)

    # ---------------------------------------------------------------------------- prompts
    def dense_pe(self) -> torch.Tensor:
        """``(1, 256, E, E)`` positional encoding of the embedding grid (fixed: it depends only on
        the frozen prompt encoder's random Fourier matrix, so it is computed once). Contiguous: a CPU
        runtime would otherwise copy the prompt encoder's permuted view (4 MB) on every decode."""
        if self._dense_pe is None:
            import torch

            with torch.no_grad():
                self._dense_pe = self.prompt_encoder.get_dense_pe().detach().contiguous()
        return self._dense_pe

    @abstractmethod
    def embed_prompts(self, points=None, labels=None, boxes=None, masks=None,
                      batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed manual prompts with the backbone's own prompt encoder.

        Args:
            points: ``(B, N, 2)`` float (x, y) in model pixels; ``labels``: ``(B, N)`` int with
                1 = foreground, 0 = background, -1 = padding.
            boxes: ``(B, 4)`` float ``(x0, y0, x1, y1)`` in model pixels.
            masks: ``(B, 1, L, L)`` mask-prompt logits.
            batch_size: B when no prompt is given at all.

        Returns:
            sparse ``(B, n, 256)`` and dense ``(B, 256, E, E)`` embeddings.
        """

    # ---------------------------------------------------------------------------- decoding
    @abstractmethod
    def decode(self, features: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
               multimask: bool = False, window: tuple[int, int, int, int] | None = None) -> DecoderOutput:
        """Decode masks for B prompt sets. ``features`` holds B images (one per prompt set) or
        one image shared by all B prompt sets. Gradients flow if enabled by the caller.

        ``window``: ``(row0, row1, col0, col1)``, half-open, in low-resolution mask pixels (the
        ``L x L`` grid; row = model y / (S / L)): only these logits are wanted (a click that can change
        a small area). They are exact; every logit outside is :data:`OUTSIDE_WINDOW_LOGIT`, whatever
        the backend computed there. A backend may compute less outside (SAM's upscaling per window).
        """

    # -------------------------------------------------- the family's ways (this adapter's)
    @property
    def box_only(self) -> bool:
        """Trained with box prompts only (LiteMedSAM): points, and its own logits as a mask prompt,
        make its masks worse, so a click edits the current mask around it and a new box starts over."""
        return self.spec.box_only

    @property
    def propagation_method(self) -> str:
        """How :mod:`automedsam.propagation` carries a mask to the next slices by default:
        ``"learned"`` (a one-shot class map) for box-only models, else ``"seeded"``; SAM 2 has
        ``"memory"`` (its video predictor)."""
        return "learned" if self.box_only else "seeded"

    #: Sparse prompt tokens one box becomes (its two corners; SAM 2 pads a box with a third).
    box_tokens = 2

    def high_res_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``(C, H, W)`` of the high-resolution maps an image's features carry besides the
        embeddings (SAM 2's ``high_res_0`` and ``high_res_1``); none for SAM."""
        return {}

    @abstractmethod
    def stock_predictor(self) -> StockPredictor:
        """The family library's own single-image predictor around this model (the bench's reference)."""

    # ------------------------------------------------------------------------- CPU runtime
    def export_spec(self, part: str) -> ExportSpec | None:
        """How to export ``part`` (``"encoder"``, ``"decoder"``) for a CPU runtime; None: PyTorch only."""
        return None

    @contextlib.contextmanager
    def eager(self):
        """PyTorch only inside the block (the exact fp32 reference, e.g. to compare against)."""
        self._eager_depth += 1
        try:
            yield self
        finally:
            self._eager_depth -= 1

    @contextlib.contextmanager
    def one_torch_thread(self):
        """PyTorch's own ops on one thread inside the block when a CPU runtime runs both the encoder
        and the decoder, so PyTorch is left with the small glue between them (prompt embedding,
        sampling a crop): its OpenMP workers spin-wait after each parallel op and take the cores the
        runtime's threads need (measured on 2 cores: a one-prompt decode 28 -> 35 ms right after one
        small torch op). A no-op where PyTorch does heavy work itself (``torch`` runtime, CUDA,
        :meth:`eager`, a part without a compiled copy)."""
        import torch

        with torch.no_grad():
            light = all(self.compiled(part) is not None for part in ("encoder", "decoder"))
        if not light:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def compiled(self, part: str) -> CompiledPart | None:
        """``part`` compiled for the CPU runtime, where it applies: a CPU device, a runtime other than
        torch, outside :meth:`eager`, not a :meth:`trainable` view's decoder, and an export that
        works. Compiled on first use (export cached on disk); compiled again if the part's weights
        change. A view compiles only the decoder it owns; the rest is its base backbone's."""
        if self.runtime == "torch" or self.device.type != "cpu" or self._eager_depth:
            return None
        if part == "decoder" and self._trains_decoder:
            return None
        if self._base is not None and not (part == "decoder" and self._decoder is not None):
            return self._base.compiled(part)  # shared with the backbone this view was made from
        compiled, tensors, versions = self._compiled.get(part, (None, None, None))
        if versions is not None and (tensors is None or _versions(tensors) == versions):
            return compiled
        spec = self.export_spec(part)
        if spec is None:
            self._compiled[part] = (None, None, ())
            return None
        try:
            compiled = self._compile(spec)
        except Exception as exc:  # an op the exporter or runtime cannot take: PyTorch still works
            log.warning("%s %s: %s cannot run it (%s: %s); using PyTorch", self.id, part, self.runtime,
                        type(exc).__name__, exc)
            compiled = None
        # Taken after the export: exporting switches the module to eval mode, and some modules
        # (TinyViT's attention) make new buffers then; taken before, every later call would see
        # "new weights" and export or compile again (once per slice when the export fails).
        tensors = [*spec.module.parameters(), *spec.module.buffers()]
        self._compiled[part] = (compiled, tensors, _versions(tensors))
        return compiled

    def _compile(self, spec: ExportSpec) -> CompiledPart:
        import torch

        from .runtime import check_agreement, compile_part

        compiled = compile_part(self.runtime, spec, self.id, self.weights_fingerprint)
        with torch.no_grad():
            expected = spec.module(*spec.example_inputs)
        expected = [t.numpy() for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
        got = compiled(*[x.numpy() for x in spec.example_inputs])
        worst = check_agreement(expected, got, _AGREEMENT_TOLERANCE.get(compiled.precision, 1e-3))
        log.info("%s %s runs on %s (%d threads; largest relative difference to PyTorch %.2g)", self.id,
                 spec.part, compiled.id, compiled.threads, worst)
        return compiled

    def runtime_id(self, part: str) -> str:
        """What computes ``part`` outside training: ``"torch"`` or e.g. ``"openvino 2026.4.1 bf16"``."""
        import torch

        with torch.no_grad():
            compiled = self.compiled(part)
        return compiled.id if compiled is not None else "torch"

    def _as_tensor(self, value, dtype):
        import numpy as np
        import torch

        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return value.to(self.device, dtype)
        return torch.as_tensor(np.asarray(value), dtype=dtype, device=self.device)


def _versions(tensors: list) -> tuple:
    """Identity and in-place version counter of each of a module's parameters and buffers (listed
    once, at compile time: walking the module on every call cost 2 ms a click): they change whenever
    weights are loaded (``load_state_dict`` copies in place), trained or moved, so a compiled copy is
    never used with other weights."""
    return tuple((t.data_ptr(), t._version) for t in tensors)
