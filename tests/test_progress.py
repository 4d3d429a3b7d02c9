"""The pipeline's stage lines: the time left is extrapolated from the stages that ran, not the kept ones."""

from __future__ import annotations

from prism_lightning import progress
from prism_lightning.progress import Progress


def test_time_left_counts_only_the_stages_that_ran(monkeypatch):
    p = Progress(4, enabled=False)
    p.start = 0.0
    monkeypatch.setattr(progress.time, "time", lambda: 10.0)
    assert p._advance(ran=False) == "[1/4 stages, 0:00:10 elapsed, ~? left]"  # a resumed run's kept stage
    assert p._advance(ran=True) == "[2/4 stages, 0:00:10 elapsed, ~0:00:20 left]"  # 10 s per stage run, 2 to go
