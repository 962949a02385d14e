"""Copy detection through the served stack: the real tritonserver, ``imgsearch index`` into
Milvus Lite, uvicorn, ``POST /v1/search``. Every edited copy that PyTorch ranks first must be
ranked first through the gateway too (a small set; bench/quality.py runs the full one).
"""

from __future__ import annotations

import json

import pytest

from bench import quality as bench_quality

pytestmark = pytest.mark.integration


def test_served_path_loses_nothing_against_pytorch(tmp_path):
    out = tmp_path / "q.json"
    assert bench_quality.main(["--originals", "6", "--variants", "1", "--distractors", "20",
                               "--skip", "random", "finetune", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    cd = res["copy_detection"]
    assert res["set"] == {"originals": 6, "gallery": 26, "queries": 48, "variants": 1}
    assert res["served_lost"] == []
    # the pretrained model finds the originals (random ResNet-152 and pHash do not, see the results file)
    assert cd["packaged"]["recall@1"] >= 0.9 and cd["served"]["recall@1"] >= cd["packaged"]["recall@1"] - 1e-9
    assert cd["phash"]["per_edit"]["flip"]["recall@1"] < cd["packaged"]["per_edit"]["flip"]["recall@1"]
    assert out.with_suffix(".md").read_text().startswith("Copy detection, 48 queries")
