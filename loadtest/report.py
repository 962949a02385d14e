"""Turn a load-test run folder into numbers (``summary.json``), plots (PNG) and ``report.html``.

The numbers come from :mod:`.analysis`, the plots from :mod:`.plots`, the page from
:mod:`.page`; this module writes the three into the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import SUMMARY, ReportError, Slo, analyse
from .page import render_html
from .plots import write_plots

__all__ = ["ReportError", "Slo", "build_report"]


def build_report(out_dir: str | Path, slo: Slo | None = None, model: str | None = None) -> dict:
    """analyse + summary.json + PNG plots + report.html; returns the summary."""
    out_dir = Path(out_dir)
    summary = analyse(out_dir, slo, model)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default))
    plots = write_plots(summary, out_dir)
    render_html(summary, out_dir, plots)
    return summary


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
