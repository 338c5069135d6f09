"""SAM and MedSAM backbones through ``segment_anything`` (imported lazily)."""

from __future__ import annotations

from functools import partial

from .base import Backbone, DecoderOutput, ImageFeatures
from .runtime import ExportSpec

#: Test-only "tiny-sam": the library's own classes with small widths/depths. 256-px input with
#: 8-px patches gives a 32x32 embedding and 128x128 mask logits (fast on a CPU).
TINY_SAM = {"img_size": 256, "patch_size": 8, "embed_dim": 96, "depth": 2, "num_heads": 3,
            "global_attn_indexes": (1,), "window_size": 8, "decoder_mlp_dim": 512}


def build_sam_model(arch: str):
    """Build a randomly initialised ``segment_anything.modeling.Sam`` for ``arch`` (vit_b, vit_l,
    vit_h or tiny). Weights are loaded separately (safely)."""
    import torch
    from segment_anything import sam_model_registry
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if arch != "tiny":
        return sam_model_registry[arch](checkpoint=None)
    t = TINY_SAM
    grid = t["img_size"] // t["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=t["img_size"], patch_size=t["patch_size"], embed_dim=t["embed_dim"], depth=t["depth"],
            num_heads=t["num_heads"], mlp_ratio=4.0, out_chans=256, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=t["window_size"], global_attn_indexes=t["global_attn_indexes"],
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(t["img_size"], t["img_size"]), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=t["decoder_mlp_dim"], num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


class SamBackbone(Backbone):
    """``segment_anything`` Sam (SAM ViT-B/L/H, MedSAM ViT-B, tiny-sam)."""

    @property
    def embedding_size(self) -> int:
        return int(self.model.prompt_encoder.image_embedding_size[0])

    @property
    def prompt_encoder(self):
        return self.model.prompt_encoder

    @property
    def mask_decoder(self):
        return self.model.mask_decoder

    def export_spec(self, part: str) -> ExportSpec | None:
        """The image encoder at batch 1 (``(1, 3, S, S)`` -> ``(1, 256, E, E)``; its attention blocks
        reshape with the batch size baked in), and the mask decoder's :class:`MaskDecoderGraph` with
        the number of prompt sets and of sparse tokens free."""
        import torch

        s, e = self.input_size, self.embedding_size
        if part == "encoder":
            return ExportSpec("encoder", self.model.image_encoder, (torch.randn(1, 3, s, s),), ("image",),
                              ("embeddings",), {})
        if part == "decoder":
            generator = torch.Generator().manual_seed(0)
            inputs = (torch.randn(1, 256, e, e, generator=generator), self.dense_pe().cpu(),
                      torch.randn(2, 3, 256, generator=generator), torch.randn(2, 256, e, e, generator=generator))
            return ExportSpec("decoder", mask_decoder_graph(self.mask_decoder), inputs,
                              ("image_embeddings", "image_pe", "sparse", "dense"), ("mask_logits", "iou"),
                              {"sparse": {0: "prompt_sets", 1: "tokens"}, "dense": {0: "prompt_sets"},
                               "mask_logits": {0: "prompt_sets"}, "iou": {0: "prompt_sets"}})
        return None

    def _encode(self, x) -> ImageFeatures:
        import numpy as np
        import torch

        compiled = self.compiled("encoder")
        if compiled is None:
            return ImageFeatures(self.model.image_encoder(x))
        images = x.numpy()
        return ImageFeatures(torch.from_numpy(np.concatenate([compiled(images[b:b + 1])[0]
                                                              for b in range(len(images))])))

    def embed_prompts(self, points=None, labels=None, boxes=None, masks=None, batch_size: int = 1):
        import torch

        points = self._as_tensor(points, torch.float32)
        labels = self._as_tensor(labels, torch.int64)
        boxes = self._as_tensor(boxes, torch.float32)
        masks = self._as_tensor(masks, torch.float32)
        if points is not None and labels is None:
            raise ValueError("point prompts need labels (1 foreground, 0 background)")
        if points is None and boxes is None and masks is None:
            pe = self.prompt_encoder
            sparse = torch.empty((batch_size, 0, self.prompt_dim), device=self.device)
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch_size, -1, self.embedding_size, self.embedding_size)
            return sparse, dense
        return self.prompt_encoder(points=(points, labels) if points is not None else None,
                                   boxes=boxes.reshape(-1, 4) if boxes is not None else None, masks=masks)

    def decode(self, features: ImageFeatures, sparse, dense, multimask: bool = False) -> DecoderOutput:
        import torch

        pe = self.dense_pe()
        n_img, n_prompt = len(features), int(sparse.shape[0])
        compiled = self.compiled("decoder") if n_img == 1 and sparse.shape[1] > 0 else None
        if compiled is not None:  # all prompt sets on the one image in a single call
            logits, iou = compiled(*(t.detach().numpy() for t in (features.embeddings, pe, sparse, dense)))
            picked = slice(1, None) if multimask else slice(0, 1)
            return DecoderOutput(torch.from_numpy(logits[:, picked]), torch.from_numpy(iou[:, picked]), None)
        with self.autocast():
            if n_img == 1:
                masks, iou = self.mask_decoder(features.embeddings, pe, sparse, dense, multimask)
            elif n_img == n_prompt:
                # segment_anything's decoder repeats one image per prompt set; decode pairs one by one.
                outs = [self.mask_decoder(features.embeddings[b:b + 1], pe, sparse[b:b + 1], dense[b:b + 1],
                                          multimask) for b in range(n_img)]
                masks, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            else:
                raise ValueError(f"{n_img} images cannot pair with {n_prompt} prompt sets")
        return DecoderOutput(masks.float(), iou.float(), None)


def mask_decoder_graph(decoder):
    """``segment_anything``'s ``MaskDecoder`` as one exportable graph: ``(image_embeddings (1, 256, E, E),
    image_pe (1, 256, E, E), sparse (B, N, 256), dense (B, 256, E, E))`` -> ``(mask_logits (B, 4, L, L),
    iou (B, 4))``: every mask output; the caller picks the single or the multimask ones, as the
    decoder's own ``forward`` does."""
    import torch

    class MaskDecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, image_embeddings, image_pe, sparse, dense):
            return self.decoder.predict_masks(image_embeddings, image_pe, sparse, dense)

    return MaskDecoderGraph()
