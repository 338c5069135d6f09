"""CPU inference runtimes: a frozen backbone part (image encoder, mask decoder) exported to ONNX once
and run by OpenVINO or ONNX Runtime instead of PyTorch.

Why: on a clinician's CPU the PyTorch fp32 image encoder is the slowest step before the first mask.
OpenVINO runs the same graph with fused kernels and, on CPUs with native bf16 (AVX512-BF16 or AMX),
in bf16; ONNX Runtime runs it in fp32. The PyTorch path stays the fallback (nothing installed, an
export or compile that fails) and is what training uses (gradients).

Runtimes (a :class:`~automedsam.backbones.registry.Runtime`; the user picks one with ``--cpu-runtime`` or
``AUTOMEDSAM_CPU_RUNTIME``):

- ``auto`` (default): ``openvino`` if installed, else ``onnxruntime`` if installed, else ``torch``.
- ``openvino``: the image encoder's linear layers (matrix products with a weight) in bf16 where the
  CPU has it natively, its convolutions, attention products, norms and residual sums in fp32 (about
  1.3x an fp32 encoder); the mask decoder in native bf16 (else fp32). Masks agree with PyTorch's to
  DSC >= 0.99 per class on the shared CT (0.993 on its right kidney, the least). Why not bf16
  throughout: OpenVINO's native bf16 also keeps convolutions and the residual stream in bf16, and
  the convolutions are where the error comes from (0.977 on that kidney, where the model itself is
  unsure); the linear layers alone cost a third of it. On a CPU without native bf16 (AVX2 only)
  the decoder runs on ONNX Runtime when it is installed (:func:`part_runtime`): there both are
  fp32, and ONNX Runtime ran LiteMedSAM's decoder in 40 ms for one prompt and 213 ms for five, where
  OpenVINO took 56 and 249 ms (its encoder stays on OpenVINO: 690 vs 732 ms).
- ``openvino-bf16``: encoder and decoder in native bf16: the fastest (about 1.4x ``openvino``'s
  encoder), at that small cost in agreement.
- ``openvino-f32``: OpenVINO, fp32 throughout.
- ``onnxruntime``: ONNX Runtime's CPU provider, fp32.
- ``torch``: PyTorch only.

Cache: ``$AUTOMEDSAM_HOME/compiled/<key>/<part>.onnx``, the key a sha256 of the backbone id, its
weights fingerprint (the weights file's sha256), the part's own weights (a fine-tuned decoder gets
its own file), the input shapes and the torch version that exported it; OpenVINO's compiled blobs go
to ``$AUTOMEDSAM_HOME/compiled/openvino-<version>/``. Files are written to a temporary name and
renamed, so a crash never leaves a half-written model that a later run would trust.

Threads: ``AUTOMEDSAM_CPU_THREADS``, else every core this process may run on (its CPU affinity).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError, RuntimeUnavailableError
from ..models import automedsam_home

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUNTIME_ENV = "AUTOMEDSAM_CPU_RUNTIME"
THREADS_ENV = "AUTOMEDSAM_CPU_THREADS"
RUNTIMES = ("auto", "openvino", "openvino-bf16", "openvino-f32", "onnxruntime", "torch")
#: What each runtime needs installed (Python distribution name).
_PACKAGES = {"openvino": "openvino", "openvino-bf16": "openvino", "openvino-f32": "openvino",
             "onnxruntime": "onnxruntime"}
#: OpenVINO's precision per part: "f32"; None for the CPU's native inference precision (bf16 on
#: CPUs with AVX512-BF16 or AMX, else fp32); "bf16-linear": fp32, but the linear layers in bf16 where
#: the CPU has it natively (:func:`bf16_linear_layers`).
_OPENVINO_PRECISION = {
    "openvino": {"encoder": "bf16-linear", "decoder": None},
    "openvino-bf16": {"encoder": None, "decoder": None},
    "openvino-f32": {"encoder": "f32", "decoder": "f32"},
}
#: Bump when the exported graphs change meaning (another wrapper, another opset).
EXPORT_FORMAT = "2"
ONNX_OPSET = 17


def cpu_threads() -> int:
    """Threads for CPU inference: ``$AUTOMEDSAM_CPU_THREADS``, else the cores this process may use."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise InvalidInputError(f"{THREADS_ENV} must be a whole number >= 1, got {value!r}")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def threads_beside_gui(cores: int | None = None) -> int:
    """Threads for a worker that runs beside an interactive application (Slicer): all cores but one,
    which stays free for the GUI. On one or two cores it takes them all: halving a two-core machine
    costs every segmentation twice the time while the GUI mostly waits; the worker runs at a lower
    priority instead (``serve --lower-priority``), so the GUI still wins the core when it needs it."""
    cores = cores or cpu_threads()
    return cores - 1 if cores >= 3 else cores


@functools.cache
def openvino_has_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 on this CPU (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def part_runtime(runtime: str, part: str) -> str:
    """The runtime that runs ``part`` (``"encoder"``, ``"decoder"``) when ``runtime`` is asked for:
    ``runtime`` itself, except that ``openvino``'s mask decoder runs on ONNX Runtime (if installed)
    on a CPU without native bf16, where both runtimes are fp32 and ONNX Runtime is the faster
    (see the module docstring). The explicit ``openvino-bf16`` / ``openvino-f32`` keep OpenVINO."""
    if runtime == "openvino" and part == "decoder" and _installed("onnxruntime") and not openvino_has_native_bf16():
        return "onnxruntime"
    return runtime


def _installed(runtime: str) -> str | None:
    """The installed version of the package a runtime needs, or None."""
    package = _PACKAGES[runtime]
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_runtime(runtime: str | None = "auto") -> str:
    """The runtime named ``runtime`` (None: ``auto``); ``auto`` becomes the best one installed. The
    user's process-wide choice (``$AUTOMEDSAM_CPU_RUNTIME``) is read by
    :meth:`automedsam.backbones.registry.Runtime.from_environment`, not here.

    Raises:
        InvalidInputError: an unknown name.
        RuntimeUnavailableError: a runtime asked for by name whose package is not installed.
    """
    name = (runtime or "auto").strip().lower()
    if name not in RUNTIMES:
        raise InvalidInputError(f"unknown CPU runtime {name!r}; use one of: {', '.join(RUNTIMES)}")
    if name == "auto":
        return next((r for r in ("openvino", "onnxruntime") if _installed(r)), "torch")
    if name != "torch" and not _installed(name):
        raise RuntimeUnavailableError(
            f"CPU runtime {name!r} needs the Python package {_PACKAGES[name]}: run `pip install {_PACKAGES[name]}`, "
            f"or choose the torch runtime (--cpu-runtime torch, or {RUNTIME_ENV}=torch)")
    return name


@dataclass(frozen=True)
class ExportSpec:
    """How to export one part: the module, example inputs, the ONNX names and dynamic axes."""

    part: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


class CompiledPart:
    """An exported part run by OpenVINO or ONNX Runtime: numpy arrays in (in ``input_names`` order;
    floating point ones as float32, integer ones as int64), a list of numpy arrays out (in
    ``output_names`` order)."""

    def __init__(self, runtime: str, onnx_path: Path, spec: ExportSpec, threads: int):
        self.runtime = runtime
        self.onnx_path = onnx_path
        self.input_names = spec.input_names
        self.threads = threads
        if runtime.startswith("openvino"):
            import openvino as ov

            core = ov.Core()
            blobs = onnx_path.parent.parent / f"openvino-{ov.__version__.split('-')[0]}"
            core.set_property({"CACHE_DIR": str(blobs)})
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
            if threads < (os.cpu_count() or threads):
                # Sharing the machine (batch workers, a worker beside Slicer): OpenVINO would pin its
                # threads to the first cores, every process to the same ones (measured: two one-thread
                # batch workers each got half of core 0, 3.6x slower per case).
                config["ENABLE_CPU_PINNING"] = False
            precision = _OPENVINO_PRECISION[runtime].get(spec.part, "f32")
            model: object = str(onnx_path)
            linear_in_bf16 = precision == "bf16-linear" and "BF16" in core.get_property(
                "CPU", "OPTIMIZATION_CAPABILITIES")
            if precision == "bf16-linear":
                precision = "f32"
                if linear_in_bf16:
                    model = bf16_linear_layers(core.read_model(str(onnx_path)))
            if precision is not None:
                config["INFERENCE_PRECISION_HINT"] = precision
            compiled = core.compile_model(model, "CPU", config)
            # "bf16", "f32", or "bf16-linear" (fp32 with the linear layers in bf16)
            self.precision = ("bf16-linear" if linear_in_bf16
                              else compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
            self._request = compiled.create_infer_request()
            self.version = ov.__version__.split("-")[0]
            self._specialise = _ShapeSpecialiser(core, model, config, compiled)
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            self.precision = "f32"
            self.version = ort.__version__

    @property
    def specialised_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Input shapes (by name) that run on a static-shape compile (OpenVINO; see
        :class:`_ShapeSpecialiser`)."""
        return self._specialise.shapes if self.runtime.startswith("openvino") else []

    @property
    def id(self) -> str:
        """``"<runtime> <version> <precision>"``: what computed a result (embedding cache keys)."""
        return f"{self.runtime.split('-')[0]} {self.version} {self.precision}"

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(a, dtype=np.int64 if np.asarray(a).dtype.kind in "iu" else np.float32)
                for name, a in zip(self.input_names, arrays, strict=True)}
        if self.runtime.startswith("openvino"):
            # Inputs are read in place (no copy); outputs are copied: the request reuses its buffers.
            request = self._specialise.request_for(feed) or self._request
            results = request.infer(feed, share_inputs=True, share_outputs=True)
            return [np.array(out) for out in results.values()]
        return self._session.run(None, feed)


class _ShapeSpecialiser:
    """Static-shape compiles of a model with dynamic inputs, for the shapes that keep coming back.

    Why: OpenVINO's CPU plugin runs a dynamic-shape graph slower than the same graph compiled for
    fixed shapes (LiteMedSAM's decoder, five prompts: 141 -> 108 ms; one prompt: 25 -> 23 ms), and an
    automatic run decodes every slice with one shape (its classes' prompts). A shape gets its own
    compile (about 0.3 s) the ``after``-th time it is seen; calls with a single prompt (clicks, whose
    point count changes as the user adds them) stay on the dynamic model, where the 2 ms would not
    pay for a compile in the middle of an interaction. At most ``limit`` shapes are kept.
    """

    def __init__(self, core, model, config: dict, compiled, *, after: int = 3, limit: int = 4):
        self._dynamic = [i.get_any_name() for i in compiled.inputs if i.get_partial_shape().is_dynamic]
        self._core, self._model, self._config = core, model, config
        self._after, self._limit = after, limit
        self._seen: dict[tuple, int] = {}
        self._requests: dict[tuple, object] = {}

    @property
    def shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The dynamic inputs' shapes that have a static compile, by input name."""
        return [dict(zip(self._dynamic, key, strict=True)) for key in self._requests]

    def request_for(self, feed: dict[str, np.ndarray]):
        """The static compile's infer request for this feed's shapes, or None (use the dynamic one)."""
        if not self._dynamic:
            return None
        key = tuple(feed[name].shape for name in self._dynamic)
        request = self._requests.get(key)
        if request is not None or len(self._requests) >= self._limit or key[0][0] <= 1:
            return request
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] < self._after:
            return None
        model = self._core.read_model(self._model) if isinstance(self._model, str) else self._model.clone()
        model.reshape(dict(zip(self._dynamic, key, strict=True)))
        request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        self._requests[key] = request
        log.debug("compiled a static-shape copy for %s", dict(zip(self._dynamic, key, strict=True)))
        return request


#: Operations a weight reaches a matrix product through (OpenVINO's ONNX import keeps some).
_WEIGHT_PATH = ("Convert", "Transpose", "Reshape", "Unsqueeze", "Squeeze")


def _is_weight(output) -> bool:
    node = output.get_node()
    while node.get_type_name() in _WEIGHT_PATH:
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def bf16_linear_layers(model):
    """An OpenVINO model (changed in place and returned) whose linear layers, the ``MatMul``s with a
    constant weight, take bf16 inputs and give their result back in fp32: run with an fp32
    inference precision, OpenVINO's CPU plugin runs exactly those in its bf16 kernels (AVX512-BF16,
    AMX) and everything else (convolutions, attention's activation products, softmax, norms, the
    residual stream) in fp32, much as ``torch.autocast`` would with only ``nn.Linear`` enabled."""
    import openvino as ov
    import openvino.opset13 as ops

    for node in list(model.get_ordered_ops()):
        if node.get_type_name() != "MatMul" or not _is_weight(node.input_value(1)):
            continue
        for i in range(2):
            node.input(i).replace_source_output(ops.convert(node.input_value(i), ov.Type.bf16).output(0))
        consumers = list(node.output(0).get_target_inputs())
        back = ops.convert(node.output(0), ov.Type.f32)
        for consumer in consumers:
            consumer.replace_source_output(back.output(0))
    model.validate_nodes_and_infer_types()
    return model


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, dtypes and bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_key(backbone_id: str, fingerprint: str, spec: ExportSpec, part_digest: str) -> str:
    """The cache key of an exported part (see the module docstring)."""
    import torch

    shapes = [tuple(x.shape) for x in spec.example_inputs]
    text = "|".join([EXPORT_FORMAT, backbone_id, fingerprint, spec.part, part_digest, str(shapes),
                     str(sorted(spec.dynamic_axes.items())), torch.__version__.split("+")[0], str(ONNX_OPSET)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def exported_onnx(spec: ExportSpec, key: str, cache_root: Path | None = None) -> Path:
    """The part's ONNX file in the cache, exported first if it is not there."""
    import warnings

    import torch

    folder = (cache_root or automedsam_home() / "compiled") / key
    path = folder / f"{spec.part}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{spec.part}.{os.getpid()}.tmp.onnx"
    log.info("exporting the %s to ONNX (once; cached in %s)", spec.part, folder)
    with warnings.catch_warnings(), torch.no_grad():  # the tracer's notes on shape arithmetic are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, spec.example_inputs, str(tmp), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes,
                          opset_version=ONNX_OPSET, dynamo=False)
    os.replace(tmp, path)
    return path


def compile_part(runtime: str, spec: ExportSpec, backbone_id: str, fingerprint: str,
                 threads: int | None = None, cache_root: Path | None = None) -> CompiledPart:
    """Export (or find in the cache) and compile one part for ``runtime`` (not ``torch``/``auto``;
    :func:`part_runtime` says which runtime a part then gets)."""
    key = export_key(backbone_id, fingerprint, spec, weights_digest(spec.module))
    path = exported_onnx(spec, key, cache_root)
    return CompiledPart(part_runtime(runtime, spec.part), path, spec, threads or cpu_threads())


def check_agreement(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], tolerance: float) -> float:
    """Largest absolute difference between two output lists, relative to the largest expected
    magnitude; raises RuntimeUnavailableError above ``tolerance`` (a runtime that computes
    something else must not be used)."""
    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape:
            raise RuntimeUnavailableError(f"compiled part returned shape {g.shape}, PyTorch {e.shape}")
        scale = max(float(np.abs(e).max()), 1e-6)
        difference = float(np.abs(e - g).max()) / scale
        worst = difference if not np.isfinite(difference) else max(worst, difference)  # NaN stays NaN
        if not np.isfinite(worst):
            break
    if not np.isfinite(worst) or worst > tolerance:
        raise RuntimeUnavailableError(f"compiled part disagrees with PyTorch (relative difference {worst:.3g})")
    return worst
