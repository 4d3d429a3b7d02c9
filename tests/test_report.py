"""The behaviour metric and the report: verdicts paired over seeds, computed from the numbers themselves."""

from __future__ import annotations

import math

import pytest

from prism_lightning.eval.generation import pair_choice
from prism_lightning.report import paired, verdict, write_report


@pytest.mark.parametrize(("generation", "expected"), [
    ("No, 45 is more than 11.", "chosen"),
    ("Yes, 45 is less than 12.", "rejected"),  # the decision counts, not the digits after it
    ("Maybe.", "other"),
    (" No", "chosen"),  # surrounding whitespace is ignored
])
def test_pair_choice_decides_at_the_first_difference(generation, expected):
    assert pair_choice(generation, "No, 45 is more than 11.", "Yes, 45 is less than 11.") == expected


def test_pair_choice_inside_a_shared_prefix():
    assert pair_choice("57", "56", "57") == "rejected"
    assert pair_choice("58", "56", "57") == "other"
    assert pair_choice("46", "56", "57") == "other"  # left the common prefix "5"
    assert pair_choice("ab", "ab", "abc") == "chosen"  # stopping is the chosen way
    assert pair_choice("abcd", "ab", "abc") == "rejected"


def run(seed: int, auroc: dict, unwanted: dict, kind: str = "repair") -> dict:
    modes = {m: {"within_subtask": {"auroc": a}, "whole_pool": {"auroc": a}} for m, a in auroc.items()}
    finetune = {m: {"exact_match": 0.5, "unwanted": u, "wanted": 1 - u, "pref_acc": 0.5, "exact_match_all": 0.5,
                    "seconds": 1.0} for m, u in unwanted.items()}
    return {"experiment": "exp", "kind": kind, "seed": seed, "subtask": "claim", "metric": "unwanted",
            "target_noise": 0.0, "study": None, "preconditioner": "adam", "seconds": {"warmup": 1.0},
            "ranking": {"modes": modes}, "finetune": finetune}


RUNS = [run(0, {"prism": 0.9, "less": 0.7, "loss": 0.6}, {"prism": 0.10, "less": 0.30, "loss": 0.40, "full": 0.40,
                                                          "oracle": 0.05, "base": 0.45}),
        run(1, {"prism": 0.8, "less": 0.75, "loss": 0.6}, {"prism": 0.20, "less": 0.15, "loss": 0.45, "full": 0.45,
                                                           "oracle": 0.05, "base": 0.45}),
        run(2, {"prism": 0.85, "less": 0.8, "loss": 0.5}, {"prism": 0.15, "less": 0.20, "loss": 0.35, "full": 0.35,
                                                           "oracle": 0.05, "base": 0.45})]


def test_paired_differences_over_seeds():
    auroc = lambda r, m: r["ranking"]["modes"][m]["within_subtask"]["auroc"]  # noqa: E731
    c = paired(RUNS, "prism", "less", auroc)
    diffs = [0.2, 0.05, 0.05]
    mean = sum(diffs) / 3
    assert c["mean"] == pytest.approx(mean)
    assert c["std"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2))
    assert (c["wins"], c["ties"], c["n"]) == (3, 0, 3) and c["a_mean"] == pytest.approx(0.85)
    assert paired(RUNS, "prism", "prism", auroc)["ties"] == 3  # equal to the report's precision: a tie
    unwanted = lambda r, m: r["finetune"][m]["unwanted"]  # noqa: E731
    lower = paired(RUNS, "prism", "less", unwanted, higher_better=False)  # positive = prism has fewer
    assert lower["mean"] == pytest.approx((0.2 - 0.05 + 0.05) / 3) and lower["wins"] == 2


def test_verdict_names_the_best_mode_the_gap_and_the_recovery():
    lines = verdict("exp", RUNS)
    text = "\n".join(lines)
    assert "prism is best (0.850)" in text
    assert "(positive = prism better): vs less +0.100 ± 0.087 (better on 3/3 seeds)" in text
    assert "The contamination hurts: full pool 40.0% vs clean pool (oracle) 5.0%" in text
    # recovered share of the full-vs-oracle gap, from the means: (0.40 - 0.15) / (0.40 - 0.05)
    assert f"prism {(0.40 - 0.15) / 0.35:.0%}" in text
    assert "lower is better" in text


def test_verdict_when_the_contamination_does_not_hurt():
    flat = [run(0, {"prism": 0.6}, {"prism": 0.3, "full": 0.30, "oracle": 0.28, "base": 0.3})]
    assert any("does not hurt enough" in line for line in verdict("exp", flat))


def test_report_opens_with_the_verdicts(tmp_path):
    report = {"package_version": "0", "settings": {"modes": "prism,less,loss", "seeds": [0, 1, 2]},
              "model": {"name_or_path": "m"}, "lora": {"r": 8}, "results": RUNS}
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("### exp") < md.index("## exp") < md.index("| mode |")
    assert "prism vs prism_uniform" not in md  # no prism_uniform run: no weights table


def test_report_lists_the_rows_to_look_at_with_their_strongest_pair(tmp_path):
    row = {"mode": "prism", "rank": 1, "id": "r|1", "subtask": "backwards", "label": None, "score": 0.25,
           "prompt": "Write vok backwards", "completion": "kov", "pair": "t-3", "pair_subtask": "backwards",
           "pair_share": 0.4, "pair_prompt": "Write abc backwards"}
    runs = [dict(run(0, {"prism": 0.9}, {"prism": 0.1, "full": 0.2, "base": 0.3}, kind="forward"),
                 explained=[row, dict(row, rank=2, id="r2", pair_share=-0.1)])]
    report = {"package_version": "0", "settings": {"modes": "prism", "seeds": [0]}, "model": {"name_or_path": "m"},
              "lora": {"r": 8}, "results": runs}
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    table = md[md.index("top selected rows by `prism`"):].split("\n\n")[1].splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 | r\\|1 | backwards | – | 0.25 |")
    assert table[2].endswith("| 40% |") and table[3].endswith("| -10% |")
    html = (tmp_path / "report.html").read_text()
    assert "prism-data" in html and "<script" in html and "http" not in html.split("<script", 1)[0]
