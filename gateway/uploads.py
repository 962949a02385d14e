"""Streaming multipart reader: the byte limit is enforced while reading, nothing touches the disk.

FastAPI's ``UploadFile`` parameters spool the whole body to a temp file before the
handler runs, with no size limit. Here the request stream goes chunk by chunk through
python-multipart's push parser: a declared ``Content-Length`` over the limit is refused
before one body byte is read, and an undeclared (chunked) body is cut off at the first
byte past the limit. The file part stays in memory (at most ``max_bytes``, and at most
``IMGSEARCH_MAX_INFLIGHT`` requests at a time), is never written anywhere, and the
client's filename is never used.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from imgsearch.errors import UploadTooLarge

from .errors import ApiError

FILE_FIELD = "file"
MAX_FIELD_BYTES = 4096  # top_k, min_score, label: short text
MAX_PARTS = 8
OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small fields


@dataclass
class Upload:
    data: bytes | None = None
    fields: dict[str, str] = field(default_factory=dict)


def _too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"upload is over the limit of {limit:,} bytes (IMGSEARCH_MAX_UPLOAD_BYTES)")


def _malformed(msg: str) -> ApiError:
    return ApiError(422, "malformed_multipart", msg)


class _Collector:
    """python-multipart callbacks: gathers the parts, enforcing the per-part limits."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.out = Upload()
        self.parts = 0
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._buf = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} form parts")
        self._headers, self._buf, self._name, self._is_file = {}, bytearray(), None, False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._hname).decode("latin-1").lower()] = bytes(self._hvalue)
        self._hname, self._hvalue = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        disp, params = parse_options_header(self._headers.get("content-disposition"))
        if disp != b"form-data" or b"name" not in params:
            raise _malformed("a form part lacks Content-Disposition: form-data; name=...")
        self._name = params[b"name"].decode("utf-8", "replace")
        self._is_file = self._name == FILE_FIELD
        if self._is_file:
            if self.out.data is not None:
                raise _malformed("more than one 'file' part")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._buf += data[start:end]
        limit = self.max_bytes if self._is_file else MAX_FIELD_BYTES
        if len(self._buf) > limit:
            if self._is_file:
                raise _too_large(self.max_bytes)
            raise _malformed(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._is_file:
            self.out.data = bytes(self._buf)
        elif self._name is not None:
            try:
                self.out.fields[self._name] = bytes(self._buf).decode("utf-8")
            except UnicodeDecodeError:
                raise _malformed(f"form field {self._name!r} is not UTF-8") from None
        self._buf = bytearray()


async def read_upload(request: Request, max_bytes: int, timeout_s: float | None = None) -> Upload:
    """Parse a multipart/form-data body: the ``file`` part (bytes) and small text fields.

    ``timeout_s``: the whole body must arrive within this (408 otherwise), so a client that
    sends a byte now and then cannot keep a connection and its buffers for ever.
    """
    ctype, params = parse_options_header(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if not ctype and declared in (None, "0"):
        return Upload()  # no body at all: the caller reports the missing 'file' field
    if ctype != b"multipart/form-data":
        raise ApiError(415, "unsupported_content_type",
                       "send multipart/form-data with the image in a 'file' field")
    boundary = params.get(b"boundary")
    if not boundary:
        raise _malformed("multipart/form-data without a boundary")
    try:
        if declared is not None and int(declared) > max_bytes + OVERHEAD:
            raise _too_large(max_bytes)  # refused before reading a single body byte
    except ValueError:
        raise _malformed("Content-Length is not a number") from None

    collector = _Collector(max_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except (ValueError, MultipartParseError) as e:
        raise _malformed(f"bad multipart boundary: {e}") from None
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_bytes + OVERHEAD:
                    raise _too_large(max_bytes)
                if chunk:
                    parser.write(chunk)
        parser.finalize()
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the upload did not arrive within {timeout_s:g} s "
                                            "(IMGSEARCH_BODY_TIMEOUT_S)") from None
    except MultipartParseError as e:
        raise _malformed(f"malformed multipart body: {e}") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away during the upload") from None
    return collector.out
