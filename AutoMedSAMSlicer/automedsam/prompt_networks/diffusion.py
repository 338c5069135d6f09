"""The diffusion-based class prompt encoder of AutoMedSAM (sec. 3.2, eq. 2-12).

Forward conditional diffusion (eq. 2-5): the one-hot class ``c`` is projected by a linear layer to an
E x E map and added, with Gaussian noise of standard deviation ``sigma_t = 1 / (t + 1)``, to the image
embedding: ``F_t = F_I + eps_t + c_expand``.

Two-branch reverse pass: one convolutional encoder (eq. 6, conv + ReLU; GroupNorm added for stable
small-batch training) with two downsampling stages; the class is coded again to the bottleneck size
and concatenated (``F_att``). The dense branch computes element-wise attention (eq. 7-8) and decodes
with skip connections (eq. 9) to the dense prompt embedding ``(256, E, E)``. The sparse branch pools
``F_att`` globally, computes channel attention (eq. 10-12), decodes the same way with its own
weights, and is "transformed in size" to ``k`` sparse tokens by ``k`` learned spatial attention
maps (softmax over positions) — ``k`` equals the number of tokens the backbone's own prompt
encoder gives a box (2 for SAM, 3 for SAM 2), so the MSE teacher of training has the same shape.
An objectness head on the pooled bottleneck (our addition) lets absent classes produce no mask.

Noise at inference: none (``sigma = 0``, the t -> infinity limit of eq. 4). The paper's reverse
process is a single pass, not iterative denoising, so the noise acts as a training-time
regulariser; sampling it at inference would make a clinician's masks change from run to run.
``inference_t`` in the config re-enables a fixed-seed noise level for experiments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..errors import InvalidInputError
from .base import GeneratedPrompts


@dataclass(frozen=True)
class DiffusionConfig:
    """Hyper-parameters of the diffusion class prompt encoder (recorded in model bundles).

    Attributes:
        num_classes: number of classes (one-hot size).
        embedding_size: E (divisible by 4).
        num_sparse_tokens: k sparse tokens (2 for SAM backbones, 3 for SAM 2).
        dim: prompt width (256).
        hidden: channels of the two encoder stages.
        max_t: training draws t uniformly from 0..max_t (sigma_t = 1/(t+1)).
        inference_t: None (no noise at inference, the default) or a fixed t.
    """

    num_classes: int
    embedding_size: int
    num_sparse_tokens: int = 2
    dim: int = 256
    hidden: tuple[int, int] = (128, 128)
    max_t: int = 999
    inference_t: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.embedding_size % 4 or self.num_sparse_tokens < 1:
            raise InvalidInputError(f"invalid diffusion config {self}: embedding_size must be divisible by 4")
        object.__setattr__(self, "hidden", tuple(self.hidden))

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.ReLU())


class _Decoder(nn.Module):
    """Upsample x2, concatenate the encoder's skip feature, convolve (eq. 9); twice."""

    def __init__(self, bottleneck: int, skip2: int, skip1: int, out: int):
        super().__init__()
        self.up2 = _conv(bottleneck + skip2, skip2)
        self.up1 = _conv(skip2 + skip1, out)

    def forward(self, x: torch.Tensor, skip2: torch.Tensor, skip1: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip2.shape[-2:], mode="bilinear", align_corners=False)
        x = self.up2(torch.cat([x, skip2], 1))
        x = F.interpolate(x, size=skip1.shape[-2:], mode="bilinear", align_corners=False)
        return self.up1(torch.cat([x, skip1], 1))


class DiffusionClassPromptEncoder(nn.Module):
    """AutoMedSAM's class prompt encoder. ``forward(embeddings, image_pe, class_idx)`` ->
    :class:`GeneratedPrompts` with ``sparse`` ``(B, k, 256)`` and ``dense`` ``(B, 256, E, E)``."""

    kind = "diffusion"

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = c = config
        e, (h1, h2) = c.embedding_size, c.hidden
        self.class_proj = nn.Linear(c.num_classes, e * e)  # eq. 2
        self.class_code = nn.Linear(c.num_classes, (e // 4) ** 2)  # the class coded for F_att
        self.enc1 = _conv(c.dim, h1)  # E
        self.enc2 = _conv(h1, h2, stride=2)  # E/2
        self.enc3 = _conv(h2, h2, stride=2)  # E/4
        self.dense_att = nn.Conv2d(h2 + 1, h2, 1)  # eq. 7
        self.sparse_att = nn.Linear(h2 + 1, h2)  # eq. 11
        self.dense_dec = _Decoder(h2, h2, h1, h1)
        self.sparse_dec = _Decoder(h2, h2, h1, h1)
        self.dense_out = nn.Conv2d(h1, c.dim, 1)
        self.token_maps = nn.Conv2d(h1, c.num_sparse_tokens, 1)
        self.token_proj = nn.Conv2d(h1, c.dim, 1)
        self.object_head = nn.Sequential(nn.Linear(h2 + 1, h2), nn.ReLU(), nn.Linear(h2, 1))

    def noise_sigma(self, batch: int, device, rng: torch.Generator | None = None) -> torch.Tensor:
        """``(B,)`` noise levels: random t during training, ``inference_t`` or zero otherwise (eq. 4)."""
        c = self.config
        if self.training:
            t = torch.randint(0, c.max_t + 1, (batch,), device=device, generator=rng)
        elif c.inference_t is not None:
            t = torch.full((batch,), c.inference_t, device=device)
        else:
            return torch.zeros(batch, device=device)
        return 1.0 / (t.float() + 1.0)

    def forward(self, embeddings: torch.Tensor, image_pe: torch.Tensor | None, class_idx: torch.Tensor,
                rng: torch.Generator | None = None) -> GeneratedPrompts:
        """Args:
            embeddings: ``(B, 256, E, E)`` image embeddings.
            image_pe: unused (the encoder is convolutional); accepted for a uniform interface.
            class_idx: ``(B,)`` int64 class indices.
            rng: random generator for the diffusion noise (reproducible training).
        """
        c = self.config
        b, _, e, _ = embeddings.shape
        onehot = F.one_hot(class_idx, c.num_classes).to(embeddings.dtype)
        c_expand = self.class_proj(onehot).view(b, 1, e, e)  # eq. 3
        sigma = self.noise_sigma(b, embeddings.device, rng).to(embeddings.dtype).view(b, 1, 1, 1)
        noise = torch.randn(embeddings.shape, device=embeddings.device, dtype=embeddings.dtype,
                            generator=rng) if self.training or c.inference_t is not None else 0.0
        f_t = embeddings + sigma * noise + c_expand  # eq. 5
        s1 = self.enc1(f_t)
        s2 = self.enc2(s1)
        f_enc = self.enc3(s2)
        c_p = self.class_code(onehot).view(b, 1, e // 4, e // 4)
        f_att = torch.cat([f_enc, c_p], 1)
        # Dense branch: element-wise attention (eq. 7-8), decoded with skips (eq. 9).
        dense_feat = self.dense_dec(f_enc * torch.sigmoid(self.dense_att(f_att)), s2, s1)
        dense = self.dense_out(dense_feat)
        # Sparse branch: global pooling and channel attention (eq. 10-12), then k tokens.
        pooled = f_att.mean(dim=(2, 3))
        sparse_feat = self.sparse_dec(f_enc * torch.sigmoid(self.sparse_att(pooled))[..., None, None], s2, s1)
        weights = self.token_maps(sparse_feat).flatten(2).softmax(dim=-1)  # (B, k, E*E)
        values = self.token_proj(sparse_feat).flatten(2)  # (B, 256, E*E)
        sparse = torch.einsum("bkn,bcn->bkc", weights, values)
        object_logit = self.object_head(pooled).squeeze(-1)
        return GeneratedPrompts(sparse=sparse, object_logit=object_logit, dense=dense)
