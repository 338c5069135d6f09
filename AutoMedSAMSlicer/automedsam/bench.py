"""Speed and memory benchmark behind ``automedsam bench`` (JSON out; targets live here, not in tests).

For each backbone (random weights unless ``weights`` names cached ones) and a volume of N slices:

- ``encoder_ms_per_slice``: image encoder time per slice as the engine runs it (its CPU runtime, e.g.
  OpenVINO; batched as the engine batches); ``encoder_ms_per_slice_torch``: the PyTorch fp32 path
  on the same slices in the same run (up to 8 of them), ``encoder_speedup_vs_torch`` their ratio.
- ``runtime_encoder`` / ``runtime_decoder``: what ran each part; ``runtime_compile_s``: exporting and
  compiling both at first use (from the on-disk export cache when it has them).
- ``refine_ms_p50/p95``: click-to-mask, :meth:`Engine.refine` of one + click on a cached slice
  with learned + manual prompts (semi-automatic), from the mapping to model pixels to the slice
  mask, repeated ``repeats`` times after one warm-up click.
- ``stock_predict_ms_p50``: the stock ``SamPredictor`` / ``SAM2ImagePredictor`` ``predict()`` with
  the same points on the same already-set image (LiteMedSAM: its reference inference with a box).
- ``volume_s_1_class`` / ``volume_s_5_classes``: whole-volume ``segment`` from a cold engine.
- ``naive_s_5_classes``: the naive way: stock predictor ``set_image`` + ``predict`` per slice per class
  (LiteMedSAM: its own reference inference, encoder included, per slice and class), PyTorch; left
  out with ``naive=False`` (it costs 5 encoder passes per slice).
- ``cached_resegment_decode_s``: ``segment`` of the 5 classes again on the cached embeddings
  (prompt network and decoder run again); ``cached_resegment_s``: once more, with the engine's memoised
  automatic results as well (what a user re-running segment with other options gets).
- ``peak_rss_mb``: the process's peak resident memory so far.
- ``service_refine_ms_p50/p95`` and ``service_overhead_ms_p50``: the same click-to-mask through a
  local worker process on loopback (HTTP, JSON, packed-bit masks); the overhead is the median over
  interleaved pairs (a worker click, then the same click in process) of their difference, so a
  change in the machine's speed between two timing loops does not show up as overhead.
"""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np

from . import __version__
from .prompt_networks import DEFAULT_PROMPT_NETWORK
from .volume import Volume

BENCH_CLASSES = ("liver", "spleen", "left_kidney", "right_kidney", "pancreas")


def phantom_volume(num_slices: int, size: int = 512) -> Volume:
    """A CT-like phantom (HU): body ellipse with organ-like blobs, ``num_slices`` x size x size."""
    rng = np.random.default_rng(0)
    jj, ii = np.mgrid[0:size, 0:size] / size
    body = ((ii - 0.5) / 0.42) ** 2 + ((jj - 0.5) / 0.33) ** 2 < 1
    slices = []
    for k in range(num_slices):
        img = np.full((size, size), -1000.0)
        img[body] = 20.0
        for cx, cy, r, hu in ((0.35, 0.45, 0.12, 60.0), (0.68, 0.42, 0.06, 45.0), (0.62, 0.6, 0.04, 150.0)):
            r_k = r * (1.0 - 0.3 * abs(k - num_slices / 2) / max(num_slices, 1))
            img[((ii - cx) ** 2 + (jj - cy) ** 2) < r_k ** 2] = hu
        slices.append(img + rng.normal(0, 10, img.shape))
    return Volume(np.stack(slices).astype(np.int16), (0.8, 0.8, 2.5), (-200.0, -200.0, 0.0), name="phantom")


def _time_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _p(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _uint8_rgb(engine, k: int) -> np.ndarray:
    from .preprocess import normalize_intensity

    grey = normalize_intensity(engine.volume.array[k], engine.store.value_range)
    return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)


def bench_backbone(backbone_id: str, volume: Volume, *, repeats: int = 20, device: str = "cpu",
                   weights: str | None = "random", prompt_network: str = DEFAULT_PROMPT_NETWORK,
                   service: bool = False, naive: bool = True, runtime: str | None = None) -> dict:
    """Measure one backbone (see the module docstring); ``service`` adds refine through a worker,
    ``runtime`` names the CPU runtime (None: the process's; see
    :func:`~automedsam.backbones.registry.default_registry`).
    The backbone is built afresh (its own registry), so load and compile times are measured."""
    import torch

    from .backbones.registry import ModelRegistry, Runtime, default_registry
    from .bundle import create_bundle
    from .classes import default_class_catalog
    from .engine import Engine
    from .preprocess import IntensityConfig
    from .prompt_networks import build_prompt_network, default_config

    runtime = runtime or default_registry().runtime.cpu
    registry = ModelRegistry(Runtime(device, runtime))
    backbone = registry.backbone(backbone_id, weights=weights)
    t = time.perf_counter()
    runtimes = {part: backbone.runtime_id(part) for part in ("encoder", "decoder")}
    compile_s = time.perf_counter() - t
    classes = [default_class_catalog().get(c) for c in BENCH_CLASSES]
    gen = build_prompt_network(prompt_network, default_config(prompt_network, backbone, len(classes)))
    bundle = create_bundle(backbone, gen, classes, IntensityConfig.ct(), name=f"bench-{backbone_id}")
    n, k_mid = volume.num_slices, volume.num_slices // 2
    height, width = volume.array.shape[1:3]
    points = np.array([[width * 0.4, height * 0.45], [width * 0.8, height * 0.2]])
    labels = np.array([1, 0])
    box = np.array([width * 0.2, height * 0.2, width * 0.6, height * 0.7])

    def cold_engine() -> Engine:
        e = Engine(backbone, bundle, registry=registry)
        e.set_volume(volume)
        return e

    # Whole-volume runs from a cold engine (encoding included).
    e1 = cold_engine()
    t = time.perf_counter()
    e1.segment_volume([BENCH_CLASSES[0]])
    volume_1 = time.perf_counter() - t
    e5 = cold_engine()
    t = time.perf_counter()
    e5.encode(range(n))
    encode_s = time.perf_counter() - t
    e5.segment_volume(list(BENCH_CLASSES))
    volume_5 = time.perf_counter() - t
    e5.clear_result_cache()  # embedding cache only: prompt network + decoder run again
    t = time.perf_counter()
    e5.segment_volume(list(BENCH_CLASSES))
    resegment_decode = time.perf_counter() - t
    t = time.perf_counter()  # embeddings and memoised automatic results (another run, other cleanup, ...)
    e5.segment_volume(list(BENCH_CLASSES), cleanup="none")
    resegment = time.perf_counter() - t
    torch_slices = list(range(min(n, 8)))
    with backbone.eager():  # the PyTorch fp32 encoder on the same slices, same run
        e_torch = cold_engine()
        t = time.perf_counter()
        e_torch.encode(torch_slices)
        encode_torch_s = time.perf_counter() - t

    # Click-to-mask on a cached slice vs the stock predictor on the same set image. Each click sends
    # the slice's mask as a caller would (a fresh interaction each time, so all clicks are alike).
    shown = e5.refine(BENCH_CLASSES[0], k_mid, points=points[:1], point_labels=labels[:1], reset=True)

    def click():
        e5.refine(BENCH_CLASSES[0], k_mid, points=points[:1], point_labels=labels[:1], reset=True, mask=shown)

    click()  # warm-up (learned prompts cached)
    refine = _time_ms(click, repeats)
    predictor = backbone.stock_predictor()
    with torch.inference_mode():
        predictor.set_image(_uint8_rgb(e5, k_mid))
        stock = _time_ms(lambda: predictor.click(points, labels, box), repeats)

    # The naive way: one stock set_image + predict per slice per class.
    naive_5 = None
    if naive:
        t = time.perf_counter()
        with torch.inference_mode():
            for k in range(n):
                image = _uint8_rgb(e5, k)
                for _ in BENCH_CLASSES:
                    predictor.set_image(image)
                    predictor.box(box)
        naive_5 = time.perf_counter() - t

    result = {
        "backbone": backbone_id,
        "weights": backbone.weights_fingerprint,
        "prompt_network": prompt_network,
        "slices": n,
        "slice_shape_ji": [int(height), int(width)],
        "runtime_encoder": runtimes["encoder"],
        "runtime_decoder": runtimes["decoder"],
        "runtime_compile_s": round(compile_s, 2),
        "cpu_threads": torch.get_num_threads(),
        "encoder_ms_per_slice": round(encode_s * 1000.0 / n, 2),
        "encoder_ms_per_slice_torch": round(encode_torch_s * 1000.0 / len(torch_slices), 2),
        "encoder_speedup_vs_torch": round((encode_torch_s / len(torch_slices)) / (encode_s / n), 2),
        "refine_ms_p50": _p(refine, 50),
        "refine_ms_p95": _p(refine, 95),
        "stock_predict_ms_p50": _p(stock, 50),
        "refine_vs_stock_p50": round(statistics.median(refine) / statistics.median(stock), 3),
        "volume_s_1_class": round(volume_1, 3),
        "volume_s_5_classes": round(volume_5, 3),
        "five_vs_one_class": round(volume_5 / volume_1, 3),
        "naive_s_5_classes": None if naive_5 is None else round(naive_5, 3),
        "speedup_vs_naive_5_classes": None if naive_5 is None else round(naive_5 / volume_5, 2),
        "cached_resegment_s": round(resegment, 3),
        "resegment_speedup": round(volume_5 / resegment, 2),
        "cached_resegment_decode_s": round(resegment_decode, 3),
        "resegment_decode_speedup": round(volume_5 / resegment_decode, 2),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if service:
        result.update(service_refine_latency(volume, bundle, repeats=repeats, device=device, runtime=runtime,
                                             local_click=click))
    return result


def service_refine_latency(volume: Volume, bundle, *, repeats: int, device: str, runtime: str | None = None,
                           local_click: Callable[[], object] | None = None) -> dict:
    """Click-to-mask through a local worker on loopback (same bundle, same slice, same clicks, same
    CPU runtime). With ``local_click`` (the same click in process) each worker click is paired with
    one in process, and ``service_overhead_ms_p50`` is the median of the pairs' differences."""
    import os
    import tempfile
    from pathlib import Path

    from .backbones.runtime import RUNTIME_ENV
    from .worker import LocalWorker

    k, (height, width) = volume.num_slices // 2, volume.array.shape[1:3]
    points = np.array([[width * 0.4, height * 0.45], [width * 0.8, height * 0.2]])
    labels = np.array([1, 0])
    env = (os.environ | {RUNTIME_ENV: runtime}) if runtime else None
    with tempfile.TemporaryDirectory() as tmp, LocalWorker(device=device, env=env) as worker:
        path = bundle.save(Path(tmp) / "bench.zip")
        remote = worker.client(bundle=str(path))
        remote.set_volume(volume)
        shown = remote.refine(BENCH_CLASSES[0], k, points=points[:1], point_labels=labels[:1], reset=True)

        def click():  # the same click as in process, the slice's mask sent along
            remote.refine(BENCH_CLASSES[0], k, points=points[:1], point_labels=labels[:1], reset=True, mask=shown)

        click()  # encodes the slice, warms up
        times, overheads = [], []
        for _ in range(repeats):
            times.append(_time_ms(click, 1)[0])
            if local_click is not None:
                overheads.append(times[-1] - _time_ms(local_click, 1)[0])
        remote.close()
    result = {"service_refine_ms_p50": _p(times, 50), "service_refine_ms_p95": _p(times, 95)}
    if overheads:
        result["service_overhead_ms_p50"] = round(statistics.median(overheads), 2)
    return result


def environment(device: str) -> dict:
    import torch

    from .backbones.registry import default_registry

    versions = {"automedsam": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for module in ("segment_anything", "sam2", "numpy", "SimpleITK", "openvino", "onnxruntime"):
        try:
            versions[module] = importlib.metadata.version(module.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    return {
        "device": device if device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_runtime": default_registry().runtime.resolved().cpu,
        "versions": versions,
    }
