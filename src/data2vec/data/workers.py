"""What every data-loader worker process does first."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ignores SIGTERM and SIGINT. Ctrl-C and job schedulers
    signal every process of the job; the main process then finishes its step and checkpoints (the
    SignalStop hook), which needs its workers alive. Workers still end with the main process (the
    loader shuts them down, and they exit when their parent is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
