"""The worker's bundle folders: the only places a session's bundle may come from.

A request names a bundle by its path relative to one of the configured folders (``liver.zip``,
``uploaded/1f2e....zip``) or by an absolute path that resolves (symlinks followed) inside one of
them. Anything else gets the same answer whether or not it exists, so a token holder can neither
probe the server's file system nor make the model thread open a FIFO or a device. Bundles are
uploaded into the first folder's ``uploaded/`` subfolder under their sha256, written aside and
moved into place only after they load.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from ..bundle import MANIFEST, WEIGHTS, ModelBundle, load_bundle
from ..errors import InvalidInputError, StorageError
from .protocol import MAX_BUNDLE_NAME_CHARS


class BundleStore:
    """Resolves, lists and stores bundles inside ``folders`` (the first one is writable)."""

    def __init__(self, folders: list[Path], max_weights_bytes: int | None = None):
        if not folders:
            raise InvalidInputError("the worker needs at least one bundle folder")
        self.folders = [Path(f).expanduser() for f in folders]
        self.max_weights_bytes = max_weights_bytes

    def _unknown(self, name: str) -> InvalidInputError:
        shown = name if len(name) <= 120 else name[:117] + "..."
        return InvalidInputError(
            f"no bundle {shown!r} among this worker's bundles: name one relative to its bundle folders (GET "
            "/v1/bundles lists them), upload it (POST /v1/bundles), or start the worker with --bundle-dir")

    def resolve(self, name: str) -> Path:
        """The real path of the bundle ``name``; one neutral error for anything not allowed or absent."""
        try:
            found = self._find(name)
        except (OSError, ValueError):  # undecodable names, other drives: the same neutral answer
            found = None
        if found is None:
            raise self._unknown(name if isinstance(name, str) else "")
        return found

    def _find(self, name: str) -> Path | None:
        if not name or len(name) > MAX_BUNDLE_NAME_CHARS or "\x00" in name or name.startswith(("\\\\", "//")):
            return None
        name.encode("utf-8")  # lone surrogates are refused here, before any file system call
        for folder in self.folders:
            root = os.path.abspath(folder)
            # Lexically inside the folder first (no file system access for names outside it) ...
            candidate = os.path.normpath(os.path.join(root, name))
            if os.path.commonpath([candidate, root]) != root or candidate == root:
                continue
            # ... then really inside once symlinks are followed, and a regular file or bundle folder.
            real, real_root = os.path.realpath(candidate), os.path.realpath(root)
            if os.path.commonpath([real, real_root]) == real_root and real != real_root and _is_bundle_path(
                    Path(real)):
                return Path(real)
        return None

    def load(self, name: str) -> ModelBundle:
        return load_bundle(self.resolve(name), self.max_weights_bytes)

    def list(self) -> list[dict]:
        """Every bundle in the folders (the names :meth:`resolve` accepts): name (relative), bundle
        name, classes and backbone."""
        found = []
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder).as_posix()
                if any(part.startswith(".") for part in Path(rel).parts):
                    continue
                try:
                    b = load_bundle(self.resolve(str(path)), self.max_weights_bytes)
                except InvalidInputError:
                    continue  # not a bundle, half-written, foreign or pointing outside: not offered
                found.append({"bundle": rel, "name": b.name, "backbone": b.backbone_id,
                              "classes": [c.name for c in b.classes]})
        return found

    def store(self, data: bytes) -> tuple[str, ModelBundle]:
        """Keep an uploaded bundle zip under its sha256; returns its name for ``POST /v1/sessions``
        and the bundle. The same bundle uploaded again keeps the file (and the worker's model cache)."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.folders[0] / "uploaded" / f"{digest[:32]}.zip"
        name = target.relative_to(self.folders[0]).as_posix()
        if target.is_file() and target.stat().st_size == len(data):
            return name, self.load(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".upload", dir=target.parent)
        except OSError as exc:
            raise _unwritable(exc) from None
        tmp = Path(tmp_name)
        try:
            try:
                with os.fdopen(fd, "wb") as f:  # a name of its own: parallel uploads of one bundle do not collide
                    f.write(data)
            except OSError as exc:
                raise _unwritable(exc) from None
            try:
                bundle = load_bundle(tmp, self.max_weights_bytes)
            except InvalidInputError as exc:
                reason = str(exc).replace(str(tmp), "the upload")  # server paths stay private
                raise InvalidInputError(f"the uploaded file is not a valid model bundle zip: {reason}") from None
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _unwritable(exc) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return name, bundle


def _unwritable(exc: OSError) -> StorageError:
    """The message for an upload the worker cannot keep: the reason, never the server's paths."""
    return StorageError(f"the worker cannot store the uploaded bundle: its bundle folder is not writable "
                        f"({exc.strerror or type(exc).__name__}); whoever runs the worker must fix its first "
                        "--bundles folder")


def _is_bundle_path(path: Path) -> bool:
    """A regular ``.zip`` file, or a folder whose manifest and weights are regular files (checked
    with ``stat``: nothing is opened, so FIFOs and devices are never read)."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            return path.suffix.lower() == ".zip"
        if stat.S_ISDIR(mode):  # lstat: a member that is a symlink (perhaps to outside) does not count
            return all(stat.S_ISREG(os.lstat(path / f).st_mode) for f in (MANIFEST, WEIGHTS))
    except OSError:
        return False
    return False
