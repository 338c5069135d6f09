"""SAM and MedSAM backbones through ``segment_anything`` (imported lazily)."""

from __future__ import annotations

import logging
from functools import partial

from .base import (
    OUTSIDE_WINDOW_LOGIT,
    Backbone,
    DecoderOutput,
    ImageFeatures,
    StockPredictor,
    check_window,
    keep_window,
)
from .runtime import ExportSpec

log = logging.getLogger(__name__)

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

    def stock_predictor(self) -> StockPredictor:
        from segment_anything import SamPredictor

        return StockPredictor(SamPredictor(self.model))

    @property
    def embedding_size(self) -> int:
        return int(self.model.prompt_encoder.image_embedding_size[0])

    @property
    def prompt_encoder(self):
        return self.model.prompt_encoder

    @property
    def model_mask_decoder(self):
        return self.model.mask_decoder

    def export_spec(self, part: str) -> ExportSpec | None:
        """The image encoder at batch 1 (``(1, 3, S, S)`` -> ``(1, 256, E, E)``; its attention blocks
        reshape with the batch size baked in), and the mask decoder as :func:`mask_decoder_graph`
        with the number of prompt sets, of sparse tokens and the window of cells free."""
        import torch

        s, e = self.input_size, self.embedding_size
        if part == "encoder":
            return ExportSpec("encoder", self.model.image_encoder, (torch.randn(1, 3, s, s),), ("image",),
                              ("embeddings",), {})
        if part == "decoder":
            generator = torch.Generator().manual_seed(0)
            # A window of cells in the example, so the check at compile time covers the indexing.
            rows, cols = torch.arange(1, e - 2), torch.arange(3, e)
            inputs = (torch.randn(1, 256, e, e, generator=generator), self.dense_pe().cpu(),
                      torch.randn(2, 3, 256, generator=generator), torch.randn(2, 256, e, e, generator=generator),
                      rows, cols)
            graph = mask_decoder_graph(self.mask_decoder)
            if graph is None:
                return None
            return ExportSpec("decoder", graph, inputs,
                              ("image_embeddings", "image_pe", "sparse", "dense", "rows", "cols"),
                              ("mask_logits", "iou"),
                              {"sparse": {0: "prompt_sets", 1: "tokens"},
                               "dense": {0: "prompt_sets", 2: "dense_rows", 3: "dense_cols"},
                               "rows": {0: "rows"}, "cols": {0: "cols"},
                               "mask_logits": {0: "prompt_sets", 2: "height", 3: "width"}, "iou": {0: "prompt_sets"}})
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

    def decode(self, features: ImageFeatures, sparse, dense, multimask: bool = False,
               window: tuple[int, int, int, int] | None = None) -> DecoderOutput:
        import torch

        pe = self.dense_pe()
        n_img, n_prompt = len(features), int(sparse.shape[0])
        window = check_window(window, self.mask_size)
        compiled = self.compiled("decoder") if n_img == 1 and sparse.shape[1] > 0 else None
        if compiled is not None:  # all prompt sets on the one image in a single call
            rows, cols = window_cells(window, self.embedding_size)
            if dense.shape[-1] > 1 and dense.stride(-1) == 0 and dense.stride(-2) == 0:
                dense = dense[..., :1, :1]  # the same at every cell (no mask prompt): no 4 MB copy
            arrays = [t.detach().numpy() for t in (features.embeddings, pe, sparse, dense)]
            logits, iou = compiled(*arrays, rows, cols)
            picked = slice(1, None) if multimask else slice(0, 1)
            logits = torch.from_numpy(logits[:, picked])
            if window is not None:  # the window's cells back into the L x L grid
                full = torch.full((*logits.shape[:2], self.mask_size, self.mask_size), OUTSIDE_WINDOW_LOGIT)
                full[..., 4 * rows[0]:4 * rows[-1] + 4, 4 * cols[0]:4 * cols[-1] + 4] = logits
                logits = keep_window(full, window)
            return DecoderOutput(logits, torch.from_numpy(iou[:, picked]), None)
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
        return DecoderOutput(keep_window(masks.float(), window), iou.float(), None)


def window_cells(window: tuple[int, int, int, int] | None, embedding_size: int):
    """``(rows, cols)`` int64 index vectors of the embedding cells that cover ``window`` (row0, row1,
    col0, col1, half-open, in low-resolution mask pixels; 4 per cell), every cell when None."""
    import numpy as np

    if window is None:
        every = np.arange(embedding_size, dtype=np.int64)
        return every, every
    r0, r1, c0, c1 = window
    return (np.arange(r0 // 4, -(-r1 // 4), dtype=np.int64), np.arange(c0 // 4, -(-c1 // 4), dtype=np.int64))


def mask_decoder_graph(decoder):
    """``segment_anything``'s ``MaskDecoder`` as one exportable graph (None where its upscaling is
    not SAM's): ``(image_embeddings (1, 256, E, E), image_pe (1, 256, E, E), sparse (B, N, 256),
    dense (B, 256, E, E) or (B, 256, 1, 1) (the same at every cell), rows (h,), cols (w,))`` ->
    ``(mask_logits (B, 4, 4h, 4w), iou (B, 4))``: every mask output (the caller picks the single or
    the multimask ones, as the decoder's own ``forward`` does), upscaled only for the embedding
    cells ``rows x cols`` (int64 indices; all of them: the whole ``L x L`` grid).

    The same computation as the decoder's ``predict_masks``, arranged for a CPU runtime:

    - The upscaling (two stride-2, 2x2 transposed convolutions, then the hypernetwork product: a
      third of a one-prompt decode) maps each embedding cell to its own 4 x 4 block of logits and
      nothing else, so a click that can only change a small area pays for that area
      (:meth:`SamBackbone.decode`'s ``window``).
    - It runs channels last: each transposed convolution is one matrix product per cell (input
      channels -> 2 x 2 x output channels), its channel norm a plain layer norm over the last axis,
      and the only transpose is the one that lays the 4 x 4 blocks out as rows and columns at the end.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    layers = list(decoder.output_upscaling)
    convs = [layers[i] for i in (0, 3)] if len(layers) == 5 else []
    if not (len(convs) == 2 and all(isinstance(c, torch.nn.ConvTranspose2d) and c.kernel_size == (2, 2)
                                    and c.stride == (2, 2) and c.padding == (0, 0) and c.bias is not None
                                    for c in convs) and type(layers[1]).__name__ == "LayerNorm2d"):
        log.info("mask decoder upscaling is not SAM's (%s): the decoder stays on PyTorch", decoder.output_upscaling)
        return None
    first, norm, act1, second, act2 = layers

    def as_matrix(conv):
        """A 2x2 stride-2 ``ConvTranspose2d`` as ``(in, 2 * 2 * out)`` weights and the bias to match."""
        w = conv.weight  # (in, out, 2, 2)
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), conv.bias.repeat(4)

    class MaskDecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, image_embeddings, image_pe, sparse, dense, rows, cols):
            d = self.decoder
            n = sparse.shape[0]
            output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
            tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
            channels, height, width = image_embeddings.shape[1:]
            src = image_embeddings + dense
            hs, image_tokens = d.transformer(src, image_pe.repeat(n, 1, 1, 1), tokens)
            # (n, h, w, C): the window's cells, channels last
            x = image_tokens.reshape(n, height, width, channels).index_select(1, rows).index_select(2, cols)
            h, w = x.shape[1], x.shape[2]
            w1, b1 = as_matrix(first)
            x = (x @ w1 + b1).reshape(n, h, w, 2, 2, -1)  # (n, h, w, a, c, C1): pixel (2p + a, 2q + c)
            x = act1(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
            w2, b2 = as_matrix(second)
            x = act2(x @ w2 + b2)  # (n, h, w, a, c, 2 * 2 * C2)
            hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
            masks = x.reshape(n, -1, hyper.shape[2]) @ hyper.transpose(1, 2)  # (n, h w a c a' c', masks)
            masks = masks.reshape(n, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
            return masks.reshape(n, hyper.shape[1], 4 * h, 4 * w), d.iou_prediction_head(hs[:, 0])

    return MaskDecoderGraph()
