"""The worker's memory over many sessions: N cycles of create session / upload the volume /
segment / delete the session against a real ``automedsam serve`` process, its resident memory
(VmRSS, Linux) read after each cycle. Prints JSON: the RSS per cycle and the growth per session
after the first cycles (model loading, allocator warm-up).

    python scripts/worker_memory.py --model bundle.zip --image ../shared/data/ct_abdomen/ct_lowres.nii.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(model: str, image: str, cycles: int, classes: list[str], warmup: int = 5, settle_s: float = 0.5) -> dict:
    """Run the cycles; returns the RSS trace (MB) and the fitted growth per session (MB) after
    ``warmup`` cycles."""
    from automedsam.contract import result_of
    from automedsam.io import read_image
    from automedsam.worker import LocalWorker

    volume = read_image(image)
    worker = LocalWorker(device="cpu", extra_args=["--bundle-dir", str(Path(model).resolve().parent)])
    worker.start()
    try:
        pid = worker.server_pid
        before = rss_mb(pid)
        trace = []
        for _ in range(cycles):
            engine = worker.client(bundle=Path(model).name)
            engine.set_volume(volume)
            result = result_of(engine.segment(classes))
            assert any(m.any() for m in result.masks.values())
            engine.close()
            time.sleep(settle_s)  # the worker frees a deleted session's memory on its model thread
            trace.append(round(rss_mb(pid), 1))
    finally:
        worker.stop()
    tail = np.asarray(trace[warmup:], float)
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else 0.0
    return {"cycles": cycles, "rss_start_mb": round(before, 1), "rss_mb": trace,
            "rss_end_mb": trace[-1], "growth_mb_per_session_after_warmup": round(slope, 2), "warmup_cycles": warmup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--classes", default="liver,spleen")
    parser.add_argument("--cycles", type=int, default=30)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.image, args.cycles, args.classes.split(",")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
