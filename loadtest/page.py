"""The report page: ``report.html`` rendered (jinja2) from the summary and the plots' file names.

Not named ``html``: Locust puts the locustfile's folder (this one) first on ``sys.path``,
where a module of that name would hide the standard library's.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .analysis import LOCUST_PREFIX, METRICS, MIN_LEVEL_WINDOW_S, REQUEST_LOG, SUMMARY

REPORT = "report.html"


def _jinja_env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)

    def ms(v):
        return "–" if v is None else (f"{v:.1f}" if v >= 1 else f"{v:.3f}")

    def pct(v):
        return "–" if v is None else f"{v:.2%}"

    def num(v, digits=1):
        return "–" if v is None else f"{v:.{digits}f}"

    env.filters.update(ms=ms, pct=pct, num=num)
    return env


def render_html(summary: dict, out_dir: Path, plots: dict[str, str]) -> Path:
    links = [(name, name) for name in ("locust.html", f"{LOCUST_PREFIX}_stats.csv",
                                       f"{LOCUST_PREFIX}_stats_history.csv", f"{LOCUST_PREFIX}_failures.csv",
                                       REQUEST_LOG, METRICS, SUMMARY, "locust.log")
             if (out_dir / name).exists()]
    page = _jinja_env().get_template("report.html.j2").render(
        s=summary, plots=plots, links=links, min_window_s=MIN_LEVEL_WINDOW_S,
        command=shlex.join(summary["run"].get("argv", [])))
    path = out_dir / REPORT
    path.write_text(page, encoding="utf-8")
    return path
