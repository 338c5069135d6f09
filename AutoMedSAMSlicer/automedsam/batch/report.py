"""The report of a batch run, made from the cases' records: ``batch_report.csv`` (one row per case
and class), ``batch_report.json`` (the records, per-class means and the run's figures) and
``index.html`` (every case with its preview, worst first), all in the output folder.

Worst first: failed cases, then with a reference the lowest DSC of any class, without one the
cases with the most empty classes and then the smallest mask: the cases a person should look at
before the others.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from ..io import temporary_name
from .records import OutputLayout, write_json_atomic

#: The run's own files in the output folder.
REPORT_FILES = ("batch_report.json", "batch_report.csv", "index.html")
#: Marks the HTML index as this tool's (so a user's index.html is never replaced unasked).
GENERATOR = '<meta name="generator" content="automedsam batch">'
CSV_COLUMNS = ("case", "class", "status", "voxels", "volume_ml", "slices_with_mask", "dsc", "nsd", "seconds",
               "image", "reference", "output", "error")


def worst_first_key(record: dict) -> tuple:
    """Sort key: failed first, then lowest DSC (with a reference), then most empty classes, then
    smallest mask volume."""
    if record.get("status") != "done":
        return (0, 0.0, 0, 0.0, record["case"])
    classes = record.get("classes") or {}
    dscs = [c["dsc"] for c in classes.values() if c.get("dsc") is not None]
    empty = sum(1 for c in classes.values() if not c.get("voxels"))
    smallest = min((c.get("volume_ml", 0.0) for c in classes.values()), default=0.0)
    return (1, min(dscs) if dscs else math.inf, -empty, smallest, record["case"])


def class_means(records: Sequence[dict]) -> dict:
    """Per class, over the finished cases with a score: mean DSC and NSD, and how many cases."""
    out: dict[str, dict] = {}
    for record in records:
        for name, c in (record.get("classes") or {}).items():
            if c.get("dsc") is not None:
                out.setdefault(name, {"dsc": [], "nsd": []})
                out[name]["dsc"].append(c["dsc"])
                out[name]["nsd"].append(c["nsd"])
    return {name: {"dsc": round(sum(v["dsc"]) / len(v["dsc"]), 4), "nsd": round(sum(v["nsd"]) / len(v["nsd"]), 4),
                   "cases": len(v["dsc"])} for name, v in out.items()}


def _csv_rows(records: Sequence[dict]) -> list[dict]:
    rows = []
    for r in records:
        common = {"case": r["case"], "status": r.get("status"), "seconds": r.get("seconds"), "image": r.get("image"),
                  "reference": r.get("reference") or "", "output": r.get("output") or "",
                  "error": (r.get("error") or {}).get("message", "")}
        classes = r.get("classes") or {}
        if not classes:
            rows.append(common | {"class": ""})
        for name, c in classes.items():
            rows.append(common | {"class": name, "voxels": c.get("voxels"), "volume_ml": c.get("volume_ml"),
                                  "slices_with_mask": c.get("slices_with_mask"), "dsc": c.get("dsc", ""),
                                  "nsd": c.get("nsd", "")})
    return rows


def foreign_report_files(folder: Path) -> list[Path]:
    """Report file names in ``folder`` taken by files this tool did not write."""
    found = []
    for name in REPORT_FILES:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            text = path.read_text(encoding="utf-8")[:1_000_000] if path.is_file() else ""
        except (OSError, UnicodeDecodeError):
            text = ""
        if name == "index.html":
            ours = GENERATOR in text
        elif name == "batch_report.csv":
            ours = text.split("\n", 1)[0] == ",".join(CSV_COLUMNS)
        else:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            ours = isinstance(data, dict) and isinstance(data.get("run"), dict) and "run_key" in data["run"]
        if not ours:
            found.append(path)
    return found


def _html(layout: OutputLayout, records: Sequence[dict], classes: Sequence[str], summary: dict) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in classes)
    rows = []
    for rank, r in enumerate(sorted(records, key=worst_first_key), start=1):
        cells = []
        for name in classes:
            c = (r.get("classes") or {}).get(name)
            if c is None:
                cells.append("<td></td>")
                continue
            score = f"<br>DSC {c['dsc']:.3f} · NSD {c['nsd']:.3f}" if c.get("dsc") is not None else ""
            flag = ' class="empty"' if not c.get("voxels") else ""
            cells.append(f"<td{flag}>{c.get('volume_ml', 0):.1f} mL{score}</td>")
        if r.get("status") == "done":
            status = "done" + "".join(f'<div class="warn">{e(w)}</div>' for w in r.get("warnings") or [])
        else:
            status = f'<span class="failed">failed</span>: {e((r.get("error") or {}).get("message", ""))}'
        # Links are made from the layout, never taken from a record (which a hand may have edited).
        link = e(quote(layout.preview_link(r["case"])))
        picture = f'<a href="{link}"><img src="{link}" loading="lazy"></a>' if r.get("preview") else ""
        target = e(quote(layout.segmentation(r["case"]).name))
        output = f'<a href="{target}">{e(r["case"])}</a>' if r.get("status") == "done" else e(r["case"])
        rows.append(f"<tr><td>{rank}</td><td>{output}</td><td>{status}</td>{''.join(cells)}"
                    f"<td>{r.get('seconds') or ''}</td><td>{picture}</td></tr>")
    figures = ", ".join(f"{k}: {e(str(v))}" for k, v in summary.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>AutoMedSAM batch report</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}}img{{height:120px}}
.failed{{color:#b00;font-weight:bold}}.empty{{background:#fde}}.warn{{color:#a60;font-size:11px}}</style></head>
<body><h1>AutoMedSAM batch report</h1><p>{figures}</p><p>Worst first: failed cases, then the lowest DSC
(with a reference), else empty and small masks.</p>
<table><tr><th>#</th><th>case</th><th>status</th>{head}<th>seconds</th><th>preview</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


def write_report(layout: OutputLayout, records: Sequence[dict], classes: Sequence[str], run: dict,
                 summary: dict) -> dict:
    """Write the three report files (atomically) into ``layout.folder`` and return the JSON report."""
    folder = layout.folder
    records = sorted(records, key=lambda r: r["case"])
    report = {"run": run, "summary": summary, "classes": class_means(records), "cases": list(records)}
    write_json_atomic(folder / "batch_report.json", report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_rows(records))
    for name, text in (("batch_report.csv", buffer.getvalue()),
                       ("index.html", _html(layout, records, classes, summary))):
        tmp = temporary_name(folder / name)
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, folder / name)
        finally:
            tmp.unlink(missing_ok=True)
    return report
