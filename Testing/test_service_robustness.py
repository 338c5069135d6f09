"""The worker under attack: every bad request is a clear 4xx, limits hold under concurrency, the event
loop never waits for the model thread, and bundles come only from the configured folders.

A real worker process on 127.0.0.1 with small limits, driven with raw HTTP (requests)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from test_service import child_env

from automedsam.io import read_label_map
from automedsam.worker import LocalWorker, wait_until

UPLOAD_MB = 2


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("strict-worker")


@pytest.fixture(scope="module")
def strict(home, make_bundle):
    allowed = home / "allowed"
    allowed.mkdir()
    (allowed / "good.zip").write_bytes(make_bundle().read_bytes())
    w = LocalWorker(device="cpu", env=child_env(home), extra_args=[
        "--max-upload-mb", str(UPLOAD_MB), "--max-bundle-mb", "20", "--max-sessions", "3", "--bundle-dir", str(allowed),
        "--mirror", "http://127.0.0.1:9/mirror/"])
    w.start()
    yield w
    w.stop()


def call(w, method: str, path: str, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {w.token}", **kwargs.pop("headers", {})}
    return requests.request(method, w.url + path, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)


def session(w, **body) -> str:
    r = call(w, "POST", "/v1/sessions", json=body or {"backbone": "tiny-sam2"})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def meta_of(volume, **change) -> str:
    meta = {"shape": list(volume.array.shape), "dtype": str(volume.array.dtype), "spacing": list(volume.spacing),
            "origin": list(volume.origin), "direction": volume.direction.reshape(-1).tolist(), "name": "ct"}
    return json.dumps(meta | change)


def upload(w, sid: str, volume) -> requests.Response:
    return call(w, "PUT", f"/v1/sessions/{sid}/volume", data=np.ascontiguousarray(volume.array).tobytes(),
                headers={"X-Volume-Meta": meta_of(volume), "Content-Type": "application/octet-stream"})


@pytest.fixture()
def sid(strict, ct):
    s = session(strict, bundle="good.zip")
    assert upload(strict, s, ct).status_code == 200
    yield s
    call(strict, "DELETE", f"/v1/sessions/{s}")


def assert_error(r: requests.Response, status: int, code: str, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]  # one error shape for every failure
    assert err["code"] == code and words.lower() in err["message"].lower(), err


def mask_json(mask: np.ndarray) -> dict:
    from automedsam.service.codec import mask_to_json

    return mask_to_json(mask)


def refine_with(bits: bytes, shape: list[int]) -> dict:
    """A refine request whose slice mask is ``bits`` declared as ``shape``."""
    import base64

    return {"class_name": "liver", "slice_index": 1, "box": [1, 1, 5, 5], "mode": "manual",
            "mask": {"shape": shape, "bits": base64.b64encode(bits).decode()}}


def test_every_bad_request_is_a_specific_4xx(strict, sid, ct):
    k, j, i = ct.array.shape
    nbytes = (j * i + 7) // 8
    nan_body = '{"class_name": "liver", "slice_index": 3, "points": [[NaN, 4.0]], "mode": "manual"}'
    cases = [
        # volume metadata: shapes and geometry are checked before a byte is read
        ("PUT", f"/v1/sessions/{sid}/volume", {"data": b"", "headers": {
            "X-Volume-Meta": meta_of(ct, shape=[-1, 4, 4])}},
         422, "invalid_input", "greater than or equal to 1"),
        ("PUT", f"/v1/sessions/{sid}/volume", {"data": b"", "headers": {
            "X-Volume-Meta": meta_of(ct, shape=[1 << 20, 1 << 20, 1 << 20])}}, 413, "too_large", "accepts up to"),
        ("PUT", f"/v1/sessions/{sid}/volume", {"data": b"", "headers": {
            "X-Volume-Meta": meta_of(ct, spacing=[float("nan"), 1.0, 1.0])}}, 422, "invalid_input", "finite"),
        ("PUT", f"/v1/sessions/{sid}/volume", {"data": ct.array.tobytes(), "headers": {
            "X-Volume-Meta": meta_of(ct, direction=[0.0] * 9)}}, 422, "invalid_input", "singular"),
        ("PUT", f"/v1/sessions/{sid}/volume", {"data": b"\0" * 10, "headers": {"X-Volume-Meta": meta_of(ct)}},
         422, "invalid_input", "needs"),
        # the caller's slice mask: exactly the packed size of its shape, and a slice of the volume
        ("POST", f"/v1/sessions/{sid}/refine", {"json": refine_with(b"\xff" * (nbytes - 1), [j, i])}, 422,
         "invalid_input", "packs into"),
        ("POST", f"/v1/sessions/{sid}/refine", {"json": refine_with(b"\xff" * (nbytes + 1), [j, i])}, 422,
         "invalid_input", "packs into"),
        ("POST", f"/v1/sessions/{sid}/refine", {"json": refine_with(b"\xff" * ((j * i + 7) // 8), [i, j])}, 422,
         "invalid_input", "not a slice of the volume"),
        ("POST", f"/v1/sessions/{sid}/refine", {"json": dict(refine_with(b"", [j, i]), mask={
            "shape": [j, i], "bits": "not base64!"})}, 422, "invalid_input", "base64"),
        ("POST", f"/v1/sessions/{sid}/refine", {"data": b'{"class_name": "liver", "slice_index": 1, "mask": '
                                                        b'{"shape": [1, 1], "bits": "' + b"A" * (UPLOAD_MB * 2**20)
                                                        + b'"}}', "headers": {"Content-Type": "application/json"}},
         413, "too_large", "at most"),
        ("PUT", f"/v1/sessions/{sid}/labels", {"data": b"\0" * (UPLOAD_MB * 2**20 + 1)}, 413, "too_large", "at most"),
        # chunked, without Content-Length: counted as it arrives
        ("PUT", f"/v1/sessions/{sid}/labels", {"data": iter([b"\0" * 2**20] * (UPLOAD_MB + 1))}, 413, "too_large",
         "passed"),
        # prompts: finite and in range
        ("POST", f"/v1/sessions/{sid}/refine", {"data": nan_body, "headers": {"Content-Type": "application/json"}},
         422, "invalid_request", "finite"),
        ("POST", f"/v1/sessions/{sid}/refine", {"json": {"class_name": "liver", "slice_index": k, "box": [1, 1, 5, 5],
                                                      "mode": "manual"}}, 422, "invalid_input", "out of range"),
        ("POST", f"/v1/sessions/{sid}/refine", {"json": {"class_name": "liver", "slice_index": -1, "box": [1, 1, 5, 5],
                                                      "mode": "manual"}}, 422, "invalid_request", "slice_index"),
        ("POST", f"/v1/sessions/{sid}/segment", {"json": {"classes": ["liver"], "slices": [0, k + 5]}},
         422, "invalid_input", "out of range"),
        ("POST", f"/v1/sessions/{sid}/segment", {"json": {"classes": ["livr"]}}, 422, "invalid_input", "livr"),
        ("POST", f"/v1/sessions/{sid}/propagate", {"json": {"class_name": "liver", "from_slice": 1}},
         422, "invalid_request", "seed"),
        ("POST", f"/v1/sessions/{sid}/propagate", {"json": {"class_name": "liver", "from_slice": k, "seed": mask_json(
            np.ones((j, i), bool))}}, 422, "invalid_input", "out of range"),
        # training options
        ("POST", f"/v1/sessions/{sid}/teach", {"json": {"classes": {"liver": 0}}}, 422, "invalid_request",
         "greater than or equal to 1"),
        ("POST", f"/v1/sessions/{sid}/teach", {"data": '{"classes": {"liver": 5}, "decoder_lr": Infinity}',
                                               "headers": {"Content-Type": "application/json"}},
         422, "invalid_request", "finite"),
        # bundles: only from the configured folders, and the same answer whether a path exists or not
        ("POST", "/v1/sessions", {"json": {"bundle": "/etc/passwd"}}, 422, "invalid_input", "among this worker's"),
        ("POST", "/v1/sessions", {"json": {"bundle": "../../../etc/hostname"}}, 422, "invalid_input",
         "among this worker's"),
        ("POST", "/v1/sessions", {"json": {"bundle": "b" * 2_000_000}}, 413, "too_large", "at most"),
        ("POST", "/v1/sessions", {"data": iter([b'{"bundle": "', b"b" * 2**20, b'"}']),
                                  "headers": {"Content-Type": "application/json"}}, 413, "too_large", "passed"),
        ("POST", "/v1/sessions", {"json": {"bundle": "b" * 100_000}}, 422, "invalid_request", "at most 1024"),
        ("POST", "/v1/bundles", {"data": b"PK not a zip"}, 422, "invalid_input", "not a valid model bundle"),
        # downloads: catalog URLs or configured mirrors only
        ("POST", "/v1/models/litemedsam/download", {"json": {"url": "file:///etc/passwd"}}, 422, "invalid_input",
         "only from the catalog"),
        ("POST", "/v1/models/litemedsam/download", {"json": {"url": "http://evil.example/x"}}, 422,
         "invalid_input", "only from the catalog"),
        ("POST", "/v1/models/litemedsam/download", {"json": {"url": "http://127.0.0.1:9/mirror/../admin/x"}}, 422,
         "invalid_input", "only from the catalog"),
        ("POST", "/v1/models/litemedsam/download", {"json": {"url": "http://127.0.0.1:9/mirror/%2e%2e/x"}}, 422,
         "invalid_input", "only from the catalog"),
        ("POST", "/v1/models/litemedsam/download", {"json": {"url": "http://me@127.0.0.1:9/mirror/x"}}, 422,
         "invalid_input", "only from the catalog"),
        ("POST", "/v1/models/litemedsam/download", {"json": {"url": "http://127.0.0.1:9/mirrorx/w"}}, 422,
         "invalid_input", "only from the catalog"),
        ("POST", "/v1/models/litemedsam/download", {"json": {"sha256": "0" * 64}}, 422, "invalid_input",
         "contradicts"),
        ("POST", "/v1/models/no_such_model/download", {"json": {}}, 422, "invalid_input", "unknown backbone"),
        # routes and methods that do not exist answer in the documented shape
        ("GET", "/v1/nothing-here", {}, 404, "not_found", "no route"),
        ("DELETE", "/health", {}, 405, "method_not_allowed", "no route"),
        ("GET", "/docs", {}, 404, "not_found", "no route"),
        ("GET", "/v1/jobs/nope/masks/liver", {}, 404, "not_found", "no job"),
    ]
    for method, path, kwargs, status, code, words in cases:
        assert_error(call(strict, method, path, **kwargs), status, code, words)


def test_a_class_absent_from_the_labels_is_refused_before_training(strict, sid, ct_dir):
    labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz").array.astype(np.uint16)
    r = call(strict, "PUT", f"/v1/sessions/{sid}/labels", data=labels.tobytes())
    assert r.status_code == 200 and {1, 2, 3, 5} <= set(r.json()["label_values"]) and 250 not in r.json()[
        "label_values"]
    r = call(strict, "POST", f"/v1/sessions/{sid}/teach", json={"classes": {"liver": 5, "livr": 250}, "epochs": 1})
    assert_error(r, 422, "invalid_input", "livr=250: no voxel")


def test_bundle_paths_reveal_nothing_and_special_files_are_never_opened(strict, home, tmp_path):
    fifo = home / "allowed" / "trap.zip"
    os.mkfifo(fifo)
    outside = tmp_path / "real.zip"
    outside.write_bytes((home / "allowed" / "good.zip").read_bytes())
    answers = set()
    (home / "allowed" / "escape.zip").symlink_to(outside)  # inside by name, outside in fact
    r = call(strict, "POST", "/v1/sessions", json={"bundle": "x\ud800.zip"})  # a lone surrogate: not a path
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    for name in (str(outside), str(tmp_path / "missing.zip"), "trap.zip", str(fifo), "missing.zip", "escape.zip",
                 "C:other.zip", "//host/share/b.zip"):
        t0 = time.monotonic()
        r = call(strict, "POST", "/v1/sessions", json={"bundle": name}, timeout=20)
        assert r.status_code == 422 and time.monotonic() - t0 < 10
        answers.add(r.json()["error"]["message"].replace(repr(name), "NAME"))
    assert len(answers) == 1, answers  # exists or not, allowed or not: one answer
    listing = call(strict, "GET", "/v1/bundles").json()["bundles"]
    assert [b["bundle"] for b in listing] == ["good.zip"] and "liver" in listing[0]["classes"]
    s = session(strict, bundle="good.zip")
    call(strict, "DELETE", f"/v1/sessions/{s}")


def test_bad_bundle_zips_are_refused_whole_and_leave_nothing_behind(strict, home, make_bundle):
    with zipfile.ZipFile(make_bundle()) as z:
        manifest = z.read("manifest.json")
    bomb, latin = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:  # 40 MB of zeros in ~40 kB
        z.writestr("manifest.json", manifest)
        z.writestr("weights.safetensors", b"\0" * (40 * 2**20))
    with zipfile.ZipFile(latin, "w") as z:
        z.writestr("manifest.json", b"\xff\xfe not utf-8")
        z.writestr("weights.safetensors", b"")
    for data, words in ((bomb.getvalue(), "more than"), (latin.getvalue(), "utf-8")):
        assert len(data) < 2**20
        assert_error(call(strict, "POST", "/v1/bundles", data=data), 422, "invalid_input", words)
    uploaded = home / "allowed" / "uploaded"
    assert not uploaded.exists() or not [p for p in uploaded.iterdir() if p.name.endswith(".upload")]


def test_the_client_uploads_a_local_bundle_and_the_worker_keeps_it_by_hash(strict, make_bundle, ct):
    bundle = make_bundle("tiny-sam2", "classmap")
    remote = strict.client(bundle=str(bundle))
    remote.set_volume(ct)
    stored = remote.upload_bundle(str(bundle))
    assert stored.startswith("uploaded/") and stored.endswith(".zip")
    assert {c["name"] for c in remote.classes} >= {"liver", "spleen"}
    # Names resolve as the engine resolves them, in the client too (alias, case, spaces).
    result = list(remote.segment(["Left Kidney"]))[-1].result
    assert set(result.masks) == {"left_kidney"}
    remote.close()


def test_session_limit_holds_under_parallel_creates(strict):
    assert call(strict, "GET", "/v1/info").json()["sessions"] == 0
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: call(strict, "POST", "/v1/sessions", json={"backbone": "tiny-sam2"}),
                                range(8)))
    created = [r.json()["session_id"] for r in replies if r.status_code == 201]
    assert len(created) == 3, [r.status_code for r in replies]
    assert all(r.status_code == 429 and r.json()["error"]["code"] == "busy" for r in replies if r.status_code != 201)
    assert call(strict, "GET", "/v1/info").json()["sessions"] == 3
    for s in created:
        call(strict, "DELETE", f"/v1/sessions/{s}")


def test_uploads_and_refines_never_block_the_event_loop(strict, ct, ct_dir):
    a, b = session(strict), session(strict)
    try:
        assert upload(strict, a, ct).status_code == 200
        labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz").array.astype(np.uint16)
        assert call(strict, "PUT", f"/v1/sessions/{a}/labels", data=labels.tobytes()).status_code == 200
        job = call(strict, "POST", f"/v1/sessions/{a}/teach",
                   json={"classes": {"liver": 5}, "epochs": 10000, "train_slices": "10:20"}).json()
        assert job["state"] in ("queued", "running")
        deadline = time.monotonic() + 60
        while call(strict, "GET", f"/v1/jobs/{job['id']}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # They wait for the model thread or session a's lock; none may hold up the server, not even
        # more of them than the server has worker threads.
        shown = mask_json(np.ones(ct.array.shape[1:], bool))  # each refine carries the caller's slice mask
        click = {"class_name": "liver", "slice_index": 12, "points": [[60, 50]], "mode": "manual", "mask": shown}
        for _ in range(48):
            threading.Thread(target=call, args=(strict, "POST", f"/v1/sessions/{a}/refine"),
                             kwargs={"json": click, "timeout": 120}, daemon=True).start()
        results = {}
        pending = [threading.Thread(target=lambda: results.__setitem__("volume", upload(strict, b, ct))),
                   threading.Thread(target=lambda: results.__setitem__("masks", call(
                       strict, "POST", f"/v1/sessions/{a}/refine", json=click, timeout=120)))]
        for t in pending:
            t.start()
        time.sleep(0.5)
        slowest = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            assert requests.get(strict.url + "/health", timeout=5).status_code == 200
            assert call(strict, "GET", f"/v1/jobs/{job['id']}", timeout=5).json()["state"] == "running"
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 2.0, slowest
        assert not results  # still waiting behind the training job, as they should
        assert call(strict, "DELETE", f"/v1/jobs/{job['id']}").status_code == 200
        for t in pending:
            t.join(60)
        assert results["volume"].status_code == 200 and results["masks"].status_code == 200
    finally:
        for s in (a, b):
            call(strict, "DELETE", f"/v1/sessions/{s}")


def test_schema_and_docs_need_the_token(strict):
    r = requests.get(strict.url + "/openapi.json", timeout=10)
    assert_error(r, 401, "unauthorized", "token")
    schema = call(strict, "GET", "/openapi.json").json()
    assert "/v1/sessions" in schema["paths"] and "/openapi.json" not in schema["paths"]
    assert requests.get(strict.url + "/health", timeout=10).status_code == 200


def test_a_chatty_worker_never_blocks_on_its_log(tmp_path, home):
    """The worker's stderr (its log) is read all the time: unread, the pipe fills at ~64 KB and the
    next write blocks the worker while ``alive()`` still says True."""
    marker = tmp_path / "wrote-everything"
    wrapper = tmp_path / "chatty-python"
    wrapper.write_text(f"""#!{sys.executable}
import runpy, sys, threading

def chatter():
    for _ in range(4000):
        sys.stderr.write("x" * 200 + "\\n")  # 800 KB in all, far past a pipe's buffer
    sys.stderr.flush()
    open({str(marker)!r}, "w").write("done")

threading.Thread(target=chatter, daemon=True).start()
sys.argv = ["automedsam", *sys.argv[3:]]  # what follows `-m automedsam`
runpy.run_module("automedsam", run_name="__main__", alter_sys=True)
""")
    wrapper.chmod(0o755)
    w = LocalWorker(python=str(wrapper), device="cpu", env=child_env(home / "chatty"))
    w.start()
    try:
        assert wait_until(marker.exists, 60)
        assert w.alive() and requests.get(w.url + "/health", timeout=10).status_code == 200
        assert any(line.startswith("x" * 200) for line in w.log_tail)  # what it said is kept for error messages
    finally:
        w.stop()


def test_stop_ends_the_server_a_launcher_started(tmp_path, home):
    """Slicer's PythonSlicer is a launcher: it runs python-real as a child and does not forward
    signals. Stopping must end that grandchild too (it holds the port and the GPU), and alive()
    must watch the server, not the launcher."""
    launcher = tmp_path / "launcher"
    launcher.write_text(f"""#!{sys.executable}
import subprocess, sys
child = subprocess.Popen([{sys.executable!r}, *sys.argv[1:]])  # no signal forwarding, like CTK's launcher
sys.exit(child.wait())
""")
    launcher.chmod(0o755)
    w = LocalWorker(python=str(launcher), device="cpu", env=child_env(home / "launched"))
    w.start()
    try:
        server = w.server_pid
        assert server and server != w.process.pid and w.alive()
        assert requests.get(w.url + "/health", timeout=10).status_code == 200
        w.stop(timeout=5)
        assert wait_until(lambda: not _running(server), 5), "the server outlived stop()"
        with pytest.raises(requests.ConnectionError):
            requests.get(w.url + "/health", timeout=2)
        w.start()  # a new tree; the server dies by itself: alive() sees it although the launcher is up
        server = w.server_pid
        os.kill(server, 9)
        assert wait_until(lambda: not w.alive(), 5)
    finally:
        w.stop(timeout=5)


def _running(pid: int) -> bool:
    """Independent of the code under test: ``ps`` shows the process and it is not a zombie."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_a_worker_never_outlives_the_application_that_started_it(tmp_path, home):
    """Slicer crashes (killed: no shutdown, no atexit): its worker must not stay behind holding the
    port, the memory and perhaps the GPU. LocalWorker passes --exit-with-pid."""
    app = tmp_path / "application.py"
    app.write_text(f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "AutoMedSAMSlicer")!r})
from automedsam.worker import LocalWorker
worker = LocalWorker(device="cpu")
worker.start()
print(worker.server_pid, flush=True)
time.sleep(600)
""")
    process = subprocess.Popen([sys.executable, str(app)], stdout=subprocess.PIPE, text=True,
                               env=child_env(home / "crashing-app"))
    try:
        server = int(process.stdout.readline())
        assert _running(server)
        process.kill()  # the application crashes
        process.wait()
        assert wait_until(lambda: not _running(server), 20), "the worker outlived its application"
    finally:
        process.kill()
        process.stdout.close()


def tampered(bundle: Path, change) -> bytes:
    """The bundle's zip with its manifest changed by ``change(manifest)`` (weights untouched, so the
    weights' sha256 still matches: only the network check can catch it)."""
    with zipfile.ZipFile(bundle) as z:
        manifest, weights = json.loads(z.read("manifest.json")), z.read("weights.safetensors")
    change(manifest)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("weights.safetensors", weights)
    return out.getvalue()


TAMPERING = {
    # A size that, built, would ask for tens of GB: refused from shapes on torch's meta device.
    "hidden": (lambda m: m["generator"]["config"].update(mlp_dim=4194304), "mlp.lin1.bias is [1024] in the weights"),
    "classes": (lambda m: m["generator"]["config"].update(num_classes=3), "has 3 class outputs"),
    "dropped class": (lambda m: m.update(classes=m["classes"][:1]), "lists 1 classes"),
    "unknown key": (lambda m: m["generator"]["config"].update(foo=1), "unexpected keyword argument 'foo'"),
    "kind": (lambda m: m["generator"].update(type="classmap"), "classmap prompt network's config is invalid"),
    "backbone": (lambda m: m["backbone"].update(id="no-such-backbone"), "not in the model catalog"),
    "input size": (lambda m: m["backbone"].update(input_size=1024), "takes 256-pixel inputs"),
    "window": (lambda m: m["preprocessing"]["intensity"].update(width=-5), "width must be > 0"),
    "nan": (lambda m: m["preprocessing"]["intensity"].update(level=float("nan")), "NaN is not a number"),
    "duplicate": (lambda m: m["classes"][1].update(name=m["classes"][0]["name"]), "used twice"),
    "decoder": (lambda m: m.update(decoder_finetuned=True), "hold no mask decoder"),
}


@pytest.mark.parametrize("what", TAMPERING)
def test_a_manifest_that_does_not_fit_its_weights_is_refused_before_anything_is_built(what, make_bundle, tmp_path,
                                                                                      strict, capsys):
    from automedsam.bundle import load_bundle
    from automedsam.cli.main import run
    from automedsam.errors import InvalidInputError

    change, words = TAMPERING[what]
    data = tampered(make_bundle("tiny-sam2", "ppn", seed=2), change)
    path = tmp_path / "bundle.zip"
    path.write_bytes(data)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        load_bundle(path)
    assert run(["segment", str(tmp_path / "none.nii.gz"), "--model", str(path), "--classes", "liver", "-o",
                str(tmp_path / "x.seg.nrrd"), "--device", "cpu"]) == 2
    assert_error(call(strict, "POST", "/v1/bundles", data=data), 422, "invalid_input", words)


def test_the_token_is_checked_before_the_body_is_read(strict):
    for headers, body in (({"Content-Type": "application/json"}, b"{not json"),
                          ({"Content-Length": str(50 * 2**20)}, b"x")):
        r = requests.post(strict.url + "/v1/sessions", data=body, headers=headers, timeout=10)
        assert_error(r, 401, "unauthorized", "token")
        assert r.headers["WWW-Authenticate"] == "Bearer"
    r = requests.post(strict.url + "/v1/no-such-route", timeout=10)  # routes are not revealed either
    assert_error(r, 401, "unauthorized", "token")


def test_an_unwritable_bundle_folder_is_a_clear_error_without_server_paths(strict, home, make_bundle):
    from automedsam.errors import WeightsLoadError
    from automedsam.service.protocol import error_status

    uploaded = home / "allowed" / "uploaded"
    aside = home / "uploaded-aside"
    if uploaded.exists():
        os.replace(uploaded, aside)
    uploaded.write_text("a file where the worker keeps uploads")  # what a read-only or full disk also gives
    try:
        r = call(strict, "POST", "/v1/bundles", data=make_bundle("tiny-sam2", "diffusion").read_bytes())
        assert_error(r, 507, "storage_unavailable", "bundle folder is not writable")
        assert str(home) not in r.text
    finally:
        uploaded.unlink()
        if aside.exists():
            os.replace(aside, uploaded)
    assert error_status(WeightsLoadError("x")) == (422, "weights_invalid")


def test_memory_returns_after_sessions_are_deleted(strict, ct):
    """Create / upload / segment / delete, twelve times: after the first cycles (model loading,
    allocator warm-up) the worker's resident memory stays flat. Before the worker gave freed
    memory back (glibc keeps it in per-thread arenas) and dropped the jobs of deleted sessions,
    cycles 4 to 12 added ~170 MB here (scripts/worker_memory.py measures it at length)."""
    from automedsam.contract import result_of

    def rss_mb() -> float:
        line = next(x for x in Path(f"/proc/{strict.server_pid}/status").read_text().splitlines()
                    if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    trace = []
    for _ in range(12):
        engine = strict.client(bundle="good.zip")
        engine.set_volume(ct)
        masks = result_of(engine.segment(["liver", "spleen"])).masks
        assert set(masks) == {"liver", "spleen"} and masks["liver"].shape == ct.array.shape
        engine.close()
        time.sleep(0.5)  # the model thread frees the session's memory after it is deleted
        trace.append(rss_mb())
    assert trace[-1] - trace[3] < 60, [round(t) for t in trace]
