"""Automatic segmentation with a prompt network: the learned prompts of a class on a slice, and the
masks they decode to, gated per slice by the network's objectness. Used by the engine (segment,
semi-automatic refine, seeded propagation) and by training's validation.

Masks are ``(J, I)`` bool on slice k of the volume of an :class:`~automedsam.embeddings.EmbeddingStore`;
logits are the decoder's low-resolution ``(L, L)`` output in model space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .classes import ClassCatalog, ClassInfo

if TYPE_CHECKING:
    import torch

    from .backbones import ImageFeatures
    from .embeddings import EmbeddingStore
    from .prompt_networks import GeneratedPrompts


class ResultMemo:
    """Automatic results per (class, slice): objectness and low-resolution logits (float16, CPU),
    least recently used dropped first beyond ``max_bytes`` (0 keeps only the latest request's).
    They depend only on the slice and the weights, so re-segmenting (other classes, another
    cleanup) skips the prompt network and the decoder as well as the encoder."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], tuple[float, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._items

    def get(self, key: tuple[str, int]) -> tuple[float, torch.Tensor]:
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: tuple[str, int], objectness: float, logits: torch.Tensor) -> None:
        self._items[key] = (objectness, logits)
        self._bytes += logits.numel() * logits.element_size()

    def trim(self, keep: int) -> None:
        """Drop the least recently used results beyond ``max_bytes``, keeping at least ``keep``."""
        while self._bytes > self.max_bytes and len(self._items) > keep:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class LearnedPrompts:
    """A prompt network on the store's backbone: learned prompts per (class, slice) (the last
    ``prompt_cache_size`` kept, so repeated refines on a slice cost only the decoder) and the
    automatic results they decode to (memoised in ``result_cache_bytes``)."""

    def __init__(self, store: EmbeddingStore, prompt_cache_size: int = 64, result_cache_bytes: int = 256 << 20):
        self.store = store
        self.network = None
        self.class_catalog = ClassCatalog([])
        self.prompt_cache_size = prompt_cache_size
        self._prompts: OrderedDict[tuple[str, int], GeneratedPrompts] = OrderedDict()
        self.memo = ResultMemo(result_cache_bytes)

    def use(self, network, classes: Sequence[ClassInfo]) -> None:
        """Use ``network``, whose class indices follow ``classes``; forgets what the old one made."""
        self.network = network
        self.class_catalog = ClassCatalog(list(classes))
        self.clear()

    def clear(self) -> None:
        """Forget cached prompts and results (a new volume, or changed weights)."""
        self._prompts.clear()
        self.memo.clear()

    def _generate(self, names: Sequence[str], feats: ImageFeatures) -> GeneratedPrompts:
        import torch

        backbone = self.store.backbone
        known = self.class_catalog.names()
        idx = torch.tensor([known.index(n) for n in names], device=backbone.device)
        emb = feats.embeddings.expand(len(names), -1, -1, -1)
        return self.network(emb, backbone.dense_pe(), idx)

    def prompts(self, name: str, k: int, feats: ImageFeatures) -> GeneratedPrompts:
        """The learned prompts of (class, slice k); they do not depend on clicks."""
        key = (name, k)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        generated = self._generate([name], feats)
        self._prompts[key] = generated
        if len(self._prompts) > self.prompt_cache_size:
            self._prompts.popitem(last=False)
        return generated

    def automatic_logits(self, k: int, names: Sequence[str]):
        """Objectness ``(C,)`` and low-resolution mask logits ``(C, L, L)`` (CPU) on slice k."""
        import torch

        from .prompt_networks import decoder_prompts

        todo = [n for n in names if (n, k) not in self.memo]
        if todo:
            backbone = self.store.backbone
            feats = self.store.features(k)
            with backbone.one_torch_thread():  # the prompt network is small beside the compiled decoder
                generated = self._generate(todo, feats)
                sparse, dense = decoder_prompts(backbone, generated)
                out = backbone.decode(feats, sparse, dense)
            for row, n in enumerate(todo):
                logits = out.mask_logits[row, 0].to("cpu", torch.float16)
                self.memo.put((n, k), float(generated.object_logit[row]), logits)
            self.memo.trim(keep=len(names))
        results = [self.memo.get((n, k)) for n in names]
        return torch.tensor([r[0] for r in results]), torch.stack([r[1] for r in results])

    def slice_masks(self, k: int, names: Sequence[str], objectness_threshold: float,
                    mask_threshold: float) -> dict[str, np.ndarray]:
        """The ``(J, I)`` masks of the classes present on slice k (objectness above the threshold and
        a non-empty mask); absent classes are left out."""
        import torch

        with torch.inference_mode():
            objectness, logits = self.automatic_logits(k, names)
            keep = (objectness > objectness_threshold).nonzero().flatten().tolist()
            if not keep:
                return {}
            slice_logits = self.store.transform.logits_to_slice(logits[keep].float())
        masks = {}
        for row, c in enumerate(keep):
            mask = (slice_logits[row] > mask_threshold).numpy()
            if mask.any():
                masks[names[c]] = mask
        return masks

    def shown_logits(self, name: str, k: int, shown: np.ndarray, mask_threshold: float):
        """The memoised automatic logits of (class, slice k), ``(1, 1, L, L)`` on the backbone's
        device, if ``shown`` (the slice's current ``(J, I)`` mask) is still exactly their result;
        else None. A first semi-automatic refine starts from them, as SAM's loop starts from its
        last mask."""
        import torch

        if (name, k) not in self.memo:
            return None
        logits = self.memo.get((name, k))[1].float()
        if not np.array_equal((self.store.transform.logits_to_slice(logits) > mask_threshold).numpy(), shown):
            return None
        return logits.to(self.store.backbone.device, torch.float32)[None, None]
