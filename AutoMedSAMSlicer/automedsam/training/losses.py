"""Training losses of the two recipes.

Shapes: masks are ``(B, L, L)`` on the decoder's low-resolution grid over the padded model input;
logits unless a name says ``prob``; boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1].

- Sam2Rad (eq. 1-2): focal loss (gamma 3, alpha 0.7, alpha weighting the negatives as eq. 2 writes
  it) on the mask prompt and on the final mask, L1 + generalised IoU on the box, BCE on objectness;
  weighted 10 / 1 / 1.
- AutoMedSAM (eq. 13-17): MSE of the sparse and dense embeddings against the backbone's own prompt
  encoder fed the ground-truth box, cross-entropy, Dice and the shape-distance loss on the final mask,
  combined with learnable uncertainty weights ``sum_j L_j / (2 lambda_j^2) + log(1 + lambda_j^2)``.
  Our reading of the shape distance (eq. 16): the mean, over the predicted foreground probability,
  of the distance to the reference mask (0 inside it; normalised by the grid size), which is >= 0 as
  the uncertainty weighting needs. An objectness BCE term (our addition) joins the weighted sum.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 3.0, alpha: float = 0.7) -> torch.Tensor:
    """Sam2Rad eq. 2, averaged over pixels."""
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    loss = -target * (1 - p) ** gamma * log_p - alpha * (1 - target) * p ** gamma * log_not_p
    return loss.mean()


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """``(B, L, L)`` binary -> normalised boxes ``(B, 4)`` spanning the extreme pixel centres, in the
    same units as model pixels / S (pixel centre of index x is (x + 0.5) / L)."""
    b, low, _ = masks.shape
    out = torch.zeros(b, 4, device=masks.device)
    for n in range(b):
        ys, xs = torch.nonzero(masks[n] > 0, as_tuple=True)
        if len(xs):
            out[n] = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
    return (out + 0.5) / low


def box_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + generalised IoU (torchvision's implementation)."""
    from torchvision.ops import generalized_box_iou_loss

    return F.l1_loss(pred, target) + generalized_box_iou_loss(pred, target, reduction="mean")


def ppn_loss(gen, final_logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
             weights: tuple[float, float, float] = (10.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Sam2Rad's total loss. Mask and box terms use only items whose class is present."""
    obj = F.binary_cross_entropy_with_logits(gen.object_logit, present.float())
    zero = final_logits.sum() * 0.0
    if present.any():
        pos = present.bool()
        mask = focal_loss(gen.mask_prompt[pos, 0], target[pos]) + focal_loss(final_logits[pos], target[pos])
        box = box_loss(gen.box[pos], boxes_from_masks(target[pos]))
    else:
        mask = box = zero
    total = weights[0] * mask + weights[1] * box + weights[2] * obj
    return {"total": total, "mask": mask.detach(), "box": box.detach(), "objectness": obj.detach()}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """AutoMedSAM eq. 14 over the batch."""
    p = torch.sigmoid(logits)
    return 1 - 2 * (p * target).sum() / ((p * p).sum() + (target * target).sum() + eps)


def outside_distance(target: torch.Tensor) -> torch.Tensor:
    """Per-pixel distance to the reference mask (0 inside), divided by the grid size L."""
    from scipy import ndimage

    out = np.zeros(target.shape, np.float32)
    t = target.detach().cpu().numpy() > 0
    for n in range(t.shape[0]):
        if t[n].any():
            out[n] = ndimage.distance_transform_edt(~t[n]) / t.shape[-1]
    return torch.from_numpy(out).to(target.device)


def shape_distance_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean distance of the predicted foreground (probability-weighted) to the reference mask."""
    p = torch.sigmoid(logits)
    return (outside_distance(target) * p).sum() / (p.sum() + eps)


class UncertaintyWeights(nn.Module):
    """AutoMedSAM eq. 17 with one learnable lambda per loss term (initialised to 1)."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.lambdas = nn.Parameter(torch.ones(len(names)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        lam2 = self.lambdas ** 2
        return sum(losses[n] / (2 * lam2[i]) + torch.log1p(lam2[i]) for i, n in enumerate(self.names))


DIFFUSION_TERMS = ["mse_sparse", "mse_dense", "ce", "dice", "shape", "objectness"]


def diffusion_loss(gen, final_logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
                   teacher_sparse: torch.Tensor, teacher_dense: torch.Tensor,
                   weighting: UncertaintyWeights) -> dict[str, torch.Tensor]:
    """AutoMedSAM's joint loss; embedding and mask terms use only items whose class is present."""
    terms = {"objectness": F.binary_cross_entropy_with_logits(gen.object_logit, present.float())}
    pos = present.bool()
    if pos.any():
        terms["mse_sparse"] = F.mse_loss(gen.sparse[pos], teacher_sparse[pos])
        terms["mse_dense"] = F.mse_loss(gen.dense[pos], teacher_dense[pos])
        terms["ce"] = F.binary_cross_entropy_with_logits(final_logits[pos], target[pos])
        terms["dice"] = soft_dice_loss(final_logits[pos], target[pos])
        terms["shape"] = shape_distance_loss(final_logits[pos], target[pos])
    else:
        zero = final_logits.sum() * 0.0
        for name in DIFFUSION_TERMS[:-1]:
            terms[name] = zero
    total = weighting(terms)
    return {"total": total} | {n: v.detach() for n, v in terms.items()}
