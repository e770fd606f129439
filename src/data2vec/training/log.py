"""train.log: every line a run reports, also shown above the progress bar."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from data2vec.writes import append_line


class RunLog:
    """Appends to RUN_DIR/train.log and prints (unless `quiet`). Ranks other than 0 get `silent`."""

    def __init__(self, run_dir: Path, quiet: bool) -> None:
        self.path = run_dir / "train.log"
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        append_line(self.path, msg, "train.log")
        if not self.quiet:
            tqdm.write(msg)


def silent(msg: str) -> None:
    """The log of ranks other than 0: nothing."""
