"""Reading and writing images and segmentations with their geometry.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``),
a DICOM series folder (all read with SimpleITK, i.e. in LPS), Slicer ``.seg.nrrd`` segmentations
(through slicerio, with segment names, label values, colours and terminology), and 2-D pictures
(PNG, JPEG, BMP, TIFF) loaded as single-slice volumes with 1 mm pixels.

Every array returned is KJI-indexed (``array[k, j, i]``); see :mod:`automedsam.volume`.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .segmentation import Segmentation, SegmentInfo
from .volume import Volume

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SEG_NRRD_SUFFIX = ".seg.nrrd"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (SEG_NRRD_SUFFIX, ".nii.gz", *VOLUME_SUFFIXES, *PICTURE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidInputError(f"{what} not found: {p}. Check the path (relative paths start at {Path.cwd()}).")
    check_regular(p, what)
    if p.is_file() and p.stat().st_size == 0:
        raise InvalidInputError(f"{what} {p} is an empty file (0 bytes); it was probably not copied completely.")
    return p


def check_regular(path: Path, what: str = "input") -> None:
    """Refuse, without opening it, a path that is neither a regular file nor a folder: a FIFO, a
    socket or a device would block a reader forever or stream without end.

    Raises:
        InvalidInputError: names the path and what it is.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise InvalidInputError(f"{what} {path} is {kind}, not a file; give a volume file or a DICOM folder")


def writable_folder(folder: str | os.PathLike, option: str, purpose: str) -> Path:
    """Create ``folder`` if missing and prove it can be written (a probe file, written and removed),
    before any work that would put results there.

    Args:
        option: the option that named it (``--output``), for the message.
        purpose: what goes there (``the batch's outputs``), for the message.

    Raises:
        InvalidInputError: it is a file, or it cannot be created or written.
    """
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{option} {path} is a file; give a folder for {purpose}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(path / ".write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InvalidInputError(f"cannot write {purpose} into {path}: {exc.strerror or exc}") from None
    return path


def temporary_name(path: Path, suffix: str = "") -> Path:
    """A hidden name beside ``path`` to write to before renaming onto it: unique per process and
    call (``.<name>.<pid>-<random>.tmp<suffix>``), so two writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


# --------------------------------------------------------------------------- SimpleITK bridge
def sitk_to_volume(image, name: str = "", allow_rgb: bool = False) -> Volume:
    """Convert a SimpleITK image (LPS geometry) to a :class:`Volume` (KJI array).

    2-D images become single-slice volumes (k spacing 1 mm). Vector pixels are accepted only with
    ``allow_rgb`` (pictures): RGBA drops alpha, grey+alpha keeps grey.
    """
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim == 4 or dim > 4:
        raise InvalidInputError(
            f"{name or 'image'} is {dim}-D (size {image.GetSize()}); AutoMedSAM needs a 3-D volume. "
            "Extract one time point / component first (e.g. Slicer's Sequences module)."
        )
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    if components > 1:
        if not allow_rgb:
            raise InvalidInputError(
                f"{name or 'image'} has {components} components per voxel; only scalar volumes (or "
                "RGB pictures) are supported. Convert it to a scalar volume first."
            )
        if components in (2,):
            array = array[..., 0]
        elif components >= 3:
            array = array[..., :3]
    spacing = list(image.GetSpacing())
    origin = list(image.GetOrigin())
    direction = np.array(image.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:
        array = array[np.newaxis]
        spacing.append(1.0)
        origin.append(0.0)
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    return Volume(array, tuple(spacing), tuple(origin), direction, name)


def volume_to_sitk(volume: Volume):
    """Convert a :class:`Volume` to a 3-D SimpleITK image with the same LPS geometry."""
    import SimpleITK as sitk

    array = np.ascontiguousarray(volume.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array, isVector=volume.is_rgb)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.reshape(-1)))
    return image


def _run_sitk_read(path: Path, read):
    try:
        return read()
    except RuntimeError as exc:  # SimpleITK reports every reader failure as RuntimeError
        detail = str(exc).strip().splitlines()
        reason = next((line for line in reversed(detail) if line.strip()), "unknown reader error")
        raise InvalidInputError(
            f"could not read {path}: {reason.strip()}. The file may be truncated, corrupt or not "
            f"in the format its name says ({_suffix(path) or 'no extension'})."
        ) from None


def _check_nifti(path: Path) -> None:
    """Refuse truncated NIfTI files and NaN/infinite voxels. ITK's NIfTI reader fills missing voxels silently (seen with
    SimpleITK 2.5), which would be a silent wrong answer; NRRD and MetaImage readers do raise.
    Compares the bytes present (after gunzip, which also checks the gzip CRC) with the header's
    ``vox_offset + voxels * bitpix / 8``."""
    import gzip
    import struct
    import zlib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            total = len(header)
            while block := f.read(1 << 22):
                total += len(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidInputError(
            f"could not read {path}: {exc}. The file is truncated or corrupt; copy it again."
        ) from None
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        raise InvalidInputError(f"{path} is not a NIfTI file (no NIfTI-1/2 header); check the file and its name")
    n_dim = max(1, min(int(dims[0]), 7))
    voxels = int(np.prod([max(1, int(d)) for d in dims[1:1 + n_dim]]))
    expected = max(offset, 348) + voxels * bitpix // 8
    if total < expected:
        raise InvalidInputError(
            f"{path} is truncated: its header announces {expected} bytes of image data, the file holds {total}. "
            "Copy or export it again."
        )
    # ITK's NIfTI reader turns NaN voxels into 0 (seen with SimpleITK 2.5): a silent wrong answer,
    # so float data are checked here (float32/64 and complex, by their real and imaginary parts).
    item = {16: "f4", 32: "f4", 64: "f8", 1792: "f8"}.get(int(datatype))
    if item is None:
        return
    dtype = np.dtype(endian + item)
    bad = 0
    with opener(path, "rb") as f:
        f.seek(max(offset, 348))
        remaining = (expected - max(offset, 348)) // dtype.itemsize
        while remaining > 0:
            block = np.frombuffer(f.read(min(remaining, 1 << 22) * dtype.itemsize), dtype)
            if block.size == 0:
                break
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
            remaining -= block.size
    if bad:
        raise InvalidInputError(
            f"{path} holds {bad} NaN or infinite voxel value(s); replace them (e.g. with the background value) "
            "before segmenting")


# ------------------------------------------------------------------------------------ reading
def read_image(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read an image volume (LPS geometry, KJI array).

    Args:
        path: a NIfTI/NRRD/MetaImage file, a DICOM series folder, or a 2-D picture.
        series_uid: for a DICOM folder holding several series, which one to read (default: the
            series with the most files).

    Raises:
        InvalidInputError: missing/empty/unreadable file, 4-D or multi-component data, NaN/inf
            voxels, a folder without a DICOM series.
    """
    import SimpleITK as sitk

    p = _existing(path, "image")
    if p.is_dir():
        return _read_dicom_series(p, series_uid)
    suffix = _suffix(p)
    if suffix == SEG_NRRD_SUFFIX:
        raise InvalidInputError(f"{p} is a Slicer segmentation; read it with read_segmentation(), not as an image")
    is_picture = suffix in PICTURE_SUFFIXES
    if suffix in (".nii", ".nii.gz"):
        _check_nifti(p)
    image = _run_sitk_read(p, lambda: sitk.ReadImage(str(p)))
    return sitk_to_volume(image, name=p.name, allow_rgb=is_picture)


def _read_dicom_series(folder: Path, series_uid: str | None) -> Volume:
    import SimpleITK as sitk

    for entry in folder.iterdir():  # GDCM opens every file it finds: a FIFO would block it
        check_regular(entry, f"a file of the DICOM folder {folder}:")
    reader = sitk.ImageSeriesReader()
    series = list(reader.GetGDCMSeriesIDs(str(folder)) or [])
    if not series:
        raise InvalidInputError(
            f"no DICOM series found in folder {folder}. Point to the folder that holds the .dcm "
            "slice files of one series (or to a NIfTI/NRRD file)."
        )
    if series_uid is not None:
        if series_uid not in series:
            raise InvalidInputError(f"DICOM series {series_uid} not in {folder}; found: {', '.join(series)}")
        chosen = series_uid
    else:
        chosen = max(series, key=lambda s: len(reader.GetGDCMSeriesFileNames(str(folder), s)))
        if len(series) > 1:
            log.warning("%s holds %d DICOM series; reading %s (most files)", folder, len(series), chosen)
    files = reader.GetGDCMSeriesFileNames(str(folder), chosen)
    _check_even_slices(folder, files)
    reader.SetFileNames(files)
    image = _run_sitk_read(folder, reader.Execute)
    return sitk_to_volume(image, name=folder.name)


def _check_even_slices(folder: Path, files: list[str]) -> None:
    """Refuse a series whose slices are not evenly spaced along the slice normal (a missing or
    duplicated file). ITK would spread the slices evenly over the whole extent and report a wrong
    spacing (2.111 mm instead of 2.0 with one slice missing), a silent geometry error."""
    import SimpleITK as sitk

    if len(files) < 3:
        return
    positions, normal = [], None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        _run_sitk_read(Path(name), header.ReadImageInformation)
        if normal is None:
            normal = np.array(header.GetDirection(), float).reshape(3, 3)[:, 2]
        positions.append(float(np.dot(header.GetOrigin(), normal)))
    order = np.argsort(positions)
    gaps = np.diff(np.asarray(positions)[order])
    step = float(np.median(gaps))
    tolerance = max(0.01, 0.01 * abs(step))  # mm: DICOM positions carry rounding, not 1 % errors
    bad = np.flatnonzero(np.abs(gaps - step) > tolerance)
    if step <= tolerance or bad.size:
        n = int(bad[0]) if bad.size else 0
        first, second = Path(files[order[n]]).name, Path(files[order[n + 1]]).name
        raise InvalidInputError(
            f"the DICOM series in {folder} is not evenly spaced: {gaps[n]:.3f} mm between {first} and {second}, "
            f"{step:.3f} mm between most slices ({bad.size} uneven gap(s) in {len(files)} files). A slice is "
            "probably missing or duplicated; export the complete series (or resample it to even spacing first).")


def as_label_array(array: np.ndarray, name: str = "label map") -> np.ndarray:
    """Validate and convert label values to the smallest unsigned integer dtype.

    Raises:
        InvalidInputError: for non-integer values (e.g. an intensity image passed as labels) or
            negative labels.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise InvalidInputError(f"{name} must hold integer labels, got dtype {array.dtype}")
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InvalidInputError(
                f"{name} holds non-integer values (dtype {array.dtype}); a label map must hold "
                "integer label values. Was an intensity image passed as labels?"
            )
    if array.size and array.min() < 0:
        raise InvalidInputError(f"{name} holds negative values (min {array.min()}); labels must be >= 0")
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    raise InvalidInputError(f"{name}: label value {top} is too large (max {np.iinfo(np.uint32).max})")


def read_segmentation(path: str | os.PathLike) -> Segmentation:
    """Read a segmentation: a Slicer ``.seg.nrrd`` (names, colours, terminology, layers) or an
    integer label-map image (segments named ``label_<value>``).

    The result keeps the file's own grid; use
    :func:`automedsam.resample.labels_onto_grid` to bring it onto an image grid.
    """
    p = _existing(path, "segmentation")
    if p.is_file() and _suffix(p) == SEG_NRRD_SUFFIX:
        return _read_seg_nrrd(p)
    volume = read_image(p)
    if volume.is_rgb:
        raise InvalidInputError(f"{p} is a colour picture, not a label map")
    labels = volume.with_array(as_label_array(volume.array, f"label map {p.name}"))
    return Segmentation.from_label_volume(labels)


def read_label_map(path: str | os.PathLike) -> Volume:
    """Read a segmentation file as one integer label map (KJI array, LPS geometry)."""
    return read_segmentation(path).label_volume()


def _read_seg_nrrd(p: Path) -> Segmentation:
    import slicerio
    from slicerio.segmentation import terminology_entry_to_string

    try:
        data = slicerio.read_segmentation(str(p))
    except Exception as exc:  # slicerio/pynrrd raise assorted errors for broken headers or data
        raise InvalidInputError(f"could not read Slicer segmentation {p}: {exc}") from None
    voxels = np.asarray(data["voxels"])  # IJK (Fortran) order, optional leading layer axis
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    matrix = np.asarray(data["ijkToLPS"], dtype=float)
    layers = tuple(
        Volume.from_ijk_to_lps(as_label_array(np.transpose(layer, (2, 1, 0)), p.name), matrix, p.name)
        for layer in voxels
    )
    segments = []
    for seg in data.get("segments", []):
        terminology = seg.get("terminology")
        segments.append(
            SegmentInfo(
                name=seg.get("name") or seg.get("id", "segment"),
                label_value=int(seg.get("labelValue", 1)),
                color=tuple(seg.get("color", (0.5, 0.5, 0.5))),
                terminology=terminology_entry_to_string(terminology) if terminology else None,
                segment_id=seg.get("id", ""),
                layer=int(seg.get("layer", 0)),
            )
        )
    return Segmentation(layers, tuple(segments))


# ------------------------------------------------------------------------------------ writing
def _prepare_output(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidInputError(f"output path {p} is a folder; give a file name such as {p / 'out.nrrd'}")
    if not p.parent.exists():
        raise InvalidInputError(f"output folder {p.parent} does not exist; create it first")
    return p


def check_output(path: str | os.PathLike, overwrite: bool = False, segmentation: bool = True) -> Path:
    """Check an output file before any work starts: its kind (by name), its folder (exists and is
    writable) and, without ``overwrite``, that nothing is there yet.

    Raises:
        InvalidInputError: says what to change.
    """
    p = _prepare_output(path)
    allowed = (SEG_NRRD_SUFFIX, *VOLUME_SUFFIXES) if segmentation else VOLUME_SUFFIXES
    if _suffix(p) not in allowed:
        raise InvalidInputError(f"cannot write {p.name}: the name must end in one of {', '.join(allowed)}")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write into {p.parent}: no permission; choose another output folder")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise InvalidInputError(f"output {p} exists; pass --overwrite to replace it (or choose another name)")
    return p


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume as NRRD, NIfTI or MetaImage (chosen by the file name), keeping geometry."""
    import SimpleITK as sitk

    p = _prepare_output(path)
    suffix = _suffix(p)
    if suffix not in VOLUME_SUFFIXES or suffix == SEG_NRRD_SUFFIX:
        raise InvalidInputError(
            f"cannot write a volume to {p.name}: use one of {', '.join(VOLUME_SUFFIXES)}"
        )
    tmp = temporary_name(p, suffix)
    sitk.WriteImage(volume_to_sitk(volume), str(tmp), compress)
    os.replace(tmp, p)
    return p


def write_segmentation(segmentation: Segmentation, path: str | os.PathLike) -> Path:
    """Write a segmentation: ``.seg.nrrd`` keeps names, colours, terminology and layers (Slicer
    reads it directly); NIfTI/NRRD/MetaImage write a single merged label map."""
    p = _prepare_output(path)
    if _suffix(p) != SEG_NRRD_SUFFIX:
        return write_volume(segmentation.label_volume(), p)
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    layers = np.stack([np.transpose(layer.array, (2, 1, 0)) for layer in segmentation.layers])
    voxels = layers[0] if layers.shape[0] == 1 else layers  # IJK order as slicerio expects
    segments = []
    for seg in segmentation.segments:
        entry = {
            "id": seg.segment_id,
            "name": seg.name,
            "labelValue": seg.label_value,
            "layer": seg.layer,
            "color": list(seg.color),
        }
        if seg.terminology:
            entry["terminology"] = terminology_entry_from_string(seg.terminology)
        mask = segmentation.layers[seg.layer].array == seg.label_value
        if mask.any():
            kk, jj, ii = np.nonzero(mask)
            entry["extent"] = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()),
                               int(kk.min()), int(kk.max())]
        segments.append(entry)
    data = {
        "voxels": np.ascontiguousarray(voxels).astype(np.uint8 if voxels.max(initial=0) < 256 else np.uint16),
        "ijkToLPS": segmentation.grid.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    tmp = temporary_name(p, SEG_NRRD_SUFFIX)
    slicerio.write_segmentation(str(tmp), data)
    os.replace(tmp, p)
    return p
