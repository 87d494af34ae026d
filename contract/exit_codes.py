"""How a worker asks its supervisor for a clean restart: the contract between worker.* and
whatever runs it (Kubernetes and compose restart on any exit; `make run` on these only).

A wedged worker's job keeps its lease until that lapses, then another worker's reaper retries
it or fails it `worker_lost`; a broken accelerator's job is already recorded as failed.
"""

EXIT_ACCELERATOR_BROKEN = 70  # EX_SOFTWARE: the CUDA context is unusable (job recorded failed)
EXIT_WEDGED = 75  # EX_TEMPFAIL: a job stopped making progress (worker.stall_watchdog)
RESTART_EXIT_CODES = frozenset({EXIT_ACCELERATOR_BROKEN, EXIT_WEDGED})
