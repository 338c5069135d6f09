"""Same CT, other voxel orders: does a bundle give the same masks? (issue 27's check, real weights)

Usage: .venv/bin/python scripts/orientation_agreement.py BUNDLE [SHARED=../shared] [OUT=/tmp/orientation]

Writes the shared 3 mm CT again in other voxel orders with SimpleITK (identical physical space:
rows and columns flipped, stored sagittally, flipped and transposed), segments each with BUNDLE
and prints JSON: per copy and class the DSC, in physical space, against the masks of the original;
the original's DSC against the reference labels; and the DICOM series (0.98 mm) against its labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from automedsam.engine import Engine
from automedsam.io import read_image, read_label_map
from automedsam.metrics import dice
from automedsam.resample import labels_onto_grid

CLASSES = {"liver": 5, "spleen": 1, "right_kidney": 2, "left_kidney": 3}
COPIES = {
    "flipped_ij": lambda image: sitk.Flip(image, [True, True, False]),
    "sagittal_stack": lambda image: sitk.PermuteAxes(image, [2, 1, 0]),
    "flipped_ik_transposed_ij": lambda image: sitk.PermuteAxes(sitk.Flip(image, [True, False, True]), [1, 0, 2]),
}


def on_grid_of(mask, other, reference) -> np.ndarray:
    """A ``(K, J, I)`` mask on ``other``'s grid, read at ``reference``'s voxel centres."""
    shape = reference.array.shape[:3]
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    lps = reference.index_to_lps(np.column_stack([i.ravel(), j.ravel(), k.ravel()]))
    ijk = np.rint(other.lps_to_index(lps)).astype(int)
    return mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]].reshape(shape)


def main(bundle: str, shared: str = "../shared", out: str = "/tmp/orientation") -> dict:
    data, folder = Path(shared) / "data" / "ct_abdomen", Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    engine = Engine.from_bundle(bundle, "cpu")

    def segment(volume):
        engine.set_volume(volume)
        return engine.segment_volume(list(CLASSES)).masks

    original = read_image(data / "ct_lowres.nii.gz")
    labels = labels_onto_grid(read_label_map(data / "ct_lowres_labels.nii.gz"), original).array
    reference = segment(original)
    report = {"original_vs_labels": {c: round(dice(reference[c], labels == v), 4) for c, v in CLASSES.items()}}
    image = sitk.ReadImage(str(data / "ct_lowres.nii.gz"))
    for name, make in COPIES.items():
        path = folder / f"{name}.nii.gz"
        sitk.WriteImage(make(image), str(path))
        other = read_image(path)
        masks = segment(other)
        report[name] = {c: round(dice(on_grid_of(masks[c], other, original), reference[c]), 4) for c in CLASSES}
    dicom = read_image(data / "ct_dicom")
    dicom_labels = labels_onto_grid(read_label_map(data / "ct_dicom_labels.nii.gz"), dicom).array
    masks = segment(dicom)
    report["dicom_0.98mm_vs_labels"] = {c: round(dice(masks[c], dicom_labels == v), 4)
                                        for c, v in CLASSES.items() if (dicom_labels == v).any()}
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:]), indent=1))
