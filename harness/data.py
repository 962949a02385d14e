"""Test data made here: generated images with separable classes, and broken files."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imgsearch.imaging import jpeg_bytes

COLOURS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (230, 200, 20), (160, 40, 200),
           (20, 200, 200), (240, 120, 10), (120, 70, 30), (250, 250, 250), (10, 10, 10)]
SHAPES = ["circle", "square", "triangle", "cross", "ring"]


def shape_image(cls: int, seed: int, size: int = 160) -> Image.Image:
    """Class = (colour, shape); position, scale, background noise vary with the seed."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(90, 170) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    colour = COLOURS[cls % len(COLOURS)]
    shape = SHAPES[(cls // 2) % len(SHAPES)] if cls >= len(COLOURS) else SHAPES[cls % len(SHAPES)]
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=colour)
        d.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=colour)
    else:
        d.ellipse(box, outline=colour, width=max(3, r // 3))
    arr = np.asarray(im).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-12, 13, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def make_dataset(root: Path, classes: int = 10, per_class: int = 20, seed: int = 0,
                 prefix_synset: bool = True) -> list[Path]:
    """root/n0000000k-class_k/img_i.jpg, Stanford-Dogs style folder names."""
    files = []
    for c in range(classes):
        name = f"n{c:08d}-class_{c}" if prefix_synset else f"class_{c}"
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = d / f"img_{i:04d}.jpg"
            p.write_bytes(jpeg_bytes(shape_image(c, seed * 100_000 + c * 1000 + i)))
            files.append(p)
    return files


def bomb_png(width: int = 10000, height: int = 10000) -> bytes:
    """A tiny PNG that claims a huge size (a decompression bomb)."""
    im = Image.new("1", (width, height), 0)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def truncated_jpeg(seed: int = 1) -> bytes:
    data = jpeg_bytes(shape_image(1, seed, 256))
    return data[: len(data) // 2]


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    """``im`` saved as ``fmt`` with Pillow's save options ``kw`` (quality, exif, save_all, ...)."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def load_module(path: Path, name: str):
    """Import a Python file that is not on sys.path (a Triton model.py template, a test module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_version_module(version_dir: Path, module: str, package: str = "triton_model_version"):
    """Import ``module`` from a Triton model version folder the way Triton does: the folder is a
    package (Triton imports ``1/model.py`` as ``1.model``), so the modules' relative imports
    resolve inside it. The package is rebuilt on each call: another folder loaded under the
    same name must not be answered from ``sys.modules``."""
    import importlib
    import importlib.machinery
    import importlib.util
    import sys

    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
    spec.submodule_search_locations = [str(version_dir)]
    sys.modules[package] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{package}.{module}")


def make_tiny_queue_repo(src: Path, dest: Path, model: str = "resnet152") -> Path:
    """A copy of ``src``'s model whose CPU config batches one request and queues at most 2:
    a handful of concurrent requests overflows Triton's queue."""
    import dataclasses
    import shutil

    from imgsearch.export.triton_config import CPU_DEFAULTS, cpu_config
    from imgsearch.model_card import read_card

    shutil.copytree(src / model, dest / model)
    opts = dataclasses.replace(CPU_DEFAULTS, max_batch_size=1, preferred=(1,), max_queue_size=2, queue_delay_us=0)
    (dest / model / "configs" / "cpu.pbtxt").write_text(cpu_config(read_card(dest, model), opts))
    return dest


def check_decode_or_typed_error(data: bytes) -> None:
    """The decoder's contract for any bytes: a 224x224x3 uint8 image, or one of the typed image errors."""
    from imgsearch.errors import ImageError
    from imgsearch.imaging import decode_image

    try:
        out = decode_image(data, max_pixels=4_000_000)
    except ImageError:
        return
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def huge_png(mode: str, side: int = 7000) -> bytes:
    """A small PNG (100-300 KB) that decodes to a ``side`` x ``side`` raster: 16-bit grey
    ("I;16"), "RGBA" with varying alpha, "P" with a transparent index, or "RGB"."""
    ramp = np.linspace(0, 1, side, dtype=np.float32)[None, :].repeat(side, 0)
    if mode == "I;16":
        return png_bytes(Image.fromarray((ramp * 65535).astype(np.uint16)))
    if mode == "RGBA":
        rgba = np.zeros((side, side, 4), np.uint8)
        rgba[..., 0] = ramp * 255
        rgba[..., 3] = 255 - ramp.T * 255
        return png_bytes(Image.fromarray(rgba, "RGBA"))
    if mode == "P":
        im = Image.fromarray((ramp * 200).astype(np.uint8), "L").convert("P")
        im.info["transparency"] = 0
        return png_bytes(im)
    return png_bytes(Image.fromarray((ramp * 255).astype(np.uint8), "L").convert("RGB"))


def huge_jpeg(side: int = 7000) -> bytes:
    """A baseline JPEG of about 1 MB that decodes to a ``side`` x ``side`` RGB raster."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[..., 0] = ramp[None, :]
    rgb[..., 1] = ramp[:, None]
    rgb[..., 2] = 128
    return jpeg_bytes(Image.fromarray(rgb))
