"""``automedsam serve``: run the local inference worker (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

from ..processes import lower_priority
from .common import add_device_option


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the inference worker (HTTP on 127.0.0.1, bearer token)",
        description="Starts the worker and prints one JSON line on stdout once it accepts requests: url, port, "
                    "protocol, device and, if it generated one, the token. Binds 127.0.0.1 unless told otherwise.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_bounded(0, 65535), default=0,
                   help="port (default 0: a free one, reported on stdout)")
    p.add_argument("--token", help="bearer token clients must send (default: a random one)")
    p.add_argument("--token-file", help="read the token from this file (keeps it out of the process list)")
    add_device_option(p)
    p.add_argument("--max-upload-mb", type=_bounded(1, 1 << 20), default=1024,
                   help="largest accepted volume, labels or masks upload (MB)")
    p.add_argument("--max-bundle-mb", type=_bounded(1, 1 << 20), default=1024,
                   help="largest accepted bundle upload (MB)")
    p.add_argument("--max-sessions", type=_bounded(1, 10000), default=8)
    p.add_argument("--max-queued-jobs", type=_bounded(1, 100000), default=16)
    p.add_argument("--session-ttl-s", type=_bounded(1, 10**9, float), default=3600.0,
                   help="idle sessions expire after this")
    p.add_argument("--bundle-dir", action="append", default=[],
                   help="a folder sessions may load bundles from (repeatable; the first also receives uploaded and "
                        "trained bundles; default $AUTOMEDSAM_HOME/bundles)")
    p.add_argument("--mirror", action="append", default=[],
                   help="URL prefix downloads may use besides the catalog's URLs (repeatable)")
    p.add_argument("--download-deadline-s", type=_bounded(1, 10**7, float), default=3600.0,
                   help="overall time limit of one weights download")
    p.add_argument("--exit-with-pid", type=_bounded(1, 2**31 - 1), default=None, metavar="PID",
                   help="stop when process PID ends (the application that started this worker, a crash "
                        "included), so no worker is left running without its user")
    p.add_argument("--lower-priority", action="store_true",
                   help="run below normal priority, so the application it serves (Slicer's GUI) gets the CPU first")
    p.set_defaults(handler=run)


def _bounded(low, high, kind=int):
    """An argparse type: a number of ``kind`` in ``low..high`` (a usage error, exit 2, otherwise)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text} is not in {low}..{high}")
        return value

    return parse


def read_token_file(name: str) -> str:
    """The token in a file only its owner can read (as ssh insists for keys): a token other users
    can read lets them drive the worker. Never opens a FIFO or device.

    Raises:
        InvalidInputError: missing, not a regular file, readable or writable by others, unreadable.
    """
    import stat

    from ..errors import InvalidInputError
    from ..io import check_regular

    path = Path(name).expanduser()
    if not path.exists():
        raise InvalidInputError(f"--token-file {path} does not exist")
    check_regular(path, "--token-file")
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInputError(f"--token-file {path} can be read or changed by other users (mode "
                                f"{stat.filemode(mode)}); run `chmod 600 {path}` and start again")
    if not path.is_file():
        raise InvalidInputError(f"--token-file {path} is a folder; give the file that holds the token")
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read --token-file {path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..backbones import resolve_device
    from ..errors import InvalidInputError
    from ..service.app import create_app
    from ..service.protocol import PROTOCOL
    from ..service.state import ServiceSettings

    if args.lower_priority and not lower_priority():
        logging.getLogger(__name__).warning("could not lower the worker's priority; it runs at normal priority")
    generated = None
    if args.token_file:
        token = read_token_file(args.token_file)
    else:
        token = args.token or secrets.token_urlsafe(32)
        generated = None if args.token else token
    if len(token) < 16:
        raise InvalidInputError("the token must have at least 16 characters")
    device = str(resolve_device(args.device))
    settings = ServiceSettings(token=token, device=device, max_upload_mb=args.max_upload_mb,
                               max_bundle_mb=args.max_bundle_mb,
                               max_sessions=args.max_sessions, max_queued_jobs=args.max_queued_jobs,
                               session_ttl_s=args.session_ttl_s,
                               bundle_dirs=tuple(str(Path(d).expanduser().resolve()) for d in args.bundle_dir),
                               mirrors=tuple(args.mirror),
                               download_deadline_s=args.download_deadline_s)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it, a keep-alive response written in two parts waits
    # for the client's delayed ACK (measured: 42 ms per request on loopback instead of ~2 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    import threading
    import time

    def announce():
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
        # pid: the process that holds the port and the GPU, which a launcher (Slicer's PythonSlicer)
        # may have started as its child; LocalWorker watches and stops this one.
        line = {"url": f"http://{host}:{port}", "port": port, "protocol": PROTOCOL, "device": device,
                "pid": os.getpid()}
        if generated:
            line["token"] = generated
        print(json.dumps(line), flush=True)

    threading.Thread(target=announce, daemon=True).start()
    if args.exit_with_pid:
        threading.Thread(target=_exit_with, args=(args.exit_with_pid, server), daemon=True).start()
    server.run(sockets=[sock])
    print("worker stopped", file=sys.stderr)
    return 0


def _exit_with(pid: int, server, every: float = 0.5) -> None:
    """Ask ``server`` to stop once process ``pid`` has ended (checked every ``every`` seconds)."""
    import contextlib
    import time

    from ..processes import pid_alive

    while not server.should_exit:
        if not pid_alive(pid):
            server.should_exit = True
            # The pipe to a crashed parent may be gone: the stop must not depend on this line.
            with contextlib.suppress(OSError):
                print(f"worker stopping: process {pid}, which started it, has ended", file=sys.stderr)
            return
        time.sleep(every)
