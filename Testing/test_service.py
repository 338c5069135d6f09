"""The worker service, started for real on 127.0.0.1 in a subprocess and driven by the real client."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from automedsam.bundle import load_bundle
from automedsam.client import (
    ProtocolMismatchError,
    RemoteEngine,
    ServiceError,
    ServiceUnavailableError,
)
from automedsam.engine import Engine
from automedsam.errors import InvalidInputError
from automedsam.io import read_image
from automedsam.worker import LocalWorker

from http_fixture import FaultyFileServer

REPO = Path(__file__).resolve().parents[1]


def child_env(tmp_path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "AutoMedSAMSlicer"), AUTOMEDSAM_HOME=str(tmp_path / "home"),
                TQDM_DISABLE="1")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = LocalWorker(device="cpu", env=child_env(tmp_path_factory.mktemp("worker")),
                    extra_args=["--max-upload-mb", "6", "--max-sessions", "6"])
    w.start()
    yield w
    w.stop()


def test_health_is_open_everything_else_needs_the_token(worker):
    assert requests.get(worker.url + "/health", timeout=10).json()["status"] == "ok"
    assert worker.url.startswith("http://127.0.0.1:")
    r = requests.get(worker.url + "/v1/info", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = requests.get(worker.url + "/v1/info", headers={"Authorization": "Bearer wrong-token-wrong-token"}, timeout=10)
    assert r.status_code == 401
    ok = requests.get(worker.url + "/v1/info", headers={"Authorization": f"Bearer {worker.token}"}, timeout=10)
    from automedsam.service.protocol import PROTOCOL

    assert ok.status_code == 200 and ok.json()["protocol"] == PROTOCOL
    assert requests.get(worker.url + "/openapi.json", timeout=10).status_code == 401


def test_remote_engine_gives_the_same_masks_as_the_in_process_engine(worker, make_bundle, ct):
    bundle_path = str(make_bundle("tiny-sam2", "ppn", seed=2))
    remote = worker.client(bundle=bundle_path)
    remote.set_volume(ct)
    events = list(remote.segment(["liver", "spleen"], slices=list(range(10, 16)), cleanup="none"))
    assert events[-1].stage == "done" and events[-1].result.slices == list(range(10, 16))
    bundle = load_bundle(bundle_path)
    local = Engine.from_bundle(bundle, "cpu")
    local.set_volume(ct)
    expected = local.segment_volume(["liver", "spleen"], list(range(10, 16)), cleanup="none")
    for name in ("liver", "spleen"):
        assert expected.masks[name].any() and np.array_equal(events[-1].result.masks[name], expected.masks[name])
    shown = expected.masks["liver"][12]
    mask = remote.refine("liver", 12, points=[[60, 50], [10, 10]], point_labels=[1, 0], mask=shown)
    expected_refine = local.refine("liver", 12, points=[[60, 50], [10, 10]], point_labels=[1, 0], mask=shown)
    assert mask.any() and np.array_equal(mask, expected_refine)
    assert not hasattr(remote, "masks")  # no mirror: the caller's masks are the only ones
    remote.close()


def test_bad_requests_get_clear_4xx(worker, make_bundle, ct):
    remote = worker.client(bundle=str(make_bundle("tiny-sam2", "ppn")))
    remote.set_volume(ct)
    with pytest.raises(InvalidInputError, match="it has: liver"):
        list(remote.segment(["heart"]))
    with pytest.raises(InvalidInputError, match="out of range"):
        remote.refine("liver", 99, points=[[1, 1]])
    sid = remote.session_id
    headers = {"Authorization": f"Bearer {worker.token}", "Content-Type": "application/octet-stream"}
    meta = {"shape": [2, 3, 4], "dtype": "int16", "spacing": [1, 1, 1], "origin": [0, 0, 0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    r = requests.put(f"{worker.url}/v1/sessions/{sid}/volume", data=b"\0" * 10,
                     headers=headers | {"X-Volume-Meta": json.dumps(meta)}, timeout=10)
    assert r.status_code == 422 and "needs 48" in r.json()["error"]["message"]
    r = requests.put(f"{worker.url}/v1/sessions/{sid}/volume", data=b"\0" * 48,
                     headers=headers | {"X-Volume-Meta": json.dumps(meta | {"spacing": [1, -1, 1]})}, timeout=10)
    assert r.status_code == 422 and "spacing.1: Input should be greater than 0" in r.json()["error"]["message"]
    r = requests.put(f"{worker.url}/v1/sessions/{sid}/volume", data=b"\0" * (7 * 2**20),
                     headers=headers | {"X-Volume-Meta": json.dumps(meta)}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = requests.post(f"{worker.url}/v1/sessions/{sid}/segment", json={"classes": []}, headers=headers, timeout=10)
    assert r.status_code == 422
    r = requests.get(f"{worker.url}/v1/jobs/nope", headers=headers, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    remote.close()


def test_cancel_a_running_job(worker, make_bundle, ct_dir):
    remote = worker.client(bundle=str(make_bundle("tiny-sam", "ppn")))
    big = read_image(ct_dir / "ct_full_lowres.nii.gz")
    remote.set_volume(big)
    cancel = threading.Event()
    stages = []
    for event in remote.segment(["liver"], cancel=cancel):
        stages.append(event.stage)
        cancel.set()  # at the first event: 112 slices cannot finish before the cancel arrives
    assert stages[-1] == "cancelled"
    remote.close()


def test_concurrent_clients(worker, make_bundle, ct):
    bundle = str(make_bundle("tiny-sam2", "diffusion"))
    results, errors = {}, []

    def one(n):
        try:
            remote = worker.client(bundle=bundle)
            remote.set_volume(ct)
            results[n] = remote.refine("spleen", 10 + n, box=[70, 30, 100, 60], mode="manual")
            remote.close()
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(results) == [0, 1, 2]
    assert all(m.shape == (101, 122) for m in results.values())


def test_killed_worker_is_a_clear_error_and_a_restart_loses_nothing(make_bundle, ct, tmp_path):
    w = LocalWorker(device="cpu", env=child_env(tmp_path))
    w.start()
    try:
        remote = w.client(bundle=str(make_bundle("tiny-sam2", "ppn")))
        remote.set_volume(ct)
        mask = remote.refine("liver", 12, box=[40, 30, 90, 80], mode="manual")
        clicked = remote.refine("liver", 12, points=[[60, 50]], mask=mask)
        with pytest.raises(ServiceUnavailableError, match="cannot reach the AutoMedSAM worker"):
            for _event in remote.segment(["spleen"]):  # killed while the job runs
                w.process.kill()
                w.process.wait(10)
        url = w.restart()
        remote.url = url
        remote.reconnect()
        # The caller holds the mask; the restarted worker refines from it as the first would have
        # from the same start (a new interaction: the click alone on the caller's mask).
        after = remote.refine("liver", 12, points=[[60, 50]], mask=mask)
        assert after.shape == mask.shape and clicked.shape == mask.shape
        assert list(remote.propagate("liver", 12, after if after.any() else mask, max_slices=1))[-1].stage == "done"
    finally:
        w.stop()


def test_protocol_mismatch_names_what_to_upgrade():
    import http.server

    class Old(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "protocol": "0", "version": "0.0.1"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Old)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ProtocolMismatchError, match="upgrade the worker"):
            RemoteEngine(f"http://127.0.0.1:{server.server_address[1]}", "x" * 20)
    finally:
        server.shutdown()
    with FaultyFileServer({}) as closed:
        url = closed.url
    with pytest.raises(ServiceUnavailableError, match="is it running"):
        RemoteEngine(url, "x" * 20)


def test_service_errors_carry_stable_codes(worker):
    remote = RemoteEngine(worker.url, worker.token, bundle="/no/such/bundle.zip")
    with pytest.raises(InvalidInputError, match=r"no bundle '/no/such/bundle\.zip' among this worker's bundles"):
        remote.set_volume(read_image(REPO.parent / "shared" / "data" / "ct_abdomen" / "ct_lowres.nii.gz"))
    bad = RemoteEngine(worker.url, "wrong" * 5)
    with pytest.raises(ServiceError) as info:
        bad._call("GET", "/v1/models")
    assert info.value.status == 401 and info.value.code == "unauthorized"


def test_schemathesis_finds_no_server_error(worker, make_bundle, ct):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    auth = {"Authorization": f"Bearer {worker.token}"}
    schema = schemathesis.openapi.from_url(worker.url + "/openapi.json", headers=auth)
    # Most generated requests go to a real session with a volume, so bodies reach the engine's
    # checks instead of stopping at "no such session".
    remote = worker.client(bundle=str(make_bundle()))
    remote.set_volume(ct)
    failures, statuses, created = [], [], []

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema.as_strategy())
    def check(case):
        if case.path == "/v1/sessions" and case.method.upper() == "POST":
            case.body = {"backbone": "tiny-sam2"} if not isinstance(case.body, dict) else case.body
        params = case.path_parameters or {}
        if "sid" in params and len(statuses) % 4:
            params["sid"] = remote.session_id
        if "class_name" in params and len(statuses) % 2:
            params["class_name"] = "liver"
        if case.path.endswith("/teach") and isinstance(case.body, dict):
            case.body["epochs"] = 1  # keep the model thread free for the other requests
        response = case.call(headers=auth, timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 201 and case.path == "/v1/sessions":
            created.append(response.json()["session_id"])
        if response.status_code >= 500:
            failures.append((case.method, case.path, response.status_code, response.text[:200]))

    check()
    assert not failures, failures
    assert len(set(statuses)) >= 4, statuses  # the fuzz reached past the token and the router
    remote.close()
    for sid in created:  # leave the session limit to the other tests
        requests.delete(f"{worker.url}/v1/sessions/{sid}", headers=auth, timeout=10)


def test_teaching_job_teaches_a_class_and_the_session_uses_it(worker, ct, ct_dir, tmp_path):
    import zipfile

    from automedsam.io import read_label_map

    remote = worker.client(backbone="tiny-sam2")
    remote.set_volume(ct)
    labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz").array
    events = list(remote.teach(labels, {"liver": 5}, tmp_path / "taught.zip", epochs=1, train_slices="13:15",
                               decoder_lr=3e-4))
    done = events[-1]
    assert done.stage == "done" and set(done.metrics) == {"liver"} and done.bundle_path == str(tmp_path / "taught.zip")
    with zipfile.ZipFile(done.bundle_path) as z:
        assert json.loads(z.read("manifest.json"))["classes"][0]["name"] == "liver"
    final = list(remote.segment(["liver"], slices=[14]))[-1]
    assert final.stage == "done" and final.result.masks["liver"].shape == (30, 101, 122)
    assert remote.class_catalog.names() == ["liver"]
    remote.close()


def test_download_job_through_the_worker(tmp_path, make_bundle):
    import hashlib

    data = os.urandom(200_000)
    with FaultyFileServer({"w.pth": data}) as files:
        entry = {"id": "site_sam", "family": "sam", "arch": "vit_b", "display_name": "Site SAM", "input_size": 1024,
                 "pixel_normalization": "sam", "url": f"{files.url}/ok/w.pth", "filename": "site_sam.pth",
                 "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "checkpoint_key": None,
                 "license": "Apache-2.0", "test_only": False}
        catalog = tmp_path / "catalog.json"
        catalog.write_text(json.dumps({"catalog_version": 1, "backbones": [entry]}))
        env = child_env(tmp_path) | {"AUTOMEDSAM_CATALOG": str(catalog)}
        with LocalWorker(device="cpu", env=env) as w:
            remote = w.client(backbone="tiny-sam")
            job = remote._call("POST", "/v1/models/site_sam/download", json={}).json()
            final = list(remote._follow(job))[-1]
            assert final["state"] == "done" and final["done"] == len(data)
            listed = remote._call("GET", "/v1/models").json()["backbones"]
            assert next(b for b in listed if b["id"] == "site_sam")["cached"]
    assert (tmp_path / "home" / "weights" / "site_sam.pth").read_bytes() == data
