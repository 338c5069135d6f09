"""Learned prompt networks: Sam2Rad's PPN, AutoMedSAM's diffusion class prompt encoder and the
class-map prompt network (the default: fastest to teach from a few slices, see ``classmap.py``).

``build_prompt_network(kind, config_dict)`` and ``default_config(kind, backbone, num_classes)`` create
them; torch is imported when this package is imported (it is only imported lazily by callers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..contract import DEFAULT_PROMPT_NETWORK
from ..errors import InvalidInputError
from .base import GeneratedPrompts, decoder_prompts

if TYPE_CHECKING:
    from torch import nn

    from ..backbones import Backbone

PROMPT_NETWORK_KINDS = ("classmap", "ppn", "diffusion")

__all__ = ["DEFAULT_PROMPT_NETWORK", "PROMPT_NETWORK_KINDS", "GeneratedPrompts", "build_prompt_network",
           "decoder_prompts", "default_config"]


def default_config(kind: str, backbone: Backbone, num_classes: int) -> dict:
    """A prompt network config sized for ``backbone`` (embedding grid; box tokens of its prompt encoder)."""
    if kind == "classmap":
        return {"num_classes": num_classes, "embedding_size": backbone.embedding_size,
                "input_size": backbone.input_size}
    if kind == "ppn":
        return {"num_classes": num_classes, "embedding_size": backbone.embedding_size}
    if kind == "diffusion":
        return {"num_classes": num_classes, "embedding_size": backbone.embedding_size,
                "num_sparse_tokens": backbone.box_tokens}
    raise InvalidInputError(f"unknown prompt network kind {kind!r}; choose one of {', '.join(PROMPT_NETWORK_KINDS)}")


def build_prompt_network(kind: str, config: dict) -> nn.Module:
    """Instantiate a prompt network from its type and config dict (as stored in a bundle manifest)."""
    if kind == "classmap":
        from .classmap import ClassMapConfig, ClassMapPromptNetwork

        return ClassMapPromptNetwork(ClassMapConfig(**config))
    if kind == "ppn":
        from .ppn import PPNConfig, PromptPredictorNetwork

        return PromptPredictorNetwork(PPNConfig(**config))
    if kind == "diffusion":
        from .diffusion import DiffusionClassPromptEncoder, DiffusionConfig

        return DiffusionClassPromptEncoder(DiffusionConfig(**config))
    raise InvalidInputError(f"unknown prompt network kind {kind!r}; choose one of {', '.join(PROMPT_NETWORK_KINDS)}")
