"""Weights downloads against a real HTTP server on 127.0.0.1: resume, verification, failures."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from automedsam.cli.main import run
from automedsam.download import download_backbone, download_file, import_backbone, sha256_file
from automedsam.errors import ChecksumMismatchError, DownloadError, InvalidInputError, WeightsUnavailableError
from automedsam.models import BackboneCatalog, weights_dir

from http_fixture import FaultyFileServer

DATA = os.urandom(3 * (1 << 20) + 12345)  # several chunks, odd size
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture()
def server():
    with FaultyFileServer({"w.pth": DATA}, stall_s=2.0) as srv:
        yield srv


def test_plain_download_is_verified_and_atomic(server, tmp_path):
    seen = []
    dest = download_file(f"{server.url}/ok/w.pth", tmp_path / "w.pth", SHA,
                         progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == DATA
    assert seen[-1] == (len(DATA), len(DATA))
    assert not (tmp_path / "w.pth.part").exists()
    # A second call finds the verified file and asks the server for nothing.
    n = len(server.requests)
    download_file(f"{server.url}/ok/w.pth", tmp_path / "w.pth", SHA)
    assert len(server.requests) == n


def test_interrupted_transfer_is_resumed_with_a_range_request(server, tmp_path):
    dest = download_file(f"{server.url}/drop-once/w.pth", tmp_path / "w.pth", SHA, retry_wait_s=0.01)
    assert sha256_file(dest) == SHA
    assert server.requests[0][1] is None
    assert server.requests[1][1] is not None and server.requests[1][1].startswith("bytes=")
    assert int(server.requests[1][1][6:-1]) > 0


def test_resume_of_a_part_file_left_by_an_earlier_run(server, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(DATA[:1000])
    download_file(f"{server.url}/ok/w.pth", tmp_path / "w.pth", SHA)
    assert server.requests == [("/ok/w.pth", "bytes=1000-")]
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(b"garbage" * 10)
    download_file(f"{server.url}/norange/w.pth", tmp_path / "w.pth", SHA)
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_wrong_hash_leaves_nothing_behind(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError, match=f"expected {wrong}"):
        download_file(f"{server.url}/ok/w.pth", tmp_path / "w.pth", wrong)
    assert list(tmp_path.iterdir()) == []


def test_404_names_url_path_and_hash(server, tmp_path):
    with pytest.raises(DownloadError) as info:
        download_file(f"{server.url}/ok/missing.pth", tmp_path / "w.pth", SHA)
    msg = str(info.value)
    assert "HTTP 404" in msg and "/ok/missing.pth" in msg and str(tmp_path / "w.pth") in msg and SHA in msg
    assert list(tmp_path.iterdir()) == []


def test_timeout_is_a_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match=r"ReadTimeout|timed out"):
        download_file(f"{server.url}/slow/w.pth", tmp_path / "w.pth", SHA, timeout=(2.0, 0.3), max_retries=1,
                      retry_wait_s=0.01)
    assert not (tmp_path / "w.pth").exists()


def test_connection_refused_leaves_no_file(tmp_path):
    with FaultyFileServer({}) as srv:
        url = srv.url  # the port is free again once the server is closed
    with pytest.raises(DownloadError, match="ConnectionError"):
        download_file(f"{url}/ok/w.pth", tmp_path / "w.pth", SHA, max_retries=1, retry_wait_s=0.01)
    assert list(tmp_path.iterdir()) == []


def _site_catalog(tmp_path, url: str, sha: str | None = SHA) -> str:
    entry = {"id": "site_sam", "family": "sam", "arch": "vit_b", "display_name": "Site SAM", "input_size": 1024,
             "pixel_normalization": "sam", "url": url, "filename": "site_sam.pth", "sha256": sha,
             "size_bytes": len(DATA), "checkpoint_key": None, "license": "Apache-2.0", "test_only": False}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"catalog_version": 1, "backbones": [entry]}))
    return str(path)


def test_cli_download_and_import_use_the_cache(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", _site_catalog(tmp_path, f"{server.url}/ok/w.pth"))
    assert run(["models", "download", "site_sam"]) == 0
    cached = weights_dir() / "site_sam.pth"
    assert cached.read_bytes() == DATA
    assert capsys.readouterr().out.strip() == str(cached)
    assert run(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    row = next(r for r in listing["backbones"] if r["id"] == "site_sam")
    assert row["cached"] and row["path"] == str(cached)
    cached.unlink()
    src = tmp_path / "from_usb.pth"
    src.write_bytes(DATA)
    assert run(["models", "import", "site_sam", str(src)]) == 0
    assert cached.read_bytes() == DATA


def test_cli_download_failures_exit_3_with_what_to_do(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", _site_catalog(tmp_path, f"{server.url}/ok/gone.pth"))
    assert run(["models", "download", "site_sam"]) == 3
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "site_sam.pth" in err and "models import" in err and "Traceback" not in err
    assert not any(weights_dir().glob("*")) if weights_dir().exists() else True
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", _site_catalog(tmp_path, f"{server.url}/ok/w.pth", "1" * 64))
    assert run(["models", "download", "site_sam"]) == 3
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not list(weights_dir().glob("*"))


def test_unpinned_hash_needs_an_explicit_sha256(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", _site_catalog(tmp_path, f"{server.url}/ok/w.pth", None))
    with pytest.raises(WeightsUnavailableError, match="pins no sha256"):
        download_backbone("site_sam")
    assert download_backbone("site_sam", sha256=SHA).read_bytes() == DATA


def test_import_refuses_a_file_with_the_wrong_hash(tmp_path):
    bad = tmp_path / "sam_vit_b.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ChecksumMismatchError, match="was not imported"):
        import_backbone("sam_vit_b", bad)
    assert BackboneCatalog.load().cached_path(BackboneCatalog.load().get("sam_vit_b")) is None


def test_a_request_with_another_hash_never_removes_the_verified_file(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", _site_catalog(tmp_path, f"{server.url}/ok/w.pth", None))
    cached = download_backbone("site_sam", sha256=SHA)
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        download_backbone("site_sam", sha256="2" * 64)
    assert cached.read_bytes() == DATA  # still there, still verified
    assert run(["models", "download", "site_sam", "--sha256", "3" * 64]) == 3
    assert "sha256 mismatch" in capsys.readouterr().err and cached.read_bytes() == DATA
    assert not cached.with_name(cached.name + ".part").exists()


def test_redirect_loops_file_urls_and_the_deadline_are_clear_errors(server, tmp_path, monkeypatch, capsys):
    with pytest.raises(DownloadError, match="TooManyRedirects"):
        download_file(f"{server.url}/loop/w.pth", tmp_path / "w.pth", SHA)
    for url in ("file:///etc/passwd", "ftp://example.org/w.pth", "no-scheme"):
        with pytest.raises(InvalidInputError, match="only http:// and https://"):
            download_file(url, tmp_path / "w.pth", SHA)
    with pytest.raises(DownloadError, match=r"deadline of 0\.3 s"):
        download_file(f"{server.url}/slow/w.pth", tmp_path / "w.pth", SHA, deadline_s=0.3)
    assert not (tmp_path / "w.pth").exists()
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", _site_catalog(tmp_path, f"{server.url}/ok/w.pth"))
    assert run(["models", "download", "site_sam", "--url", f"{server.url}/loop/x"]) == 3
    assert "TooManyRedirects" in capsys.readouterr().err
    assert run(["models", "download", "site_sam", "--url", "file:///etc/passwd"]) == 2
    err = capsys.readouterr().err
    assert "only http://" in err and "Traceback" not in err
