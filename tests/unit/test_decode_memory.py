"""Decoding memory: small files that decode to huge rasters, and the budget shared by decodes.

Peaks are measured in a fresh process (its peak RSS, ``VmHWM``, after a warm-up decode, then
after the decode under test), so nothing else in the test run moves them. Linux only.
"""

from __future__ import annotations

import io
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import huge_jpeg, huge_png, image_bytes, load_module, png_bytes
from imgsearch.errors import DecodeBusy
from imgsearch.imaging import DecodeBudget, _to_rgb, decode_image

SIDE = 7000  # 49 MP: under the 50 MP limit
PEAK = """
import io, re, sys
from imgsearch.imaging import decode_image, thumbnail
from PIL import Image

def hwm():  # this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

warm = []
for fmt in ("PNG", "JPEG"):
    buf = io.BytesIO(); Image.new("RGB", (640, 480), (1, 2, 3)).save(buf, fmt); warm.append(buf.getvalue())
path, where = sys.argv[1], sys.argv[2]
fast = lambda: 0  # how many files took the preprocess model's fast (torchvision) path
def decode(f):
    decode_image(f.read())
if where in ("pillow", "torchvision"):  # Triton's preprocess model, as its Python backend runs it
    import importlib.util
    spec = importlib.util.spec_from_file_location("preprocess_decoder", sys.argv[3])
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    decoder = mod.Decoder(where)
    fast = lambda: decoder.stats["fast"]
    def decode(f):
        out = decoder.decode([f.read()])[0]
        assert not isinstance(out, Exception), out
elif where == "thumb":  # the gateway's /thumb: from the open file, as Pillow reads it
    def decode(f):
        thumbnail(f)
for w in warm:
    decode(io.BytesIO(w))  # imports and first-use allocations out of the way
with open(path, "rb") as f:
    before = fast()
    base = hwm()
    decode(f)
print(hwm() - base, fast() - before)
"""
TEMPLATE = Path(__file__).parents[2] / "export" / "templates" / "preprocess_decoder.py"


@pytest.mark.parametrize(("mode", "where"), [("I;16", "gateway"), ("RGBA", "gateway"), ("P", "gateway"),
                                             ("RGB", "gateway"), ("I;16", "pillow"), ("RGBA", "pillow"),
                                             ("JPEG", "torchvision"), ("I;16", "thumb"), ("RGBA", "thumb"),
                                             ("P", "thumb")])
def test_one_decode_peaks_under_twice_its_8bit_rgb_raster(mode, where, tmp_path):
    """``where``: the gateway's decode_image, its /thumb, or Triton's preprocess model with that
    decoder (torchvision: its batched JPEG path, on the CPU here, nvJPEG on a GPU)."""
    path = tmp_path / "huge"
    path.write_bytes(huge_jpeg(SIDE) if mode == "JPEG" else huge_png(mode, SIDE))
    args = [str(path), where] + ([str(TEMPLATE)] if where in ("pillow", "torchvision") else [])
    out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, fast = map(int, out.stdout.split())
    assert fast == (where == "torchvision"), "the file under test took the other path"
    raster = SIDE * SIDE * 3
    print(f"{mode} ({where}): file {path.stat().st_size / 1e3:.0f} KB, decode peak +{peak / 2**20:.0f} MiB "
          f"({peak / raster:.2f}x the {raster / 2**20:.0f} MiB RGB raster)")
    assert peak <= 2 * raster, (mode, peak)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16", "P"])
def test_shrinking_first_gives_what_converting_first_gave(mode):
    """The shrink-first path agrees with the full-size convert-then-resize it replaces."""
    rng = np.random.default_rng(3)
    w, h = 1500, 1100
    base = rng.integers(0, 256, (h // 50, w // 50, 4), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base, "RGBA").resize((w, h), Image.Resampling.BILINEAR))
    im = Image.fromarray(big, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "I;16":
        im = Image.fromarray(big[..., 0].astype(np.uint16) * 200)
    elif mode == "P":
        im = im.convert("RGB").convert("P")
    data = png_bytes(im)
    want = np.asarray(_to_rgb(Image.open(io.BytesIO(data))).resize((224, 224), Image.Resampling.BILINEAR),
                      dtype=np.float32)
    got = decode_image(data).astype(np.float32)
    assert np.abs(got - want).mean() < 2.0, np.abs(got - want).mean()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_allocations_can_be_unmapped_on_glibc():
    # in a child: the setting is process-wide, and this process measures nothing with it
    code = "from imgsearch.imaging import unmap_large_allocations as u; print(u())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]  # found mallopt, and glibc took the setting


def test_the_budget_is_shared_and_a_decode_waits_then_gives_up():
    budget = DecodeBudget(100, wait_s=0.2)
    with budget.hold(60):
        t0 = time.monotonic()
        with pytest.raises(DecodeBusy):
            with budget.hold(60):
                pass
        assert time.monotonic() - t0 >= 0.2
        with budget.hold(40):  # what is left still serves a smaller one
            assert budget.used == 100
    with budget.hold(10_000):  # larger than the whole budget: runs, alone
        assert budget.used == 100

    released = threading.Event()
    waiting = DecodeBudget(100, wait_s=30)

    def later():
        with waiting.hold(100):
            released.wait(10)

    t = threading.Thread(target=later)
    t.start()
    while waiting.used == 0:
        time.sleep(0.001)
    threading.Timer(0.05, released.set).start()
    with waiting.hold(100):  # waits for the other, then runs
        assert waiting.used == 100
    t.join()
    assert waiting.peak == 100


def jpeg_of(w: int, h: int, seed: int, orientation: int = 1) -> bytes:
    """A JPEG of smooth random colour blobs (detail at about 1/40 of the side)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    ex = Image.Exif()
    ex[0x0112] = orientation
    return image_bytes(im, "JPEG", quality=90, exif=ex.tobytes())


def test_torchvision_path_shrinks_as_pillow_does_within_the_ensemble_tolerance():
    """Large and lopsided JPEGs through the preprocess model's torchvision path (averaged down
    in uint8 strips, then resized) against decode_image: the tolerance of the ensemble tests."""
    dec = load_module(TEMPLATE, "preprocess_decoder").Decoder("torchvision", "cpu")
    files = [jpeg_of(3000, 2000, 1), jpeg_of(1001, 677, 2), jpeg_of(5000, 300, 3), jpeg_of(300, 2500, 4),
             jpeg_of(449, 448, 5), jpeg_of(2400, 1600, 6, orientation=6), jpeg_of(1800, 2400, 7, orientation=7)]
    got = dec.decode(files)
    assert dec.stats["fast"] == len(files), dec.stats
    for k, (data, px) in enumerate(zip(files, got)):
        diff = np.abs(px.astype(int) - decode_image(data).astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 20, (k, diff.mean(), diff.max())


def test_torchvision_path_decodes_a_batch_in_chunks_under_its_memory_budget():
    mod = load_module(TEMPLATE, "preprocess_decoder")
    assert list(mod.raster_chunks([5, 5, 20, 3, 3, 3, 9], 10)) == [[0, 1], [2], [3, 4, 5], [6]]
    files = [jpeg_of(900, 700, s) for s in range(5)] + [jpeg_of(1600, 1200, 9), jpeg_of(640, 480, 10)]
    whole = mod.Decoder("torchvision", "cpu").decode(files)
    budget = 900 * 700 * 3 * 2
    dec = mod.Decoder("torchvision", "cpu", memory_bytes=budget)
    calls = []
    decode_jpeg = dec.tvio.decode_jpeg

    class Spy:  # the module the decoder calls, recording what each decode call holds
        ImageReadMode = dec.tvio.ImageReadMode

        @staticmethod
        def decode_jpeg(datas, **kw):
            imgs = decode_jpeg(datas, **kw)
            calls.append(sum(img.numel() for img in imgs))
            return imgs

    dec.tvio = Spy
    chunked = dec.decode(files)
    one = 900 * 700 * 3
    # 2 + 2 + 1 of 900x700; the 1600x1200, larger than the budget, alone; then the 640x480
    assert calls == [2 * one, 2 * one, one, 1600 * 1200 * 3, 640 * 480 * 3], calls
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
