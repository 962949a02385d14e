"""The gateway's routes over in-process fakes of Triton and Milvus (harness.fakes): no servers.

The app is the real one (``create_app``, its lifespan, middleware and error handlers); only
the encoder and the store are stand-ins, with the real ones' interfaces and exceptions. Every
expected answer is derived from the rows the store holds and the embedding the encoder gave
the request: an exact cosine ranking computed here.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from harness.data import jpeg_bytes, shape_image, truncated_jpeg
from harness.fakes import FakeEncoder, FakeStore, unit
from imgsearch.errors import TritonInvalidInput, TritonOverloaded, TritonUnavailable
from imgsearch.gateway import routes
from imgsearch.gateway.app import create_app
from imgsearch.gateway.errors import PUBLIC_MESSAGES
from imgsearch.gateway.uploads import OVERHEAD
from imgsearch.imaging import decode_image
from imgsearch.model_card import CARD_FILE, LABELS_FILE, ModelCard
from imgsearch.settings import Settings
from imgsearch.store import Row, content_id
from imgsearch.triton_metrics import metric_sum

MODEL = "resnet152"
DIM = 48
KEY = "unit-test-key-0123"
LABELS = ["beagle", "collie", "pug"]  # the classes of the indexed images, and the head's labels
PER_LABEL = 4
MAX_UPLOAD = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}


@functools.cache
def image(cls: int, seed: int) -> bytes:
    return jpeg_bytes(shape_image(cls, seed, size=64))


@functools.cache
def dataset(size: int) -> tuple[list[tuple[str, str, bytes]], np.ndarray]:
    """PER_LABEL images of each label: (path, label, file bytes) and their decoded pixels."""
    entries = [(f"{label}/img_{s}.jpg", label, image(c, 100 * c + s))
               for c, label in enumerate(LABELS) for s in range(PER_LABEL)]
    return entries, np.stack([decode_image(data, size) for _, _, data in entries])


@dataclass
class Gw:
    client: TestClient
    enc: FakeEncoder
    store: FakeStore
    settings: Settings
    files: dict[int, bytes]  # id -> bytes of each indexed dataset image

    @property
    def root(self) -> Path:
        return self.settings.image_root


@pytest.fixture
def serve(settings_env, tmp_path):
    """``serve(head=..., api_key=..., index=..., enc_dim=..., **settings)``: a running app over fakes.

    The store holds PER_LABEL images of each label (files under the image root too), embedded
    by the same encoder the app uses, as the indexer would.
    """
    stack, started = ExitStack(), itertools.count()

    def start(*, head: bool = False, api_key: str | None = KEY, index: bool = True, enc_dim: int = DIM,
              **kw) -> Gw:
        base = tmp_path / f"gw{next(started)}"
        model_dir = base / "repo" / MODEL
        model_dir.mkdir(parents=True)
        labels = LABELS if head else []
        card = ModelCard(name=MODEL, arch="resnet18", embedding="pool", embedding_dim=DIM, num_classes=len(labels),
                         weights="random:0", checkpoint_sha256="0" * 64, model_sha="fake-model-sha")
        (model_dir / CARD_FILE).write_text(card.to_json())
        if labels:
            (model_dir / LABELS_FILE).write_text("\n".join(labels) + "\n")
        settings = Settings(_env_file=None, model_repository=base / "repo",
                            model_name=MODEL, image_root=base / "images", api_key=api_key,
                            max_upload_bytes=MAX_UPLOAD, decode_threads=1, store_threads=1, **kw)
        enc, store = FakeEncoder(enc_dim, labels), FakeStore()
        store.open(DIM, card.model_sha, MODEL)
        files: dict[int, bytes] = {}
        if index:
            entries, pixels = dataset(settings.image_size)
            embeddings = enc.embed(pixels).embeddings
            store.upsert([Row(content_id(data), rel, label, emb) for (rel, label, data), emb in zip(entries, embeddings)])
            for rel, _, data in entries:
                (settings.image_root / rel).parent.mkdir(parents=True, exist_ok=True)
                (settings.image_root / rel).write_bytes(data)
                files[content_id(data)] = data
        store.calls.clear()
        client = stack.enter_context(TestClient(create_app(settings, encoder=enc, store=store)))
        return Gw(client, enc, store, settings, files)

    with stack:
        yield start


@pytest.fixture
def gw(serve) -> Gw:
    return serve()


# --- helpers ---------------------------------------------------------------------------

def ranking(store: FakeStore, q: np.ndarray, label: str | None = None,
            exclude: int | None = None) -> list[tuple[int, float]]:
    """(id, cosine) of the store's rows, best first: the answer of an exact search."""
    rows = [r for r in store.rows.values() if (label is None or r.label == label) and r.id != exclude]
    q = np.asarray(q, dtype=np.float64)
    scored = [(r.id, float(np.dot(r.embedding, q) / (np.linalg.norm(r.embedding) * np.linalg.norm(q))))
              for r in rows]
    return sorted(scored, key=lambda t: -t[1])


def search(gw: Gw, data: bytes, params: dict | None = None, fields: dict | None = None):
    return gw.client.post("/v1/search", params=params or {}, data=fields or {},
                          files={"file": ("q.jpg", data, "image/jpeg")})


def add(gw: Gw, data: bytes, label: str | None, headers: dict | None = AUTH):
    fields = {} if label is None else {"label": label}
    return gw.client.post("/v1/images", headers=headers, data=fields,
                          files={"file": ("x.jpg", data, "image/jpeg")})


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1
    return body


def ids_scores(results: list[dict]) -> list[tuple[int, float]]:
    return [(int(h["id"]), h["score"]) for h in results]


def assert_ranked(results: list[dict], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in ids_scores(results)] == [i for i, _ in expected]
    for (_, got), (_, want) in zip(ids_scores(results), expected):
        assert got == pytest.approx(want, abs=2e-6)


def vote(hits: list[tuple[int, float]], store: FakeStore) -> tuple[str, float] | None:
    """The score-weighted label vote of these hits (positive scores only): label, winner's share."""
    votes: dict[str, float] = defaultdict(float)
    for id_, score in hits:
        if score > 0:
            votes[store.rows[id_].label] += score
    if not votes:
        return None
    label = max(votes, key=votes.get)
    return label, votes[label] / sum(votes.values())


# --- /v1/search ------------------------------------------------------------------------

def test_search_answers_the_exact_top_k_by_cosine_with_urls_and_model(gw):
    r = search(gw, image(1, 999), {"top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    q = gw.enc.encoded[-1].embeddings[0]
    expected = ranking(gw.store, q)[:5]
    assert_ranked(body["results"], expected)
    for h in body["results"]:
        row = gw.store.rows[int(h["id"])]
        assert (h["label"], h["path"]) == (row.label, row.path)
        assert h["url"] == f"/v1/images/{h['id']}" and h["thumb_url"] == f"/v1/images/{h['id']}/thumb"
    assert body["model"] == {"name": MODEL, "arch": "resnet18", "weights": "random weights, untrained",
                             "untrained": True}


def test_an_indexed_image_finds_itself_first(gw):
    id_, data = next(iter(gw.files.items()))
    body = search(gw, data, {"top_k": 3}).json()
    assert int(body["results"][0]["id"]) == id_
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_timings_cover_every_stage(gw):
    t = search(gw, image(0, 5)).json()["timings_ms"]
    assert set(t) == {"decode", "infer", "search", "total"}
    assert t["decode"] > 0 and t["infer"] > 0 and t["search"] > 0  # pixels mode: decoded here
    assert t["total"] + 0.003 >= t["decode"] + t["infer"] + t["search"]


@pytest.mark.parametrize("where", ["query", "form"])
@pytest.mark.parametrize("top_k", [0, 101, -1])
def test_top_k_out_of_range_is_422_before_any_inference(gw, where, top_k):
    params, fields = ({"top_k": top_k}, None) if where == "query" else (None, {"top_k": str(top_k)})
    assert_error(search(gw, image(0, 5), params, fields), 422, "invalid_request")
    assert gw.enc.encoded == [] and gw.store.calls["search"] == 0


def test_top_k_bounds_are_inclusive_and_the_form_wins(gw):
    n = len(gw.store.rows)
    assert len(search(gw, image(0, 5), {"top_k": 1}).json()["results"]) == 1
    assert len(search(gw, image(0, 5), {"top_k": 100}).json()["results"]) == min(100, n)
    assert len(search(gw, image(0, 5), {"top_k": 2}, {"top_k": "3"}).json()["results"]) == 3
    assert_error(search(gw, image(0, 5), None, {"top_k": "three"}), 422, "invalid_request")


def test_min_score_drops_the_hits_under_it(gw):
    search(gw, image(2, 77), {"top_k": 1})
    full = ranking(gw.store, gw.enc.encoded[-1].embeddings[0])
    cut = (full[3][1] + full[4][1]) / 2  # between the 4th and the 5th best
    body = search(gw, image(2, 77), {"top_k": 10, "min_score": cut}).json()
    assert_ranked(body["results"], full[:4])
    assert_ranked(search(gw, image(2, 77), {"top_k": 10}, {"min_score": str(cut)}).json()["results"], full[:4])
    for bad in ("1.5", "-1.01", "nan"):
        assert_error(search(gw, image(2, 77), {"min_score": bad}), 422, "invalid_request")
        assert_error(search(gw, image(2, 77), None, {"min_score": bad}), 422, "invalid_request")


def test_label_filter_ranks_within_the_label_and_the_form_wins(gw):
    body = search(gw, image(0, 31), {"top_k": 10, "label": "collie"}).json()
    expected = ranking(gw.store, gw.enc.encoded[-1].embeddings[0], label="collie")
    assert len(expected) == PER_LABEL
    assert_ranked(body["results"], expected)
    body = search(gw, image(0, 31), {"top_k": 10, "label": "collie"}, {"label": "pug"}).json()
    assert {h["label"] for h in body["results"]} == {"pug"}
    nothing = search(gw, image(0, 31), {"label": "no-such-breed"}).json()
    assert nothing["results"] == [] and nothing["breed_guess"] is None
    for bad in ("", "a\x01b", "x" * 257):
        assert_error(search(gw, image(0, 31), None, {"label": bad}), 422, "invalid_request")


def test_without_a_head_the_breed_guess_is_the_neighbours_vote(gw):
    body = search(gw, image(1, 404), {"top_k": 7}).json()
    hits = ranking(gw.store, gw.enc.encoded[-1].embeddings[0])[:7]
    label, share = vote(hits, gw.store)
    guess = body["breed_guess"]
    assert guess["source"] == "knn" and guess["label"] == label
    assert guess["confidence"] == pytest.approx(share, abs=1e-5)


def test_the_vote_weighs_scores_and_ignores_dissimilar_neighbours(serve):
    gw = serve(index=False)
    query = image(0, 1)
    q = gw.enc.embed(decode_image(query, gw.settings.image_size)[None]).embeddings[0].astype(np.float64)
    other = np.random.default_rng(3).standard_normal(DIM)
    other = unit(other - np.dot(other, q) * q).astype(np.float64)  # orthogonal to q

    def at(cos: float) -> np.ndarray:
        return (cos * q + math.sqrt(1 - cos * cos) * other).astype(np.float32)

    # the nearest is a pug, but two collies together outweigh it; the dissimilar beagles do not vote
    rows = [Row(1, "pug/1.jpg", "pug", at(0.9)), Row(2, "collie/2.jpg", "collie", at(0.6)),
            Row(3, "collie/3.jpg", "collie", at(0.5)), Row(4, "beagle/4.jpg", "beagle", at(-0.8)),
            Row(5, "beagle/5.jpg", "beagle", at(-0.9))]
    gw.store.upsert(rows)
    body = search(gw, query, {"top_k": 5}).json()
    assert [int(h["id"]) for h in body["results"]] == [1, 2, 3, 4, 5]
    assert body["breed_guess"]["label"] == "collie" and body["breed_guess"]["source"] == "knn"
    assert body["breed_guess"]["confidence"] == pytest.approx((0.6 + 0.5) / (0.9 + 0.6 + 0.5), abs=1e-5)
    only_beagles = search(gw, query, {"label": "beagle"}).json()
    assert len(only_beagles["results"]) == 2 and only_beagles["breed_guess"] is None


def test_with_a_head_the_breed_guess_is_the_models_own(serve):
    gw = serve(head=True)
    guessed = set()
    for cls, seed in [(0, 8), (1, 8), (2, 8), (0, 9), (1, 9), (2, 9)]:
        body = search(gw, image(cls, seed), {"top_k": 3, "label": "beagle"}).json()
        probs = gw.enc.encoded[-1].probs[0]
        i = int(np.argmax(probs))
        assert body["breed_guess"] == {"label": LABELS[i], "confidence": pytest.approx(float(probs[i]), abs=1e-6),
                                       "source": "probs"}
        guessed.add(LABELS[i])
    assert len(guessed) > 1  # the queries tell the head's answers apart, not one label for all
    nothing = search(gw, image(2, 8), {"label": "no-such-breed"}).json()
    assert nothing["results"] == [] and nothing["breed_guess"]["source"] == "probs"


# --- upload errors ---------------------------------------------------------------------

@pytest.mark.parametrize("case, status, code", [
    ("empty", 422, "undecodable_image"),
    ("text", 415, "unsupported_media_type"),
    ("truncated", 422, "undecodable_image"),
    ("just_over_the_limit", 413, "payload_too_large"),
    ("declared_over_the_limit", 413, "payload_too_large"),
])
def test_bad_uploads_are_refused_with_the_error_body(gw, case, status, code):
    data = {"empty": b"", "text": b"just some text, not an image\n", "truncated": truncated_jpeg(),
            "just_over_the_limit": b"\xff\xd8\xff" + b"\0" * (MAX_UPLOAD - 2),
            "declared_over_the_limit": b"\xff\xd8\xff" + b"\0" * (MAX_UPLOAD + OVERHEAD)}[case]
    assert_error(search(gw, data), status, code)
    assert_error(add(gw, data, "beagle"), status, code)
    assert gw.enc.encoded == [] and gw.store.calls["search"] == gw.store.calls["upsert"] == 0


def test_a_file_at_the_limit_is_read(gw):
    data = image(0, 2)
    padded = data + b"\0" * (MAX_UPLOAD - len(data))  # JPEG decoders stop at the end marker
    assert search(gw, padded).status_code == 200


def test_a_body_without_a_file_or_not_multipart(gw):
    assert_error(gw.client.post("/v1/search", files={"top_k": (None, "3")}), 422, "missing_file")
    assert_error(gw.client.post("/v1/search", data={"top_k": "3"}), 415, "unsupported_content_type")
    assert_error(gw.client.post("/v1/search"), 422, "missing_file")
    assert_error(gw.client.post("/v1/search", content=image(0, 1), headers={"Content-Type": "image/jpeg"}),
                 415, "unsupported_content_type")
    assert gw.enc.encoded == []


# --- /v1/images/{id}/similar -----------------------------------------------------------

def test_similar_ranks_the_others_by_cosine_and_excludes_itself(gw):
    id_ = next(iter(gw.files))
    body = gw.client.get(f"/v1/images/{id_}/similar", params={"top_k": 5}).json()
    expected = ranking(gw.store, gw.store.rows[id_].embedding, exclude=id_)[:5]
    assert_ranked(body["results"], expected)
    assert str(id_) not in {h["id"] for h in body["results"]}
    assert body["breed_guess"]["label"] == vote(expected, gw.store)[0]
    assert body["timings_ms"]["decode"] == body["timings_ms"]["infer"] == 0
    assert gw.enc.encoded == []  # the stored embedding, no inference
    every = gw.client.get(f"/v1/images/{id_}/similar", params={"top_k": 100}).json()["results"]
    assert len(every) == len(gw.store.rows) - 1


def test_similar_within_a_label(gw):
    id_ = next(i for i, r in gw.store.rows.items() if r.label == "pug")
    body = gw.client.get(f"/v1/images/{id_}/similar", params={"label": "pug"}).json()
    assert_ranked(body["results"], ranking(gw.store, gw.store.rows[id_].embedding, label="pug", exclude=id_))
    assert len(body["results"]) == PER_LABEL - 1


def test_similar_to_an_unknown_or_invalid_id(gw):
    unknown = next(i for i in range(1, 1000) if i not in gw.store.rows)
    assert_error(gw.client.get(f"/v1/images/{unknown}/similar"), 404, "not_found")
    for bad in ("-1", str(2**63), "abc"):
        assert_error(gw.client.get(f"/v1/images/{bad}/similar"), 422, "invalid_request")
    id_ = next(iter(gw.files))
    for params in ({"top_k": 0}, {"top_k": "2.5"}, {"min_score": ""}, {"min_score": "nan"}, {"label": ""},
                   {"label": "a\x01b"}):
        assert_error(gw.client.get(f"/v1/images/{id_}/similar", params=params), 422, "invalid_request")
    assert gw.store.calls["search"] == 0


# --- /v1/images/{id}/thumb --------------------------------------------------------------

def test_a_thumbnail_takes_its_memory_from_the_decode_budget_searches_share(serve):
    gw = serve(decode_wait_s=0.2)
    id_ = next(iter(gw.files))
    budget = gw.client.app.state.runtime.decode_budget
    with budget.hold(budget.capacity):  # other decodes hold all of it for longer than the wait
        assert_error(gw.client.get(f"/v1/images/{id_}/thumb"), 503, "overloaded")
        assert_error(search(gw, gw.files[id_]), 503, "overloaded")
    r = gw.client.get(f"/v1/images/{id_}/thumb")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text[:300]
    assert max(Image.open(io.BytesIO(r.content)).size) <= gw.settings.thumb_max_side
    assert budget.used == 0


# --- POST / DELETE /v1/images ----------------------------------------------------------

def test_writes_are_disabled_without_a_configured_key(serve):
    gw = serve(api_key=None)
    assert_error(add(gw, image(0, 9), "beagle"), 403, "writes_disabled")
    assert_error(add(gw, image(0, 9), "beagle", headers=None), 403, "writes_disabled")
    id_ = next(iter(gw.files))
    assert_error(gw.client.delete(f"/v1/images/{id_}", headers=AUTH), 403, "writes_disabled")
    assert id_ in gw.store.rows and gw.store.calls["upsert"] == 0


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}])
def test_writes_need_the_key(gw, headers):
    r = add(gw, image(0, 9), "beagle", headers=headers)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    id_ = next(iter(gw.files))
    assert_error(gw.client.delete(f"/v1/images/{id_}", headers=headers), 401, "unauthorized")
    assert id_ in gw.store.rows and gw.enc.encoded == [] and gw.store.calls["upsert"] == 0


def test_the_key_is_checked_before_the_body(gw):
    r = gw.client.post("/v1/images", content=b"not multipart", headers={"Content-Type": "text/plain"})
    assert_error(r, 401, "unauthorized")


def test_add_stores_the_file_and_its_embedding_then_search_finds_it(gw):
    data = image(1, 4242)
    id_ = content_id(data)
    r = add(gw, data, "collie")
    assert r.status_code == 201, r.text
    body = r.json()
    rel = f"collie/{gw.settings.upload_prefix}{id_}.jpg"
    assert body == {"id": str(id_), "label": "collie", "path": rel, "url": f"/v1/images/{id_}",
                    "thumb_url": f"/v1/images/{id_}/thumb", "created": True}
    assert (gw.root / rel).read_bytes() == data
    row = gw.store.rows[id_]
    assert (row.path, row.label) == (rel, "collie")
    np.testing.assert_array_equal(row.embedding, gw.enc.encoded[-1].embeddings[0])
    found = search(gw, data, {"top_k": 1}).json()["results"][0]
    assert int(found["id"]) == id_ and found["score"] == pytest.approx(1.0, abs=1e-5)


def test_adding_the_same_content_again_updates_the_label_and_keeps_the_file(gw):
    data = image(2, 4243)
    first = add(gw, data, "pug").json()
    again = add(gw, data, "beagle")
    assert again.status_code == 200
    assert again.json() == {**first, "label": "beagle", "created": False}
    assert gw.store.rows[content_id(data)].label == "beagle"
    assert [p.relative_to(gw.root).as_posix() for p in gw.root.rglob("upload-*")] == [first["path"]]
    dataset_id, dataset_bytes = next(iter(gw.files.items()))
    known = add(gw, dataset_bytes, "pug")
    assert known.status_code == 200 and known.json()["path"] == gw.store.rows[dataset_id].path
    assert not list(gw.root.rglob(f"*{dataset_id}*"))  # an indexed dataset file is not copied


@pytest.mark.parametrize("label, code", [(None, "missing_label"), ("", "invalid_request"),
                                         ("   ", "invalid_request"), ("a\x01b", "invalid_request"),
                                         ("x" * 257, "invalid_request"), ("é" * 129, "invalid_request")])
def test_add_refuses_a_missing_or_bad_label(gw, label, code):
    assert_error(add(gw, image(0, 9), label), 422, code)
    assert gw.enc.encoded == [] and gw.store.calls["upsert"] == 0 and not list(gw.root.rglob("upload-*"))


def test_add_without_a_file(gw):
    r = gw.client.post("/v1/images", headers=AUTH, files={"label": (None, "pug")})
    assert_error(r, 422, "missing_file")


def test_a_label_that_is_not_a_folder_name_still_lands_in_one_folder(gw):
    data = image(0, 4244)
    body = add(gw, data, "toy/poodle").json()
    assert body["label"] == "toy/poodle" and gw.store.rows[content_id(data)].label == "toy/poodle"
    path = gw.root / body["path"]
    assert path.parent.parent == gw.root and path.read_bytes() == data


def test_delete_removes_the_entry_and_only_an_uploaded_file(gw):
    data = image(1, 4245)
    added = add(gw, data, "collie").json()
    id_ = content_id(data)
    r = gw.client.delete(f"/v1/images/{id_}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"id": str(id_), "deleted": True, "file_removed": True}
    assert id_ not in gw.store.rows and not (gw.root / added["path"]).exists()
    assert_error(gw.client.get(f"/v1/images/{id_}/similar"), 404, "not_found")
    assert_error(gw.client.delete(f"/v1/images/{id_}", headers=AUTH), 404, "not_found")

    dataset_id = next(iter(gw.files))
    rel = gw.store.rows[dataset_id].path
    r = gw.client.delete(f"/v1/images/{dataset_id}", headers=AUTH)
    assert r.json() == {"id": str(dataset_id), "deleted": True, "file_removed": False}
    assert dataset_id not in gw.store.rows and (gw.root / rel).is_file()
    assert_error(gw.client.delete("/v1/images/-5", headers=AUTH), 422, "invalid_request")


# --- backend failures ------------------------------------------------------------------

def test_milvus_down_is_503_without_its_address_and_the_next_request_reopens(gw):
    gw.store.down = True
    r = search(gw, image(0, 3))
    body = assert_error(r, 503, "milvus_unavailable")
    assert body["error"]["message"] == PUBLIC_MESSAGES["milvus_unavailable"]
    assert r.headers["retry-after"] == str(gw.settings.retry_after_s)
    assert gw.store.uri not in r.text
    id_ = next(iter(gw.files))
    assert_error(gw.client.get(f"/v1/images/{id_}/similar"), 503, "milvus_unavailable")
    assert_error(add(gw, image(0, 3), "pug"), 503, "milvus_unavailable")
    assert not list(gw.root.rglob("upload-*"))

    gw.store.down = False
    opened = gw.store.calls["open"]
    assert search(gw, image(0, 3)).status_code == 200
    assert gw.store.calls["open"] == opened + 1  # the failure made the runtime open the collection again


def test_a_failed_upsert_leaves_no_file_behind(gw):
    gw.store.failing = {"upsert"}
    data = image(2, 4246)
    assert_error(add(gw, data, "pug"), 503, "milvus_unavailable")
    assert gw.store.calls["upsert"] == 1 and content_id(data) not in gw.store.rows
    assert not list(gw.root.rglob("upload-*")) and not list(gw.root.rglob(".upload-*"))
    gw.store.failing = set()
    assert add(gw, data, "pug").status_code == 201  # and nothing in the way of the retry


@pytest.mark.parametrize("exc, status, code", [
    (TritonUnavailable("connection refused at 10.0.0.7:8001"), 503, "triton_unavailable"),
    (TritonOverloaded("queue full at 10.0.0.7:8001"), 503, "overloaded"),
    (TritonInvalidInput("tensor INPUT__0 refused at 10.0.0.7:8001"), 502, "invalid_inference_input"),
])
def test_triton_failures_map_to_their_status_and_hide_the_backend(gw, exc, status, code):
    gw.enc.error = exc
    r = search(gw, image(0, 3))
    assert_error(r, status, code)
    assert "10.0.0.7" not in r.text
    assert_error(add(gw, image(0, 3), "pug"), status, code)
    assert gw.store.calls["search"] == gw.store.calls["upsert"] == 0


def test_an_encoder_of_another_dimension_is_a_503_not_garbage(serve):
    gw = serve(enc_dim=DIM + 1, index=False)  # the fixture indexes with the encoder: here it would not fit
    assert_error(search(gw, image(0, 3)), 503, "bad_model_repository")
    assert gw.store.calls["search"] == 0


# --- operations ------------------------------------------------------------------------

def test_healthz_is_the_process_only(gw):
    gw.enc.ready, gw.store.down = False, True
    r = gw.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.fixture
def clock(monkeypatch):
    """The readiness cache's clock, stepped by hand."""
    now = [1000.0]
    monkeypatch.setattr(routes, "clock", lambda: now[0])
    return now


def test_readyz_when_both_backends_are_ready(gw, clock):
    r = gw.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"triton": True, "milvus": True}, "detail": {},
                        "model": {"name": MODEL, "arch": "resnet18", "weights": "random weights, untrained",
                                  "untrained": True}}


def test_readyz_names_the_backend_that_is_not_ready_not_its_address(gw, clock):
    gw.enc.ready = False
    r = gw.client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] == str(gw.settings.retry_after_s)
    body = r.json()
    assert body["status"] == "not_ready" and body["checks"] == {"triton": False, "milvus": True}
    assert body["detail"] == {"triton": routes.NOT_READY["triton"]}
    assert body["error"] == {"code": "not_ready", "message": f"triton: {routes.NOT_READY['triton']}"}
    assert gw.enc.url not in r.text

    gw.enc.ready, gw.store.down = True, True
    clock[0] += routes.READY_TTL_S
    body = gw.client.get("/readyz").json()
    assert body["checks"] == {"triton": True, "milvus": False}
    assert body["detail"] == {"milvus": routes.NOT_READY["milvus"]} and gw.store.uri not in str(body)


def test_readyz_reopens_a_collection_that_is_not_loaded(gw, clock):
    gw.store.loaded = False
    assert gw.client.get("/readyz").json()["checks"]["milvus"] is False
    opened = gw.store.calls["open"]
    clock[0] += routes.READY_TTL_S
    assert gw.client.get("/readyz").status_code == 200
    assert gw.store.calls["open"] == opened + 1


def test_readyz_answers_from_a_check_at_most_the_ttl_old(gw, clock):
    start, asked = clock[0], gw.enc.ready_calls
    assert gw.client.get("/readyz").status_code == 200
    assert gw.enc.ready_calls == asked + 1
    gw.enc.ready = False  # not seen until the cached answer expires
    clock[0] = start + routes.READY_TTL_S / 2
    assert gw.client.get("/readyz").status_code == 200
    assert gw.enc.ready_calls == asked + 1
    clock[0] = start + routes.READY_TTL_S
    assert gw.client.get("/readyz").status_code == 503
    assert gw.enc.ready_calls == asked + 2
    assert metric_sum(gw.client.get("/metrics").text, "imgsearch_readiness_checks_total") == 2  # what /metrics shows


def test_each_app_has_its_own_readiness_cache(serve, clock):
    ready, down = serve(), serve()
    down.enc.ready = False
    assert ready.client.get("/readyz").status_code == 200
    assert down.client.get("/readyz").status_code == 503
    assert ready.client.get("/readyz").status_code == 200


def test_docs_and_openapi_are_served(gw):
    spec = gw.client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert {"/v1/search", "/v1/images", "/v1/images/{id}", "/v1/images/{id}/similar", "/readyz",
            "/healthz"} <= set(paths)
    assert "Retry-After" in paths["/v1/search"]["post"]["responses"]["503"]["headers"]
    # the search routes read their parameters themselves: the schema still documents each, with its bounds
    for path, method, names in (("/v1/search", "post", ["top_k", "min_score", "label"]),
                                ("/v1/images/{id}/similar", "get", ["id", "top_k", "min_score", "label"])):
        params = {p["name"]: p for p in paths[path][method]["parameters"]}
        assert sorted(params) == sorted(names), (path, params)
        assert params["top_k"]["schema"] | {"type": "integer", "minimum": 1, "maximum": 100} == params["top_k"]["schema"]
        assert params["label"]["schema"]["maxLength"] == 256
    assert paths["/v1/images/{id}/similar"]["get"]["parameters"][0]["schema"]["maximum"] == 2**63 - 1
    docs = gw.client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text or "/static/docs.js" in docs.text

