"""POST/DELETE /v1/images when the file system says no, or two adds race, against the real
tritonserver, a Milvus server (milvus-lite's server mode, so the gateway itself writes only
the image files) and uvicorn.
"""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.data import jpeg_bytes, make_dataset, shape_image
from harness.gateway import API_KEY, gateway_env, index_images, start_gateway
from harness.stack import MilvusServer
from imgsearch.store import content_id

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FILE_LIMIT = 256 * 1024  # the gateway process may write no file larger than this: a "full disk"


def _post(c: httpx.Client, data: bytes, label: str) -> httpx.Response:
    return c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, label)}, headers=AUTH)


def _noise_jpeg(seed: int, side: int = 700) -> bytes:
    """A JPEG over FILE_LIMIT (noise does not compress) and under the upload limit."""
    import io

    px = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=95)
    assert FILE_LIMIT < len(buf.getvalue()) < 10 * 1024 * 1024
    return buf.getvalue()


@pytest.fixture(scope="module")
def wstack(tmp_path_factory, triton, repo18):
    base = tmp_path_factory.mktemp("writes")
    root = base / "images"
    make_dataset(root, classes=2, per_class=3, seed=21)
    # a dataset file that happens to carry the upload prefix
    (root / "n00000000-class_0" / "upload-holiday.jpg").write_bytes(jpeg_bytes(shape_image(0, 2100)))
    (root / "clash").write_text("a file where a label folder would go\n")
    milvus = MilvusServer(base / "milvus-data", log_path=base / "milvus.log").start()
    ids = index_images(root, milvus.uri, triton.grpc_url, repo18)
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, root, api_key=API_KEY))
    try:
        yield root, milvus, ids, gw
    finally:
        gw.stop()
        milvus.stop()


def test_label_folder_taken_by_a_file_is_409_and_adds_nothing(wstack):
    root, _, _, gw = wstack
    data = jpeg_bytes(shape_image(1, 2200))
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        r = _post(c, data, "clash")
        assert r.status_code == 409 and r.json()["error"]["code"] == "path_conflict", r.text
        assert str(root) not in r.text  # names the label's folder, not where the root lives
        assert c.get(f"/v1/images/{content_id(data)}").status_code == 404
        assert _post(c, data, "clash2").status_code == 201  # and the gateway carries on
    assert (root / "clash").is_file()


def test_delete_removes_only_the_exact_file_it_created(wstack):
    root, _, ids, gw = wstack
    rel = "n00000000-class_0/upload-holiday.jpg"
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        r = c.delete(f"/v1/images/{ids[rel]}", headers=AUTH)
        assert r.status_code == 200 and r.json()["file_removed"] is False, r.text
        assert (root / rel).is_file()  # a dataset file, whatever its name starts with
        data = jpeg_bytes(shape_image(1, 2300))
        added = _post(c, data, "mine").json()
        r = c.delete(f"/v1/images/{added['id']}", headers=AUTH)
        assert r.status_code == 200 and r.json()["file_removed"] is True
        assert not (root / added["path"]).exists()


def test_same_new_image_added_twice_at_once_leaves_one_file(wstack):
    root, _, _, gw = wstack
    images = [jpeg_bytes(shape_image(k % 4, 2400 + k)) for k in range(6)]

    async def pair(c: httpx.AsyncClient, k: int, data: bytes) -> list[httpx.Response]:
        def post(label: str):
            return c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, label)},
                          headers=AUTH)
        return await asyncio.gather(post(f"left{k}"), post(f"right{k}"))

    async def all_pairs() -> list[list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            return await asyncio.gather(*[pair(c, k, d) for k, d in enumerate(images)])

    for k, (a, b) in enumerate(asyncio.run(all_pairs())):
        assert {a.status_code, b.status_code} == {200, 201}, (a.text, b.text)  # one created it
        id_ = content_id(images[k])
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob(f"upload-{id_}.*"))
        created = a.json() if a.status_code == 201 else b.json()
        assert files == [created["path"]], files  # no orphan copy under the other label
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            assert c.get(f"/v1/images/{id_}").content == images[k]


def test_same_new_image_added_at_once_through_two_gateway_processes_leaves_one_file(wstack, triton, repo18):
    """Two gateway processes (as --workers 2, or two pods on one volume) share the image root
    and the Milvus server: the lock that keeps one file per content holds across processes."""
    root, milvus, _, gw = wstack
    other = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, root, api_key=API_KEY))
    images = [jpeg_bytes(shape_image(k % 4, 2600 + k)) for k in range(16)]

    async def pair(a: httpx.AsyncClient, b: httpx.AsyncClient, k: int, data: bytes) -> list[httpx.Response]:
        def post(c: httpx.AsyncClient, label: str):
            return c.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg"), "label": (None, label)},
                          headers=AUTH)
        async with room:  # a few pairs at a time: the CPU Triton's queue, not the lock, is not under test
            return await asyncio.gather(post(a, f"one{k}"), post(b, f"two{k}"))

    async def all_pairs() -> list[list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as a, \
                httpx.AsyncClient(base_url=other.url, timeout=60) as b:
            return await asyncio.gather(*[pair(a, b, k, d) for k, d in enumerate(images)])

    room = asyncio.Semaphore(2)

    try:
        results = asyncio.run(all_pairs())
    finally:
        other.stop()
    orphans = []
    for k, (a, b) in enumerate(results):
        assert {a.status_code, b.status_code} == {200, 201}, (a.text, b.text)  # one created it
        id_ = content_id(images[k])
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob(f"upload-{id_}.*"))
        created = a.json() if a.status_code == 201 else b.json()
        if files != [created["path"]]:
            orphans.append((created["path"], files))
    assert not orphans, orphans  # no copy under the other process's label


def test_full_disk_is_503_and_nothing_is_left_behind(wstack, triton, repo18):
    root, milvus, _, _ = wstack
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, root, api_key=API_KEY),
                       max_file_bytes=FILE_LIMIT)
    try:
        data = _noise_jpeg(7)
        before = {p for p in root.rglob("*")}
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            r = _post(c, data, "big")
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_full", r.text
            assert r.headers["retry-after"]
            assert c.get(f"/v1/images/{content_id(data)}").status_code == 404
            small = jpeg_bytes(shape_image(2, 2500))
            assert _post(c, small, "big").status_code == 201  # room enough for this one
        after = {p for p in root.rglob("*")}
        assert {p.relative_to(root).as_posix() for p in after - before} == {"big", f"big/upload-{content_id(small)}.jpg"}
    finally:
        gw.stop()


def test_read_only_image_root_is_503(tmp_path, triton, repo18, wstack):
    _, milvus, _, _ = wstack
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs a read-only mount (mount -t tmpfs -o ro), which this machine does not allow")
    try:
        gw = start_gateway(gateway_env(repo18, triton.grpc_url, milvus.uri, ro, api_key=API_KEY))
        try:
            with httpx.Client(base_url=gw.url, timeout=60) as c:
                data = jpeg_bytes(shape_image(3, 2600))
                r = _post(c, data, "dog")
                assert r.status_code == 503 and r.json()["error"]["code"] == "storage_read_only", r.text
                assert c.get(f"/v1/images/{content_id(data)}").status_code == 404
        finally:
            gw.stop()
    finally:
        subprocess.run(["umount", str(ro)], check=True)
