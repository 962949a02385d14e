"""bench/gpu_check.sh end to end on the CPU (GPU_CHECK_DRY=1).

A lent GPU gives one call of a few minutes: the script must not meet its first bug there.
The dry run's figures mean nothing (resnet18, torch engine on the CPU, 1-second levels);
what is checked is that every phase runs and measures what the result file says it does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
PHASES = ("export", "raw", "triton", "sweep", "bytes_probe", "indexer", "search")
FIGURES = ("raw_model_img_s", "triton_img_s", "dyn_vs_nobatch", "indexer_img_s", "bytes_path_img_s", "search_req_s",
           "search_p99_ms")


def test_gpu_check_dry_run_measures_every_phase(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), GPU_CHECK_TMP=str(tmp_path / "gc"), PY=sys.executable)
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=900, check=False)
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    res = json.loads(next(out.glob("gpu-*-dry.json")).read_text())
    assert {k: v["status"] for k, v in res["phases"].items()} == dict.fromkeys(PHASES, "ok"), tail
    for k in FIGURES:
        assert isinstance(res[k], (int, float)) and res[k] > 0, (k, res.get(k))
    assert "GPU check - cpu (dry run)" in r.stdout and "target triton >= 0.6 x raw" in r.stdout

    # the sweep: both models at the same concurrency, no errors, Triton's own counters read
    rows = {(row["model"], row["concurrency"], row["images_per_request"]): row for row in res["triton_table"]}
    assert all(not row["errors"] and row["req_s"] > 0 for row in rows.values()), rows
    dyn, nob = rows[("resnet152", 8, 1)], rows[("resnet152_nobatch", 8, 1)]
    assert dyn["avg_batch"] > 1.0, dyn  # dynamic batching merged concurrent requests
    assert nob["avg_batch"] == 1.0, nob  # the copy without a dynamic_batching block did not
    # the reported ratio is these two rows' (2 decimals): on a loaded CPU it can be well under 1,
    # where a relative tolerance is smaller than the rounding
    assert res["dyn_vs_nobatch"] == round(dyn["img_s"] / max(0.1, nob["img_s"]), 2)

    # the probe: on the CPU preprocess runs torchvision's decoder, held to the CPU tests' tolerance
    probe = res["bytes_probe"]
    assert probe["pixel_mean_abs_diff"] < 1.0 and probe["embedding_min_cosine"] >= 0.999, probe
    assert res["triton_input"] == "bytes"

    # the indexer CLI indexed every generated file; the search answered only 200s
    cli = next(row for row in res["indexer_table"] if row["path"].startswith("imgsearch index"))
    assert cli["indexed"] == res["images"]["files"] and cli["failed"] == 0, cli
    assert res["indexer_source"].startswith("imgsearch index CLI, bytes")
    assert res["indexer_img_s"] == cli["img_s"]  # the CLI's own figure, not the stand-in's
    stand_in = next(row for row in res["indexer_table"] if row["path"].startswith("bytes"))
    assert res["bytes_path_img_s"] == stand_in["img_s"] and "not imgsearch index" in res["bytes_path_measured"]
    assert res["search_table"] and all(set(row["status"]) == {"200"} for row in res["search_table"]), res["search_table"]
    # the server logs come back next to the result file, as they would from the device
    assert (out / "tritonserver.log").stat().st_size > 0 and (out / "gpu_check.log").exists()

    # the summary (markdown) that gpu_check.sh writes next to the result reads the same file
    from bench.gpu_summary import _fmt, markdown

    md = markdown(res)
    assert (out / "summary.md").read_text().strip() == md.strip()  # what the device call brings back
    assert md.count("n/a (dry run)") == 4, md
    assert f"raw engine {_fmt(res['raw_model_img_s'])} img/s" in md
    assert f"`/v1/search` {_fmt(res['search_req_s'])} req/s at p99 {_fmt(res['search_p99_ms'])} ms" in md
    search_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "{'200'" in ln]
    assert len(search_rows) == len(res["search_table"]) and all("—" not in ln for ln in search_rows), search_rows
