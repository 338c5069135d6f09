"""Keeping long work when its last step fails: a rescue folder under ``$AUTOMEDSAM_HOME/rescue``
for the trained bundle or the last finished epoch, with a message that says where it went."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

from .errors import AutoMedSAMError, TrainingFailedError


def rescue_folder(name: str) -> Path:
    """A new folder ``$AUTOMEDSAM_HOME/rescue/<name>-<time>`` (``name`` reduced to safe characters)."""
    from .models import automedsam_home

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = automedsam_home() / "rescue" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:60]}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_or_rescue(bundle, out: Path) -> Path:
    """Write a freshly trained bundle to ``out``; if that fails (disk full, folder gone), keep it in a
    rescue folder and raise :class:`TrainingFailedError` saying where, so the training is not lost."""
    return _write_or_rescue(bundle.save, out, bundle.name)


def save_bytes_or_rescue(data: bytes, out: Path, name: str) -> Path:
    """:func:`save_or_rescue` for a bundle zip's bytes (a bundle taught on a worker): written aside
    and renamed into place, replacing only an AutoMedSAM bundle."""

    def write(path: Path) -> Path:
        import os
        import tempfile

        from .bundle import check_bundle_destination

        path = check_bundle_destination(path, overwrite=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".automedsam-", suffix=".zip", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    return _write_or_rescue(write, Path(out), name)


def _write_or_rescue(write, out: Path, name: str) -> Path:
    try:
        return write(out)
    except (OSError, AutoMedSAMError) as exc:
        try:
            kept = write(rescue_folder(name) / "bundle.zip")
        except (OSError, AutoMedSAMError) as again:
            raise TrainingFailedError(f"could not write the trained bundle to {out} ({exc}), nor to a rescue folder "
                                      f"({again}); free some disk space and train again") from None
        raise TrainingFailedError(f"could not write the bundle to {out}: {exc}. The trained bundle is safe in {kept}; "
                                  "copy it where you need it.") from None
