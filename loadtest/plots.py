"""The report's PNG plots (matplotlib, headless), drawn from the summary :mod:`.analysis` makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .analysis import MIN_LEVEL_WINDOW_S, STAGES

PLOTS = {
    "latency": "latency.png",
    "throughput": "throughput.png",
    "outcomes": "outcomes.png",
    "triton": "triton.png",
    "stages": "stages.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["t"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_latency(summary: dict, path: Path, slo: dict) -> None:
    plt = _plt()
    bins = summary["bins"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for key, label, style in (("p50_ms", "p50", "-"), ("p95_ms", "p95", "-"), ("p99_ms", "p99", "-")):
        x, y = _series(bins, key)
        ax.plot(x, y, style, label=label, linewidth=1.6)
    for key, colour in (("p95_ms", "tab:orange"), ("p99_ms", "tab:green")):
        if slo.get(key):
            ax.axhline(slo[key], color=colour, linestyle="--", linewidth=1, label=f"SLO {key[:3]} {slo[key]:g} ms")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"latency of served requests, ms ({summary['bin_s']:g} s bins)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.step([r["t"] for r in bins], [r["users"] for r in bins], where="mid", color="grey", alpha=0.5,
             label="users")
    ax2.set_ylabel("users")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("Latency percentiles over time")
    _save(fig, path)


def plot_throughput(summary: dict, path: Path) -> None:
    plt = _plt()
    levels = [lv for lv in summary["levels"] if lv["window_s"] >= MIN_LEVEL_WINDOW_S] or summary["levels"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    users = [lv["users"] for lv in levels]
    ok = np.array([lv["ok_rps"] for lv in levels])
    shed = np.array([lv["shed"] / max(lv["window_s"], 1e-9) for lv in levels])
    fail = np.array([lv["failed"] / max(lv["window_s"], 1e-9) for lv in levels])
    width = 0.8 * (min(np.diff(users)) if len(users) > 1 else 1)
    ax.bar(users, ok, width, label="served rps", color="tab:blue")
    ax.bar(users, shed, width, bottom=ok, label="shed rps", color="tab:orange")
    ax.bar(users, fail, width, bottom=ok + shed, label="failed rps", color="tab:red")
    ax.set_xlabel("users (concurrent clients)")
    ax.set_ylabel("requests / s")
    top = float((ok + shed + fail).max()) if len(users) else 1.0
    ax.set_ylim(0, top * 1.6 or 1)  # room above the bars for the legend and the knee label
    ax.grid(alpha=0.3, axis="y")
    ax2 = ax.twinx()
    ax2.plot(users, [lv["slowest"]["p99_ms"] for lv in levels], "o-", color="black",
             label="p99 of the slowest endpoint")
    ax2.plot(users, [lv["p99_ms"] for lv in levels], ".--", color="grey", label="p99 of all requests")
    rule = summary["knee_rule"]
    ax2.axhline(rule["p99_ms"], color="black", linestyle=":", linewidth=1, label=f"knee p99 limit {rule['p99_ms']:g} ms")
    ax2.set_ylabel("p99 of served requests, ms")
    p99s = [v for lv in levels for v in (lv["slowest"]["p99_ms"], lv["p99_ms"]) if v is not None]
    ax2.set_ylim(0, max(p99s + [rule["p99_ms"]]) * 1.6)
    knee = summary.get("knee")
    if knee:
        ax.annotate(f"knee: {knee['ok_rps']:.1f} rps @ {knee['users']} users",
                    xy=(knee["users"], knee["ok_rps"]), xytext=(0, 18), textcoords="offset points",
                    ha="center", fontsize=9, arrowprops={"arrowstyle": "->"})
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncol=2)
    ax.set_title("Throughput vs users")
    _save(fig, path)


def plot_outcomes(summary: dict, path: Path) -> None:
    plt = _plt()
    bins = summary["bins"]
    mix = summary["outcome_mix"][:8]
    fig, (ax, axb) = plt.subplots(2, 1, figsize=(10, 4.2 + 0.45 * max(len(mix), 2)),
                                  gridspec_kw={"height_ratios": [3, 0.6 * max(len(mix), 2)]})
    t = [r["t"] for r in bins]
    ax.stackplot(t, [r["ok_rps"] for r in bins], [r["shed"] / summary["bin_s"] for r in bins],
                 [r["failed"] / summary["bin_s"] for r in bins], labels=["served", "shed", "failed"],
                 colors=["tab:blue", "tab:orange", "tab:red"], alpha=0.8)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Served, shed and failed over time")
    if mix:
        labels = [f"{m['outcome']} {m['status'] or 'no response'}  {m['name']}"
                  + (f"  ({m['error'][:60]})" if m["error"] else "") for m in mix]
        colours = ["tab:orange" if m["outcome"] == "shed" else "tab:red" for m in mix]
        bars = axb.barh(range(len(mix)), [m["count"] for m in mix], color=colours)
        axb.set_yticks([])
        for bar, label in zip(bars, labels):  # labels inside the axes: long names never get cut off
            axb.text(0.005, bar.get_y() + bar.get_height() / 2, f"{label}: {int(bar.get_width())}",
                     transform=axb.get_yaxis_transform(), va="center", fontsize=8)
        axb.invert_yaxis()
        axb.set_xlabel("requests")
        axb.set_xlim(0, max(m["count"] for m in mix) * 1.05)
    else:
        axb.text(0.5, 0.5, "no shed and no failed request", ha="center", va="center", transform=axb.transAxes)
        axb.set_xticks([])
        axb.set_yticks([])
    axb.set_title("Error and shed mix", fontsize=10)
    _save(fig, path)


def plot_triton(summary: dict, path: Path) -> None:
    plt = _plt()
    tr = summary["triton"]
    fig, (ax, axq) = plt.subplots(1, 2, figsize=(11, 4.2))
    if tr.get("series"):
        x, y = _series(tr["series"], "avg_batch")
        ax.plot(x, y, "-o", markersize=3, color="tab:purple")
        ax.set_ylim(bottom=0)
        x, q = _series(tr["series"], "queue_ms")
        axq.plot(x, q, label="queue ms / request", color="tab:brown")
        x, c = _series(tr["series"], "compute_ms")
        axq.plot(x, c, label="compute ms / request", color="tab:cyan")
        axq.legend(fontsize=8)
        axq.set_ylim(bottom=0)
    else:
        for a in (ax, axq):
            a.text(0.5, 0.5, "no Triton metrics scraped", ha="center", va="center", transform=a.transAxes)
    ax.set_title(f"Triton average batch size ({tr.get('model') or 'n/a'})")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("images per execution")
    axq.set_title("Triton queue and compute time")
    axq.set_xlabel("seconds since start")
    axq.set_ylabel("ms")
    for a in (ax, axq):
        a.grid(alpha=0.3)
    _save(fig, path)


def plot_stages(summary: dict, path: Path) -> None:
    plt = _plt()
    gw = summary["gateway"]
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    series = gw.get("series", [])
    if series and any(r.get(f"{st}_ms") is not None for r in series for st in STAGES):
        rows = [r for r in series if all(r.get(f"{st}_ms") is not None for st in STAGES)]
        ax.stackplot([r["t"] for r in rows], *[[r[f"{st}_ms"] for r in rows] for st in STAGES],
                     labels=list(STAGES), alpha=0.85)
        ax.legend(loc="upper left", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot([r["t"] for r in series], [r["inflight"] for r in series], color="black", linewidth=1,
                 label="in flight")
        ax2.set_ylabel("requests in flight")
        ax2.set_ylim(bottom=0)
        means = gw.get("stage_ms") or {}
        vals = [means.get(st) or 0.0 for st in STAGES]
        axb.bar(list(STAGES), vals, color=["tab:blue", "tab:orange", "tab:green"])
        for i, v in enumerate(vals):
            axb.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        axb.set_ylabel("mean ms over the run")
    else:
        ax.text(0.5, 0.5, "no gateway stage metrics scraped", ha="center", va="center", transform=ax.transAxes)
        axb.set_xticks([])
    ax.set_title("Gateway time per search, by stage (mean per interval)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    axb.set_title("whole run")
    _save(fig, path)


def write_plots(summary: dict, out_dir: Path) -> dict[str, str]:
    slo = {"p95_ms": summary["slo"]["p95_ms"], "p99_ms": summary["slo"]["p99_ms"]}
    plot_latency(summary, out_dir / PLOTS["latency"], slo)
    plot_throughput(summary, out_dir / PLOTS["throughput"])
    plot_outcomes(summary, out_dir / PLOTS["outcomes"])
    plot_triton(summary, out_dir / PLOTS["triton"])
    plot_stages(summary, out_dir / PLOTS["stages"])
    return dict(PLOTS)
