"""Triton Python-backend model ``preprocess``: encoded image files -> uint8 RGB pixels.

The first step of the ``image_search`` ensemble (file bytes in, embedding out), so a
client sends the file as it is (several times fewer bytes than pixels) and decodes
nothing. Copied by ``imgsearch export`` to ``<repository>/preprocess/1/model.py``.

Input ``image_bytes`` BYTES [N, 1]; output ``images`` UINT8 [N, size, size, 3], the same
plain resize to ``size x size`` as :func:`imgsearch.imaging.decode_image`.

``decoder`` parameter:

* ``pillow``: :func:`imgsearch.imaging.decode_image` itself (configs/cpu.pbtxt): the very
  pixels the gateway and the indexer make on their side.
* ``torchvision``: JPEGs decoded in one batched call, ``torchvision.io.decode_jpeg`` on the
  instance's device (nvJPEG on a GPU instance: configs/gpu.pbtxt), EXIF orientation applied
  and the resize done there too (bilinear, antialiased, as Pillow does). What the fast
  path does not take goes to Pillow: other formats, progressive/CMYK/odd JPEGs, files
  without an end marker, anything the batched call or a single GPU decode refuses.

A file that cannot be used gets its own error response (INVALID_ARG) carrying the typed
error's code and message (``imgsearch:<code>: ...``, mapped back to the same exception by
``TritonEncoder.encode_bytes``); the other requests of the batch go on. A request of
several files fails as a whole when one of them is bad (the message says which).

The stub must see the ``imgsearch`` package (installed in the environment whose python3
is first on the server's PATH) and numpy<2: with numpy 2 the stub crashes on BYTES inputs
(checked here with tritonserver 2.51: "Stub process is not healthy").
"""

import json
import warnings

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported as a library (tests of the decoding helpers)
    pb_utils = None

try:
    from imgsearch.errors import CorruptImage, ImageError
    from imgsearch.imaging import DEFAULT_MAX_PIXELS, decode_image, sniff_format
    from imgsearch.model_card import BYTES_INPUT as INPUT
except ImportError as e:  # pragma: no cover - a deployment error, said plainly
    raise ImportError(
        f"the preprocess model needs the imgsearch package in the Triton stub's Python ({e}); "
        "pip install the project into the environment whose python3 is first on tritonserver's PATH"
    ) from None

OUTPUT = "images"
# baseline and extended-sequential Huffman JPEGs: what nvJPEG's batched decode takes
FAST_SOF = (0xC0, 0xC1)
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


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


def apply_orientation(img, orientation):
    """EXIF orientation on a [3, H, W] tensor, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.rot90(-1, (-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return img.rot90(1, (-2, -1))
    return img


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

    def __init__(self, kind="pillow", device="cpu", size=224, max_pixels=DEFAULT_MAX_PIXELS, log=None):
        self.kind = kind
        self.size = size
        self.max_pixels = max_pixels
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
                    fast.append((i, head[4]))
        if fast:
            pixels = self._fast([blobs[i] for i, _ in fast], [o for _, o in fast])
            for (i, _), px in zip(fast, pixels):
                out[i] = px
        for i, b in enumerate(blobs):
            if out[i] is None:
                out[i] = self.pillow(b)
        return out

    def _fast(self, blobs, orientations):
        torch = self.torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on read-only bytes: we never write to it
            datas = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
        rgb = self.tvio.ImageReadMode.RGB
        try:
            imgs = self.tvio.decode_jpeg(datas, mode=rgb, device=self.device)
        except Exception as e:  # noqa: BLE001 - one bad file fails the batched call: go one by one
            self.stats["fast_batch_failed"] += 1
            self.log(f"batched decode of {len(datas)} files failed ({type(e).__name__}: {str(e)[:200]}); one by one")
            imgs = []
            for d in datas:
                try:
                    imgs.append(self.tvio.decode_jpeg(d, mode=rgb, device=self.device))
                except Exception:  # noqa: BLE001 - Pillow decides and names the error
                    imgs.append(None)
        results = [None] * len(blobs)
        groups = {}
        for k, (img, o) in enumerate(zip(imgs, orientations)):
            if img is None:
                continue
            img = apply_orientation(img, o)
            groups.setdefault(tuple(img.shape[-2:]), []).append((k, img))
        s = self.size
        with torch.no_grad():
            for (h, w), members in groups.items():
                x = torch.stack([img for _, img in members])
                if (h, w) != (s, s):
                    x = torch.nn.functional.interpolate(x.float(), size=(s, s), mode="bilinear",
                                                        antialias=True, align_corners=False)
                    x = x.round_().clamp_(0, 255).to(torch.uint8)
                host = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
                for j, (k, _) in enumerate(members):
                    results[k] = host[j]
        self.stats["fast"] += sum(r is not None for r in results)
        return results


def error_message(err, index, count):
    where = f"image {index + 1} of {count}: " if count > 1 else ""
    return f"imgsearch:{err.code}: {where}{err}"


class TritonPythonModel:
    def initialize(self, args):
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(
                f"numpy {np.__version__} in the Triton Python-backend environment: the stub crashes on BYTES "
                "inputs with numpy 2; install numpy<2 in the environment whose python3 is first on the server's PATH")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        if params.get("device", "auto") == "cuda":  # a KIND_CPU instance decoding on GPU 0
            kind = "GPU"
        out = next(o for o in config["output"] if o["name"] == OUTPUT)
        size = int(params.get("size", out["dims"][0]))
        decoder = params.get("decoder", "pillow")
        device = f"cuda:{device_id}" if kind == "GPU" else "cpu"
        self.logger = pb_utils.Logger
        self.decoder = Decoder(decoder, device, size, int(params.get("max_pixels", DEFAULT_MAX_PIXELS)),
                               log=self.logger.log_warn)
        self.size = size
        where = f"torchvision.io.decode_jpeg on {device}" + (" (nvJPEG)" if device != "cpu" else "")
        self.logger.log_info(f"preprocess: decoder {decoder} ({where if decoder == 'torchvision' else 'Pillow'}), "
                             f"{size}x{size}, numpy {np.__version__}")

    def execute(self, requests):
        responses = [None] * len(requests)
        blobs, spans = [], []
        for r, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
            arr = None if tensor is None else tensor.as_numpy()
            if arr is None or arr.size == 0:
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"missing or empty input {INPUT!r}", pb_utils.TritonError.INVALID_ARG))
                spans.append(None)
                continue
            items = [bytes(x) for x in arr.reshape(-1)]
            spans.append((len(blobs), len(items)))
            blobs.extend(items)
        decoded = self.decoder.decode(blobs) if blobs else []
        s = self.size
        for r, span in enumerate(spans):
            if span is None:
                continue
            start, n = span
            mine = decoded[start:start + n]
            bad = [(j, d) for j, d in enumerate(mine) if isinstance(d, Exception)]
            if bad:
                j, err = bad[0]
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    error_message(err, j, n), pb_utils.TritonError.INVALID_ARG))
                continue
            batch = np.empty((n, s, s, 3), np.uint8)
            for j, d in enumerate(mine):
                batch[j] = d
            responses[r] = pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, batch)])
        return responses

    def finalize(self):
        self.decoder = None
