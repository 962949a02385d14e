"""The encoder's engines behind one interface, picked by the config's ``engine`` parameter.

Copied beside ``model.py``, which Triton imports as ``<version>.model``: the relative
imports here resolve inside the version folder, never against a same-named module in
site-packages. No ``triton_python_backend_utils`` import, so the engines load outside
Triton too (tests, the raw-model benchmark).

Engines (``ENGINES``, keyed by the ``engine`` parameter; ``auto`` picks one of them):

* ``onnxruntime``: the exported ONNX graph on the CPU (or the CUDA EP on a GPU instance),
  tensors moved as numpy arrays, which needs numpy<2 in the stub's environment.
* ``onnxruntime-gpu``: the same graph with the TensorRT or CUDA EP (onnxruntime-gpu);
  tensors via DLPack when torch is there.
* ``torch``: the model rebuilt from ``weights.pt`` (encoder_torch.py), fp16 + CUDA graphs on
  a GPU, fp32 on a CPU instance; tensors via DLPack. Guarded by the parity gate
  (encoder_parity.py): the ONNX graph was checked at export, the rebuilt model is not.
"""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from .encoder_parity import ParityGate
from .encoder_torch import TorchEncoder

AUTO = "auto"
NUMPY_2_MESSAGE = (
    "numpy {version} in the Triton Python-backend environment corrupts tensors moved as numpy arrays; "
    "install numpy<2 in the environment whose python3 is first on the server's PATH, or use the torch "
    "engine (DLPack, configs/gpu.pbtxt)"
)


def numpy_is_safe() -> bool:
    return int(np.__version__.split(".")[0]) < 2


# --- what an engine is given ----------------------------------------------------------------


@dataclass(frozen=True)
class EngineContext:
    """What the model config and Triton's ``initialize`` arguments tell an engine."""

    params: dict
    kind: str  # "CPU" or "GPU": where the engine computes
    device_id: int
    version_dir: str
    input_name: str
    input_shape: tuple
    output_names: list
    log: Callable[[str], None] = print

    @classmethod
    def from_triton(cls, args: dict, config: dict, log: Callable[[str], None] = print) -> "EngineContext":
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = args.get("model_instance_kind", "CPU")
        if params.get("device", "auto") == "cuda":
            # a KIND_CPU instance that still computes on GPU 0 (for servers without GPU instance support)
            kind = "GPU"
        return cls(
            params=params, kind=kind, device_id=int(args.get("model_instance_device_id", 0) or 0),
            version_dir=os.path.join(args["model_repository"], args["model_version"]),
            input_name=config["input"][0]["name"],
            input_shape=tuple(int(d) for d in config["input"][0]["dims"]),
            output_names=[o["name"] for o in config["output"]], log=log,
        )

    @property
    def onnx_path(self) -> str:
        return os.path.join(self.version_dir, self.params.get("onnx_file", "model.onnx"))


# --- how Triton tensors reach an engine -----------------------------------------------------


class NumpyIO:
    """Tensors as numpy arrays (``as_numpy``): a copy each way, and numpy<2 in the stub."""

    name = "numpy"

    def take(self, tensor):
        return tensor.as_numpy()

    def is_uint8(self, arr) -> bool:
        return arr.dtype == np.uint8

    def concat(self, parts):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def to_numpy(self, arr):
        return arr

    def from_numpy(self, arr):
        return arr

    def give(self, tensor_cls, name, value):
        return tensor_cls(name, np.ascontiguousarray(value))


class DlpackIO:
    """Tensors as torch tensors through DLPack, in and out: no numpy on the path."""

    name = "dlpack"

    def __init__(self):
        import torch
        from torch.utils import dlpack

        self.torch = torch
        self.dlpack = dlpack

    def take(self, tensor):
        return self.dlpack.from_dlpack(tensor.to_dlpack())

    def is_uint8(self, arr) -> bool:
        return arr.dtype == self.torch.uint8

    def concat(self, parts):
        return parts[0] if len(parts) == 1 else self.torch.cat(parts)

    def to_numpy(self, arr):
        return arr.numpy()

    def from_numpy(self, arr):
        return self.torch.from_numpy(arr)

    def give(self, tensor_cls, name, value):
        return tensor_cls.from_dlpack(name, self.dlpack.to_dlpack(value.contiguous()))


def checked_input(io, tensor, name: str, shape: tuple):
    """The request's input as the engine takes it; ValueError (the client's fault) when malformed."""
    if tensor is None:
        raise ValueError(f"missing input {name!r}")
    arr = io.take(tensor)
    if not io.is_uint8(arr):
        raise ValueError(f"input must be uint8, got {arr.dtype}")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape or arr.shape[0] == 0:
        raise ValueError(f"input shape must be [N, {', '.join(map(str, shape))}], got {list(arr.shape)}")
    return arr


# --- the engines ----------------------------------------------------------------------------


class Engine(ABC):
    """One way to run the encoder: ``load`` once, then ``run(parts) -> outputs`` per batch.

    ``parts``: the uint8 [n_i, H, W, 3] inputs of one dynamic batch, in ``io``'s array type;
    the result: one array per config output (in ``ctx.output_names`` order) for the
    concatenated batch, in the same type.
    """

    name: ClassVar[str]

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx
        self.io = None

    @abstractmethod
    def load(self) -> None:
        """Build the engine; raises (Triton then refuses the model) when it cannot serve."""

    @abstractmethod
    def run(self, parts: list) -> list:
        """Outputs for the concatenated batch."""

    def close(self) -> None:
        """Drop what ``load`` built."""


class OnnxRuntimeEngine(Engine):
    """The exported ONNX graph in ONNX Runtime: CPU EP (CUDA EP on a GPU instance when available)."""

    name = "onnxruntime"
    gpu = False

    def load(self) -> None:
        ctx = self.ctx
        # torch (when there) moves tensors with DLPack; else numpy, which must be < 2
        self.io = NumpyIO()
        if self.gpu:
            try:
                self.io = DlpackIO()
            except ImportError:
                pass
        if self.io.name == "numpy" and not numpy_is_safe():
            raise RuntimeError(NUMPY_2_MESSAGE.format(version=np.__version__))
        path = ctx.onnx_path
        self.session = self._session(path)
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in ctx.output_names if n not in graph_outputs]
        if missing:
            raise RuntimeError(f"config outputs {missing} are not in {path} (graph has {sorted(graph_outputs)})")
        ctx.log(f"loaded {path} with {self.session.get_providers()[0]}, outputs {ctx.output_names}, "
                f"tensors via {self.io.name}")

    def _session(self, path):
        import onnxruntime as ort

        params, device_id = self.ctx.params, self.ctx.device_id
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        if (self.gpu or self.ctx.kind == "GPU") and "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        if self.gpu and "TensorrtExecutionProvider" in available:
            cache = params.get("trt_cache_path", "/tmp/trt_cache")
            providers.insert(0, ("TensorrtExecutionProvider", {
                "device_id": device_id, "trt_fp16_enable": params.get("precision", "fp16") == "fp16",
                "trt_engine_cache_enable": True, "trt_engine_cache_path": cache}))
        return ort.InferenceSession(path, opts, providers=providers)

    def run(self, parts: list) -> list:
        batch = self.io.to_numpy(self.io.concat(parts))
        outs = self.session.run(self.ctx.output_names, {self.ctx.input_name: batch})
        return [self.io.from_numpy(o) for o in outs]

    def close(self) -> None:
        self.session = None


class OnnxRuntimeGpuEngine(OnnxRuntimeEngine):
    """The ONNX graph with the TensorRT EP (fp16 by ``precision``) or the CUDA EP of onnxruntime-gpu."""

    name = "onnxruntime-gpu"
    gpu = True


class TorchEngine(Engine):
    """:class:`TorchEncoder` from ``weights.pt``, admitted by the parity gate."""

    name = "torch"

    def load(self) -> None:
        ctx, params = self.ctx, self.ctx.params
        self.io = DlpackIO()
        torch = self.io.torch
        gpu = ctx.kind == "GPU"
        device = f"cuda:{ctx.device_id}" if gpu else "cpu"
        if gpu and not torch.cuda.is_available():
            raise RuntimeError("a GPU instance, but torch sees no CUDA device")
        buckets = [int(b) for b in params.get("graph_buckets", "").split(",") if b.strip()]
        precision = params.get("precision", "fp16" if gpu else "fp32")
        graphs = params.get("cuda_graphs", "true").lower() in ("1", "true", "yes")
        weights = os.path.join(ctx.version_dir, params.get("weights_file", "weights.pt"))
        if not os.path.exists(weights):
            raise RuntimeError(f"{weights} is missing: the torch engine needs it (re-run imgsearch export)")
        enc = TorchEncoder(weights, device, precision, graphs, buckets, ctx.input_shape[0], log=ctx.log)
        self.encoder = enc
        names = ["embedding", "probs"][: enc.n_outputs]
        if names != ctx.output_names:
            raise RuntimeError(f"config outputs {ctx.output_names} but {weights} gives {names}")
        gate = ParityGate.from_params(params, ctx.input_shape[0])

        def describe(cos, against):
            return (f"torch engine on {device}: {enc.meta['arch']} {precision}, channels_last, "
                    f"cuda graphs {'on' if enc.cuda_graphs else 'off'}, buckets {list(enc.buckets)} "
                    f"(prepared in {enc.prepare_s:.1f}s), tensors via dlpack; "
                    f"parity vs {against}: min cosine {cos:.6f} (threshold {gate.threshold})")

        ctx.log(gate.check(enc.embed, enc.references(ctx.onnx_path), describe, log=ctx.log))

    def run(self, parts: list) -> list:
        return self.encoder.run(parts)

    def close(self) -> None:
        self.encoder = None


ENGINES: dict[str, type[Engine]] = {cls.name: cls for cls in (TorchEngine, OnnxRuntimeEngine, OnnxRuntimeGpuEngine)}


def ort_has_gpu() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


def pick_engine(kind: str, onnx_path: str) -> str:
    """What ``auto`` means on this instance."""
    # an export without ONNX (imgsearch export --no-onnx) leaves the torch engine only
    if kind == "GPU" and os.path.exists(onnx_path) and ort_has_gpu():
        return OnnxRuntimeGpuEngine.name
    try:
        import torch

        if kind == "GPU" and torch.cuda.is_available():
            return TorchEngine.name
    except ImportError:
        pass
    return OnnxRuntimeEngine.name


def engine_class(name: str, kind: str = "CPU", onnx_path: str = "") -> type[Engine]:
    """The class for the ``engine`` parameter ``name`` (``auto`` resolved for ``kind``)."""
    if name == AUTO:
        name = pick_engine(kind, onnx_path)
    try:
        return ENGINES[name]
    except KeyError:
        raise RuntimeError(f"unknown engine {name!r} ({', '.join([AUTO, *ENGINES])})") from None


def create_engine(ctx: EngineContext) -> Engine:
    """The engine the config asks for, not yet loaded (no ``engine`` parameter: ONNX Runtime)."""
    return engine_class(ctx.params.get("engine", OnnxRuntimeEngine.name), ctx.kind, ctx.onnx_path)(ctx)
