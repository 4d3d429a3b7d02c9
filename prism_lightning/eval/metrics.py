"""Names of the evaluation metrics, shared by the training modules (writers) and the report (reader).

``metrics-test.json`` maps ``"<metric>/<subtask>"`` (and ``"<metric>/all"``) to a number:

- ``loss``: token-mean response loss on the held-out SFT rows;
- ``exact_match``: greedy answer equals the reference (held-out SFT rows);
- ``pref_acc`` / ``pref_margin``: ``lbar(chosen) > lbar(rejected)`` and the mean margin on held-out pairs;
- ``wanted`` / ``unwanted``: share of held-out pairs whose greedy answer follows the chosen / the
  rejected answer where the two first differ (``eval.generation.pair_choice``): the behaviour itself.
"""

from __future__ import annotations

LOSS, EXACT_MATCH, PREF_ACC, PREF_MARGIN, WANTED, UNWANTED = (
    "loss", "exact_match", "pref_acc", "pref_margin", "wanted", "unwanted")
SFT_METRICS = (LOSS, EXACT_MATCH)
PAIR_METRICS = (PREF_ACC, PREF_MARGIN, WANTED, UNWANTED)
ALL = "all"


def metric_key(metric: str, subtask: str = ALL) -> str:
    """``"exact_match/add"``: the key of one metric of one subtask in ``metrics-*.json``."""
    return f"{metric}/{subtask}"
