"""What every learned prompt network returns, and how it becomes mask-decoder input.

Shapes (B = prompt sets, e.g. classes x slices; E = embedding side; L = 4 E mask-prompt side):

- ``sparse``: ``(B, n, 256)`` learned sparse tokens.
- ``dense``: ``(B, 256, E, E)`` learned dense embedding, or None when the dense prompt comes from a
  predicted mask prompt through the backbone's own prompt encoder (PPN).
- ``box``: ``(B, 4)`` predicted box, normalised ``(x0, y0, x1, y1)`` in [0, 1] of the padded model
  input (multiply by S for model pixels), or None.
- ``mask_prompt``: ``(B, 1, L, L)`` mask-prompt logits over the padded model input, or None.
- ``object_logit``: ``(B,)`` > 0 means the class is present in the slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..backbones import Backbone


@dataclass
class GeneratedPrompts:
    """Output of a prompt network for B (image, class) pairs; see the module docstring."""

    sparse: torch.Tensor
    object_logit: torch.Tensor
    dense: torch.Tensor | None = None
    box: torch.Tensor | None = None
    mask_prompt: torch.Tensor | None = None


def decoder_prompts(backbone: Backbone, generated: GeneratedPrompts | None, points=None, labels=None, box=None,
                    batch_size: int = 1, masks=None):
    """Combine learned and manual prompts into the decoder's sparse and dense embeddings.

    Modes:
        - ``generated`` None: manual only (plain SAM): the backbone's prompt encoder embeds the
          points ``(B, N, 2)`` with ``labels`` ``(B, N)`` and/or ``box`` ``(B, 4)`` (model pixels).
        - PPN or class-map output (has ``box``/``mask_prompt``): the predicted box (or the user's box, which
          overrides it) and the predicted mask prompt go through the backbone's prompt encoder, and
          the learned tokens are appended (Sam2Rad's semi-autonomous mode appends manual points).
        - Diffusion output (has ``dense``): its sparse tokens, followed by any manual prompt tokens;
          its dense embedding replaces the prompt encoder's.

    ``masks`` ``(B, 1, L, L)``: mask-prompt logits that replace the generated one (the previous
    low-resolution logits in an interactive loop); not used with a learned dense embedding.

    Returns:
        ``(sparse (B, n, 256), dense (B, 256, E, E))``.
    """
    import torch

    if generated is None:
        return backbone.embed_prompts(points, labels, box, masks, batch_size=batch_size)
    if generated.dense is None:  # PPN / class map: box + mask prompt through the backbone's prompt encoder
        size = backbone.input_size
        boxes = box if box is not None else generated.box * size
        sparse, dense = backbone.embed_prompts(points, labels, boxes,
                                               masks if masks is not None else generated.mask_prompt)
        return torch.cat([sparse, generated.sparse.to(sparse.dtype)], dim=1), dense
    sparse = generated.sparse
    if points is not None or box is not None:
        manual, _ = backbone.embed_prompts(points, labels, box, None)
        sparse = torch.cat([sparse, manual.to(sparse.dtype)], dim=1)
    return sparse, generated.dense
