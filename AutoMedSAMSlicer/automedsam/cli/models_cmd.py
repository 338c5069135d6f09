"""``automedsam models list|download|import``: the backbone catalog and the weights cache."""

from __future__ import annotations

import argparse
import sys

from .common import add_json_option, emit_json


def register(sub) -> None:
    p = sub.add_parser("models", help="list, download or import backbone weights")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    pl = msub.add_parser("list", help="list catalog backbones and whether their weights are cached")
    add_json_option(pl)
    pl.set_defaults(handler=run_list)

    pd = msub.add_parser("download", help="download a backbone's weights (resumable, sha256-verified)")
    pd.add_argument("id", help="backbone id, e.g. sam_vit_b")
    pd.add_argument("--url", help="download from this URL instead (a site mirror); the sha256 is still checked")
    pd.add_argument("--sha256", help="expected sha256 where the catalog pins none")
    pd.add_argument("--timeout", type=float, default=60.0, help="network read timeout in seconds (default 60)")
    pd.set_defaults(handler=run_download)

    pi = msub.add_parser("import", help="verify a weights file obtained by other means and put it in the cache")
    pi.add_argument("id", help="backbone id")
    pi.add_argument("file", help="the weights file")
    pi.add_argument("--sha256", help="expected sha256 where the catalog pins none")
    pi.set_defaults(handler=run_import)


def run_list(args: argparse.Namespace) -> int:
    from ..models import BackboneCatalog

    catalog = BackboneCatalog.load()
    rows = []
    for spec in catalog.all():
        cached = catalog.cached_path(spec)
        rows.append(spec.to_dict() | {
            "provenance": spec.provenance(),
            "cached": cached is not None,
            "path": str(cached or (catalog.expected_path(spec) if not spec.test_only else "")) or None,
        })
    if args.json:
        emit_json({"backbones": rows})
        return 0
    for r in rows:
        state = "TEST ONLY (random weights)" if r["test_only"] else ("cached" if r["cached"] else "not downloaded")
        print(f"{r['id']:<18} {r['display_name']:<40} input {r['input_size']:>4}  {r['license']:<11} {state}")
        if not r["test_only"]:
            p = r["provenance"]
            print(f"{'':<18} from {p['source']}; sha256 {p['sha256'] or 'not pinned'}; upstream {p['upstream']}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..download import download_backbone

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=args.id, file=sys.stderr,
               disable=None)

    def progress(done: int, total: int | None) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        path = download_backbone(args.id, url=args.url, sha256=args.sha256, progress=progress,
                                 timeout=(10.0, args.timeout))
    finally:
        bar.close()
    print(path)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..download import import_backbone

    print(import_backbone(args.id, args.file, sha256=args.sha256))
    return 0
