"""Model bundles: manifest schema, strict weights, backbone checks, folder and zip round trips."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from automedsam.backbones import build_backbone
from automedsam.backbones.registry import ModelRegistry, Runtime
from automedsam.bundle import create_bundle, load_bundle
from automedsam.classes import default_class_catalog
from automedsam.errors import InvalidInputError, WeightsLoadError
from automedsam.preprocess import IntensityConfig
from automedsam.prompt_networks import build_prompt_network, default_config


def test_zip_and_folder_round_trip_reproduce_the_generator(tmp_path, tiny_sam2):
    classes = [default_class_catalog().get(c) for c in ("liver", "spleen")]
    gen = build_prompt_network("diffusion", default_config("diffusion", tiny_sam2, 2)).eval()
    bundle = create_bundle(tiny_sam2, gen, classes, IntensityConfig.ct("abdomen"), name="rt",
                           metrics={"liver": {"dsc": 0.9}})
    emb = tiny_sam2.encode(torch.rand(1, 256, 256, 3)).embeddings
    expected = gen(emb, None, torch.tensor([1])).dense
    for target in (tmp_path / "b.zip", tmp_path / "b_folder"):
        loaded = load_bundle(bundle.save(target))
        assert loaded.manifest["metrics"] == {"liver": {"dsc": 0.9}}
        assert [c.name for c in loaded.classes] == ["liver", "spleen"]
        assert loaded.intensity == IntensityConfig.ct("abdomen")
        torch.testing.assert_close(loaded.build_prompt_network()(emb, None, torch.tensor([1])).dense, expected)
    assert sorted(p.name for p in (tmp_path / "b_folder").iterdir()) == ["manifest.json", "weights.safetensors"]


def test_class_lookup_accepts_aliases_and_lists_the_classes(make_bundle):
    bundle = load_bundle(make_bundle("tiny-sam2", "ppn"))
    assert bundle.class_index("kidney_left") == bundle.class_index("left_kidney") == 2
    with pytest.raises(InvalidInputError, match="it has: liver, spleen, left_kidney"):
        bundle.class_index("heart")


def test_bundle_refuses_another_backbone_or_other_random_weights(make_bundle):
    bundle = load_bundle(make_bundle("tiny-sam2", "ppn"))
    with pytest.raises(InvalidInputError, match="trained for backbone tiny-sam2, not tiny-sam"):
        bundle.check_backbone(build_backbone("tiny-sam", weights="random", device="cpu", runtime="torch"))
    with pytest.raises(InvalidInputError, match="random:seed=0"):
        bundle.check_backbone(build_backbone("tiny-sam2", weights="random", device="cpu", seed=5, runtime="torch"))
    bundle.check_backbone(ModelRegistry(Runtime("cpu", "torch")).for_bundle(bundle))


def _rewrite_zip(src, dst, manifest=None, weights=None):
    with zipfile.ZipFile(src) as z:
        m, w = z.read("manifest.json"), z.read("weights.safetensors")
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", manifest(json.loads(m)) if manifest else m)
        z.writestr("weights.safetensors", weights(w) if weights else w)
    return dst


def test_broken_bundles_get_clear_errors(make_bundle, tmp_path):
    src = make_bundle("tiny-sam", "ppn")
    corrupt = _rewrite_zip(src, tmp_path / "c.zip", weights=lambda w: w[:-10] + b"0123456789")
    with pytest.raises(InvalidInputError, match="does not match the sha256"):
        load_bundle(corrupt)
    newer = _rewrite_zip(src, tmp_path / "n.zip", manifest=lambda m: json.dumps(m | {"format_version": 99}))
    with pytest.raises(InvalidInputError, match="Upgrade automedsam"):
        load_bundle(newer)
    bad = _rewrite_zip(src, tmp_path / "s.zip", manifest=lambda m: json.dumps(m | {"generator": {"type": "unet"}}))
    with pytest.raises(InvalidInputError, match="broken manifest"):
        load_bundle(bad)
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="is not a model bundle"):
        load_bundle(tmp_path / "x.zip")
    with pytest.raises(InvalidInputError, match="not found"):
        load_bundle(tmp_path / "missing")


def test_strict_keys_when_config_and_weights_disagree(make_bundle):
    bundle = load_bundle(make_bundle("tiny-sam2", "ppn"))
    bundle.manifest["generator"]["config"]["num_tokens"] = 4  # shapes no longer fit the weights
    with pytest.raises(WeightsLoadError, match="generator"):
        bundle.build_prompt_network()


def test_finetuned_decoder_travels_with_the_bundle(tmp_path):
    backbone = build_backbone("tiny-sam", weights="random", device="cpu", runtime="torch")
    with torch.no_grad():
        backbone.mask_decoder.iou_token.weight.add_(1.0)
    gen = build_prompt_network("ppn", default_config("ppn", backbone, 1))
    bundle = create_bundle(backbone, gen, [default_class_catalog().get("liver")], IntensityConfig.ct(),
                           name="ft", decoder_finetuned=True)
    loaded = load_bundle(bundle.save(tmp_path / "ft.zip"))
    registry = ModelRegistry(Runtime("cpu", "torch"))
    fresh = registry.for_bundle(loaded)
    torch.testing.assert_close(fresh.mask_decoder.iou_token.weight, backbone.mask_decoder.iou_token.weight)
    # The decoder is the view's own: the shared backbone keeps its stock decoder for other bundles.
    shared = registry.backbone("tiny-sam", weights="random")
    assert fresh.same_encoder(shared) and fresh.model is shared.model
    assert not torch.allclose(shared.mask_decoder.iou_token.weight, fresh.mask_decoder.iou_token.weight)
    assert registry.for_bundle(loaded) is fresh  # one view per bundle, shared by its sessions


def test_diverged_weights_never_become_a_bundle(tiny_sam2):
    classes = [default_class_catalog().get("liver")]
    gen = build_prompt_network("classmap", default_config("classmap", tiny_sam2, 1))
    with torch.no_grad():
        next(gen.parameters()).fill_(float("nan"))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        create_bundle(tiny_sam2, gen, classes, IntensityConfig.ct(), name="diverged")


def test_save_replaces_only_bundles_and_swaps_folders_whole(make_bundle, tmp_path):
    from automedsam.bundle import check_bundle_destination

    bundle = load_bundle(make_bundle())
    folder = bundle.save(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert bundle.save(folder) == folder and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert check_bundle_destination(folder, overwrite=True) == folder
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    (tmp_path / "data.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: no manifest
    with zipfile.ZipFile(tmp_path / "webapp.zip", "w") as z:  # manifest.json is a common name
        z.writestr("manifest.json", json.dumps({"name": "my web app"}))
        z.writestr("weights.safetensors", b"not ours")
    for target in (notes, tmp_path / "data.zip", tmp_path / "webapp.zip"):
        with pytest.raises(InvalidInputError, match="not a model bundle"):
            bundle.save(target)
        with pytest.raises(InvalidInputError, match="not a model bundle"):
            check_bundle_destination(target, overwrite=True)
    assert (notes / "a.txt").read_text() == "mine" and (tmp_path / "data.zip").stat().st_size == 22
    with pytest.raises(InvalidInputError, match="exists; pass --overwrite"):
        check_bundle_destination(folder, overwrite=False)
    zipped = bundle.save(tmp_path / "model.zip")
    assert load_bundle(bundle.save(zipped)).name == bundle.name  # a zip bundle is replaced in place
