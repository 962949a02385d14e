"""Load-test the gateway with Locust, scrape Triton + gateway metrics, write report.html.

Runs Locust headless in a subprocess (scenarios in loadtest/locustfile.py: search by image,
more-like-this, page + thumbnails), scrapes Triton's and the gateway's /metrics once a
second meanwhile, then writes into --out:

  report.html        plots + tables: latency over time, throughput vs users (knee),
                     error and shed mix, Triton batch size and queue, gateway stages
  summary.json       the same numbers as data
  locust_*.csv       Locust's CSVs (full history), locust.html (Locust's own report)
  requests.csv       one line per request; metrics.jsonl: the scrapes

Exit status: 0 when every given limit holds, 1 with ONE line naming what broke
(--slo-p95-ms, --slo-p99-ms, --max-failure-ratio, --max-shed-ratio), 3 when the run
itself failed (gateway unreachable, no request made).

A 503/429 with Retry-After is "shed" (the gateway protecting itself), counted apart from
failures. Latency percentiles are of served requests.

examples:
  imgsearch loadtest --run-time 30s                               # smoke against make demo's stack
  imgsearch loadtest --users 32 --shape step --step-users 4 --step-time 20 --slo-p99-ms 800
  imgsearch loadtest --slo-p95-ms 300 --max-failure-ratio 0.01    # CI gate: exit 1 when broken
  imgsearch loadtest --ui                                         # Locust's web UI on :8089
  imgsearch loadtest --report-only --slo-p99-ms 500               # re-judge the last run (--out)

Defaults for users / spawn rate / run time come from loadtest/locust.conf.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from .scenario import step_count

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
SHAPES = HERE / "shapes.py"
CONF = HERE / "locust.conf"
EXIT_SLO = 1
SCENARIOS = {"search": "SearchUser", "similar": "SimilarUser", "page": "PageUser"}  # locustfile classes
EXIT_RUN = 3


def conf_defaults(path: Path = CONF) -> dict[str, str]:
    """``key = value`` lines of locust.conf (shown in --help; Locust reads the file itself)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "=" in line:
                k, v = (x.strip() for x in line.split("=", 1))
                out[k] = v
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from imgsearch.settings import get_settings

    s = get_settings()
    d = conf_defaults()
    p.add_argument("--host", default=f"http://{s.host}:{s.port}", help="gateway base URL (default %(default)s)")
    p.add_argument("--users", type=int, help=f"concurrent users; the top for --shape step (conf: {d.get('users')})")
    p.add_argument("--spawn-rate", type=float, help=f"users started per second (conf: {d.get('spawn-rate')})")
    p.add_argument("--run-time", help=f"e.g. 30s, 5m; a cap for --shape step (conf: {d.get('run-time')})")
    p.add_argument("--shape", choices=["constant", "step"], default="constant",
                   help="constant users, or step up to find the knee (default %(default)s)")
    p.add_argument("--step-users", type=int, default=2, help="step shape: users added per step (default 2)")
    p.add_argument("--step-time", type=float, default=20.0, help="step shape: seconds per step (default 20)")
    p.add_argument("--images", default=str(s.image_root), help="folder of query images (default %(default)s)")
    p.add_argument("--out", default="loadtest/out", help="output folder (default %(default)s)")
    p.add_argument("--slo-p95-ms", type=float, help="fail when p95 of served requests is above this")
    p.add_argument("--slo-p99-ms", type=float,
                   help="fail when p99 is above this; also the p99 the knee must meet (else 1000 ms)")
    p.add_argument("--max-failure-ratio", type=float, default=0.01,
                   help="fail when more than this share of requests failed (default %(default)s)")
    p.add_argument("--max-shed-ratio", type=float, help="fail when more than this share was shed (default: no limit)")
    p.add_argument("--triton-metrics", default=f"http://127.0.0.1:{s.local_triton_metrics_port}/metrics",
                   help="Triton's Prometheus endpoint, '' to skip (default %(default)s)")
    p.add_argument("--gateway-metrics", help="the gateway's Prometheus endpoint (default HOST/metrics)")
    p.add_argument("--model", default=s.model_name, help="Triton model whose batching is reported (default %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="top_k of each search (default 10)")
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="max think time between a user's requests (default 0: users = concurrency)")
    p.add_argument("--only", help="comma list of scenarios to run instead of the weighted mix: "
                                  + ", ".join(SCENARIOS) + " (e.g. --only search for the model path alone)")
    p.add_argument("--ignore-retry-after", action="store_true",
                   help="users retry a shed request at once instead of waiting its Retry-After")
    p.add_argument("--note", default="", help="free text stored with the run (e.g. what else ran on the machine)")
    p.add_argument("--ui", action="store_true",
                   help="Locust's interactive web UI (http://127.0.0.1:8089) instead of headless; "
                        "the report is written when you stop it (Ctrl-C)")
    p.add_argument("--web-port", type=int, default=8089, help="--ui port (default %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="no load: rebuild report.html from --out and judge it against the limits given")


# --- the run --------------------------------------------------------------------------
def locust_command(args: argparse.Namespace, out: Path) -> list[str]:
    files = str(LOCUSTFILE) + (f",{SHAPES}" if args.shape == "step" else "")
    cmd = [sys.executable, "-m", "locust", "--config", str(CONF), "-f", files, "--host", args.host,
           "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
           "--images", str(args.images), "--request-log", str(out / "requests.csv"),
           "--top-k", str(args.top_k), "--think-ms", str(args.think_ms),
           "--step-users", str(args.step_users), "--step-time", str(args.step_time),
           "--loglevel", "WARNING", "--logfile", str(out / "locust.log")]
    if args.ignore_retry_after:
        cmd.append("--ignore-retry-after")
    run_time = args.run_time
    top = args.users or int(conf_defaults().get("users", 0) or 0)
    if args.shape == "step" and run_time is None and top:
        # the shape ends by itself after its last step; locust.conf's run-time must not cut it short
        run_time = f"{math.ceil(step_count(args.step_users, top) * args.step_time) + 1}s"
    for flag, value in (("--users", args.users), ("--spawn-rate", args.spawn_rate), ("--run-time", run_time)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.ui:
        cmd += ["--web-host", "127.0.0.1", "--web-port", str(args.web_port)]
    else:
        cmd += ["--headless", "--only-summary"]
    if args.only:
        cmd += only_classes(args.only)  # positional: the user classes to run
    return cmd


def only_classes(only: str) -> list[str]:
    names = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ValueError(f"--only: unknown scenario {', '.join(unknown) or '(none)'}; choose from {', '.join(SCENARIOS)}")
    return [SCENARIOS[n] for n in names]


def check_reachable(host: str, timeout_s: float = 5.0) -> str | None:
    """None when the gateway answers /healthz, else why not."""
    try:
        with urllib.request.urlopen(host.rstrip("/") + "/healthz", timeout=timeout_s) as r:  # noqa: S310
            return None if r.status < 500 else f"/healthz answered {r.status}"
    except urllib.error.HTTPError as e:
        return f"/healthz answered {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def machine_info(note: str = "") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    cores = os.cpu_count() or 0
    desc = f"{cores}-core CPU ({cpu}), {'GPU: ' + gpu if gpu else 'no GPU'}"
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform(), "description": desc + (f"; {note}" if note else ""), "note": note}


def _flag(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _timespan_s(text: str | None) -> float | None:
    if not text:
        return None
    total, num = 0.0, ""
    for ch in str(text).strip():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms" and num:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
    return total + (float(num) if num else 0.0)


def run(args: argparse.Namespace) -> int:
    from .report import ReportError, Slo, build_report

    out = Path(args.out)
    slo = Slo(args.slo_p95_ms, args.slo_p99_ms, args.max_failure_ratio, args.max_shed_ratio)
    if args.report_only:
        return _judge(build_report, ReportError, out, slo, args)

    if args.only:
        try:
            only_classes(args.only)
        except ValueError as e:
            print(f"imgsearch loadtest: {e}", file=sys.stderr)
            return EXIT_RUN
    if not Path(args.images).is_dir():
        print(f"imgsearch loadtest: no image folder {args.images!r} (pass --images DIR)", file=sys.stderr)
        return EXIT_RUN
    why = check_reachable(args.host)
    if why:
        print(f"imgsearch loadtest: gateway at {args.host} not reachable ({why}); start it with "
              f"'make demo' or 'imgsearch serve', or pass --host", file=sys.stderr)
        return EXIT_RUN
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("requests.csv", "metrics.jsonl", "report.html", "summary.json"):
        (out / stale).unlink(missing_ok=True)  # the request log and scrapes append: start clean

    from .scrape import Scraper

    cmd = locust_command(args, out)
    conf = conf_defaults()
    record = {
        "argv": ["imgsearch", "loadtest", *sys.argv[2:]] if sys.argv[1:2] == ["loadtest"] else sys.argv,
        "locust_command": cmd, "host": args.host, "shape": args.shape, "only": args.only,
        "users": args.users or int(conf.get("users", 0) or 0),
        "spawn_rate": args.spawn_rate or float(conf.get("spawn-rate", 0) or 0),
        "run_time": _flag(cmd, "--run-time") or conf.get("run-time"),
        "step_users": args.step_users if args.shape == "step" else None,
        "step_time": args.step_time if args.shape == "step" else None,
        "images": str(args.images), "model": args.model, "machine": machine_info(args.note),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "started_at": time.time(),
        # what else ran on the machine: a load average above the core count means shared CPUs
        "loadavg_start": _loadavg(),
    }
    gateway_metrics = args.gateway_metrics or args.host.rstrip("/") + "/metrics"
    scraper = Scraper({"triton": args.triton_metrics, "gateway": gateway_metrics}, out / "metrics.jsonl")
    scraper.start()
    if args.shape == "step":
        steps = step_count(args.step_users, record["users"]) if record["users"] else "?"
        print(f"step load: +{args.step_users} users every {args.step_time:g} s up to {record['users']} "
              f"({steps} steps)", flush=True)
    if args.ui:
        print(f"Locust web UI: http://127.0.0.1:{args.web_port} (Ctrl-C here when done)", flush=True)
    timeout = _timeout(args, record)
    try:
        proc = subprocess.run(cmd, stdout=(out / "locust.stdout").open("w"), stderr=subprocess.STDOUT,
                              timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -1
    except KeyboardInterrupt:
        rc = 130  # --ui: the user stopped Locust; still write the report
    finally:
        scraper.stop()
    record.update(finished_at=time.time(), locust_returncode=rc, loadavg_end=_loadavg(),
                  scrapes={k: {"ok": scraper.ok[k], "failed": scraper.failed[k]} for k in scraper.targets})
    (out / "run.json").write_text(json.dumps(record, indent=1))
    if rc == -1:
        print(f"imgsearch loadtest: Locust did not finish within {timeout:.0f} s (see {out}/locust.log)",
              file=sys.stderr)
        return EXIT_RUN
    return _judge(build_report, ReportError, out, slo, args)


def _timeout(args: argparse.Namespace, record: dict) -> float | None:
    """A generous wall-clock bound, so a hung Locust cannot hang CI."""
    if args.ui:
        return None
    run_s = _timespan_s(record["run_time"])
    if args.shape == "step" and record["users"]:
        shape_s = step_count(args.step_users, record["users"]) * args.step_time
        run_s = min(run_s, shape_s) if run_s else shape_s
    return (run_s or 3600) + 120


def _judge(build_report, report_error, out: Path, slo, args: argparse.Namespace) -> int:
    try:
        summary = build_report(out, slo, args.model)
    except report_error as e:
        tail = _tail(out / "locust.log") or _tail(out / "locust.stdout")
        print(f"imgsearch loadtest: {e}" + (f"\n{tail}" if tail else ""), file=sys.stderr)
        return EXIT_RUN
    t = summary["totals"]
    tr = summary["triton"]
    gw = summary["gateway"].get("stage_ms") or {}

    def ms(v):
        return "n/a" if v is None else f"{v:.1f}"

    print(f"{t['requests']} requests in {t['duration_s']:.1f} s: {t['ok_rps']:.1f} served/s, "
          f"p50 {ms(t['p50_ms'])} / p95 {ms(t['p95_ms'])} / p99 {ms(t['p99_ms'])} ms, "
          f"failed {t['failure_ratio']:.2%}, shed {t['shed_ratio']:.2%}")
    if tr.get("avg_batch") is not None:
        print(f"Triton {tr['model']}: avg batch {tr['avg_batch']:.2f}, queue {ms(tr.get('queue_ms'))} ms, "
              f"compute {ms(tr.get('compute_ms'))} ms per request")
    if gw:
        print("gateway stages (mean ms): " + ", ".join(f"{k} {ms(v)}" for k, v in gw.items()))
    if summary["run"].get("shape") == "step":
        knee = summary["knee"]
        rule = summary["knee_rule"]["p99_ms"]
        if knee:
            sl, se = knee["slowest"], knee["search"]
            print(f"knee: {knee['ok_rps']:.1f} rps at {knee['users']} users (all requests p50 {ms(knee['p50_ms'])} / "
                  f"p95 {ms(knee['p95_ms'])} / p99 {ms(knee['p99_ms'])} ms; slowest p99 {ms(sl['p99_ms'])} ms "
                  f"({sl['p99_name']}); {knee['search_ok_rps']:.2f} searches/s, p99 {ms(se['p99_ms'])} ms; "
                  f"limit {rule:g} ms)")
        else:
            print(f"knee: none (no step kept every endpoint's p99 under {rule:g} ms)")
    print(f"report: {out / 'report.html'}")
    if summary["violations"]:
        print("SLO broken: " + "; ".join(summary["violations"]), file=sys.stderr)
        return EXIT_SLO
    return 0


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
