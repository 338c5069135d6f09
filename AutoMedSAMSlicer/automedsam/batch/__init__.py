"""Pre-annotating whole datasets: ``automedsam batch``.

One model per worker; every case written atomically beside its JSON record, so a rerun skips the
finished cases and redoes the rest; one bad case is recorded and never stops the others; a report
(CSV, JSON, and an HTML index of PNG previews, worst first). Workers run in this process, in a
local process pool, or as Ray actors on a cluster (:mod:`.ray_cluster`), all through the same
:class:`~.case_worker.CaseWorker`.

Imports nothing heavy: torch, SimpleITK and Ray load when a run starts.
"""

from .case_worker import BatchConfig, CaseWorker
from .cases import Case, discover_cases
from .run import BatchEvent, prepare, run_batch

__all__ = ["BatchConfig", "BatchEvent", "Case", "CaseWorker", "discover_cases", "prepare", "run_batch"]
