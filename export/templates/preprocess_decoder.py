"""The ``preprocess`` model's decoding: encoded image files -> uint8 RGB pixels, one
``size x size`` raster per file or the typed error that file raises.

Copied by ``imgsearch export`` beside ``<repository>/preprocess/1/model.py``, which imports it
(and loadable on its own: no ``triton_python_backend_utils`` here).

``decoder`` parameter:

* ``pillow``: :func:`imgsearch.imaging.decode_image` itself (configs/cpu.pbtxt): the very
  pixels the gateway and the indexer make on their side.
* ``torchvision``: JPEGs decoded in one batched call, ``torchvision.io.decode_jpeg`` on the
  instance's device (nvJPEG on a GPU instance: configs/gpu.pbtxt), EXIF orientation applied
  and the resize done there too (averaged down by whole factors, then bilinear, antialiased,
  as :func:`imgsearch.imaging.decode_image` does), never a float copy of a full-size raster.
  A batch is decoded in chunks of at most ``decode_memory_bytes`` (parameter; 512 MiB) of
  full-size rasters, each shrunk before the next is decoded. What the fast
  path does not take goes to Pillow: other formats, progressive/CMYK/odd JPEGs, files
  without an end marker, anything the batched call or a single GPU decode refuses.
"""

import warnings

import numpy as np

from imgsearch.errors import CorruptImage, ImageError
from imgsearch.imaging import DEFAULT_MAX_PIXELS, decode_image, sniff_format

# baseline and extended-sequential Huffman JPEGs: what nvJPEG's batched decode takes
FAST_SOF = (0xC0, 0xC1)
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# full-size RGB rasters the torchvision path decodes at once (the ``decode_memory_bytes``
# parameter), as the gateway's IMGSEARCH_DECODE_MEMORY_BYTES default: a batch of 128 files of
# up to 50 MP each would otherwise be 19 GB of pixels in one call
DECODE_MEMORY_BYTES = 512 * 2**20
STRIP_PIXELS = 1 << 20  # pixels of one strip made float while averaging down: 12 MB
GROUP_PIXELS = 1 << 22  # pixels of same-shape images shrunk in one call (a 48 MB float copy at most)


def exif_orientation(tiff):
    """Orientation tag (1..8) of an Exif TIFF block; None when it cannot be read."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for k in range(count):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
            value = int.from_bytes(tiff[e + 8:e + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_header(data):
    """(width, height, components, SOF marker, EXIF orientation) from the markers before the
    frame header, or None when the file does not parse as far as that."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, orientation = 2, 1
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        seg = data[i + 4:i + 2 + length]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            orientation = exif_orientation(seg[6:])
            if orientation is None:
                return None
        elif marker in SOF_MARKERS:
            if len(seg) < 6:
                return None
            h = int.from_bytes(seg[1:3], "big")
            w = int.from_bytes(seg[3:5], "big")
            return w, h, seg[5], marker, orientation
        i += 2 + length
    return None


def oriented(px, orientation):
    """EXIF orientation on an [H, W, 3] array, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return px[:, ::-1]
    if orientation == 3:
        return px[::-1, ::-1]
    if orientation == 4:
        return px[::-1]
    if orientation == 5:
        return px.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(px, -1)
    if orientation == 7:
        return px.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(px, 1)
    return px


def fast_path_ok(data, max_pixels):
    """Header facts for the batched decoder, or None: Pillow decides (and names the error)."""
    if sniff_format(data) != "JPEG":
        return None
    head = jpeg_header(data)
    if head is None:
        return None
    w, h, comps, sof, orientation = head
    if sof not in FAST_SOF or comps not in (1, 3) or w <= 0 or h <= 0 or w * h > max_pixels:
        return None
    # a truncated file must be refused, as Pillow does, not decoded into grey
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    return head


class Decoder:
    """Decode a list of files to uint8 [size, size, 3] arrays (or the typed error of each)."""

    def __init__(self, kind="pillow", device="cpu", size=224, max_pixels=DEFAULT_MAX_PIXELS, log=None,
                 memory_bytes=DECODE_MEMORY_BYTES):
        self.kind = kind
        self.size = size
        self.max_pixels = max_pixels
        self.memory_bytes = memory_bytes
        self.log = log or (lambda msg: None)
        self.stats = {"fast": 0, "pillow": 0, "fast_batch_failed": 0}
        if kind == "torchvision":
            import torch
            import torchvision.io

            self.torch = torch
            self.tvio = torchvision.io
            self.device = torch.device(device)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        elif kind != "pillow":
            raise ValueError(f"unknown decoder {kind!r} (pillow, torchvision)")

    def pillow(self, data):
        self.stats["pillow"] += 1
        try:
            return decode_image(data, self.size, self.max_pixels)
        except ImageError as e:
            return e
        except Exception as e:  # noqa: BLE001 - never lose the batch to one file
            return CorruptImage(f"undecodable image: {type(e).__name__}: {e}")

    def decode(self, blobs):
        out = [None] * len(blobs)
        fast = []
        if self.kind == "torchvision":
            for i, b in enumerate(blobs):
                head = fast_path_ok(b, self.max_pixels)
                if head is not None:
                    fast.append((i, head))
        if fast:
            pixels = self._fast([blobs[i] for i, _ in fast], [h for _, h in fast])
            for (i, _), px in zip(fast, pixels):
                out[i] = px
        for i, b in enumerate(blobs):
            if out[i] is None:
                out[i] = self.pillow(b)
        return out

    def _fast(self, blobs, heads):
        """Decode in chunks of at most ``memory_bytes`` of full-size rasters (a larger file
        alone), each chunk shrunk to ``size`` before the next is decoded."""
        results = [None] * len(blobs)
        for chunk in raster_chunks([w * h * 3 for w, h, *_ in heads], self.memory_bytes):
            imgs = self._decode_jpegs([blobs[k] for k in chunk])
            groups = {}  # (h, w) -> [(index, full-size image)]
            for k, img in zip(chunk, imgs):
                if img is not None:
                    groups.setdefault(tuple(img.shape[-2:]), []).append((k, img))
            for (h, w), members in groups.items():
                for part in raster_chunks([h * w] * len(members), GROUP_PIXELS):
                    small = shrink(self.torch, [members[j][1] for j in part], self.size).cpu().numpy()
                    for j, px in zip(part, small):
                        k = members[j][0]
                        results[k] = np.ascontiguousarray(oriented(px, heads[k][4]))
            imgs = groups = None  # the full-size rasters go before the next chunk is decoded
        self.stats["fast"] += sum(r is not None for r in results)
        return results

    def _decode_jpegs(self, blobs):
        torch = self.torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on read-only bytes: we never write to it
            datas = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
        rgb = self.tvio.ImageReadMode.RGB
        try:
            return self.tvio.decode_jpeg(datas, mode=rgb, device=self.device)
        except Exception as e:  # noqa: BLE001 - one bad file fails the batched call: go one by one
            self.stats["fast_batch_failed"] += 1
            self.log(f"batched decode of {len(datas)} files failed ({type(e).__name__}: {str(e)[:200]}); one by one")
        imgs = []
        for d in datas:
            try:
                imgs.append(self.tvio.decode_jpeg(d, mode=rgb, device=self.device))
            except Exception:  # noqa: BLE001 - Pillow decides and names the error
                imgs.append(None)
        return imgs


def raster_chunks(sizes, budget):
    """Indices of ``sizes`` in consecutive runs whose sum stays within ``budget``; an item
    larger than the budget makes a run alone."""
    run, total = [], 0
    for i, n in enumerate(sizes):
        if run and total + n > budget:
            yield run
            run, total = [], 0
        run.append(i)
        total += n
    if run:
        yield run


def shrink_factors(w, h, size):
    """Whole factors a JPEG of ``w`` x ``h`` is averaged down by before its resize to ``size``,
    as Pillow gets them: its draft mode scales by 1/2, 1/4 or 1/8 while both sides stay at least
    ``size`` (:func:`imgsearch.imaging.decode_image`), then ``Image.reduce`` by the whole
    factor that leaves between 1x and 2x ``size``."""
    d = next((s for s in (8, 4, 2) if min(w // size, h // size) >= s), 1)
    return d * max(1, -(-w // d) // size), d * max(1, -(-h // d) // size)


def shrink(torch, images, size):
    """Same-shape uint8 [3, H, W] tensors -> uint8 [N, size, size, 3] on their device.

    As :func:`imgsearch.imaging.decode_image` does: averaged down by whole factors
    (:func:`shrink_factors`), then the antialiased bilinear resize on that small raster.
    Images of up to ``GROUP_PIXELS`` in all (every group :class:`Decoder` makes of more than
    one) are averaged in one call: one launch on a GPU, not one per strip. A larger image
    is averaged on strips of about ``STRIP_PIXELS`` copied into one float buffer (fresh
    buffers a strip fragment the heap, and the process keeps what it grew), so no float copy
    of a full-size raster (4 bytes a channel, up to 50 MP an image) is made.
    """
    n = len(images)
    h, w = images[0].shape[-2:]
    fx, fy = shrink_factors(w, h, size)
    F = torch.nn.functional
    with torch.no_grad():
        if (fy, fx) == (1, 1):  # under 2x size both ways: small already
            x = torch.stack(images).float()
        elif n * h * w <= GROUP_PIXELS:  # a float copy of them all is small: average in one call
            x = F.avg_pool2d(torch.stack(images).float(), (fy, fx), ceil_mode=True)
        else:  # one image over GROUP_PIXELS (Decoder groups larger ones alone)
            (img,) = images
            rows = max(fy, STRIP_PIXELS // w // fy * fy)
            buf = torch.empty((1, 3, min(rows, h), w), dtype=torch.float32, device=img.device)
            x = torch.empty((1, 3, -(-h // fy), -(-w // fx)), dtype=torch.float32, device=img.device)
            for top in range(0, h, rows):
                r = min(rows, h - top)
                buf[0, :, :r].copy_(img[:, top:top + r])
                # ceil_mode: the last, partial boxes average the pixels they have (as Image.reduce)
                x[:, :, top // fy:top // fy + -(-r // fy)] = F.avg_pool2d(buf[:, :, :r], (fy, fx), ceil_mode=True)
            buf = None
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def error_message(err, index, count):
    where = f"image {index + 1} of {count}: " if count > 1 else ""
    return f"imgsearch:{err.code}: {where}{err}"
