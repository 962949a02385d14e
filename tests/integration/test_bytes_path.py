"""IMGSEARCH_TRITON_INPUT=bytes: the gateway and the indexer send file bytes to the ensemble.

All real: the session tritonserver (resnet18 exported WITH ``preprocess`` + ``image_search``,
CPU configs, so ``preprocess`` decodes with the project's own Pillow decoder), uvicorn
subprocesses and Milvus Lite. Each mode is compared with the pixels mode on the same files,
and Triton's own counters show which path a request took (``preprocess`` requests).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.data import (
    bomb_png,
    jpeg_bytes,
    make_dataset,
    png_bytes,
    shape_image,
    truncated_jpeg,
)
from harness.gateway import gateway_env, index_folder, release_lite, start_gateway
from imgsearch.store import VectorStore, content_id
from imgsearch.triton_client import TritonEncoder
from imgsearch.triton_metrics import fetch_model_stats, stats_since

pytestmark = pytest.mark.integration

MODEL = "resnet152"
API_KEY = "bytes-test-key-0123456789"
MAX_UPLOAD = 256 * 1024
CLASSES, PER_CLASS = 4, 5


def preprocess_stats(triton):
    """Every request that reached Triton's decoder: its error responses (a bad file) count as
    successes in Triton's metrics, only the ensemble's count says whether it went through."""
    return fetch_model_stats(triton.metrics_url, "preprocess")


def preprocess_since(triton, before, requests: int):
    return stats_since(triton.metrics_url, "preprocess", before, requests)


def ensemble_ok(triton) -> float:
    return fetch_model_stats(triton.metrics_url, "image_search").requests


# --- the decision both sides make ------------------------------------------------------------


def test_bytes_path_problem_names_what_is_missing(triton):
    async def go():
        enc = TritonEncoder(triton.grpc_url, MODEL)
        other = TritonEncoder(triton.grpc_url, MODEL, ensemble_name="no_such_ensemble")
        wrong_model = TritonEncoder(triton.grpc_url, "preprocess")
        try:
            return (await enc.bytes_path_problem(50_000_000), await enc.bytes_path_problem(1_000_000),
                    await other.bytes_path_problem(50_000_000), await wrong_model.bytes_path_problem(50_000_000))
        finally:
            for e in (enc, other, wrong_model):
                await e.close()

    usable, limit, missing, wrong = asyncio.run(go())
    assert usable is None  # exported with the default limit = Settings' default
    assert "max_pixels 50000000" in limit and "1000000" in limit
    assert "no ready ensemble 'no_such_ensemble'" in missing
    assert "ends in model 'resnet152', not 'preprocess'" in wrong


# --- gateway ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw_pair(tmp_path_factory, triton, repo18):
    """The same indexed folder behind two gateways: IMGSEARCH_TRITON_INPUT=pixels and =bytes."""
    base = tmp_path_factory.mktemp("bytes_gw")
    root = base / "images"
    make_dataset(root, classes=CLASSES, per_class=PER_CLASS, seed=7)
    gws = {}
    try:
        for mode in ("pixels", "bytes"):
            db = base / f"{mode}.db"  # Milvus Lite: one process per file
            index_folder(root, db, triton.grpc_url, repo18)
            gws[mode] = start_gateway(gateway_env(repo18, triton.grpc_url, db, root, triton_input=mode,
                                                  api_key=API_KEY, max_upload_bytes=MAX_UPLOAD))
        yield gws
    finally:
        for g in gws.values():
            g.stop()


def post(url: str, data: bytes, path: str = "/v1/search", **fields) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"} if path == "/v1/images" else {}
    return httpx.post(url + path, files={"file": ("q", data, "application/octet-stream")},
                      data={k: str(v) for k, v in fields.items()}, headers=headers, timeout=60)


def queries() -> dict[str, bytes]:
    big = shape_image(2, 901, 640).resize((640, 480))  # Pillow decodes it in draft mode (1/2 scale)
    return {"jpeg": jpeg_bytes(shape_image(1, 900)), "png": png_bytes(shape_image(3, 902)),
            "jpeg_640x480": jpeg_bytes(big)}


def test_gateway_bytes_mode_gives_the_pixels_results(gw_pair, triton):
    qs = queries()
    before = preprocess_stats(triton)
    pixels = {k: post(gw_pair["pixels"].url, q, top_k=8) for k, q in qs.items()}
    mid = preprocess_stats(triton)
    got = {k: post(gw_pair["bytes"].url, q, top_k=8) for k, q in qs.items()}
    after = preprocess_stats(triton)
    # which path each gateway took, by Triton's own counters
    assert (mid - before).requests == 0
    assert (after - mid).requests == len(qs)
    for k in qs:
        assert pixels[k].status_code == 200 and got[k].status_code == 200, (k, pixels[k].text, got[k].text)
        p, b = pixels[k].json(), got[k].json()
        assert [h["id"] for h in b["results"]] == [h["id"] for h in p["results"]], k
        assert len(b["results"]) == 8
        np.testing.assert_allclose([h["score"] for h in b["results"]], [h["score"] for h in p["results"]],
                                   atol=1e-3, err_msg=k)
        assert set(b["timings_ms"]) == {"decode", "infer", "search", "total"}
        assert b["timings_ms"]["decode"] == 0 and b["timings_ms"]["infer"] > 0
        assert p["timings_ms"]["decode"] > 0
    # the queries differ: equal result lists are not a given
    assert len({tuple(h["id"] for h in r.json()["results"]) for r in got.values()}) > 1


def test_gateway_bytes_mode_add_image_then_find_it(gw_pair, triton):
    data = jpeg_bytes(shape_image(5, 903))
    before = preprocess_stats(triton)
    r = post(gw_pair["bytes"].url, data, path="/v1/images", label="added")
    assert r.status_code == 201, r.text
    assert r.json()["id"] == str(content_id(data))
    top = post(gw_pair["bytes"].url, data, top_k=1).json()["results"][0]
    assert top["id"] == str(content_id(data)) and top["label"] == "added" and top["score"] >= 0.999
    assert preprocess_since(triton, before, 2).requests == 2


@pytest.mark.parametrize("case,status,code,reaches_triton", [
    ("truncated", 422, "undecodable_image", True),
    ("bomb", 422, "image_too_large", True),
    ("text", 415, "unsupported_media_type", False),
    ("empty", 422, "undecodable_image", False),
    ("oversize", 413, "payload_too_large", False),
])
def test_gateway_bytes_mode_errors(gw_pair, triton, case, status, code, reaches_triton):
    data = {"truncated": truncated_jpeg(), "bomb": bomb_png(10000, 10000), "text": b"hello, not an image\n" * 10,
            "empty": b"", "oversize": jpeg_bytes(shape_image(1, 1)) + b"\0" * MAX_UPLOAD}[case]
    for path in ("/v1/search", "/v1/images"):
        before, ok = preprocess_stats(triton), ensemble_ok(triton)
        r = post(gw_pair["bytes"].url, data, path=path, label="x")
        assert r.status_code == status, (case, path, r.text)
        assert r.json()["error"]["code"] == code, (case, path, r.text)
        assert r.json()["error"]["message"]
        # a bad file refused by Triton's preprocess, or here before any Triton request
        assert preprocess_since(triton, before, int(reaches_triton)).requests == int(reaches_triton), (case, path)
        assert ensemble_ok(triton) == ok
    # the pixels gateway answers the same
    r = post(gw_pair["pixels"].url, data)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_gateway_falls_back_to_pixels_without_the_ensemble(tmp_path, triton, repo18):
    root = tmp_path / "images"
    root.mkdir()
    env = gateway_env(repo18, triton.grpc_url, tmp_path / "empty.db", root, triton_input="bytes",
                      ensemble_name="no_such_ensemble")
    gw = start_gateway(env)
    try:
        before = preprocess_stats(triton)
        r = post(gw.url, jpeg_bytes(shape_image(1, 904)))
        assert r.status_code == 200, r.text
        assert r.json()["timings_ms"]["decode"] > 0
        assert (preprocess_stats(triton) - before).requests == 0
        log = gw.log_text()
        assert "IMGSEARCH_TRITON_INPUT=bytes but Triton has no ready ensemble 'no_such_ensemble'" in log, log
        assert httpx.get(gw.url + "/readyz", timeout=30).status_code == 200  # pixels need no ensemble
    finally:
        gw.stop()


# --- indexer ---------------------------------------------------------------------------------

BROKEN = {
    "n00000000-class_0/empty.jpg": "undecodable_image",
    "n00000001-class_1/text.jpg": "unsupported_media_type",
    "n00000001-class_1/truncated.jpg": "undecodable_image",
    "n00000002-class_2/bomb.png": "image_too_large",
}


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bytes_idx")
    make_dataset(root, classes=3, per_class=6, seed=11)
    data = {"empty.jpg": b"", "text.jpg": b"just text\n" * 5, "truncated.jpg": truncated_jpeg(5),
            "bomb.png": bomb_png(10000, 10000)}
    for rel in BROKEN:
        (root / rel).write_bytes(data[rel.split("/")[1]])
    (root / "n00000002-class_2" / "small.png").write_bytes(png_bytes(shape_image(2, 77)))
    return root


def index_run(root: Path, db: Path, monkeypatch, capsys, **env: str) -> dict:
    """``imgsearch index`` in this process, batches of 4 (so broken files share batches with good ones)."""
    import json

    from imgsearch.cli import main

    for k, v in env.items():
        monkeypatch.setenv(f"IMGSEARCH_{k.upper()}", v)
    monkeypatch.setenv("IMGSEARCH_MILVUS_URI", str(db))
    out = db.with_suffix(".json")
    capsys.readouterr()
    rc = main(["index", str(root), "--no-progress", "--batch-size", "4", "--workers", "1", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = json.loads(out.read_text())
    report["_stdout"] = cap.out
    return report


def stored(db: Path) -> dict[int, tuple[str, np.ndarray]]:
    store = VectorStore(str(db), "images")
    try:
        props = store.properties()
        store.open(int(props["imgsearch.dim"]), props["imgsearch.model_sha"])
        ids = [e.id for e in store.iter_entries()]
        out = {}
        for i in ids:
            e = store.get(i, with_embedding=True)
            out[i] = (e.path, np.asarray(e.embedding, np.float32))
        return out
    finally:
        store.close()
        release_lite(db)


def test_indexer_bytes_mode_matches_pixels_mode(idx_root, tmp_path, settings_env, capsys, triton, repo18):
    common = {"triton_url": triton.grpc_url, "model_repository": str(repo18), "collection": "images"}
    s0 = preprocess_stats(triton)
    pix = index_run(idx_root, tmp_path / "pixels.db", settings_env, capsys, triton_input="pixels", **common)
    s1, ok1 = preprocess_stats(triton), fetch_model_stats(triton.metrics_url, "image_search")
    byt = index_run(idx_root, tmp_path / "bytes.db", settings_env, capsys, triton_input="bytes", **common)
    # each successful request of the report, seen by Triton; and the refused ones: each failed
    # batch, then each of the 2 bad files alone
    ok = stats_since(triton.metrics_url, "image_search", ok1, byt["batches"])
    refused_too = preprocess_since(triton, s1, byt["batches"] + byt["split_batches"] + 2)
    s2 = preprocess_stats(triton)

    good = 3 * 6 + 1
    assert pix["indexed"] == byt["indexed"] == good, (pix["_stdout"], byt["_stdout"])
    assert pix["settings"]["triton_input"] == "pixels" and byt["settings"]["triton_input"] == "bytes"
    # broken files: the same codes, each with a reason, in both modes
    for rep in (pix, byt):
        got = {path: code for code, items in rep["failed"].items() for path, _ in items}
        assert got == BROKEN, rep["failed"]
        assert all(msg for items in rep["failed"].values() for _, msg in items)
    # empty and text files are refused by content in the workers; the truncated JPEG and the
    # bomb reach Triton: their batches fail as a whole and go again one file per request
    assert byt["split_batches"] >= 1, byt["_stdout"]
    assert "re-sent one file per request" in byt["_stdout"]
    assert (s1 - s0).requests == 0  # the pixels run never used the ensemble
    assert ok.requests == byt["batches"] > 0
    assert refused_too.requests == byt["batches"] + byt["split_batches"] + 2

    a, b = stored(tmp_path / "pixels.db"), stored(tmp_path / "bytes.db")
    assert set(a) == set(b) and len(a) == good
    assert all(a[i][0] == b[i][0] for i in a)
    cos = np.array([float(a[i][1] @ b[i][1]) for i in a])
    assert cos.min() >= 0.999, cos.min()
    # a re-run in bytes mode skips everything unchanged; only the 2 bad files that need Triton to
    # be found bad go again (as pixels mode decodes them again), and are reported again
    again = index_run(idx_root, tmp_path / "bytes.db", settings_env, capsys, triton_input="bytes", **common)
    assert again["indexed"] == 0 and again["unchanged"] == good and again["batches"] == 0
    assert again["failed"] == byt["failed"]
    assert preprocess_since(triton, s2, again["split_batches"] + 2).requests == again["split_batches"] + 2


def test_indexer_bytes_without_ensemble_falls_back(tmp_path, settings_env, capsys, triton, repo18):
    root = tmp_path / "images"
    make_dataset(root, classes=2, per_class=3, seed=12)
    before = preprocess_stats(triton)
    rep = index_run(root, tmp_path / "fb.db", settings_env, capsys, triton_url=triton.grpc_url,
                    model_repository=str(repo18), triton_input="bytes", ensemble_name="no_such_ensemble")
    assert rep["indexed"] == 6 and rep["failed_count"] == 0
    assert rep["settings"]["triton_input"] == "pixels"
    assert "no ready ensemble 'no_such_ensemble'" in rep["settings"]["triton_input_fallback"]
    assert "IMGSEARCH_TRITON_INPUT=bytes not used" in rep["_stdout"]
    assert (preprocess_stats(triton) - before).requests == 0
