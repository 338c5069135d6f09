"""Teaching one class from a single slice in seconds: the class-map prompt network fitted to one
mask (and augmented copies of its slice) on a frozen backbone. Used to propagate a mask through a
volume with backbones that have no memory and do poorly when seeded slice by slice (LiteMedSAM)."""

from __future__ import annotations

import numpy as np

from .data import AugmentConfig, augment_pair, downsample_labels, random_affine


def fit_classmap_to_slice(engine, k: int, mask: np.ndarray, *, epochs: int = 30, copies: int = 2,
                          seed: int = 0, lateral: bool = True):
    """A one-class :class:`~automedsam.prompt_networks.classmap.ClassMapPromptNetwork` taught from the
    ``(J, I)`` bool ``mask`` on slice ``k`` of ``engine``'s volume (KJI grid), in eval mode.

    The slice and ``copies`` random affine versions of it (rotation, shift, scale; flips unless
    ``lateral``) are encoded once; the network then trains ``epochs`` full-batch steps with the
    class-map loss. Nothing in ``engine`` changes.
    """
    import torch

    from ..prompt_networks import build_prompt_network, default_config
    from ..prompt_networks.classmap import classmap_loss

    backbone = engine.backbone
    rng = np.random.default_rng(seed)
    image = engine.model_input(k)
    labels = engine.transform.mask_to_model(np.asarray(mask, bool)).astype(np.uint8)
    images, targets = [], []
    augment = AugmentConfig(copies=copies)
    for copy in range(copies + 1):
        img, lab = (image, labels) if copy == 0 else augment_pair(image, labels,
                                                                 random_affine(rng, augment, not lateral))
        images.append(img)
        targets.append(downsample_labels(lab, backbone.mask_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_prompt_network("classmap", default_config("classmap", backbone, 1)).to(backbone.device)
    embeddings = torch.cat([engine.features(k).embeddings,
                            backbone.encode(np.stack(images[1:])).embeddings]) if copies else \
        engine.features(k).embeddings
    target = torch.from_numpy(np.stack(targets).astype(np.int64)).to(backbone.device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.01)
    network.train()
    with torch.enable_grad():
        for _ in range(epochs):
            loss = classmap_loss(network.upsampled_logits(embeddings), target)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return network.eval()
