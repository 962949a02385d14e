"""The one image decoder, shared by the gateway, the indexer and the Triton preprocess model.

Pillow is the only place bytes become pixels. Its exceptions are mapped here, at this
boundary, to :mod:`imgsearch.errors`; callers never see an ``OSError`` from a bad file.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import CorruptImage, ImageTooLarge, UnsupportedImage

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


def decode_image(
    data: bytes,
    size: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode image bytes to an RGB ``uint8`` array of shape ``(size, size, 3)``.

    EXIF orientation is applied, every colour mode becomes RGB, GIFs give their first
    frame, and the image is resized (plain, aspect not kept) to ``size x size`` as the
    model was trained. JPEGs use draft mode, so a 12 MP photo decodes at 1/8 scale.

    Raises :class:`UnsupportedImage`, :class:`CorruptImage` or :class:`ImageTooLarge`.
    """
    fmt = check_format(data)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = im.size
            if w <= 0 or h <= 0:
                raise CorruptImage("image has no pixels")
            if w * h > max_pixels:
                raise ImageTooLarge(
                    f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (decompression bomb?)"
                )
            if fmt == "JPEG":
                im.draft("RGB", (size, size))
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            im = _to_rgb(im)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (ImageTooLarge, CorruptImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise CorruptImage(f"content starts like {fmt} but cannot be decoded") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct_error()) as e:
        raise CorruptImage(f"undecodable {fmt}: {e}") from None
    except MemoryError:
        raise ImageTooLarge("image needs too much memory to decode") from None
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive, Pillow promised RGB
        raise CorruptImage(f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def thumbnail(data: bytes, max_side: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG thumbnail (aspect kept) of an allow-listed image, for the web page."""
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage("not a supported image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
            if im.size[0] * im.size[1] > max_pixels:
                raise ImageTooLarge("image over the pixel limit")
            if fmt == "JPEG":
                im.draft("RGB", (max_side, max_side))
            im.load()
            im = _to_rgb(ImageOps.exif_transpose(im) or im)
            im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=85)
            return out.getvalue()
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(str(e)) from None
    except Exception as e:  # noqa: BLE001 - the boundary: anything Pillow raises is a bad file
        raise CorruptImage(f"undecodable {fmt}: {e}") from None
