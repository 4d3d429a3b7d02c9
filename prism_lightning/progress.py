"""The pipeline's progress: a line as each stage starts and ends (the end line with the stages done of all, the
time elapsed and an estimate of the time left), and on a terminal one bar over every stage, on rank 0's stderr."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from prism_lightning.ranks import is_rank0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``with progress.stage("repair/seed-0 features", "960 pool rows ...", todo): ...``"""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.enabled, self.total, self.done, self.ran, self.start = enabled and is_rank0(), total, 0, 0, time.time()
        tty = self.enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="stage", file=sys.stderr, disable=not tty, dynamic_ncols=True,
                        bar_format="pipeline {n_fmt}/{total_fmt} stages |{bar}| {elapsed} elapsed, ~{remaining} left")

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stderr)

    def _advance(self, ran: bool) -> str:
        """The end line's counts; the time left extrapolates from the stages that ran (kept ones take no time)."""
        self.done += 1
        self.ran += ran
        self.bar.update(1)
        elapsed = time.time() - self.start
        left = _clock(elapsed / self.ran * (self.total - self.done)) if self.ran else "?"
        return f"[{self.done}/{self.total} stages, {_clock(elapsed)} elapsed, ~{left} left]"

    @contextmanager
    def stage(self, label: str, detail: str, todo: bool = True):
        if not todo:
            yield
            self.write(f"{label}: done before, kept {self._advance(ran=False)}")
            return
        start = time.time()
        self.write(f"{label}: {detail}")
        yield
        seconds = time.time() - start
        self.write(f"{label}: done in {seconds:.1f} s {self._advance(ran=True)}")

    def close(self) -> None:
        self.bar.close()
