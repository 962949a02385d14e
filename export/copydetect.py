"""Copy detection: find the original of an edited copy, among distractors.

The most common reverse-image-search job. The set is built from real photos that ship
inside Python packages (no download):

* originals: scikit-image's sample photos, scikit-learn's two, matplotlib's Grace Hopper;
  the stereo pair ``motorcycle_left`` / ``motorcycle_right`` stays in on purpose (two
  nearly identical photos, the hardest case a real collection has);
* distractors: the 200 face photos of scikit-image's LFW subset, in the gallery with the
  originals and never the answer;
* queries: each original edited ``variants`` times by each kind in :data:`EDITS`.

Every query has exactly one correct gallery image, so AP equals the reciprocal rank of
the original (mAP = MRR) when it is within the top ``k``, else 0.

``build`` writes the set to disk (``gallery/<label>/<name>.png``, ``queries/<edit>/...``,
``manifest.json``) so that the served stack can index and search the same files.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from imgsearch.imaging import jpeg_bytes

MANIFEST = "manifest.json"
DISTRACTOR_LABEL = "lfw_faces"
MAX_SIDE = 640

# (module, file) of the photos each package ships; a file missing in some version is left out
_SKIMAGE = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
            "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
            "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
            "horse.png", "logo.png", "microaneurysms.png")


def _package_file(module: str, *parts: str) -> Path:
    """A file inside an installed package; a path that does not exist when the package is missing."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return Path("/nonexistent", module, *parts)
    return Path(os.path.dirname(spec.origin), *parts)


def load_originals() -> dict[str, Image.Image]:
    """name -> RGB photo (longest side at most MAX_SIDE), from the packages' own sample data."""
    paths = {Path(f).stem: _package_file("skimage", "data", f) for f in _SKIMAGE}
    paths["china"] = _package_file("sklearn", "datasets", "images", "china.jpg")
    paths["flower"] = _package_file("sklearn", "datasets", "images", "flower.jpg")
    paths["grace_hopper"] = _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
    out = {}
    for name, p in paths.items():
        if not p.is_file():
            continue
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        rgb.thumbnail((MAX_SIDE, MAX_SIDE))
        out[name] = rgb
    return out


def load_distractors(n: int = 200) -> dict[str, Image.Image]:
    """The LFW face photos scikit-image ships (25x25 grey crops), upscaled to 112x112."""
    import skimage.data

    faces = skimage.data.lfw_subset()[:n]
    return {f"lfw_{i:03d}": Image.fromarray((f * 255).astype(np.uint8)).convert("RGB").resize((112, 112), Image.BICUBIC)
            for i, f in enumerate(faces)}


# --- edits: each takes (image, rng) and returns a new RGB image ----------------------------


def crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random window of 50-70% of each side."""
    w, h = im.size
    s = rng.uniform(0.5, 0.7)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def flip(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(im)


def rotate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """5-15 degrees either way, black corners, same canvas."""
    angle = rng.uniform(5, 15) * rng.choice((-1, 1))
    return im.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0))


def jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscaled to 40% of each side, then JPEG quality 20."""
    w, h = im.size
    small = im.resize((max(16, int(w * 0.4)), max(16, int(h * 0.4))), Image.BILINEAR)
    return Image.open(io.BytesIO(jpeg_bytes(small, quality=20))).convert("RGB")


def grey(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


def colour(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Saturation x0.3-1.8, brightness and contrast x0.7-1.3."""
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.3, 1.8))
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))


def overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Three solid boxes (each 1/6 x 1/8 of the image) and a line of caption text."""
    im = im.copy()
    d = ImageDraw.Draw(im)
    w, h = im.size
    for _ in range(3):
        x, y = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        d.rectangle((x, y, x + w // 6, y + h // 8), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    d.text((w // 10, h // 2), "(c) 2026 all rights reserved", fill=(255, 255, 255))
    return im


def aspect(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Stretched 1.3-1.6x wide."""
    w, h = im.size
    return im.resize((int(w * rng.uniform(1.3, 1.6)), h), Image.BICUBIC)


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": crop, "flip": flip, "rotate": rotate, "jpeg": jpeg, "grey": grey, "colour": colour,
    "overlay": overlay, "aspect": aspect,
}


# --- the set on disk ------------------------------------------------------------------------


@dataclass
class CopySet:
    root: Path
    gallery: list[str]  # paths relative to root/gallery, the indexed images
    queries: list[str]  # paths relative to root/queries
    truth: list[int]  # per query: index into gallery of its original
    kinds: list[str]  # per query: the edit

    @classmethod
    def load(cls, root: Path) -> CopySet:
        m = json.loads((Path(root) / MANIFEST).read_text())
        return cls(Path(root), m["gallery"], m["queries"], m["truth"], m["kinds"])


def build(root: Path, *, variants: int = 2, distractors: int = 200, originals: int | None = None,
          seed: int = 0) -> CopySet:
    """Write the set under ``root`` (deterministic for a seed) and return it."""
    root = Path(root)
    photos = dict(list(load_originals().items())[:originals])
    others = load_distractors(distractors)
    gallery: list[str] = []
    for name, im in photos.items():
        rel = f"{name}/{name}.png"
        (root / "gallery" / name).mkdir(parents=True, exist_ok=True)
        im.save(root / "gallery" / rel)
        gallery.append(rel)
    (root / "gallery" / DISTRACTOR_LABEL).mkdir(parents=True, exist_ok=True)
    for name, im in others.items():
        rel = f"{DISTRACTOR_LABEL}/{name}.png"
        im.save(root / "gallery" / rel)
        gallery.append(rel)
    queries, truth, kinds = [], [], []
    rng = np.random.default_rng(seed)
    for gi, (name, im) in enumerate(photos.items()):
        for kind, edit in EDITS.items():
            for v in range(variants):
                rel = f"{kind}/{name}_{v}.png"
                (root / "queries" / kind).mkdir(parents=True, exist_ok=True)
                edit(im, rng).save(root / "queries" / rel)
                queries.append(rel)
                truth.append(gi)
                kinds.append(kind)
    (root / MANIFEST).write_text(json.dumps({"gallery": gallery, "queries": queries, "truth": truth,
                                             "kinds": kinds, "seed": seed, "variants": variants}, indent=1))
    return CopySet(root, gallery, queries, truth, kinds)


# --- scoring --------------------------------------------------------------------------------


def ranks_from_scores(scores: np.ndarray, truth: Sequence[int]) -> np.ndarray:
    """0-based rank of each query's original in its row of ``scores`` (higher = more similar).

    Ties count against the original (it ranks after every gallery image scoring the same),
    so a model that scores everything alike cannot look good.
    """
    scores = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth)
    own = scores[np.arange(len(t)), t][:, None]
    better_or_tied = (scores >= own).sum(1) - 1
    return better_or_tied


def ranks_from_lists(results: Sequence[Sequence[str]], cs: CopySet) -> np.ndarray:
    """Ranks from ranked result paths (as the gateway returns them); not found = a large rank."""
    out = []
    for paths, t in zip(results, cs.truth):
        want = cs.gallery[t]
        out.append(list(paths).index(want) if want in paths else 10 ** 6)
    return np.asarray(out)


def metrics(ranks: np.ndarray, kinds: Sequence[str], k: int = 10) -> dict:
    """recall@1, recall@k and mAP@k (= MRR@k: one relevant image per query), overall and per edit."""
    ranks = np.asarray(ranks)
    kinds_arr = np.asarray(kinds)

    def block(r: np.ndarray) -> dict:
        return {"queries": int(len(r)), "recall@1": round(float((r == 0).mean()), 4),
                f"recall@{k}": round(float((r < k).mean()), 4),
                f"mAP@{k}": round(float(np.where(r < k, 1.0 / (r + 1), 0.0).mean()), 4)}

    out = block(ranks)
    out["per_edit"] = {kind: block(ranks[kinds_arr == kind]) for kind in EDITS if (kinds_arr == kind).any()}
    return out


def phash_scores(cs: CopySet) -> np.ndarray:
    """The baseline users reach for without a model: negative pHash Hamming distance."""
    import imagehash

    def h(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return imagehash.phash(im).hash.flatten()

    g = np.stack([h(cs.root / "gallery" / r) for r in cs.gallery])
    q = np.stack([h(cs.root / "queries" / r) for r in cs.queries])
    return -(q[:, None, :] != g[None, :, :]).sum(2).astype(np.float64)
