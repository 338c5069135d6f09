"""Learned prompt generators: Sam2Rad's PPN, AutoMedSAM's diffusion class prompt encoder and the
class-map prompt network (the default: fastest to teach from a few slices, see ``classmap.py``).

``build_generator(kind, config_dict)`` and ``default_config(kind, backbone, num_classes)`` create
them; torch is imported when this package is imported (it is only imported lazily by callers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from .base import GeneratedPrompts, decoder_prompts

if TYPE_CHECKING:
    from torch import nn

    from ..backbones import Backbone

GENERATOR_KINDS = ("classmap", "ppn", "diffusion")
#: The prompt generator used wherever a default is picked (demo, train, the panel's Teach, bench).
DEFAULT_GENERATOR = "classmap"

__all__ = ["DEFAULT_GENERATOR", "GENERATOR_KINDS", "GeneratedPrompts", "build_generator", "decoder_prompts",
           "default_config"]


def default_config(kind: str, backbone: Backbone, num_classes: int) -> dict:
    """A generator config sized for ``backbone`` (embedding grid; box tokens of its prompt encoder)."""
    if kind == "classmap":
        return {"num_classes": num_classes, "embedding_size": backbone.embedding_size,
                "input_size": backbone.input_size}
    if kind == "ppn":
        return {"num_classes": num_classes, "embedding_size": backbone.embedding_size}
    if kind == "diffusion":
        box_tokens = 3 if backbone.spec.family == "sam2" else 2  # SAM 2 pads a box with one token
        return {"num_classes": num_classes, "embedding_size": backbone.embedding_size,
                "num_sparse_tokens": box_tokens}
    raise InvalidInputError(f"unknown generator type {kind!r}; choose one of {', '.join(GENERATOR_KINDS)}")


def build_generator(kind: str, config: dict) -> nn.Module:
    """Instantiate a generator from its type and config dict (as stored in a bundle manifest)."""
    if kind == "classmap":
        from .classmap import ClassMapConfig, ClassMapPromptNetwork

        return ClassMapPromptNetwork(ClassMapConfig(**config))
    if kind == "ppn":
        from .ppn import PPNConfig, PromptPredictorNetwork

        return PromptPredictorNetwork(PPNConfig(**config))
    if kind == "diffusion":
        from .diffusion import DiffusionClassPromptEncoder, DiffusionConfig

        return DiffusionClassPromptEncoder(DiffusionConfig(**config))
    raise InvalidInputError(f"unknown generator type {kind!r}; choose one of {', '.join(GENERATOR_KINDS)}")
