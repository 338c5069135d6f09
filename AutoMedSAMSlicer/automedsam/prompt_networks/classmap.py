"""The class-map prompt network: a dense per-pixel class head on the frozen image embedding whose
map becomes SAM prompts (a box and a mask prompt) for each class.

Why it exists next to Sam2Rad's PPN and AutoMedSAM's diffusion encoder: taught from a handful of
slices on a CPU, both papers' networks learn too slowly (their training signal reaches the prompts
only through the mask decoder, and their attention or encoder stacks run once per class). A few
convolutions trained with per-pixel cross-entropy on the embedding grid see thousands of labelled
positions per slice and need no decoder in the loop, so an epoch over ten slices takes about a
second. Measured on the shared CT (LiteMedSAM, taught from every third slice, the other slices held
out), it reaches the box-prompted accuracy of the backbone; see the README's training section.

Prompts for class ``c`` on one slice (shapes as in :mod:`automedsam.prompt_networks.base`):

- ``mask_prompt``: the log-odds of ``c`` against every other class and the background, bilinearly
  upsampled from ``E x E`` to ``L x L``;
- ``box``: the extreme model pixels of the largest connected region where those log-odds are > 0
  (``min_component_fraction`` lets smaller regions count too; specks far from the organ would
  stretch the box); the same convention as a box drawn by hand (see
  :meth:`automedsam.preprocess.SliceTransform.box_to_model`);
- ``object_logit``: the largest log-odds on the slice (> 0: some pixel is most likely ``c``);
- ``sparse``: no learned tokens (``(B, 0, 256)``); manual points are appended in semi mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..errors import InvalidInputError
from .base import GeneratedPrompts


@dataclass(frozen=True)
class ClassMapConfig:
    """Hyper-parameters of the class-map prompt network (recorded in model bundles).

    Attributes:
        num_classes: C classes (the head predicts C + 1 channels, channel 0 = background).
        embedding_size: E, side of the backbone's image embedding.
        input_size: S, the backbone's model input side (boxes are normalised by it).
        dim: embedding channels (256 for every SAM-family backbone).
        hidden: channels of the two 3 x 3 convolutions.
        min_component_fraction: regions smaller than this fraction of the class's largest region
            on a slice do not stretch its box (1.0: the largest region alone, which measured best:
            mean held-out DSC 0.937 against 0.929 with 0.1 on the shared CT).
        use_mask_prompt: give the decoder the class map as a mask prompt besides the box.
    """

    num_classes: int
    embedding_size: int
    input_size: int
    dim: int = 256
    hidden: int = 64
    min_component_fraction: float = 1.0
    use_mask_prompt: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.embedding_size < 1 or self.input_size < 1 or self.hidden < 8:
            raise InvalidInputError(f"invalid class-map config {self}: need >= 1 class and hidden >= 8")
        if not 0.0 <= self.min_component_fraction <= 1.0:
            raise InvalidInputError(f"min_component_fraction must be in [0, 1], got {self.min_component_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


class ClassMapPromptNetwork(nn.Module):
    """``forward(embeddings, image_pe, class_idx)`` -> :class:`GeneratedPrompts` (box + mask prompt)."""

    kind = "classmap"

    def __init__(self, config: ClassMapConfig):
        super().__init__()
        self.config = c = config
        groups = 8 if c.hidden % 8 == 0 else 1
        self.head = nn.Sequential(
            nn.Conv2d(c.dim, c.hidden, 3, padding=1), nn.GroupNorm(groups, c.hidden), nn.GELU(),
            nn.Conv2d(c.hidden, c.hidden, 3, padding=1), nn.GroupNorm(groups, c.hidden), nn.GELU(),
            nn.Conv2d(c.hidden, c.num_classes + 1, 1),
        )

    @property
    def mask_size(self) -> int:
        """L: side of the mask prompt (4 E, as SAM's prompt encoder expects)."""
        return 4 * self.config.embedding_size

    def class_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, 256, E, E)`` embeddings -> ``(B, C + 1, E, E)`` logits (channel 0: background).

        An embedding batch expanded from one image (stride 0, as the engine passes one slice to
        every class) runs the head once."""
        if embeddings.shape[0] > 1 and embeddings.stride(0) == 0:
            return self.head(embeddings[:1]).expand(embeddings.shape[0], -1, -1, -1)
        return self.head(embeddings)

    def upsampled_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class logits bilinearly upsampled to the ``L x L`` mask grid (what training scores)."""
        logits = self.class_logits(embeddings)
        return F.interpolate(logits, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)

    def forward(self, embeddings: torch.Tensor, image_pe: torch.Tensor | None,
                class_idx: torch.Tensor) -> GeneratedPrompts:
        """Args:
            embeddings: ``(B, 256, E, E)`` image embeddings (one per prompt set).
            image_pe: unused (the head is convolutional); accepted for a uniform interface.
            class_idx: ``(B,)`` int64 class indices (0-based, as in the bundle).
        """
        logits = self.upsampled_logits(embeddings)
        b = logits.shape[0]
        rows = torch.arange(b, device=logits.device)
        own = logits[rows, class_idx + 1]  # (B, L, L)
        others = logits.clone()
        others[rows, class_idx + 1] = float("-inf")
        log_odds = own - torch.logsumexp(others, dim=1)
        box = self._boxes(log_odds.detach())
        return GeneratedPrompts(
            sparse=embeddings.new_zeros((b, 0, self.config.dim)),
            object_logit=log_odds.flatten(1).amax(dim=1),
            box=box.to(embeddings.dtype),
            mask_prompt=log_odds[:, None] if self.config.use_mask_prompt else None,
        )

    def _boxes(self, log_odds: torch.Tensor) -> torch.Tensor:
        """``(B, L, L)`` log-odds -> ``(B, 4)`` normalised boxes of the kept regions (zeros where empty)."""
        from scipy import ndimage

        low, size = self.mask_size, self.config.input_size
        scale = size / low  # model pixels per mask pixel
        out = np.zeros((log_odds.shape[0], 4), np.float32)
        for n, fg in enumerate((log_odds > 0).cpu().numpy()):
            if not fg.any():
                continue
            labels, count = ndimage.label(fg)
            if count > 1:
                sizes = np.bincount(labels.reshape(-1))[1:]
                keep = np.flatnonzero(sizes >= self.config.min_component_fraction * sizes.max()) + 1
                fg = np.isin(labels, keep)
            ys, xs = np.nonzero(fg)
            # Extreme model pixels covered by the extreme mask pixels, normalised by S.
            out[n] = [xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale - 1, (ys.max() + 1) * scale - 1]
        return torch.from_numpy(out / size).to(log_odds.device)


def classmap_loss(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel cross-entropy of upsampled class logits ``(B, C + 1, L, L)`` against class
    indices ``(B, L, L)`` (0 = background), plus a soft Dice over the foreground classes so small
    organs weigh as much as the liver."""
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter[present] / denom[present].clamp_min(1e-6)).mean() if present.any() else ce * 0.0
    return {"total": ce + dice, "ce": ce.detach(), "dice": dice.detach()}
