"""What a refine click costs Slicer's main thread, measured on Slicer's own MRML libraries (slicer-core).

A 512 x 512 x 200 CT (the shared DICOM series, 20 slices, stacked ten times) with five class segments
(from its reference labels) in one segmentation node; the Logic refines one class per click as the
panel runs it (the job's model work on a thread of its own), and the time the calling thread spends
in ``refine`` and in the job's steps is measured: p50 and p95 over ``--clicks`` clicks. Also the
memory of the segmentation node's labelmaps, against the same segments written by slicer.util
(a full-extent labelmap each) and one uint8 label map of the volume.

    .venv/bin/python scripts/slicer_click_latency.py [SHARED_DIR] [--clicks 20]

Prints JSON. The model is a small random one (its time is spent off the main thread, which is
what this measures), so the figures are the Slicer layer's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 5, "pancreas": 7}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shared", nargs="?", default=str(REPO.parent / "shared"))
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=10, help="how many times the 20-slice series is stacked")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO / "Testing"), str(REPO / "AutoMedSAMSlicer")]
    import slicer_fake
    from slicer_mrml import add_segment, segmentation_node, volume_node, world_of_voxel

    from automedsam.io import read_image, read_label_map
    from automedsam.resample import labels_onto_grid

    slicer_fake.install()
    ct_dir = Path(args.shared) / "data" / "ct_abdomen"
    image = read_image(ct_dir / "ct_dicom")
    labels = labels_onto_grid(read_label_map(ct_dir / "ct_dicom_labels.nii.gz"), image).array
    array = np.concatenate([image.array] * args.repeat)
    labels = np.concatenate([labels] * args.repeat)
    ijk_to_ras = image.ijk_to_ras()
    node = volume_node(array, ijk_to_ras, "ct 512x512x200")
    from AutoMedSAMSlicerLib import nodes
    from AutoMedSAMSlicerLib.backends import InProcessBackend
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    from automedsam.classes import resolve_class

    # As a segmentation run writes them (AutoMedSAMSlicerLib.nodes), and, for the memory comparison,
    # as slicer.util's own writer (a full-extent labelmap per segment) would.
    seg = nodes.newSegmentationNode(node, "five classes")
    for name, value in CLASSES.items():
        sid = nodes.addClassSegment(seg, resolve_class(name))
        nodes.writeSegmentMask(seg, sid, labels == value, node)
    full = segmentation_node("five classes, slicer.util")
    for name, value in CLASSES.items():
        add_segment(full, name, labels == value, node)

    from automedsam.backbones.registry import ModelRegistry, Runtime
    from automedsam.engine import Engine

    engines = InProcessBackend()
    engine = Engine.manual("tiny-sam", "cpu", weights="random", registry=ModelRegistry(Runtime("cpu", "torch")))
    engines.adopt("bench", "auto", engine)
    logic = AutoMedSAMSlicerLogic(engines)
    logic.backendName, logic.defaultModel = "inprocess", "bench"

    def click(k: int) -> float:
        liver = np.argwhere(labels[k] == CLASSES["liver"])
        j, i = liver[len(liver) // 2] if len(liver) else (256, 256)
        point = world_of_voxel(node, (int(i), int(j), k))
        t0 = time.perf_counter()
        job = logic.refine(node, seg, "liver", points=[point], mode="manual", waitForCompletion=False)
        spent = time.perf_counter() - t0
        job.background = True  # as the panel steps it
        while True:
            t0 = time.perf_counter()
            running = job.step()
            spent += time.perf_counter() - t0
            if not running:
                break
            time.sleep(0.005)
        if job.error is not None:
            raise job.error
        return spent * 1000

    click(len(array) // 2)  # the first click sends the volume: not a click's usual cost
    ks = np.linspace(5, len(array) - 6, args.clicks).astype(int)
    times = [click(int(k)) for k in ks]
    print(json.dumps({
        "volume": list(array.shape), "classes": len(CLASSES), "clicks": len(times),
        "main_thread_ms_p50": round(float(np.percentile(times, 50)), 1),
        "main_thread_ms_p95": round(float(np.percentile(times, 95)), 1),
        "segmentation_labelmaps_mb": labelmaps_mb(seg),
        "segmentation_labelmaps_mb_slicer_util": labelmaps_mb(full),
        "one_uint8_labelmap_mb": round(array.size / 2**20, 1),
    }, indent=1))
    slicer_fake.uninstall()
    return 0


def labelmaps_mb(seg) -> float:
    """Memory of the distinct labelmaps a segmentation node holds (MB)."""
    segmentation = seg.GetSegmentation()
    images = {}
    for n in range(segmentation.GetNumberOfSegments()):
        image_data = segmentation.GetNthSegment(n).GetRepresentation("Binary labelmap")
        images[image_data.GetAddressAsString("vtkOrientedImageData")] = image_data.GetActualMemorySize()
    return round(sum(images.values()) / 1024, 1)


if __name__ == "__main__":
    sys.exit(main())
