"""Running cases on a Ray cluster (``pip install automedsam[cluster]``): one model actor per GPU
(or per share of CPU cores), cases handed out by Ray's :class:`ray.util.ActorPool`; no scheduler,
queue or RPC of our own.

The actors are :class:`~.case_worker.CaseWorker` itself, so a case runs the same code as on one
machine and writes the same files; the output folder must therefore be a path every node sees
(a shared file system), and so must the inputs and the model bundle. Ray restarts an actor that
dies (the model is loaded again); the case it held is recorded as failed and done again by the
next run.

``address``: ``"local"`` starts a cluster on this machine for the run (and stops it after),
``"auto"`` connects to the cluster this machine belongs to (``ray start``), anything else is a
cluster address (``ray://host:10001`` or ``host:6379``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import ClusterUnreachableError, InvalidInputError
from . import reaper
from .case_worker import BatchConfig, CaseWorker
from .cases import Case
from .local import lost_case, mark_interrupted
from .records import read_record

log = logging.getLogger(__name__)

#: Threads of one CPU actor when --workers does not say (the cluster's cores / workers otherwise).
DEFAULT_ACTOR_THREADS = 4


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds when nothing listens at a cluster address (Ray itself retries for a
    minute or more before it gives up).

    Raises:
        InvalidInputError: the address is not ``[ray://]host:port``.
        ClusterUnreachableError: no answer at it.
    """
    import socket
    from urllib.parse import urlsplit

    split = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = split.hostname, split.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise InvalidInputError(f"--ray {address!r} is not a cluster address: give host:port (e.g. 10.0.0.5:6379), "
                                "ray://host:10001, auto or local")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {address!r} ({exc.strerror or exc}); start one there with `ray start --head`, "
            "check the address and firewall, or use --ray local") from None


def _connect(address: str) -> tuple[bool, object]:
    """Connect to (or start) the cluster. Returns whether this call did (so the run disconnects
    after) and, for a cluster it started here, the :mod:`.reaper` that ends it with this process."""
    try:
        import ray
    except ImportError:
        raise InvalidInputError("--ray needs Ray: pip install 'automedsam[cluster]' (or pip install ray)") from None
    if ray.is_initialized():
        return False, None
    package_root = str(Path(__file__).resolve().parents[2])
    passed = {k: v for k, v in os.environ.items() if k.startswith("AUTOMEDSAM_")}
    if address == "local":
        # The actors run this checkout's automedsam with this process's settings (cache folder too).
        paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = passed | {"PYTHONPATH": os.pathsep.join(paths)}
        before = reaper.descendants(os.getpid())
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env})
        return True, reaper.start(package_root, before)
    else:
        if address != "auto":
            _reachable(address)
        # Nodes keep their own cache folder; the CPU runtime choice travels.
        env = {k: v for k, v in passed.items() if k != "AUTOMEDSAM_HOME"}
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": env} if env else None)
        except ConnectionError as exc:
            raise ClusterUnreachableError(f"no Ray cluster at {address!r}: {exc}. Start one with `ray start --head`, "
                                          "or use --ray local") from None
    return True, None


def actor_plan(resources: dict, device: str, workers: int | None) -> tuple[int, dict, str, int]:
    """How many actors, each one's Ray resources, its device and its CPU threads, from the
    cluster's resources (``ray.cluster_resources()``)."""
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device != "cpu" and gpus:
        n = workers or gpus
        return n, {"num_gpus": min(1.0, gpus / n), "num_cpus": 1}, "cuda", max(1, cpus // n)
    if device.startswith("cuda"):
        raise InvalidInputError(f"device {device!r} was requested but the Ray cluster has no GPU; use --device cpu")
    threads = max(1, cpus // workers) if workers else min(DEFAULT_ACTOR_THREADS, cpus)
    n = workers or max(1, cpus // threads)
    return n, {"num_cpus": threads}, "cpu", threads


def run_on_ray(config: BatchConfig, cases: Sequence[Case], run_key: str, deaths: dict[str, int], address: str,
               workers: int | None, cancel: threading.Event | None = None) -> Iterator[dict]:
    """Yields each case's record as an actor finishes it."""
    import ray
    from ray.util import ActorPool

    connected, local_reaper = _connect(address)
    returned: set[str] = set()
    try:
        n, resources, device, threads = actor_plan(ray.cluster_resources(), config.device, workers)
        log.info("Ray: %d actor(s) on %s, %d thread(s) each", n, device, threads)
        actor_class = ray.remote(CaseWorker).options(max_restarts=2, max_task_retries=0, **resources)
        pool = ActorPool([actor_class.remote(config, device, threads) for _ in range(n)])
        for case in cases:
            pool.submit(lambda actor, c: actor.process.remote(c, run_key, deaths.get(c.id, 0)), case)
        while pool.has_next():
            if cancel is not None and cancel.is_set():
                break
            try:
                record = pool.get_next_unordered()
            except ray.exceptions.RayError as exc:  # an actor died under a case (which one, Ray does not say)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, InvalidInputError):  # e.g. the output folder became unwritable: stop
                    raise InvalidInputError(str(cause)) from None
                log.warning("a Ray actor failed: %s", exc)
                continue
            returned.add(record["case"])
            yield record
        if cancel is None or not cancel.is_set():
            # Cases whose actor died under them (their claim says running): failed now, done again by the
            # next run. Cases never started keep what they had and are simply done by the next run.
            for case in cases:
                claim = read_record(config.layout, case.id)
                if case.id not in returned and claim is not None and claim["status"] == "running":
                    yield lost_case(config, case, run_key, "the Ray actor processing it died")
    finally:
        if connected:
            ray.shutdown()
        reaper.stop(local_reaper)
        for case in cases:  # stopped early: what the actors held was interrupted, not killed by its case
            if case.id not in returned:
                mark_interrupted(config, case)
