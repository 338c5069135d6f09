"""``automedsam segment`` end to end on the shared real CT, and ``automedsam bench`` output."""

from __future__ import annotations

import json

import numpy as np

from automedsam.cli.main import run
from automedsam.io import read_image, read_label_map, read_segmentation


def test_segment_writes_a_seg_nrrd_in_the_input_geometry(make_bundle, ct_dir, tmp_path, capsys):
    bundle = make_bundle("tiny-sam2", "ppn")
    out = tmp_path / "case.seg.nrrd"
    code = run(["segment", str(ct_dir / "ct_dicom"), "--model", str(bundle), "--classes", "liver,spleen",
                "-o", str(out), "--device", "cpu", "--slices", "5:9", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert set(summary["classes"]) == {"liver", "spleen"} and summary["slices"] == 4
    seg = read_segmentation(out)
    image = read_image(ct_dir / "ct_dicom")
    assert seg.grid.same_grid(image)
    assert [s.segment_id for s in seg.segments] == ["liver", "spleen"]
    assert seg.segment("liver").name == "Liver"
    assert seg.segment("liver").terminology.split("~")[2] == "SCT^10200004^Liver"
    np.testing.assert_allclose(seg.segment("spleen").color, np.array([157, 108, 162]) / 255, atol=1e-4)
    for s in seg.segments:
        mask = seg.mask(s.segment_id)
        assert not mask[:5].any() and not mask[9:].any()  # only the requested slices
        assert int(mask.sum()) == summary["classes"][s.segment_id]["voxels"]


def test_segment_label_map_output_and_refusals(make_bundle, ct_dir, tmp_path, capsys):
    bundle = str(make_bundle("tiny-sam", "diffusion"))
    image = str(ct_dir / "ct_lowres.nii.gz")
    out = tmp_path / "labels.nii.gz"
    assert run(["segment", image, "--model", bundle, "--classes", "kidney_left", "-o", str(out),
                "--slices", "0::10", "--no-cleanup"]) == 0
    labels = read_label_map(out)
    assert labels.same_grid(read_image(image)) and set(np.unique(labels.array)) <= {0, 1}
    capsys.readouterr()
    assert run(["segment", image, "--model", bundle, "--classes", "kidney_left", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(["segment", image, "--model", bundle, "--classes", "heart", "-o", str(tmp_path / "x.nrrd")]) == 2
    assert "it has: liver, spleen, left_kidney" in capsys.readouterr().err
    assert run(["segment", image, "--model", bundle, "--classes", "liver", "-o", str(tmp_path / "y.nrrd"),
                "--slices", "20:99:0"]) == 2
    assert "not a slice selection" in capsys.readouterr().err
    assert run(["segment", image, "--model", bundle, "--classes", "liver", "-o", str(tmp_path / "y.nrrd"),
                "--slices", "31"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert run(["segment", image, "--model", str(tmp_path), "--classes", "liver", "-o", str(tmp_path / "z.nrrd")]) == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_bench_reports_every_promised_key(capsys):
    assert run(["bench", "--backbones", "tiny-sam2", "--slices", "2", "--repeats", "2", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cpu") and report["versions"]["torch"]
    (r,) = report["results"]
    for key in ("backbone", "encoder_ms_per_slice", "refine_ms_p50", "refine_ms_p95", "stock_predict_ms_p50",
                "volume_s_1_class", "volume_s_5_classes", "naive_s_5_classes", "cached_resegment_s", "peak_rss_mb"):
        assert isinstance(r[key], (int, float, str)) and r[key] != 0, key
    assert r["refine_ms_p95"] >= r["refine_ms_p50"] > 0
    # Through the worker: paired with in-process clicks, so the overhead is a finite difference. Its
    # size is the benchmark's figure, not the test's: on a busy machine it can be anything.
    assert r["service_refine_ms_p95"] >= r["service_refine_ms_p50"] > 0
    overhead = r["service_overhead_ms_p50"]
    assert isinstance(overhead, float) and np.isfinite(overhead)
