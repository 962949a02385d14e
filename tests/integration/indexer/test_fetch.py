"""``imgsearch fetch``: a local file:// archive, checksum mismatch, resume over loopback HTTP,
and archives that try to write outside the target folder. Never the real URL."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.data import jpeg_bytes, shape_image
from imgsearch.indexer.fetch import FetchError, download, fetch


def make_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path) -> tuple[Path, str, dict[str, bytes]]:
    members = {f"Images/n0208562{i}-Breed_{i}/img_{j}.jpg": jpeg_bytes(shape_image(i, j, 96))
               for i in range(3) for j in range(4)}
    members["Images/n02085620-Breed_0/big.jpg"] = jpeg_bytes(shape_image(0, 99, 600), 98)  # > 1 chunk
    src = tmp_path / "src" / "images.tar"
    src.parent.mkdir()
    return src, make_tar(src, members), members


class RangeServer:
    """A loopback HTTP server for one file; honours Range unless told not to, can cut a reply short."""

    def __init__(self, data: bytes, ranges: bool = True, cut_after: int | None = None):
        self.data, self.ranges, self.cut_after = data, ranges, cut_after
        self.requests: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                start = 0
                if rng and outer.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(outer.data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(outer.data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.data) - 1}/{len(outer.data)}")
                else:
                    self.send_response(200)
                body = outer.data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    self.wfile.write(body[: outer.cut_after])
                    outer.cut_after = None  # only the first reply is cut
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/images.tar"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_file_url_verify_extract_and_rerun_is_a_no_op(archive, tmp_path, capsys):
    src, sha, members = archive
    dest = tmp_path / "dest"
    out = fetch("stanford-dogs", dest, url=src.as_uri(), sha256=sha, progress=False)
    assert out == dest / "Images"
    for name, data in members.items():
        assert (dest / name).read_bytes() == data
    assert (dest / "images.tar").read_bytes() == src.read_bytes()
    assert not (dest / "images.tar.part").exists()
    src.unlink()  # a second run needs neither the source nor a download
    capsys.readouterr()
    fetch("stanford-dogs", dest, url=src.as_uri(), sha256=sha, progress=False)
    assert "already there" in capsys.readouterr().out


def test_checksum_mismatch_is_refused_and_nothing_unpacked(archive, tmp_path):
    src, sha, _ = archive
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match="sha256 mismatch") as err:
        fetch("stanford-dogs", dest, url=src.as_uri(), sha256="0" * 64, progress=False)
    assert sha in str(err.value)  # says what it got, so a trusted mirror can be accepted
    assert not (dest / "Images").exists() and not (dest / "images.tar").exists()
    # the default checksum is the published one: this fixture does not match it either
    with pytest.raises(FetchError, match="a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"):
        fetch("stanford-dogs", tmp_path / "d2", url=src.as_uri(), progress=False)


def test_resume_with_range_over_loopback_http(archive, tmp_path):
    src, sha, members = archive
    data = src.read_bytes()
    dest = tmp_path / "dest"
    dest.mkdir()
    half = len(data) // 2
    (dest / "images.tar.part").write_bytes(data[:half])  # an earlier, interrupted download
    with RangeServer(data) as server:
        fetch("stanford-dogs", dest, url=server.url, sha256=sha, progress=False)
    assert server.requests == [f"bytes={half}-"]  # only the rest was asked for
    assert (dest / "images.tar").read_bytes() == data
    assert all((dest / n).read_bytes() == d for n, d in members.items())


def test_interrupted_download_fails_clearly_then_resumes(archive, tmp_path):
    src, sha, _ = archive
    data = src.read_bytes()
    dest = tmp_path / "dest"
    with RangeServer(data, cut_after=len(data) // 3) as server:
        with pytest.raises(FetchError, match="run the same command again to resume"):
            fetch("stanford-dogs", dest, url=server.url, sha256=sha, progress=False)
        kept = (dest / "images.tar.part").stat().st_size
        assert 0 < kept < len(data)
        fetch("stanford-dogs", dest, url=server.url, sha256=sha, progress=False)
    assert server.requests == [None, f"bytes={kept}-"]
    assert (dest / "images.tar").read_bytes() == data


def test_server_without_range_support_starts_over(archive, tmp_path):
    src, sha, _ = archive
    data = src.read_bytes()
    part = tmp_path / "images.tar.part"
    part.write_bytes(data[:1000])
    with RangeServer(data, ranges=False) as server:
        download(server.url, part, progress=False)
    assert part.read_bytes() == data  # not data[:1000] + data


def test_complete_part_file_gets_416_and_is_used(archive, tmp_path):
    src, sha, _ = archive
    data = src.read_bytes()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "images.tar.part").write_bytes(data)
    with RangeServer(data) as server:
        fetch("stanford-dogs", dest, url=server.url, sha256=sha, progress=False)
    assert (dest / "images.tar").read_bytes() == data


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs/escape.txt", "Images/../../escape.txt", "symlink", "hardlink"])
def test_unsafe_archives_are_refused_before_writing(tmp_path, evil):
    src = tmp_path / "evil.tar"
    extra = []
    members = {"Images/ok/a.jpg": b"fine"}
    if evil == "symlink":
        info = tarfile.TarInfo("Images/ok/link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        extra.append(info)
    elif evil == "hardlink":
        info = tarfile.TarInfo("Images/ok/hard.jpg")
        info.type, info.linkname = tarfile.LNKTYPE, "../../outside"
        extra.append(info)
    else:
        members[evil] = b"gotcha"
    sha = make_tar(src, members, extra)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(FetchError, match="refusing to unpack"):
        fetch("stanford-dogs", dest, url=src.as_uri(), sha256=sha, progress=False)
    assert not (dest / "Images").exists()  # checked before anything was written
    assert not list(tmp_path.rglob("escape.txt"))


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from imgsearch.cli import main

    rc = main(["fetch", "stanford-dogs", "--dest", str(tmp_path / "d"), "--url", "ftp://example.invalid/x.tar",
               "--no-progress"])
    assert rc == 1 and "unsupported URL scheme" in capsys.readouterr().err
