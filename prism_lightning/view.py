"""``report.html``: one self-contained page per run to look at instead of reading (no server, no internet).

Per experiment: the verdict, the ranking and fine-tune table, the ROC and score-distribution plots
(inlined as data URIs) and the explanation table of every gradient mode (``explain.jsonl`` of the first
seed): the rows at both ends of the ranking with the target pairs behind their scores, searchable and
sortable (click a column). The page's state can be set from its address: ``report.html#q=claim&sort=score``
filters every table to rows containing ``claim`` and sorts them by score (what the tests drive).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

from prism_lightning.io import atomic_write_text
from prism_lightning.select import explained_text

COLUMNS = [("whole_pool.auroc", "AUROC (pool)", False), ("within_subtask.auroc", "AUROC (in skill)", False),
           ("within_subtask.precision_at_k", "P@k (in skill)", False), ("exact_match", "exact match %", True),
           ("wanted", "wanted %", True), ("unwanted", "unwanted %", True)]

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1300px;color:#1d2430;padding:0 16px}
h1{font-size:24px}h2{font-size:19px;margin-top:34px;border-bottom:1px solid #d5dae1;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}th,td{border:1px solid #d5dae1;padding:3px 7px;
vertical-align:top}th{background:#eef1f5;text-align:left}th.sortable{cursor:pointer}th.sortable:after{content:" \\2195";
color:#8a94a3}td.num{text-align:right;font-variant-numeric:tabular-nums}.verdict{background:#f6f8fa;border-left:4px
solid #3b6fd6;padding:6px 12px;margin:8px 0}.plots img{max-width:48%;margin-right:1%}
.harm{color:#b3261e;font-weight:600}
.bar{margin:8px 0}input[type=search]{width:320px;padding:4px}details{font-size:12px}.muted{color:#5d6878}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById('prism-data').textContent);
const state = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
function cell(tr, text, cls) { const td = document.createElement('td'); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); return td; }
function fmt(v, d) { return (v === null || v === undefined || Number.isNaN(v)) ? '–' : Number(v).toPrecision(d || 3); }
function render(box) {
  const exp = DATA.explain[box.dataset.exp], mode = box.querySelector('select').value;
  const q = box.querySelector('input').value.toLowerCase(), key = box.dataset.sort || 'rank';
  const dir = box.dataset.dir === 'desc' ? -1 : 1;
  let rows = (exp[mode] || []).filter(r => JSON.stringify(r).toLowerCase().includes(q));
  rows.sort((a, b) => (a[key] > b[key] ? 1 : a[key] < b[key] ? -1 : 0) * dir);
  const body = box.querySelector('tbody'); body.innerHTML = '';
  for (const r of rows) {
    const tr = document.createElement('tr'); tr.dataset.row = r.row;
    cell(tr, r.rank, 'num'); cell(tr, r.id); cell(tr, r.subtask);
    const lab = cell(tr, r.label == null ? '–' : (r.label ? 'harmful' : 'clean'));
    if (r.label) lab.className = 'harm';
    cell(tr, fmt(r.score), 'num'); cell(tr, r.prompt); cell(tr, r.completion);
    const top = r.pairs[0] || {};
    cell(tr, top.id ? `${top.id} (${top.subtask}): ${top.prompt}` : '–'); cell(tr, top.share === undefined ? '–' :
      (100 * top.share).toFixed(0) + '%', 'num');
    const more = cell(tr, ''), d = document.createElement('details'), s = document.createElement('summary');
    s.textContent = r.pairs.length + ' pairs'; d.appendChild(s);
    for (const p of r.pairs) { const div = document.createElement('div');
      div.textContent = `${p.id} ${fmt(p.contribution)} (${(100 * p.share).toFixed(0)}%): ${p.prompt}` +
        ` | + ${p.chosen} | - ${p.rejected}`;
      d.appendChild(div); }
    const rest = document.createElement('div'); rest.className = 'muted';
    rest.textContent = 'other pairs: ' + fmt(r.other_pairs); d.appendChild(rest); more.appendChild(d);
    body.appendChild(tr);
  }
  box.querySelector('.count').textContent = rows.length + ' rows';
}
for (const box of document.querySelectorAll('.explain')) {
  box.querySelector('input').value = state.q || '';
  if (state.sort) { box.dataset.sort = state.sort; box.dataset.dir = state.dir || 'asc'; }
  box.querySelector('input').addEventListener('input', () => render(box));
  box.querySelector('select').addEventListener('change', () => render(box));
  for (const th of box.querySelectorAll('th[data-key]')) th.addEventListener('click', () => {
    box.dataset.dir = box.dataset.sort === th.dataset.key && box.dataset.dir !== 'desc' ? 'desc' : 'asc';
    box.dataset.sort = th.dataset.key; render(box); });
  render(box);
}
document.body.dataset.rendered = 'yes';
"""

HEAD = [("rank", "rank"), ("id", "row"), ("subtask", "skill"), ("label", "label"), ("score", "score"),
        ("prompt", "prompt"), ("completion", "completion"), (None, "strongest target pair"), (None, "share"),
        (None, "all parts")]


def script_json(obj) -> str:
    """JSON to embed in a ``<script>`` block: no ``<``, ``>``, ``&`` or line separators (U+2028/2029) stay raw,
    so no text in the data (``</script>``, ``<!--``) can end the block or change how the page parses."""
    text = json.dumps(obj)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _e(text) -> str:
    return html.escape(str(text))


def _inline_md(text: str) -> str:
    """A verdict line of report.md as HTML: escaped, ``**bold**`` and ```code``` kept, the list dash dropped."""
    out = _e(text.removeprefix("- "))
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _image(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(path.name)}" src="data:image/png;base64,{data}">'


NAN = (float("nan"), float("nan"))


def fmt_stat(pair: tuple[float, float], seeds: int, pct: bool = False) -> str:
    """``mean ± std`` over seeds (the spread only with more than one seed); percentages for ``pct``."""
    mean, std = pair
    if math.isnan(mean):
        return "–"
    scale, digits = (100, 1) if pct else (1, 3)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if seeds > 1 else "")


def _explanations(root: Path, name: str, seed: int) -> dict[str, list[dict]]:
    """Every mode's ``explain.jsonl`` of one experiment and seed, as table rows."""
    out = {}
    for path in sorted((root / name / f"seed-{seed}" / "selection").glob("*/explain.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            r = json.loads(line)
            prompt, answer = explained_text(r)
            rows.append({"row": r["row"], "rank": r["rank"], "id": r["id"], "subtask": r.get("subtask", ""),
                         "label": r.get("label"), "score": r["score"], "prompt": prompt, "completion": answer,
                         "pairs": r["pairs"], "other_pairs": r["other_pairs"]})
        out[path.parent.name] = rows
    return out


def _experiment(root: Path, name: str, s: dict, data: dict) -> list[str]:
    parts = [f'<h2 id="{_e(name)}">{_e(name)}</h2>',
             f'<p class="muted">{_e(s["kind"])} on skill <code>{_e(s["subtask"])}</code>, {s["seeds"]} seed(s), '
             f'pool preconditioner <code>{_e(s["preconditioner"])}</code></p>']
    parts += [f'<div class="verdict">{_inline_md(line)}</div>' for line in s.get("verdict") or []]
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in COLUMNS)
    parts.append(f'<table class="metrics"><thead><tr><th>mode</th>{head}</tr></thead><tbody>')
    for mode, m in s["modes"].items():
        cells = "".join(f'<td class="num">{fmt_stat(m.get(key, NAN), s["seeds"], pct)}</td>' for key, _, pct in COLUMNS)
        parts.append(f"<tr><td>{_e(mode)}</td>{cells}</tr>")
    parts.append("</tbody></table>")
    if s.get("plots"):
        roc = root / s["plots"][0]
        parts.append(f'<div class="plots">{_image(roc)}{_image(roc.with_name("score_distributions.png"))}</div>')
    seed = (s.get("explained") or {}).get("seed", 0)
    explained = _explanations(root, name, seed)
    if explained:
        data[name] = explained
        focus = "prism" if "prism" in explained else next(iter(explained))
        options = "".join(f'<option{" selected" if m == focus else ""}>{_e(m)}</option>' for m in explained)
        ths = "".join(f'<th class="sortable" data-key="{k}">{_e(label)}</th>' if k else f"<th>{_e(label)}</th>"
                      for k, label in HEAD)
        parts.append(f'<div class="explain" data-exp="{_e(name)}"><div class="bar">Rows at both ends of the '
                     f'ranking (seed {seed}), with the target pairs behind each score. Mode <select>{options}</select> '
                     f'<input type="search" placeholder="search rows, pairs, skills"> <span class="count"></span>'
                     f'</div><table><thead><tr>{ths}</tr></thead><tbody></tbody></table></div>')
    return parts


def write_html(root: str | Path, report: dict) -> Path:
    """Write ``<root>/report.html`` from a report (``report.write_report``) and the run's files."""
    root = Path(root)
    summary = report["summary"]
    body = [f"<h1>prism_lightning report</h1><p class=\"muted\">Model <code>{_e(report['model']['name_or_path'])}"
            f"</code>, modes {_e(report['settings']['modes'])}, seeds {_e(report['settings']['seeds'])}.</p>"]
    data: dict = {}
    for name, s in summary.items():
        if not s.get("study"):
            body += _experiment(root, name, s, data)
    studies: dict[str, dict] = {}
    for name, s in summary.items():
        if s.get("study"):
            studies.setdefault(s["study"], {})[name] = s
    for study, exps in studies.items():
        modes = list(next(iter(exps.values()))["modes"])
        head = "".join(f"<th>{_e(n)}<br><span class='muted'>{_e(v['preconditioner'])}, noise "
                       f"{v['target_noise']:.0%}</span></th>" for n, v in exps.items())
        body.append(f"<h2>Study: {_e(study)} (within-skill AUROC)</h2><table><thead><tr><th>mode</th>{head}</tr>"
                    "</thead><tbody>")
        for mode in modes:
            stats = [(v["modes"].get(mode, {}).get("within_subtask.auroc", NAN), v["seeds"]) for v in exps.values()]
            cells = "".join(f'<td class="num">{fmt_stat(pair, seeds)}</td>' for pair, seeds in stats)
            body.append(f"<tr><td>{_e(mode)}</td>{cells}</tr>")
        body.append("</tbody></table>")
    payload = script_json({"explain": data})
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>prism_lightning report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}"
            f'<script type="application/json" id="prism-data">{payload}</script><script>{SCRIPT}</script>'
            "</body></html>\n")
    atomic_write_text(root / "report.html", page)
    return root / "report.html"
