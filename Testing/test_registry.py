"""One registry of models: backbones are built once per (id, weights, device, runtime) and shared;
what it hands out is never changed by a session (a fine-tuned decoder is a view's own module, a
CUDA fall-back is the session's own, training works on a view); teach reuses the session's backbone
and embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from automedsam.backbones.base import Backbone
from automedsam.backbones.registry import ModelRegistry, Runtime
from automedsam.bundle import load_bundle
from automedsam.engine import Engine, EngineConfig
from automedsam.io import read_label_map


@pytest.fixture()
def registry():
    return ModelRegistry(Runtime("cpu", "torch"))


def test_engines_on_one_model_share_one_backbone(registry, make_bundle):
    plain = load_bundle(make_bundle("tiny-sam2", "ppn"))
    other_network = load_bundle(make_bundle("tiny-sam2", "classmap"))
    a = Engine.from_bundle(plain, "cpu", registry=registry)
    b = Engine.from_bundle(other_network, "cpu", registry=registry)
    manual = Engine.manual("tiny-sam2", "cpu", weights="random", registry=registry)
    assert a.backbone is b.backbone is manual.backbone is a.sibling().backbone
    assert registry.builds == 1
    Engine.manual("tiny-sam", "cpu", weights="random", registry=registry)  # another model: built once more
    assert registry.builds == 2
    assert registry.backbone("tiny-sam2", weights="random", seed=3) is not a.backbone  # other random weights
    with pytest.raises(ValueError, match="did not come from this registry"):
        ModelRegistry(Runtime("cpu", "torch")).on_device(a.backbone, "cpu")


def test_a_fine_tuned_decoder_is_the_bundles_own_and_the_shared_backbone_keeps_its_own(registry, make_bundle):
    import torch

    plain = Engine.from_bundle(load_bundle(make_bundle("tiny-sam", "ppn")), "cpu", registry=registry)
    shared = plain.backbone
    stock = {k: v.clone() for k, v in shared.mask_decoder.state_dict().items()}
    tuned_bundle = load_bundle(make_bundle("tiny-sam", "ppn", decoder_finetuned=True))
    # The bundle's decoder differs from the stock one (as a fine-tuned one would).
    for k, v in list(tuned_bundle.tensors.items()):
        if k.startswith("mask_decoder.") and v.is_floating_point():
            tuned_bundle.tensors[k] = v + 0.5
    tuned = Engine.from_bundle(tuned_bundle, "cpu", registry=registry)
    assert tuned.backbone is not shared and tuned.backbone.same_encoder(shared)
    assert tuned.backbone.model is shared.model  # encoders are not copied
    assert tuned.backbone.mask_decoder is not shared.mask_decoder
    for k, v in shared.mask_decoder.state_dict().items():
        torch.testing.assert_close(v, stock[k])  # untouched
    # A session of each gives different results from the same volume: the decoders really differ.
    rng = np.random.default_rng(0)
    features = shared.encode(rng.random((1, shared.input_size, shared.input_size, 3), dtype=np.float32))
    sparse, dense = shared.embed_prompts(boxes=np.array([[10.0, 10.0, 40.0, 40.0]]))
    with torch.no_grad():
        a = shared.decode(features, sparse, dense).mask_logits
        b = tuned.backbone.decode(features, sparse, dense).mask_logits
    assert not torch.allclose(a, b)
    # The same bundle in another session gets the same view; a CPU fall-back keeps the decoder.
    assert Engine.from_bundle(tuned_bundle, "cpu", registry=registry).backbone is tuned.backbone
    assert registry.on_device(tuned.backbone, "cpu") is tuned.backbone
    assert registry.on_device(shared, "cpu") is shared


def test_backbones_are_never_moved_a_cuda_fall_back_is_the_sessions_own(registry, make_bundle, ct):
    """A session that runs out of CUDA memory asks the registry for its backbone on the CPU and
    switches alone: the shared backbone has no way to be moved, and a sibling keeps it."""
    import torch

    assert not hasattr(Backbone, "to")
    engine = Engine.from_bundle(load_bundle(make_bundle("tiny-sam2", "ppn")), "cpu", registry=registry)
    sibling = engine.sibling()
    engine.set_volume(ct)
    shared = engine.backbone
    asked = []

    class OutOfMemoryOnce:
        """The store's backbone as CUDA would answer at batch 1: out of memory."""

        def __getattr__(self, name):
            return getattr(shared, name)

        def encode(self, images):
            asked.append(len(images))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    engine.store.backbone = OutOfMemoryOnce()
    engine.encode([3])
    assert asked == [1]
    assert engine.store.backbone is engine.backbone is registry.on_device(shared, "cpu")
    assert any("goes on on the CPU" in m for m in engine.messages)
    assert sibling.backbone is shared


def test_teach_reuses_the_sessions_backbone_and_embeddings(make_bundle, ct, ct_dir, tmp_path, monkeypatch):
    registry = ModelRegistry(Runtime("cpu", "torch"))
    engine = Engine.from_bundle(load_bundle(make_bundle("tiny-sam2", "ppn")), "cpu", EngineConfig(),
                                registry=registry)
    engine.set_volume(ct)
    engine.encode(range(ct.num_slices))
    labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz").array
    encoded = []
    real_encode = Backbone.encode

    def counting(self, images):
        encoded.append(len(images))
        return real_encode(self, images)

    monkeypatch.setattr(Backbone, "encode", counting)
    events = list(engine.teach(labels, {"liver": 5}, tmp_path / "taught.zip", epochs=1, train_slices="12:16"))
    assert events[-1].stage == "done"
    # Only the augmented copies of the 4 drawn slices are new images (2 each); the slices themselves
    # and the validation slices come from the session's embeddings.
    assert sum(encoded) == 4 * 2
    assert registry.builds == 1  # no second backbone
    encoded.clear()
    result = engine.segment_volume(["liver"], list(range(10, 20)))
    assert encoded == [] and result.masks["liver"].shape == ct.array.shape[:3]
