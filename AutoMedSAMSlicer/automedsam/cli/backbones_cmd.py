"""``automedsam backbones check``: build a backbone and run one slice through it end to end."""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import add_command, add_device_option, add_json_option, emit_json

#: ``automedsam backbones check``: what ``--help`` says.
HELP = "build a backbone, encode one slice and decode a box prompt"
DESCRIPTION = """\
Builds the backbone, takes the middle slice of IMAGE (CT window abdomen), maps it to the model
input, encodes it, decodes a box prompt around the slice centre and maps the mask back onto the
slice's voxels. Reports shapes and timings.
"""


def register(sub) -> None:
    p = sub.add_parser("backbones", help="check that a backbone builds and runs")
    bsub = p.add_subparsers(dest="backbones_command", metavar="ACTION", required=True)
    pc = add_command(bsub, "check", run_check, HELP, DESCRIPTION)
    pc.add_argument("id", help="backbone id (tiny-sam and tiny-sam2 are test-only, random weights)")
    pc.add_argument("--image", required=True, help="image file or DICOM folder")
    pc.add_argument("--weights", default=None, help="'random', a weights file, or the cached file (default)")
    add_device_option(pc)
    add_json_option(pc)


def check_backbone(backbone_id: str, image_path: str, weights: str | None = None, device: str = "auto") -> dict:
    from ..backbones.registry import default_registry
    from ..io import read_image
    from ..preprocess import IntensityConfig, normalize_intensity

    volume = read_image(image_path)
    t0 = time.perf_counter()
    registry = default_registry()
    backbone = registry.backbone(backbone_id, weights=weights, runtime=registry.runtime.on(device))
    t1 = time.perf_counter()
    k = volume.num_slices // 2
    cfg = IntensityConfig.rgb() if volume.is_rgb else IntensityConfig.ct("abdomen")
    slice_ = normalize_intensity(volume.array[k], cfg.value_range(volume.array))
    height, width = slice_.shape[:2]
    transform = backbone.slice_transform(height, width)
    model_input = transform.image_to_model(slice_)[None]
    t2 = time.perf_counter()
    features = backbone.encode(model_input)
    t3 = time.perf_counter()
    box_ij = np.array([width * 0.25, height * 0.25, width * 0.75, height * 0.75])
    sparse, dense = backbone.embed_prompts(boxes=transform.box_to_model(box_ij)[None])
    out = backbone.decode(features, sparse, dense)
    slice_mask = transform.logits_to_slice(out.mask_logits[0, 0].detach().cpu().numpy()) > 0
    t4 = time.perf_counter()
    return {
        "backbone": backbone.id,
        "test_only": backbone.spec.test_only,
        "device": str(backbone.device),
        "slice_index_k": k,
        "slice_shape_ji": [height, width],
        "model_input_shape": list(model_input.shape),
        "embedding_shape": list(features.embeddings.shape),
        "high_res_shapes": [list(h.shape) for h in features.high_res],
        "mask_logits_shape": list(out.mask_logits.shape),
        "predicted_iou": float(out.iou[0, 0]),
        "object_logit": None if out.object_logits is None else float(out.object_logits[0, 0]),
        "mask_voxels_on_slice": int(slice_mask.sum()),
        "build_s": round(t1 - t0, 3),
        "encode_s": round(t3 - t2, 3),
        "prompt_decode_map_s": round(t4 - t3, 3),
    }


def run_check(args: argparse.Namespace) -> int:
    report = check_backbone(args.id, args.image, args.weights, args.device)
    if args.json:
        emit_json(report)
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0
