"""Backbones: shapes through encode / embed prompts / decode, weights loading, device choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automedsam.backbones import build_backbone, resolve_device
from automedsam.errors import InvalidInputError, WeightsLoadError, WeightsUnavailableError
from automedsam.models import BackboneCatalog


def images(backbone, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, backbone.input_size, backbone.input_size, 3), dtype=np.float32)


def test_encode_embed_decode_shapes(tiny_backbone):
    b = tiny_backbone
    e, low = b.embedding_size, b.mask_size
    feats = b.encode(images(b))
    assert feats.embeddings.shape == (2, 256, e, e) and feats.embeddings.dtype == torch.float32
    if b.spec.family == "sam2":
        assert [tuple(h.shape) for h in feats.high_res] == [(2, 32, 4 * e, 4 * e), (2, 64, 2 * e, 2 * e)]
    else:
        assert feats.high_res == ()
    pts = torch.tensor([[[30.0, 40.0], [100.0, 90.0]], [[10.0, 10.0], [200.0, 180.0]]])
    lbl = torch.tensor([[1, 0], [1, 1]])
    boxes = torch.tensor([[10.0, 10.0, 120.0, 140.0], [5.0, 6.0, 50.0, 60.0]])
    masks = torch.zeros(2, 1, low, low)
    sparse, dense = b.embed_prompts(pts, lbl, boxes, masks)
    # SAM: 2 points + 2 box corners; SAM 2 embeds the box as 2 labelled points and pads once more.
    n_tokens = 4 if b.spec.family == "sam" else 5
    assert sparse.shape == (2, n_tokens, 256) and dense.shape == (2, 256, e, e)
    out = b.decode(feats, sparse, dense, multimask=True)
    assert out.mask_logits.shape == (2, 3, low, low) and out.iou.shape == (2, 3)
    assert (out.object_logits is None) == (b.spec.family == "sam")
    # One image shared by five prompt sets (five classes on one slice).
    sparse5, dense5 = b.embed_prompts(batch_size=5)
    assert sparse5.shape == (5, 0, 256)
    out5 = b.decode(feats.select(1), sparse5, dense5)
    assert out5.mask_logits.shape == (5, 1, low, low)
    with pytest.raises(ValueError, match="cannot pair"):
        b.decode(feats, sparse5, dense5)


def test_batched_decode_equals_per_image_decode(tiny_backbone):
    b = tiny_backbone
    feats = b.encode(images(b, 3, seed=1))
    boxes = torch.tensor([[10.0, 10.0, 120.0, 140.0], [5.0, 6.0, 50.0, 60.0], [60.0, 60.0, 200.0, 210.0]])
    sparse, dense = b.embed_prompts(boxes=boxes)
    together = b.decode(feats, sparse, dense).mask_logits
    for i in range(3):
        alone = b.decode(feats.select(i), sparse[i:i + 1], dense[i:i + 1]).mask_logits
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_prompts_change_the_mask(tiny_backbone):
    b = tiny_backbone
    feats = b.encode(images(b, 1))
    s1, d1 = b.embed_prompts(boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0]]))
    s2, d2 = b.embed_prompts(boxes=torch.tensor([[150.0, 150.0, 250.0, 250.0]]))
    assert not torch.allclose(b.decode(feats, s1, d1).mask_logits, b.decode(feats, s2, d2).mask_logits)


def test_random_weights_are_reproducible_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_backbone("tiny-sam", weights="random", device="cpu", runtime="torch")
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_backbone("tiny-sam", weights="random", device="cpu", runtime="torch")
    x = images(a, 1)
    torch.testing.assert_close(a.encode(x).embeddings, b.encode(x).embeddings)
    c = build_backbone("tiny-sam", weights="random", device="cpu", seed=1, runtime="torch")
    assert not torch.allclose(a.encode(x).embeddings, c.encode(x).embeddings)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip_with_strict_keys(tmp_path, tiny_sam, suffix):
    spec = BackboneCatalog.load().get("tiny-sam")
    state = {k: v.clone() for k, v in tiny_sam.model.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    # A non-test spec pointing at the tiny architecture lets us load a real file.
    from dataclasses import replace

    real = replace(spec, id="tiny-file", test_only=False)
    loaded = build_backbone(real, weights=path, device="cpu", seed=99, runtime="torch")
    x = images(tiny_sam, 1)
    torch.testing.assert_close(loaded.encode(x).embeddings, tiny_sam.encode(x).embeddings)
    del state["mask_decoder.iou_token.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsLoadError, match=r"missing keys \[mask_decoder.iou_token.weight\].*extra.weight"):
        build_backbone(real, weights=tmp_path / "broken.pth", device="cpu", runtime="torch")


def test_pickled_code_in_weights_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    spec = BackboneCatalog.load().get("sam_vit_b")
    with pytest.raises(WeightsLoadError, match="cannot load weights"):
        build_backbone(spec, weights=tmp_path / "evil.pth", device="cpu", runtime="torch")


def test_missing_weights_say_how_to_get_them():
    with pytest.raises(WeightsUnavailableError, match=r"models download sam2\.1_hiera_t"):
        build_backbone("sam2.1_hiera_t", device="cpu", runtime="torch")
    with pytest.raises(InvalidInputError, match="test-only"):
        build_backbone("tiny-sam2", weights="/some/file.pt")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(InvalidInputError, match="unknown device"):
        resolve_device("tpu0")


@pytest.mark.slow
@pytest.mark.parametrize("backbone_id", ["sam_vit_b", "medsam_vit_b", "sam_vit_l", "sam_vit_h", "sam2.1_hiera_t",
                                         "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"])
def test_full_size_backbones_build_and_run_with_random_weights(backbone_id):
    b = build_backbone(backbone_id, weights="random", device="cpu", runtime="torch")
    assert b.input_size == 1024 and b.embedding_size == 64 and b.mask_size == 256
    feats = b.encode(images(b, 1))
    assert feats.embeddings.shape == (1, 256, 64, 64)
    sparse, dense = b.embed_prompts(boxes=torch.tensor([[100.0, 100.0, 600.0, 700.0]]))
    out = b.decode(feats, sparse, dense, multimask=True)
    assert out.mask_logits.shape == (1, 3, 256, 256)
