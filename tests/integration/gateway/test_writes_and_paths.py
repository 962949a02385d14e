"""Write endpoints need the key; the image routes never leave the image root."""

from __future__ import annotations

import httpx
import pytest

from harness.data import jpeg_bytes, shape_image
from harness.gateway import (
    API_KEY,
    EVIL_ABS,
    EVIL_DOTDOT,
    EVIL_SYMLINK,
    INNER_LINK,
    MISSING,
    NOT_IMAGE,
)

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def add(client, data: bytes, label: str | None = "newdog", headers=None):
    fields = {"file": ("new.jpg", data, "image/jpeg")}
    if label is not None:
        fields["label"] = (None, label)
    return client.post("/v1/images", files=fields, headers=headers or {})


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


def test_writes_are_disabled_without_a_configured_key(gw_nokey):
    with httpx.Client(base_url=gw_nokey.url, timeout=60) as c:
        data = jpeg_bytes(shape_image(1, 77))
        for headers in ({}, {"Authorization": "Bearer anything"}, AUTH):
            r = add(c, data, headers=headers)
            assert r.status_code == 403 and error_code(r) == "writes_disabled"
            r = c.delete("/v1/images/1", headers=headers)
            assert r.status_code == 403 and error_code(r) == "writes_disabled"


def test_wrong_or_missing_key_is_401(gw):
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        data = jpeg_bytes(shape_image(1, 78))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API_KEY}x"},
                        {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY},
                        {"Authorization": f"Bearer {API_KEY[:-1]}"}):
            r = add(c, data, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert error_code(r) == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
            assert c.delete("/v1/images/1", headers=headers).status_code == 401


def test_add_search_serve_and_delete_with_the_key(gw):
    data = jpeg_bytes(shape_image(7, 4321, size=200))
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        assert add(c, data, label=None, headers=AUTH).status_code == 422
        assert add(c, b"<svg/>", headers=AUTH).status_code == 415
        r = add(c, data, label="Golden Retriever", headers=AUTH)
        assert r.status_code == 201, r.text
        body = r.json()
        id_ = body["id"]
        assert body["created"] is True and body["label"] == "Golden Retriever"
        assert body["path"] == f"Golden Retriever/upload-{id_}.jpg"
        stored = gw.root / body["path"]
        assert stored.read_bytes() == data  # kept under the image root so it can be served

        again = add(c, data, label="Golden Retriever", headers=AUTH)
        assert again.status_code == 200 and again.json()["created"] is False and again.json()["id"] == id_

        hits = c.post("/v1/search", params={"top_k": 3}, files={"file": ("q.jpg", data, "image/jpeg")}).json()
        assert hits["results"][0]["id"] == id_ and hits["results"][0]["score"] >= 0.99
        assert hits["results"][0]["label"] == "Golden Retriever"
        assert c.get(f"/v1/images/{id_}").content == data
        assert c.get(f"/v1/images/{id_}/thumb").status_code == 200

        r = c.delete(f"/v1/images/{id_}", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"id": id_, "deleted": True, "file_removed": True}
        assert not stored.exists()
        hits = c.post("/v1/search", params={"top_k": 3}, files={"file": ("q.jpg", data, "image/jpeg")}).json()
        assert id_ not in [h["id"] for h in hits["results"]]
        assert c.get(f"/v1/images/{id_}").status_code == 404
        assert c.delete(f"/v1/images/{id_}", headers=AUTH).status_code == 404


def test_deleting_an_indexed_dataset_image_keeps_its_file(gw):
    rel = sorted(gw.ids)[-1]
    id_ = gw.ids[rel]
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        data = gw.image(rel)
        r = c.delete(f"/v1/images/{id_}", headers=AUTH)
        assert r.status_code == 200 and r.json()["file_removed"] is False
        assert (gw.root / rel).exists()
        assert c.get(f"/v1/images/{id_}").status_code == 404
        # put it back (same content -> same id) for the other tests
        r = add(c, data, label="class_3", headers=AUTH)
        assert r.status_code == 201 and r.json()["id"] == str(id_)


@pytest.mark.parametrize("id_,what", [(EVIL_DOTDOT, "'..'"), (EVIL_ABS, "absolute"), (EVIL_SYMLINK, "outside")])
def test_image_routes_refuse_to_leave_the_root(gw, id_, what):
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        for suffix in ("", "/thumb"):
            r = c.get(f"/v1/images/{id_}{suffix}")
            assert r.status_code == 403, r.text
            assert error_code(r) == "forbidden_path" and what in r.json()["error"]["message"]
            assert b"secret" not in r.content and not r.content.startswith(b"\xff\xd8")


def test_image_routes_inside_the_root(gw):
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        assert c.get(f"/v1/images/{INNER_LINK}").status_code == 200  # symlink inside the root is fine
        r = c.get(f"/v1/images/{MISSING}")
        assert r.status_code == 404 and error_code(r) == "not_found"
        r = c.get(f"/v1/images/{NOT_IMAGE}")  # text named .jpg inside the root: not served as an image
        assert r.status_code == 404 and b"text named" not in r.content
