"""The prompt predictor network (PPN) of Sam2Rad (sec. 3.1.1, fig. 3).

Learnable class queries (``num_tokens`` per class) cross-attend to the frozen image embedding, to
which the backbone's positional encoding is added, in a light two-way attention module (queries
attend to image tokens and image tokens attend back). Of the updated queries, the first two predict
the box corners (normalised x0, y0 and x1, y1), the remaining ``num_tokens - 2`` are 256-d sparse
prompt tokens; the updated image tokens are upsampled 4x into a mask prompt (L x L, 256 x 256 for
a 1024 input); an objectness head on the pooled queries says whether the class is in the slice
(Sam2Rad's sec. 3.2: outputs with objectness < 0 are disregarded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InvalidInputError
from .base import GeneratedPrompts


@dataclass(frozen=True)
class PPNConfig:
    """Hyper-parameters of the PPN (recorded in model bundles).

    Attributes:
        num_classes: number of class queries.
        embedding_size: E, side of the backbone's image embedding.
        num_tokens: N learnable tokens per class (>= 3: 2 for the box, N - 2 sparse prompts).
        dim: token width (256, the SAM prompt width).
        depth, num_heads, mlp_dim: the two-way attention module.
    """

    num_classes: int
    embedding_size: int
    num_tokens: int = 8
    dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 1024

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.num_tokens < 3 or self.embedding_size < 1:
            raise InvalidInputError(f"invalid PPN config {self}: need num_classes >= 1 and num_tokens >= 3")

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(dim_in: int, hidden: int, dim_out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for n in range(layers):
        mods.append(nn.Linear(dim_in if n == 0 else hidden, hidden if n < layers - 1 else dim_out))
        if n < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class PromptPredictorNetwork(nn.Module):
    """Sam2Rad's PPN. ``forward(embeddings, image_pe, class_idx)`` -> :class:`GeneratedPrompts`."""

    kind = "ppn"

    def __init__(self, config: PPNConfig):
        super().__init__()
        from segment_anything.modeling import TwoWayTransformer
        from segment_anything.modeling.common import LayerNorm2d

        self.config = config
        c = config
        self.class_queries = nn.Parameter(torch.randn(c.num_classes, c.num_tokens, c.dim) * 0.02)
        # The same two-way attention block SAM's decoder uses, small and trained from scratch.
        self.attention = TwoWayTransformer(depth=c.depth, embedding_dim=c.dim, num_heads=c.num_heads,
                                           mlp_dim=c.mlp_dim)
        self.box_head = _mlp(c.dim, c.dim, 2, 3)  # one corner (x, y) per box token
        self.mask_head = nn.Sequential(
            nn.ConvTranspose2d(c.dim, c.dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(c.dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c.dim // 4, c.dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
            nn.Conv2d(c.dim // 8, 1, kernel_size=1),
        )
        self.object_head = _mlp(c.dim, c.dim, 1, 2)
        # Start from a centred box (corners at ~0.3 and ~0.7 of the input) so that early training
        # feeds the decoder a sensible prompt instead of a degenerate one.
        with torch.no_grad():
            self.box_head[-1].weight.mul_(0.01)
            self.box_head[-1].bias.zero_()
        self.register_buffer("corner_offset", torch.tensor([[-0.85, -0.85], [0.85, 0.85]]), persistent=False)

    def forward(self, embeddings: torch.Tensor, image_pe: torch.Tensor, class_idx: torch.Tensor) -> GeneratedPrompts:
        """Args:
            embeddings: ``(B, 256, E, E)`` image embeddings (one per prompt set; expand a shared one).
            image_pe: ``(1, 256, E, E)`` the backbone's positional encoding of the embedding grid.
            class_idx: ``(B,)`` int64 class indices.
        """
        b = embeddings.shape[0]
        queries = self.class_queries[class_idx]  # (B, N, C)
        pe = image_pe.to(embeddings.dtype).expand(b, -1, -1, -1)
        tokens, image_tokens = self.attention(embeddings, pe, queries)
        corners = torch.sigmoid(self.box_head(tokens[:, :2]) + self.corner_offset)  # (B, 2, 2)
        x0y0 = torch.minimum(corners[:, 0], corners[:, 1])
        x1y1 = torch.maximum(corners[:, 0], corners[:, 1])
        box = torch.cat([x0y0, x1y1], dim=1)
        e = embeddings.shape[-1]
        grid = image_tokens.transpose(1, 2).reshape(b, -1, e, e)
        mask_prompt = self.mask_head(grid)
        object_logit = self.object_head(tokens.mean(dim=1)).squeeze(-1)
        return GeneratedPrompts(sparse=tokens[:, 2:], object_logit=object_logit, box=box, mask_prompt=mask_prompt)
