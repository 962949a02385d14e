"""The parity gate: an engine's embeddings against a reference's on a few fixed images.

Copied beside ``model.py`` with the engines that use it, and imported by ``imgsearch
export`` for :func:`parity_images`, so the export's check and the server's see the same
images. numpy only at import time: ONNX Runtime is imported when a reference needs it.
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

Embed = Callable[[np.ndarray], Optional[np.ndarray]]


def parity_images(n, size=224, seed=4321):
    """Noise and smooth gradients: both ends of what cameras produce (deterministic)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n // 2, n):
        c = rng.uniform(0, 1, (3, 3))
        smooth = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * np.sin(6 * xx * (k + 1)) for k in range(3)], -1)
        smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)
        imgs[i] = (smooth * 255).astype(np.uint8)
    return imgs


def min_cosine(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


@dataclass(frozen=True)
class Reference:
    """Where the reference embeddings come from.

    ``name`` goes into the log line (``parity vs <name>``), ``label`` into the message when
    an earlier reference is unusable. ``embed`` returns None where the reference does not
    apply (no ONNX file); an exception means it is broken here, and the next one is tried.
    """

    name: str
    label: str
    embed: Embed


def onnxruntime_cpu(onnx_path: Optional[str]) -> Reference:
    """The exported graph in ONNX Runtime on the CPU: what ``imgsearch export`` checked against PyTorch."""

    def embed(images):
        import onnxruntime as ort

        if not (onnx_path and os.path.exists(onnx_path)):
            return None
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        return sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: images})[0]

    return Reference("onnxruntime-cpu", "ONNX Runtime", embed)


def measure(run: Embed, references: Sequence[Reference], n: int = 4, size: int = 224,
            log: Callable[[str], None] = print) -> tuple[float, str]:
    """(min cosine of ``run``'s embeddings vs the first usable reference, that reference's name)."""
    imgs = parity_images(n, size)
    got = run(imgs)
    for i, ref in enumerate(references):
        try:
            expected = ref.embed(imgs)
        except Exception as e:  # noqa: BLE001 - broken here (a missing or mismatched package): the next reference
            if i + 1 == len(references):
                raise
            log(f"parity: {ref.label} unusable ({type(e).__name__}: {str(e)[:200]}); "
                f"using {references[i + 1].label}")
            continue
        if expected is not None:
            return min_cosine(got, expected), ref.name
    raise RuntimeError(f"parity: no usable reference among {[r.name for r in references]}")


@dataclass(frozen=True)
class ParityGate:
    """Refuses to serve an engine whose min cosine against the reference is under ``threshold``."""

    threshold: float
    n_images: int = 4
    input_size: int = 224

    @classmethod
    def from_params(cls, params: dict, input_size: int) -> "ParityGate":
        return cls(float(params.get("parity_min_cosine", "0.999")), int(params.get("parity_images", "4")), input_size)

    def check(self, run: Embed, references: Sequence[Reference], describe: Callable[[float, str], str],
              log: Callable[[str], None] = print) -> str:
        """The engine's start-up line (``describe(min cosine, reference name)``); raises when under the threshold."""
        cos, against = measure(run, references, self.n_images, self.input_size, log)
        msg = describe(cos, against)
        if not cos >= self.threshold:
            raise RuntimeError(f"parity check failed, refusing to serve: {msg}")
        return msg
