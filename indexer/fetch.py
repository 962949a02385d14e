"""Download, verify and unpack a dataset (needs internet; resumable).

stanford-dogs: the official archive images.tar (757 MiB, 20,580 JPEGs in 120 folders
such as Images/n02085620-Chihuahua/) from vision.stanford.edu. The download goes to
DEST/images.tar.part and resumes with an HTTP Range request when interrupted; the file
must match the sha256 (the published one by default, or --sha256) before it is renamed
and unpacked. Unpacking refuses absolute paths, "..", links and device files, so a
tampered archive cannot write outside DEST. Running it again when everything is in place
does nothing.

examples:
  imgsearch fetch stanford-dogs                          # -> data/stanford-dogs/Images
  imgsearch fetch stanford-dogs --dest /data/dogs
  imgsearch fetch stanford-dogs --url http://mirror.example/images.tar
  imgsearch index data/stanford-dogs/Images              # then index it
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imgsearch.model_card import sha256_file

CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    url: str
    filename: str
    sha256: str
    size: int
    extracts_to: str
    source_of_checksum: str


DATASETS = {
    "stanford-dogs": Dataset(
        url="http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
        filename="images.tar",
        # as recorded by tensorflow/datasets (url_checksums/stanford_dogs.txt), with the size
        sha256="a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",
        size=793_579_520,
        extracts_to="Images",
        source_of_checksum="tensorflow/datasets url_checksums/stanford_dogs.txt",
    ),
}


class FetchError(Exception):
    """A download or archive problem, with what to do about it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=sorted(DATASETS), help="what to fetch")
    p.add_argument("--dest", type=Path, default=None, help="target folder (default: data/<dataset>)")
    p.add_argument("--url", help="download from here instead (a mirror; file:// works too)")
    p.add_argument("--sha256", help="expected sha256 of the archive (default: the published one)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default: 60)")
    p.add_argument("--no-progress", action="store_true")


# --- download -------------------------------------------------------------------------
def download(url: str, part: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` into ``part``, continuing from what ``part`` holds already."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        return _copy_local(urllib.request.url2pathname(urllib.parse.urlparse(url).path), part, have)
    if scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL scheme {scheme!r}: use http(s):// or file://")
    req = urllib.request.Request(url, headers={"User-Agent": "imgsearch-fetch/1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is complete already
            return part
        raise FetchError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise FetchError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    with resp:
        if have and resp.status == 206:
            mode, total, done = "ab", _total(resp, have), have
            print(f"resuming {part.name} at {have:,} bytes", file=sys.stderr)
        else:
            if have:
                print(f"the server ignored the Range request (HTTP {resp.status}): starting {part.name} over",
                      file=sys.stderr)
            mode, total, done = "wb", _total(resp, 0), 0
        bar = _bar(total, done, part.name, progress)
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise FetchError(f"download interrupted at {out.tell():,} bytes ({e}); "
                                         "run the same command again to resume") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    size = part.stat().st_size
    if total and size < total:
        raise FetchError(f"download stopped at {size:,} of {total:,} bytes; run the same command again to resume")
    return part


def _total(resp, offset: int) -> int | None:
    cr = resp.headers.get("Content-Range")  # bytes 100-999/1000
    if cr and "/" in cr and cr.rsplit("/", 1)[1].strip().isdigit():
        return int(cr.rsplit("/", 1)[1])
    cl = resp.headers.get("Content-Length")
    return offset + int(cl) if cl and cl.isdigit() else None


def _copy_local(src: str, part: Path, have: int) -> Path:
    try:
        with open(src, "rb") as f, open(part, "ab" if have else "wb") as out:
            f.seek(have)
            shutil.copyfileobj(f, out, CHUNK)
    except OSError as e:
        raise FetchError(f"cannot read {src}: {e.strerror or e}") from None
    return part


def _bar(total: int | None, done: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not enabled)


# --- unpack ---------------------------------------------------------------------------
def check_member(m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name)
    if not p.parts or p.is_absolute() or ".." in p.parts or "\\" in m.name or ":" in p.parts[0]:
        raise FetchError(f"archive member {m.name!r} points outside the target folder: refusing to unpack")
    if not (m.isfile() or m.isdir()):
        kind = "link" if (m.issym() or m.islnk()) else "special file"
        raise FetchError(f"archive member {m.name!r} is a {kind}: refusing to unpack")


def extract(archive: Path, dest: Path) -> int:
    """Unpack regular files and folders only; every member is checked before anything is written."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                check_member(m)
            root = dest.resolve()
            for m in members:
                target = (root / m.name).resolve()
                if not target.is_relative_to(root):  # belt and braces after check_member
                    raise FetchError(f"archive member {m.name!r} resolves outside {root}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python before 3.11.4 has no extraction filters: do what "data" does to modes and owners
                for m in members:
                    m.mode &= 0o755
                    m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
                tar.extractall(dest, members=members)
    except tarfile.TarError as e:
        raise FetchError(f"{archive} is not a readable tar archive: {e}") from None
    return sum(1 for m in members if m.isfile())


# --- command --------------------------------------------------------------------------
def fetch(name: str, dest: Path, url: str | None = None, sha256: str | None = None,
          timeout: float = 60.0, progress: bool = True) -> Path:
    ds = DATASETS[name]
    expected = (sha256 or ds.sha256).lower()
    archive = dest / ds.filename
    stamp = dest / f".{ds.filename}.extracted"
    if stamp.exists() and stamp.read_text().strip() == expected and (dest / ds.extracts_to).is_dir():
        print(f"{dest / ds.extracts_to} is already there (archive sha256 {expected[:16]}...)")
        return dest / ds.extracts_to
    if not (archive.exists() and sha256_file(archive) == expected):
        part = archive.with_name(archive.name + ".part")
        download(url or ds.url, part, timeout, progress)
        actual = sha256_file(part)
        if actual != expected:
            raise FetchError(
                f"sha256 mismatch for {part}: expected {expected}, got {actual}. The file is kept; "
                f"delete it to download again, or pass --sha256 {actual} if you trust this source.")
        part.replace(archive)
    n = extract(archive, dest)
    stamp.write_text(expected + "\n")
    print(f"unpacked {n} files into {dest} (archive {archive}, sha256 verified)")
    return dest / ds.extracts_to


def run(args: argparse.Namespace) -> int:
    dest = args.dest or Path("data") / args.dataset
    try:
        out = fetch(args.dataset, dest, args.url, args.sha256, args.timeout, not args.no_progress)
    except FetchError as e:
        print(f"imgsearch fetch: {e}", file=sys.stderr)
        return 1
    print(f"next: imgsearch index {out}")
    return 0
