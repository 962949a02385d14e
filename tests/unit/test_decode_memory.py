"""Decoding memory: small files that decode to huge rasters, and the budget shared by decodes.

Peaks are measured in a fresh process (its peak RSS, ``VmHWM``, after a warm-up decode, then
after the decode under test), so nothing else in the test run moves them. Linux only.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import huge_png, png_bytes
from imgsearch.errors import DecodeBusy
from imgsearch.imaging import DecodeBudget, _to_rgb, decode_image

SIDE = 7000  # 49 MP: under the 50 MP limit
PEAK = """
import io, re, sys
from imgsearch.imaging import decode_image, thumbnail
from PIL import Image

def hwm():  # this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

buf = io.BytesIO(); Image.new("RGB", (640, 480), (1, 2, 3)).save(buf, "PNG")
path, where = sys.argv[1], sys.argv[2]
def decode(f):
    decode_image(f.read())
if where == "triton":  # Triton's preprocess model, as its Python backend runs it
    import importlib.util
    spec = importlib.util.spec_from_file_location("preprocess_model", sys.argv[3])
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    decoder = mod.Decoder("pillow")
    def decode(f):
        out = decoder.decode([f.read()])[0]
        assert not isinstance(out, Exception), out
elif where == "thumb":  # the gateway's /thumb: from the open file, as Pillow reads it
    def decode(f):
        thumbnail(f)
decode(io.BytesIO(buf.getvalue()))  # imports and first-use allocations out of the way
with open(path, "rb") as f:
    base = hwm()
    decode(f)
print(hwm() - base)
"""
TEMPLATE = Path(__file__).parents[2] / "export" / "templates" / "preprocess_model.py"


@pytest.mark.parametrize(("mode", "where"), [("I;16", "gateway"), ("RGBA", "gateway"), ("P", "gateway"),
                                             ("RGB", "gateway"), ("I;16", "triton"), ("RGBA", "triton"),
                                             ("I;16", "thumb"), ("RGBA", "thumb"), ("P", "thumb")])
def test_one_decode_peaks_under_twice_its_8bit_rgb_raster(mode, where, tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png(mode, SIDE))
    args = [str(path), where] + ([str(TEMPLATE)] if where == "triton" else [])
    out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.strip())
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
