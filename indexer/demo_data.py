"""Build a demo image set from the sample photos scikit-image ships (no download).

OUT_DIR/<photo>/<photo>_NNN.jpg: one label folder per photo (astronaut, chelsea the cat,
coffee, rocket, ...), holding the photo itself and transformed copies of it: random
crops, flips, colour shifts, small rotations, rescaling and JPEG re-compression at
several qualities. A search with one copy should find its siblings first, which makes
the demo (and the retrieval check) meaningful even with an untrained model.

Deterministic (fixed seeds) and idempotent: files already there are kept, so running it
again adds nothing; a larger --count adds the missing copies.

examples:
  imgsearch demo-data data/images                 # ~320 images in 16 folders
  imgsearch demo-data data/images --count 1000
  imgsearch demo-data /tmp/demo --count 40 && imgsearch index /tmp/demo
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

from imgsearch.imaging import jpeg_bytes

# scikit-image sample images that load offline (the others need pooch + a download),
# photographs or photo-like; grey and binary ones become RGB.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "horse", "coins", "moon", "clock",
          "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "colorwheel")
QUALITIES = (35, 50, 65, 80, 95)
MAX_SIDE = 640


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where the label folders go")
    p.add_argument("--count", type=int, default=320, help="images in total, spread over the photos (default: 320)")
    p.add_argument("--seed", type=int, default=0, help="changes every transform (default: 0)")


def load_photos(names: tuple[str, ...] = PHOTOS):
    """name -> RGB PIL image, for the sample photos available offline."""
    import skimage.data
    from PIL import Image

    out = {}
    for name in names:
        try:
            a = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo that needs a download is simply left out
            continue
        if a.dtype == bool:
            a = np.where(a, 255, 0).astype(np.uint8)  # horse: black silhouette on white
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        im = Image.fromarray(a[..., :3]).convert("RGB")
        im.thumbnail((MAX_SIDE, MAX_SIDE))
        out[name] = im
    return out


def variant(photo, name: str, index: int, seed: int = 0) -> bytes:
    """JPEG bytes of copy ``index`` of ``photo``; 0 is the photo itself, at quality 90."""
    from PIL import Image, ImageEnhance, ImageOps

    if index == 0:
        return jpeg_bytes(photo, 90)
    rng = np.random.default_rng(zlib.crc32(f"{seed}:{name}:{index}".encode()))
    im = photo
    w, h = im.size
    # crop 45-100% of the area, aspect jittered
    area = rng.uniform(0.45, 1.0)
    aspect = rng.uniform(0.8, 1.25)
    cw = int(min(w, max(32, w * np.sqrt(area * aspect))))
    ch = int(min(h, max(32, h * np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    if rng.random() < 0.6:
        mean = tuple(int(v) for v in np.asarray(im).reshape(-1, 3).mean(0))
        im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, fillcolor=mean)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.75, 1.25))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    gains = rng.uniform(0.9, 1.1, 3)  # a colour cast
    im = Image.fromarray(np.clip(np.asarray(im, np.float32) * gains, 0, 255).astype(np.uint8))
    scale = rng.uniform(0.5, 1.0)
    im = im.resize((max(32, int(im.width * scale)), max(32, int(im.height * scale))), Image.Resampling.BILINEAR)
    return jpeg_bytes(im, int(rng.choice(QUALITIES)))


def build(out_dir: Path, count: int = 320, seed: int = 0) -> tuple[int, int, list[str]]:
    """Write the demo set; returns (written, kept, labels)."""
    photos = load_photos()
    if not photos:
        raise RuntimeError("no scikit-image sample photo could be loaded (is scikit-image installed?)")
    names = list(photos)[: max(1, count)]
    per, extra = divmod(count, len(names))
    written = kept = 0
    for k, name in enumerate(names):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per + (1 if k < extra else 0)):
            path = folder / f"{name}_{i:03d}.jpg"
            if path.exists():
                kept += 1
                continue
            tmp = path.with_name(f".{path.name}.tmp")  # hidden: the indexer never sees half a file
            tmp.write_bytes(variant(photos[name], name, i, seed))
            tmp.replace(path)
            written += 1
    return written, kept, names


def run(args: argparse.Namespace) -> int:
    if args.count < 1:
        print("imgsearch demo-data: --count must be at least 1", file=sys.stderr)
        return 2
    written, kept, labels = build(args.out_dir, args.count, args.seed)
    print(f"{args.out_dir}: wrote {written} images, kept {kept} already there; "
          f"{len(labels)} labels: {', '.join(labels)}")
    return 0
