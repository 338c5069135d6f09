"""The CPU runtimes (OpenVINO, ONNX Runtime) against PyTorch: masks from the real LiteMedSAM weights
on the shared CT agree (DSC >= 0.99 per class), exports are cached by weights and reused, a
changed decoder is compiled again, and bad choices get clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from automedsam.backbones import build_backbone
from automedsam.backbones.registry import Runtime
from automedsam.backbones.runtime import (
    RUNTIME_ENV,
    THREADS_ENV,
    check_agreement,
    cpu_threads,
    part_runtime,
    resolve_runtime,
    threads_beside_gui,
)
from automedsam.cli.main import run
from automedsam.engine import Engine
from automedsam.errors import InvalidInputError, RuntimeUnavailableError
from automedsam.interactive_eval import box_of, next_click
from automedsam.metrics import dice
from automedsam.training import load_case

FAST_RUNTIMES = ("openvino", "onnxruntime")
CLASSES = {"liver": 5, "spleen": 1, "right_kidney": 2, "left_kidney": 3}


@pytest.fixture(scope="module")
def case(ct_dir):
    return load_case(ct_dir / "ct_lowres.nii.gz", ct_dir / "ct_lowres_labels.nii.gz")


@pytest.fixture(scope="module")
def bundle(lowres_bundle):
    return lowres_bundle


@pytest.fixture(scope="module")
def torch_result(case, bundle):
    engine = Engine(build_backbone("litemedsam", device="cpu", runtime="torch"), bundle)
    engine.set_volume(case.image)
    return engine.segment_volume(list(CLASSES))


#: Least DSC to PyTorch's masks per runtime: the issue's 0.99 (``openvino``, bf16 linear layers, was
#: measured at 0.993 on the right kidney), and what bf16 throughout was measured to keep on this CT
#: (0.977 on the right kidney; on a CPU without native bf16 both are fp32 anyway).
AGREEMENT = {"openvino": 0.99, "onnxruntime": 0.99, "openvino-bf16": 0.97}


@pytest.mark.parametrize("runtime", AGREEMENT)
def test_fast_runtime_masks_agree_with_pytorch_on_the_shared_ct(case, bundle, torch_result, runtime):
    backbone = build_backbone("litemedsam", device="cpu", runtime=runtime)
    engine = Engine(backbone, bundle)
    engine.set_volume(case.image)
    for part in ("encoder", "decoder"):  # openvino's decoder is ONNX Runtime's on a CPU without bf16
        assert backbone.runtime_id(part).startswith(part_runtime(runtime, part).split("-")[0]), part
    fast = engine.segment_volume(list(CLASSES))
    for name, label in CLASSES.items():
        reference = torch_result.masks[name]
        agreement = dice(fast.masks[name], reference)
        print(f"{runtime} {name}: DSC to PyTorch {agreement:.4f}")  # the figures for the record (-s)
        assert reference.sum() > 500, name  # a real organ, not an empty agreement
        assert agreement >= AGREEMENT[runtime], name
        # And the model is still right about the organ (the labels of the shared CT).
        assert dice(fast.masks[name], case.labels.array == label) >= 0.7, name


@pytest.mark.parametrize("runtime", FAST_RUNTIMES)
def test_fast_runtime_box_and_click_refines_agree_with_pytorch(case, runtime):
    backbone = build_backbone("litemedsam", device="cpu", runtime=runtime)

    def refines() -> list[np.ndarray]:
        engine = Engine(backbone)
        engine.set_volume(case.image)
        out = []
        for k in (10, 14, 18):
            for label in (5, 1):  # liver, spleen: a box, then two corrective clicks as a user places them
                truth = case.labels.array[k] == label
                mask = engine.refine("organ", k, box=box_of(truth), mode="manual")
                out.append(mask)
                for _ in range(2):
                    (i, j), positive = next_click(mask, truth)
                    mask = engine.refine("organ", k, points=[(i, j)], point_labels=[positive], mask=mask)
                    out.append(mask)
        return out

    fast = refines()
    with backbone.eager():
        reference = refines()
    for got, expected in zip(fast, reference, strict=True):
        assert expected.sum() > 100
        assert dice(got, expected) >= 0.99


def test_exports_are_cached_by_weights_and_a_changed_decoder_is_compiled_again(tiny_sam, isolated_home):
    import torch

    backbone = build_backbone("tiny-sam", device="cpu", runtime="onnxruntime")
    assert backbone.runtime_id("encoder").startswith("onnxruntime")
    exported = sorted((isolated_home / "compiled").glob("*/*.onnx"))
    assert [p.name for p in exported] == ["encoder.onnx"]
    stamp = exported[0].stat().st_mtime_ns
    # Another backbone with the same weights finds the export (no new file, not rewritten).
    again = build_backbone("tiny-sam", device="cpu", runtime="onnxruntime")
    assert again.runtime_id("encoder") == backbone.runtime_id("encoder")
    assert sorted((isolated_home / "compiled").glob("*/*.onnx")) == exported and exported[0].stat().st_mtime_ns == stamp

    features = backbone.encode(np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32))
    sparse, dense = backbone.embed_prompts(np.array([[[100.0, 120.0]]]), np.array([[1]]))

    def decode():
        with torch.inference_mode():
            return backbone.decode(features, sparse, dense).mask_logits

    def eager_decode():
        with backbone.eager(), torch.inference_mode():
            return backbone.decode(features, sparse, dense).mask_logits

    first = decode()
    assert torch.allclose(first, eager_decode(), atol=1e-3)
    # A bundle's fine-tuned decoder: new weights loaded in place are never decoded with the old graph.
    with torch.no_grad():
        for p in backbone.mask_decoder.parameters():
            p.mul_(1.5)
    second = decode()
    assert not torch.allclose(first, second, atol=1e-3)
    assert torch.allclose(second, eager_decode(), atol=1e-3)
    assert len(list((isolated_home / "compiled").glob("*/decoder.onnx"))) == 2


def test_training_views_decode_in_pytorch_and_leave_the_shared_backbone_alone(tiny_sam):
    import torch

    backbone = build_backbone("tiny-sam", device="cpu", runtime="onnxruntime")
    decoder = backbone.compiled("decoder")
    assert decoder is not None
    assert backbone.compiled("decoder") is decoder  # whatever torch's gradient mode: the runtime decides
    training = backbone.trainable()
    assert training.compiled("decoder") is None  # gradients flow through PyTorch's decoder
    assert training.compiled("encoder") is backbone.compiled("encoder")  # the frozen encoder is shared
    finetuning = backbone.trainable(finetune_decoder=True)
    assert finetuning.mask_decoder is not backbone.mask_decoder
    assert all(p.requires_grad for p in finetuning.mask_decoder.parameters())
    assert not any(p.requires_grad for p in backbone.mask_decoder.parameters())
    with torch.no_grad():
        for p in finetuning.mask_decoder.parameters():
            p.add_(1.0)
    assert backbone.compiled("decoder") is decoder  # the shared decoder did not change
    with backbone.eager(), torch.no_grad():
        assert backbone.compiled("encoder") is None
    assert build_backbone("tiny-sam2", device="cpu", runtime="onnxruntime").runtime_id("encoder") == "torch"


def test_runtime_choice_and_thread_settings(monkeypatch):
    monkeypatch.setenv(RUNTIME_ENV, "torch")  # read by Runtime.from_environment only, never by the library
    assert resolve_runtime() == "openvino"  # installed with the models extra
    assert resolve_runtime("torch") == "torch"
    assert Runtime.from_environment("cpu") == Runtime("cpu", "torch")
    assert Runtime("cpu").resolved() == Runtime("cpu", "openvino")
    with pytest.raises(InvalidInputError, match=r"unknown CPU runtime 'tensorrt'.*openvino-f32"):
        resolve_runtime("tensorrt")
    monkeypatch.setenv(RUNTIME_ENV, "fastest")
    with pytest.raises(InvalidInputError, match=RUNTIME_ENV):
        Runtime.from_environment()
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    with pytest.raises(RuntimeUnavailableError, match="pip install openvino"):
        resolve_runtime("openvino")
    assert resolve_runtime("auto") == "onnxruntime"  # the next best installed one

    from automedsam.backbones import runtime as runtime_module

    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    for native_bf16, decoder in ((True, "openvino"), (False, "onnxruntime")):
        monkeypatch.setattr(runtime_module, "openvino_has_native_bf16", lambda native_bf16=native_bf16: native_bf16)
        assert part_runtime("openvino", "decoder") == decoder
        assert part_runtime("openvino", "encoder") == "openvino"
        assert part_runtime("openvino-f32", "decoder") == "openvino-f32"  # asked for by name: kept
        assert part_runtime("onnxruntime", "encoder") == "onnxruntime"

    monkeypatch.setenv(THREADS_ENV, "3")
    assert cpu_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(InvalidInputError, match=THREADS_ENV):
        cpu_threads()
    assert [threads_beside_gui(n) for n in (1, 2, 3, 8)] == [1, 2, 2, 7]


def test_the_cli_refuses_a_runtime_that_is_not_installed(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    assert run(["backbones", "check", "tiny-sam", "--image", "x.nii.gz", "--cpu-runtime", "onnxruntime"]) == 1
    err = capsys.readouterr().err
    assert "pip install onnxruntime" in err and "Traceback" not in err


def test_a_part_that_disagrees_with_pytorch_is_refused():
    good = [np.ones((2, 3), np.float32)]
    assert check_agreement(good, [good[0] + 0.01], 0.15) == pytest.approx(0.01)
    with pytest.raises(RuntimeUnavailableError, match="disagrees"):
        check_agreement(good, [good[0] * 2], 0.15)
    with pytest.raises(RuntimeUnavailableError, match="shape"):
        check_agreement(good, [np.ones((1, 3), np.float32)], 0.15)
    with pytest.raises(RuntimeUnavailableError):
        check_agreement(good, [np.full((2, 3), np.nan, np.float32)], 0.15)


def test_click_reach_in_a_window_equals_the_whole_slice_distance_transform():
    from scipy import ndimage

    from automedsam.refinement import disk, distance_to_outside

    rng = np.random.default_rng(3)
    for _ in range(60):
        side = ndimage.binary_opening(rng.random((90, 130)) < rng.uniform(0.5, 0.97), iterations=2)
        side[rng.integers(0, 90), :rng.integers(0, 130)] = True  # long runs: windows must grow
        j, i = int(rng.integers(0, 90)), int(rng.integers(0, 130))
        whole = ndimage.distance_transform_edt(np.pad(side, 1))[1:-1, 1:-1][j, i]
        assert distance_to_outside(side, j, i) == pytest.approx(whole)
    jj, ii = np.mgrid[0:90, 0:130]
    for radius in (0.5, np.sqrt(2), 7.3, 200.0):
        assert (disk((90, 130), 3, 128, radius) == ((jj - 3) ** 2 + (ii - 128) ** 2 <= radius ** 2)).all()
    assert distance_to_outside(np.ones((40, 50), bool), 20, 25) == 20.0  # the border is the edge (row 40)


def test_a_part_that_cannot_be_exported_falls_back_once_not_on_every_slice(monkeypatch, caplog):
    """Without the onnx package torch's exporter fails after tracing, which rebuilds TinyViT's
    attention-bias buffers; the fall-back must still be decided once per part (it was retried,
    export and warning included, on every slice: 3.7x slower batch runs)."""
    import sys

    import torch

    from automedsam.backbones import runtime as runtime_module

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError, as when not installed
    attempts = []
    real = runtime_module.exported_onnx
    monkeypatch.setattr(runtime_module, "exported_onnx", lambda *a, **k: attempts.append(a[0].part) or real(*a, **k))
    backbone = build_backbone("litemedsam", device="cpu", runtime="openvino")
    images = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
    with caplog.at_level("WARNING"):
        first = backbone.encode(images).embeddings
        for _ in range(2):
            again = backbone.encode(images).embeddings
    assert attempts == ["encoder"] and backbone.runtime_id("encoder") == "torch"
    assert sum("cannot run it" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(first, again)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter, as the runtime uses
def test_only_the_linear_layers_are_put_in_bf16(tmp_path):
    """``openvino``'s encoder: matrix products with a weight go through bf16, convolutions and the
    products of two activations (attention's) stay in fp32, and the result stays close to fp32."""
    ov = pytest.importorskip("openvino")
    import torch

    from automedsam.backbones.runtime import bf16_linear_layers

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            tokens = self.conv(x).flatten(2).transpose(1, 2)  # (1, 64, 8)
            tokens = self.linear(tokens)
            return tokens @ tokens.transpose(1, 2)  # an activation product, no weight

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 4, 8, 8)
    torch.onnx.export(block, (x,), tmp_path / "block.onnx", dynamo=False)
    core = ov.Core()
    model = bf16_linear_layers(core.read_model(str(tmp_path / "block.onnx")))
    matmuls = [n for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"]
    in_bf16 = [all(n.get_input_element_type(i) == ov.Type.bf16 for i in range(2)) for n in matmuls]
    assert sorted(in_bf16) == [False, True]  # the linear layer's product, not attention's
    convolutions = [n for n in model.get_ordered_ops() if n.get_type_name() == "Convolution"]
    assert convolutions and all(n.get_input_element_type(0) == ov.Type.f32 for n in convolutions)
    assert model.output(0).get_element_type() == ov.Type.f32
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x.numpy())[0]
    with torch.no_grad():
        expected = block(x).numpy()
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 0.02


def test_a_prompt_batch_that_repeats_gets_a_static_compile_with_the_same_masks(isolated_home):
    """Every slice of an automatic run decodes its classes with one shape: from the third time on it
    runs on a static-shape compile (faster in OpenVINO), giving what the dynamic graph gives; single
    prompts (clicks) stay on the dynamic graph."""
    pytest.importorskip("openvino")
    import torch

    # openvino-bf16: OpenVINO's decoder on any CPU (plain openvino hands it to ONNX Runtime without bf16)
    backbone = build_backbone("tiny-sam", weights="random", device="cpu", runtime="openvino-bf16")
    features = backbone.encode(np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32))
    with torch.inference_mode():  # a compiled part serves calls without gradients only
        decoder = backbone.compiled("decoder")
    assert decoder is not None and decoder.specialised_shapes == []

    def decode(boxes):
        sparse, dense = backbone.embed_prompts(boxes=np.asarray(boxes, np.float32))
        with torch.inference_mode():
            return backbone.decode(features, sparse, dense).mask_logits

    three = [[10, 20, 120, 140], [60, 60, 200, 230], [0, 0, 255, 255]]
    dynamic = decode(three)
    for _ in range(3):
        assert decode(three[:1]).shape[0] == 1
    assert decoder.specialised_shapes == []  # single prompts never
    decode(three)
    assert decoder.specialised_shapes == []  # seen twice
    static = decode(three)
    assert [shape["sparse"][0] for shape in decoder.specialised_shapes] == [3]
    # The same graph: the kernels differ only in bf16 rounding (the decoder runs in bf16 where native).
    assert check_agreement([dynamic.numpy()], [static.numpy()], 0.02) < 0.02
    with backbone.eager():
        assert check_agreement([decode(three).numpy()], [static.numpy()], 0.05) < 0.05


@pytest.mark.parametrize("runtime", ("torch", *FAST_RUNTIMES))
def test_the_exported_decoder_is_the_stock_one_and_a_window_is_exact_inside(case, runtime):
    """The decoder graph the runtimes run (channels-last upscaling, cells of a window only) gives
    ``predict_masks``'s logits; a decode window gives the whole decode's logits inside it and the
    background logit outside, on every runtime; a window that does not fit is refused."""
    import torch

    from automedsam.backbones.base import OUTSIDE_WINDOW_LOGIT, ImageFeatures
    from automedsam.backbones.sam import mask_decoder_graph, window_cells

    backbone = build_backbone("litemedsam", device="cpu", runtime=runtime)
    engine = Engine(backbone)
    engine.set_volume(case.image)
    features: ImageFeatures = engine.store.features(14)
    sparse, dense = backbone.embed_prompts(boxes=np.array([[60.0, 70, 150, 160], [20, 30, 240, 200]]))
    with torch.inference_mode():
        stock = backbone.mask_decoder.predict_masks(features.embeddings, backbone.dense_pe(), sparse, dense)
        rows, cols = (torch.from_numpy(c) for c in window_cells(None, backbone.embedding_size))
        graph = mask_decoder_graph(backbone.mask_decoder)(features.embeddings, backbone.dense_pe(), sparse, dense,
                                                          rows, cols)
        assert check_agreement([t.numpy() for t in stock], [t.numpy() for t in graph], 1e-5) < 1e-5
        whole = backbone.decode(features, sparse, dense, multimask=True).mask_logits
        for window in ((0, 256, 0, 256), (37, 90, 101, 103), (250, 256, 0, 9), (0, 1, 255, 256)):
            got = backbone.decode(features, sparse, dense, multimask=True, window=window).mask_logits
            r0, r1, c0, c1 = window
            inside = got[..., r0:r1, c0:c1]
            assert check_agreement([whole[..., r0:r1, c0:c1].numpy()], [inside.numpy()], 1e-5) < 1e-5
            outside = got.clone()
            outside[..., r0:r1, c0:c1] = OUTSIDE_WINDOW_LOGIT
            assert (outside == OUTSIDE_WINDOW_LOGIT).all()
        for bad in ((0, 0, 0, 10), (10, 5, 0, 10), (0, 10, -1, 10), (0, 257, 0, 10), (0, 10, 0)):
            with pytest.raises(ValueError, match="decode window"):
                backbone.decode(features, sparse, dense, window=bad)


def test_a_crop_reads_only_the_logits_of_its_window():
    """``logits_window`` names every low-resolution pixel that ``logits_to_slice`` samples for a
    crop of voxels (borders, non-square slices, up- and downscaling): with the logits outside it
    replaced, the crop's values do not change, and they equal that part of the whole slice."""
    import torch

    from automedsam.preprocess import SliceTransform

    rng = np.random.default_rng(5)
    for height, width, size, mask_size in ((512, 512, 256, 256), (512, 400, 256, 256), (90, 130, 1024, 256),
                                           (301, 77, 256, 256)):
        transform = SliceTransform(height, width, size)
        logits = torch.from_numpy(rng.normal(size=(mask_size, mask_size)).astype(np.float32))
        whole = transform.logits_to_slice(logits)
        for _ in range(40):
            j0, i0 = int(rng.integers(0, height)), int(rng.integers(0, width))
            crop = (j0, int(rng.integers(j0 + 1, height + 1)), i0, int(rng.integers(i0 + 1, width + 1)))
            r0, r1, c0, c1 = transform.logits_window(crop, mask_size)
            assert 0 <= r0 < r1 <= mask_size and 0 <= c0 < c1 <= mask_size
            masked = torch.full_like(logits, -1e4)
            masked[r0:r1, c0:c1] = logits[r0:r1, c0:c1]
            got = transform.logits_to_slice(masked, crop)
            torch.testing.assert_close(got, whole[crop[0]:crop[1], crop[2]:crop[3]])


@pytest.mark.parametrize("runtime", ("onnxruntime", "torch"))
def test_the_glue_around_compiled_parts_runs_on_one_torch_thread(runtime):
    """A refine and an automatic slice beside a compiled encoder and decoder run PyTorch's small ops
    on one thread (its spinning workers would take the runtime's cores) and give the threads back
    after; on the PyTorch runtime, which does the heavy work itself, nothing changes."""
    import torch

    from automedsam.bundle import create_bundle
    from automedsam.classes import default_class_catalog
    from automedsam.preprocess import IntensityConfig
    from automedsam.prompt_networks import build_prompt_network, default_config
    from automedsam.volume import Volume

    backbone = build_backbone("tiny-sam", weights="random", device="cpu", runtime=runtime)
    classes = [default_class_catalog().get("liver")]
    network = build_prompt_network("classmap", default_config("classmap", backbone, 1))
    engine = Engine(backbone, create_bundle(backbone, network, classes, IntensityConfig.ct(), name="glue"))
    rng = np.random.default_rng(0)
    engine.set_volume(Volume(rng.normal(0, 200, (2, 64, 64)).astype(np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
    seen = []
    real_decode = backbone.decode
    backbone.decode = lambda *a, **k: seen.append(torch.get_num_threads()) or real_decode(*a, **k)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # more than one, whatever the machine: one is what the glue must get
    try:
        engine.segment_volume(["liver"])
        engine.refine("liver", 1, points=[(30, 30)], point_labels=[1], mask=np.zeros((64, 64), bool))
        engine.refine("liver", 1, box=(10, 10, 40, 40), mode="manual")
        assert torch.get_num_threads() == 2  # given back
    finally:
        del backbone.decode
        torch.set_num_threads(before)
    assert len(seen) >= 3
    assert set(seen) == ({1} if runtime != "torch" else {2})
