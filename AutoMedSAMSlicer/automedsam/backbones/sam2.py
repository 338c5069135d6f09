"""SAM 2.1 backbones through ``sam2`` (imported lazily; configs read from the installed package)."""

from __future__ import annotations

from .base import Backbone, DecoderOutput, ImageFeatures, StockPredictor, check_window, keep_window

#: Test-only "tiny-sam2": SAM 2.1 Hiera-T's config with small widths/depths and a 256-px input
#: (embedding 16x16, high-res maps 64x64 and 32x32, mask logits 64x64).
TINY_SAM2_OVERRIDES = {
    "model.image_size": 256,
    "model.image_encoder.trunk.embed_dim": 32,
    "model.image_encoder.trunk.num_heads": 1,
    # The first block of stages 2-4 pools queries and must stay windowed: global attention in block 4.
    "model.image_encoder.trunk.stages": [1, 2, 2, 1],
    "model.image_encoder.trunk.global_att_blocks": [4],
    "model.image_encoder.trunk.window_spec": [8, 4, 8, 8],
    "model.image_encoder.trunk.window_pos_embed_bkg_spatial_size": [4, 4],
    "model.image_encoder.neck.backbone_channel_list": [256, 128, 64, 32],
    "model.memory_attention.num_layers": 1,
    "model.memory_attention.layer.dim_feedforward": 256,
    "model.memory_attention.layer.self_attention.feat_sizes": [16, 16],
    "model.memory_attention.layer.cross_attention.feat_sizes": [16, 16],
    "model.memory_encoder.fuser.num_layers": 1,
}

def _override(key: str, value) -> str:
    """A hydra command-line override ``++key=value`` (lists as ``[a,b]``)."""
    text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, (list, tuple)) else str(value)
    return f"++{key}={text}"


def _has_postprocessing_kernel() -> bool:
    """Whether sam2's compiled extension (connected components on CUDA) is installed: without it the
    video predictor's hole filling only warns on every frame, so it is switched off instead."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def build_sam2_model(arch: str, video: bool = False):
    """A randomly initialised ``SAM2Base`` built by sam2's own ``build_sam2`` (or, with ``video``,
    ``build_sam2_video_predictor``, taking frames:
    :class:`~automedsam.backbones.sam2_video.FramesVideoPredictor`) from the installed package's
    config ``arch`` (e.g. ``sam2.1_hiera_t``) or ``tiny``, with sam2's post-processing (dynamic
    multimask fall-back; for video also masks binarised from clicks for the memory encoder, and hole
    filling where sam2's CUDA extension is installed). On the CPU; weights are loaded by the caller."""
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    name = "sam2.1_hiera_t" if arch == "tiny" else arch
    config = f"configs/sam2.1/{name}.yaml"
    overrides = [_override(k, v) for k, v in TINY_SAM2_OVERRIDES.items()] if arch == "tiny" else []
    if not video:
        return build_sam2(config, None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    overrides.append(_override("model._target_", "automedsam.backbones.sam2_video.FramesVideoPredictor"))
    predictor = build_sam2_video_predictor(config, None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    if not _has_postprocessing_kernel():  # sam2's own overrides come last, so it is set here
        predictor.fill_hole_area = 0
    return predictor


class Sam2Backbone(Backbone):
    """``sam2`` SAM2Base (SAM 2.1 Hiera-T/S/B+/L, tiny-sam2)."""

    propagation_method = "memory"  # its video predictor over the slices as frames
    box_tokens = 3  # SAM 2 embeds a box as two corner points and pads with one more

    def high_res_shapes(self) -> dict[str, tuple[int, int, int]]:
        e = self.embedding_size
        return {"high_res_0": (32, 4 * e, 4 * e), "high_res_1": (64, 2 * e, 2 * e)}

    def stock_predictor(self) -> StockPredictor:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(self.model)
        s = self.input_size  # the stock predictor assumes 1024-px models; set the real feature sizes
        predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        return StockPredictor(predictor)

    @property
    def embedding_size(self) -> int:
        return int(self.model.sam_image_embedding_size)

    @property
    def prompt_encoder(self):
        return self.model.sam_prompt_encoder

    @property
    def model_mask_decoder(self):
        return self.model.sam_mask_decoder

    def _encode(self, x) -> ImageFeatures:
        model = self.model
        backbone_out = model.forward_image(x)
        _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:  # what SAM 2 adds on a frame without memory
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        batch = x.shape[0]
        maps = [f.permute(1, 2, 0).reshape(batch, -1, h, w) for f, (h, w) in zip(vision_feats, feat_sizes, strict=True)]
        return ImageFeatures(maps[-1], tuple(maps[:-1]))

    def embed_prompts(self, points=None, labels=None, boxes=None, masks=None, batch_size: int = 1):
        import torch

        points = self._as_tensor(points, torch.float32)
        labels = self._as_tensor(labels, torch.int32)
        boxes = self._as_tensor(boxes, torch.float32)
        masks = self._as_tensor(masks, torch.float32)
        if points is not None and labels is None:
            raise ValueError("point prompts need labels (1 foreground, 0 background)")
        if boxes is not None:  # SAM 2 embeds a box as two corner points labelled 2 and 3
            box_pts = boxes.reshape(-1, 2, 2)
            box_lbl = torch.tensor([[2, 3]], dtype=torch.int32, device=self.device).expand(box_pts.shape[0], -1)
            if points is not None:
                points, labels = torch.cat([box_pts, points], 1), torch.cat([box_lbl, labels.int()], 1)
            else:
                points, labels = box_pts, box_lbl
        if points is None and masks is None:
            sparse = torch.empty((batch_size, 0, self.prompt_dim), device=self.device)
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch_size, -1, self.embedding_size, self.embedding_size)
            return sparse, dense
        return self.prompt_encoder(points=(points, labels) if points is not None else None, boxes=None,
                                   masks=masks)

    def decode(self, features: ImageFeatures, sparse, dense, multimask: bool = False,
               window: tuple[int, int, int, int] | None = None) -> DecoderOutput:
        window = check_window(window, self.mask_size)
        n_img, n_prompt = len(features), int(sparse.shape[0])
        if n_img not in (1, n_prompt):
            raise ValueError(f"{n_img} images cannot pair with {n_prompt} prompt sets")
        with self.autocast():
            masks, iou, _tokens, obj = self.mask_decoder(
                image_embeddings=features.embeddings, image_pe=self.dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
                repeat_image=n_img == 1 and n_prompt > 1, high_res_features=list(features.high_res),
            )
        return DecoderOutput(keep_window(masks.float(), window), iou.float(), obj.float())
