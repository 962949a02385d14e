"""The one image decoder, shared by the gateway, the indexer and the Triton preprocess model.

Pillow is the only place bytes become pixels. Its exceptions are mapped here, at this
boundary, to :mod:`imgsearch.errors`; callers never see an ``OSError`` from a bad file.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import threading
import time
import warnings
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import CorruptImage, DecodeBusy, ImageTooLarge, UnsupportedImage

# Formats allowed by content. TIFF, SVG, PDF, ICO, PSD... are refused even though
# Pillow could open some of them: a smaller attack surface, and nothing a camera sends.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 50_000_000

# Pillow must never paper over a truncated file.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def sniff_format(data: bytes) -> str | None:
    """Name the allow-listed format from the magic bytes, or None."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    return None


def check_format(data: bytes) -> str:
    """The allow-listed format of ``data`` by content, or the error :func:`decode_image` gives first.

    For callers that hand the bytes on undecoded (the ``image_search`` ensemble decodes in
    Triton) but want the quick 415 / 422 for an empty or non-image file.
    """
    if not data:
        raise CorruptImage("empty file")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage(
            f"not a supported image (allowed: {', '.join(ALLOWED_FORMATS)}; detected by content)"
        )
    return fmt


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bit by the actual range (a plain convert clips).
        a = np.asarray(im, dtype=np.float64)
        hi = float(a.max()) or 1.0
        return Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((a - lo) * scale).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        # Transparent pixels often hold garbage colour: composite onto white as a viewer would.
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, RGBX...


_GREY_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_REDUCIBLE = ("L", "RGB", "CMYK", "YCbCr", "RGBX")  # Image.reduce averages these as they are
_STRIP_PIXELS = 1 << 20  # strips converted at once while shrinking: a few MB, whatever the image
# EXIF orientation -> the transpose that undoes it (as ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _shrink_to_rgb(im: Image.Image, fx: int, fy: int) -> Image.Image | None:
    """A loaded image averaged down by the whole factors ``fx`` x ``fy`` *before* any conversion,
    as RGB; None when both are 1.

    Converting first (16-bit to float, alpha compositing, palette expansion) costs several
    copies of the full raster; here conversions run on strips of about a megapixel, so a
    decode needs little more than the loaded raster itself.
    """
    w, h = im.size
    if fx == 1 and fy == 1:
        return None
    alpha = _has_alpha(im)
    if im.mode in _REDUCIBLE:
        small = im.reduce((fx, fy))
        return small if small.mode == "RGB" else small.convert("RGB")
    if im.mode in _GREY_WIDE:
        lo, hi = im.getextrema()
        lo = float(lo) if im.mode == "F" else 0.0  # 16/32-bit: scale by the actual range (convert clips)
        scale = 255.0 / (float(hi) - lo) if float(hi) > lo else 0.0

        def to8(strip: Image.Image) -> Image.Image:
            a = (np.asarray(strip, dtype=np.float32) - lo) * np.float32(scale)
            return Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")
    elif alpha:
        def to8(strip: Image.Image) -> Image.Image:
            return strip.convert("RGBA").convert("RGBa")  # premultiplied: averages no hidden colour
    else:  # P, 1, ...
        def to8(strip: Image.Image) -> Image.Image:
            return strip.convert("RGB")
    rows = max(fy, _STRIP_PIXELS // max(1, w) // fy * fy)
    parts = [to8(im.crop((0, top, w, min(h, top + rows)))).reduce((fx, fy)) for top in range(0, h, rows)]
    small = Image.new(parts[0].mode, (parts[0].width, sum(p.height for p in parts)))
    y = 0
    for part in parts:
        small.paste(part, (0, y))
        y += part.height
    if small.mode == "RGBa":  # composite onto white, as _to_rgb does: c*a + 255*(1-a)
        a = np.asarray(small, dtype=np.uint16)
        rgb = a[..., :3] + (255 - a[..., 3:4])
        return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    return small.convert("RGB")


def decode_image(
    data: bytes,
    size: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Decode image bytes to an RGB ``uint8`` array of shape ``(size, size, 3)``.

    EXIF orientation is applied, every colour mode becomes RGB, GIFs give their first
    frame, and the image is resized (plain, aspect not kept) to ``size x size`` as the
    model was trained. JPEGs use draft mode, so a 12 MP photo decodes at 1/8 scale; any
    other image at least twice ``size`` is averaged down before its colours are converted
    (:func:`_shrink_to_rgb`). With a ``budget``, the decode first reserves the memory its
    raster needs, shared with the other decodes holding that budget.

    Raises :class:`UnsupportedImage`, :class:`CorruptImage`, :class:`ImageTooLarge`, or
    :class:`DecodeBusy` when the budget stays taken for its whole wait.
    """
    fmt = check_format(data)
    with _pillow_errors(fmt):
        im = _small_rgb(_open(io.BytesIO(data), fmt, max_pixels), fmt, size, budget, keep_aspect=False)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive, Pillow promised RGB
        raise CorruptImage(f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    """``im`` encoded as a JPEG file."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def thumbnail(
    f: BinaryIO,
    max_side: int = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: DecodeBudget | None = None,
) -> bytes:
    """A JPEG thumbnail (aspect kept, longest side ``max_side``) of the allow-listed image in
    the open binary file ``f``, which Pillow reads as it decodes rather than all at once.
    Decoded as :func:`decode_image` decodes (draft, shrink before converting, the same
    ``budget``) and raises the same errors.
    """
    start = f.tell()
    fmt = check_format(f.read(16))
    f.seek(start)
    with _pillow_errors(fmt):
        im = _small_rgb(_open(f, fmt, max_pixels), fmt, max_side, budget, keep_aspect=True)
        im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return jpeg_bytes(im, quality=85)


def _open(f: BinaryIO, fmt: str, max_pixels: int) -> Image.Image:
    """The image in ``f`` opened (not loaded) as ``fmt``, refused over ``max_pixels``."""
    im = Image.open(f, formats=[fmt])
    w, h = im.size
    if w <= 0 or h <= 0:
        raise CorruptImage("image has no pixels")
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (decompression bomb?)")
    return im


def _small_rgb(im: Image.Image, fmt: str, size: int, budget: DecodeBudget | None, keep_aspect: bool) -> Image.Image:
    """The opened image loaded within ``budget`` and, when it is at least twice ``size``,
    averaged down to between 1x and 2x ``size`` (the longest side when ``keep_aspect``, else each
    side) before its colours are converted; as RGB, EXIF orientation applied."""
    if fmt == "JPEG":
        im.draft("RGB", (size, size))
    with budget.hold(decode_bytes(im, size)) if budget is not None else contextlib.nullcontext():
        im.seek(0)
        im.load()
        w, h = im.size
        fx, fy = (max(1, max(w, h) // size),) * 2 if keep_aspect else (max(1, w // size), max(1, h // size))
        small = _shrink_to_rgb(im, fx, fy)
        if small is None:
            return _to_rgb(ImageOps.exif_transpose(im) or im)
        turn = _ORIENTATION.get(im.getexif().get(0x0112))
        return small.transpose(turn) if turn is not None else small


@contextlib.contextmanager
def _pillow_errors(fmt: str) -> Iterator[None]:
    """Pillow's exceptions as :mod:`imgsearch.errors`; its bomb warning as an error."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (ImageTooLarge, CorruptImage, DecodeBusy):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise CorruptImage(f"content starts like {fmt} but cannot be decoded") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct_error()) as e:
        raise CorruptImage(f"undecodable {fmt}: {e}") from None
    except MemoryError:
        raise ImageTooLarge("image needs too much memory to decode") from None


def decode_bytes(im: Image.Image, size: int) -> int:
    """Memory a decode of this (opened, not loaded) image to ``size`` may need: its raster as
    loaded (after JPEG draft), the strips converted while shrinking, and the RGB raster it
    becomes (under twice ``size`` a side, shrunk or too small to be)."""
    w, h = im.size
    if im.mode == "P" or im.mode == "1":
        per_px = 1
    elif im.mode in _GREY_WIDE:
        per_px = 2 if im.mode.startswith("I;16") else 4
    else:
        per_px = max(1, len(im.getbands()))
    return w * h * per_px + 4 * (2 * size) ** 2 * 4 + _STRIP_PIXELS * 8


class DecodeBudget:
    """Bytes shared by the decodes running at once: a decode waits for its share up to
    ``wait_s`` (then :class:`DecodeBusy`). A decode larger than the whole budget runs alone."""

    def __init__(self, capacity_bytes: int, wait_s: float = 5.0) -> None:
        self.capacity = max(1, int(capacity_bytes))
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        need = min(int(nbytes), self.capacity)
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.used + need > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeBusy(f"decoding needs {need / 2**20:.0f} MiB and the decode memory budget "
                                     f"({self.capacity / 2**20:.0f} MiB) stayed taken for {self.wait_s:g}s")
                self._cond.wait(left)
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()


# glibc's mallopt parameter; a request at least this large gets its own mapping
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def unmap_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have the C allocator serve every request of ``threshold`` bytes or more from its own
    mapping, given back to the OS when freed. Process-wide; False where there is no glibc.

    A :class:`DecodeBudget` bounds the rasters alive at once, but by default glibc raises its
    mmap threshold after each large free (up to 32 MiB), so later rasters come from the heap
    of whichever thread decodes them, and each thread's heap keeps its pages: decode threads
    taking turns would each keep a raster's worth (docs/reliability.md has the figures).
    Setting the threshold also stops glibc from moving it.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no mallopt in it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def struct_error() -> type[Exception]:
    import struct

    return struct.error
