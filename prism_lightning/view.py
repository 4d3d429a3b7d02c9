"""``report.md`` and ``report.html`` rendered from one view model (``report.view_model``) with Jinja2 templates.

The templates, the page's CSS and its script are package assets (``assets/report/``). The HTML is
autoescaped: text from the data (ids, prompts, answers) can only ever be text; the explanation rows are
embedded as JSON escaped for a ``<script>`` block (``script_json``). The page is self-contained (plots
inlined as data URIs, no server, no network). Its state can be set from its address:
``report.html#q=claim&sort=score`` filters every explanation table to rows containing ``claim`` and sorts them
by score (what the tests drive).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from functools import cache
from importlib import resources
from pathlib import Path

ASSETS = resources.files("prism_lightning") / "assets" / "report"
NAN = (float("nan"), float("nan"))


def fmt_stat(pair: tuple[float, float], seeds: int, pct: bool = False) -> str:
    """``mean ± std`` over seeds (the spread only with more than one seed); percentages for ``pct``."""
    mean, std = pair
    if math.isnan(mean):
        return "–"
    scale, digits = (100, 1) if pct else (1, 3)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if seeds > 1 else "")


def script_json(obj) -> str:
    """JSON to embed in a ``<script>`` block: no ``<``, ``>``, ``&`` or line separators (U+2028/2029) stay raw,
    so no text in the data (``</script>``, ``<!--``) can end the block or change how the page parses."""
    text = json.dumps(obj)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def md_cell(text) -> str:
    """A markdown table cell: HTML escaped (a viewer renders raw HTML), pipes escaped, one line."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


@cache
def _environments():
    import jinja2
    from markupsafe import Markup

    def inline_md(text: str) -> Markup:
        out = html.escape(text.removeprefix("- "))  # escaped first: only the verdicts' own **bold** and `code`
        out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
        return Markup(re.sub(r"`(.+?)`", r"<code>\1</code>", out))

    def image(relative: str, root: str) -> Markup:
        path = Path(root) / relative
        if not path.exists():
            return Markup("")
        data = base64.b64encode(path.read_bytes()).decode()
        return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(path.name, data)

    loader = jinja2.FunctionLoader(lambda name: (ASSETS / name).read_text())
    page = jinja2.Environment(loader=loader, autoescape=True, keep_trailing_newline=True)
    page.filters.update(inline_md=inline_md, image=image, script_json=lambda obj: Markup(script_json(obj)))
    text = jinja2.Environment(loader=loader, autoescape=False, keep_trailing_newline=True)
    text.filters["cell"] = md_cell
    return text, page


def render_md(model: dict) -> str:
    return _environments()[0].get_template("report.md.j2").render(**model)


def render_html(model: dict) -> str:
    return _environments()[1].get_template("report.html.j2").render(
        **model, css=(ASSETS / "report.css").read_text(), js=(ASSETS / "report.js").read_text())
