"""Triton Python-backend model: the image encoder, on the CPU or the GPU.

Copied by ``imgsearch export`` to ``<repository>/<model>/1/model.py``. The config that
Triton was started with (``--model-config-name``) picks the engine through its
``parameters``:

* ``configs/cpu.pbtxt`` (no ``engine`` parameter): the exported ONNX graph in ONNX Runtime
  on the CPU, tensors moved as numpy arrays (needs numpy<2 in the stub's environment).
* ``configs/gpu.pbtxt`` (``engine`` = ``auto``): ONNX Runtime with the TensorRT or CUDA EP
  when onnxruntime-gpu is installed; otherwise torch rebuilt from ``1/weights.pt`` (the
  same weights as the ONNX file; arch, head and embedding kind stored with them), fp16,
  channels_last, one CUDA graph per batch bucket (a batch is padded up to its bucket).
  Tensors move with DLPack, in and out, with no numpy copy; that also keeps clear of the
  numpy-2 trap of the stub (DESIGN.md), so this path works with numpy 2.
* ``engine`` = ``torch`` on a CPU instance runs the same torch code in fp32 without
  graphs: that is how the tests exercise the GPU engine's code on a machine without one.
* ``device`` = ``cuda`` makes a KIND_CPU instance compute on GPU 0 anyway (a fallback for a
  server build that refuses GPU instances); default ``auto`` follows the instance kind.

At start-up the torch engine is checked against the ONNX model (ONNX Runtime on the CPU,
or an fp32 torch reference when ONNX Runtime is missing) on a few images: a min cosine
under ``parity_min_cosine`` refuses to load, and the figure is written to Triton's log.

Dynamic batching hands ``execute`` several requests at once: they are stacked into one
engine call and split back. A malformed request gets its own error; the rest still run.

Imported outside Triton (the raw-model benchmark in bench/gpu.py), the module
gives :class:`TorchEncoder` without ``triton_python_backend_utils``.
"""

import json
import os
import time

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported as a library, outside Triton
    pb_utils = None

NUMPY_2_MESSAGE = (
    "numpy {version} in the Triton Python-backend environment corrupts tensors moved as numpy arrays; "
    "install numpy<2 in the environment whose python3 is first on the server's PATH, or use the torch "
    "engine (DLPack, configs/gpu.pbtxt)"
)
WEIGHTS_FORMAT = "imgsearch-serving/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def numpy_is_safe() -> bool:
    return int(np.__version__.split(".")[0]) < 2


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


def min_cosine(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


# --- torch engine ---------------------------------------------------------------------------


def build_serving_module(meta):
    """The exporter's ServingModel, rebuilt from what ``weights.pt`` records (no project import)."""
    import torch
    import torchvision
    from torch import nn

    def backbone():
        """(network returning pooled features, their width): a torchvision ResNet or timm's EfficientNet-Lite0."""
        if meta["arch"].startswith("efficientnet"):
            import timm  # the GPU image needs timm for this arch; a ResNet needs torchvision only

            net = timm.create_model("tf_" + meta["arch"], pretrained=False, num_classes=0)
            return net, net.num_features
        net = getattr(torchvision.models, meta["arch"])(weights=None)
        feats = net.fc.in_features
        net.fc = nn.Identity()
        return net, feats

    class Served(nn.Module):
        def __init__(self):
            super().__init__()
            net, feats = backbone()
            self.backbone = net
            head, n = meta["head"], int(meta["num_classes"])
            if head == "none":
                self.fc = nn.Identity()
            elif head == "linear":
                self.fc = nn.Linear(feats, n)
            else:  # Linear -> ReLU -> Dropout -> Linear, the original project's head
                hidden = int(meta["hidden"])
                self.fc = nn.Sequential(nn.Linear(feats, hidden), nn.ReLU(inplace=True), nn.Dropout(0.0),
                                        nn.Linear(hidden, n))
            self.head = head
            self.embedding = meta["embedding"]
            mean, std = meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD)
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
            self.compute_dtype = torch.float32

        def forward(self, images):
            # NHWC uint8 permuted to NCHW *is* channels_last in memory: no layout copy
            x = images.permute(0, 3, 1, 2).to(torch.float32)
            x = ((x - self.mean) / self.std).to(self.compute_dtype)
            pooled = self.backbone(x)
            if self.head == "none":
                return (nn.functional.normalize(pooled.float(), dim=1),)
            if self.head == "mlp":
                hidden = self.fc[1](self.fc[0](pooled))
                logits = self.fc[3](self.fc[2](hidden))
            else:
                hidden = pooled
                logits = self.fc(pooled)
            emb = {"pool": pooled, "head": hidden, "logits": logits}[self.embedding]
            return nn.functional.normalize(emb.float(), dim=1), torch.softmax(logits.float(), dim=1)

    return Served()


def load_weights(path):
    """``weights.pt`` as the exporter wrote it; ``weights_only=True``: no code is unpickled."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        raise RuntimeError(f"{path} is not an imgsearch serving checkpoint (format {WEIGHTS_FORMAT}); re-run imgsearch export")
    return obj


class TorchEncoder:
    """ServingModel in torch on one device; ``run(uint8 NHWC) -> [embedding, probs?]`` on the host.

    ``buckets``: batch sizes with static buffers (and a CUDA graph each when ``cuda_graphs``).
    A batch is padded up to the smallest bucket that holds it; a batch over the largest
    bucket runs in several pieces. Without buckets the batch runs eagerly as it comes.
    """

    def __init__(self, weights_path, device="cuda", precision="fp16", cuda_graphs=True, buckets=(),
                 input_size=224, log=print):
        import torch

        self.torch = torch
        self.log = log
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, not {precision!r}")
        if precision == "fp16" and not self.on_cuda:
            raise ValueError("fp16 needs a GPU; use precision fp32 on the CPU")
        self.meta = load_weights(weights_path)
        self.precision = precision
        self.input_size = input_size
        if self.on_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            # fp32 convolutions may use TF32: the parity gate below says whether that is close enough
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model = build_serving_module(self.meta)
        model.load_state_dict(self.meta["state_dict"], strict=True)
        model.eval()
        if precision == "fp16":
            model.backbone.half()
            model.fc.half()
            model.compute_dtype = torch.float16
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.n_outputs = 1 if self.meta["head"] == "none" else 2
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.cuda_graphs = bool(cuda_graphs and self.on_cuda and self.buckets)
        self.static = {}  # bucket -> (input buffer, outputs, graph or None)
        self.pinned_in = None
        t0 = time.perf_counter()
        if self.buckets:
            self._prepare_buckets()
        self.prepare_s = time.perf_counter() - t0

    # --- set-up -------------------------------------------------------------------------
    def _prepare_buckets(self):
        torch = self.torch
        s = self.input_size
        pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        with torch.no_grad():
            # largest first: the smaller graphs reuse the shared memory pool
            for b in sorted(self.buckets, reverse=True):
                x = torch.zeros(b, s, s, 3, dtype=torch.uint8, device=self.device)
                graph = None
                if self.cuda_graphs:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):  # cudnn picks its kernels before capture
                            self.model(x)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        outs = self.model(x)
                else:
                    outs = None
                self.static[b] = (x, outs, graph)
            if self.on_cuda:
                torch.cuda.synchronize()
                biggest = self.buckets[-1]
                # host staging: one memcpy per request, then a single async H2D copy
                self.pinned_in = torch.empty(biggest, s, s, 3, dtype=torch.uint8).pin_memory()
                self.pinned_out = [torch.empty(biggest, int(o.shape[1]), dtype=torch.float32).pin_memory()
                                   for o in self._outputs_for(biggest)]

    def _outputs_for(self, b):
        x, outs, _graph = self.static[b]
        if outs is None:
            with self.torch.no_grad():
                outs = self.model(x)
        return outs

    def bucket_for(self, n):
        for b in self.buckets:
            if b >= n:
                return b
        return self.buckets[-1]

    # --- running ------------------------------------------------------------------------
    def run_device(self, b):
        """Replay bucket ``b`` on its static input (device only): the raw-model figure."""
        torch = self.torch
        x, outs, graph = self.static[b]
        with torch.no_grad():
            if graph is not None:
                graph.replay()
                return outs
            return self.model(x)

    def run(self, parts):
        """``parts``: uint8 [n_i, H, W, 3] tensors (host or device). Returns host float32 outputs
        for the concatenated batch, one tensor per model output."""
        torch = self.torch
        total = sum(int(p.shape[0]) for p in parts)
        if not self.buckets:
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
            with torch.no_grad():
                outs = self.model(x.to(self.device, non_blocking=True))
            return [o.float().cpu() for o in outs]
        results = [[] for _ in range(self.n_outputs)]
        # split the batch into pieces of at most the biggest bucket, each padded to its bucket
        pieces = self._pieces(parts, self.buckets[-1])
        for piece in pieces:
            n = sum(int(p.shape[0]) for p in piece)
            b = self.bucket_for(n)
            x, _outs, _graph = self.static[b]
            self._fill(x, piece)
            outs = self.run_device(b)
            for k, o in enumerate(outs):
                results[k].append(self._to_host(o, n, k))
        if self.on_cuda:
            torch.cuda.current_stream().synchronize()
        out = [r[0] if len(r) == 1 else torch.cat(r) for r in results]
        assert out[0].shape[0] == total
        return out

    @staticmethod
    def _pieces(parts, limit):
        pieces, cur, size = [], [], 0
        for p in parts:
            start = 0
            n = int(p.shape[0])
            while start < n:
                take = min(n - start, limit - size)
                cur.append(p[start:start + take])
                size += take
                start += take
                if size == limit:
                    pieces.append(cur)
                    cur, size = [], 0
        if cur:
            pieces.append(cur)
        return pieces

    def _fill(self, x, piece):
        """Copy the piece into the bucket's static input (rows past it keep stale data: rows are independent)."""
        off = 0
        if self.on_cuda and all(not p.is_cuda for p in piece):
            stage = self.pinned_in
            for p in piece:
                k = int(p.shape[0])
                stage[off:off + k].copy_(p)
                off += k
            x[:off].copy_(stage[:off], non_blocking=True)
            return
        for p in piece:
            k = int(p.shape[0])
            x[off:off + k].copy_(p, non_blocking=True)
            off += k

    def _to_host(self, o, n, k):
        if not self.on_cuda:
            return o[:n].float().clone()
        # pinned staging, then a private copy: the next replay overwrites both buffers
        buf = self.pinned_out[k][:n]
        buf.copy_(o[:n], non_blocking=True)
        self.torch.cuda.current_stream().synchronize()
        return buf.clone()

    # --- parity -------------------------------------------------------------------------
    def parity(self, onnx_path, n=4, output_names=None):
        """Min cosine of this engine's embeddings vs ONNX Runtime on the CPU (or fp32 torch)."""
        torch = self.torch
        imgs = parity_images(n, self.input_size)
        got = self.run([torch.from_numpy(imgs)])[0].numpy()
        ref, against = None, None
        try:
            import onnxruntime as ort

            if onnx_path and os.path.exists(onnx_path):
                sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
                ref = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: imgs})[0]
                against = "onnxruntime-cpu"
        except Exception as e:  # noqa: BLE001 - no (working) ONNX Runtime here: the fp32 torch reference
            self.log(f"parity: ONNX Runtime unusable ({type(e).__name__}: {str(e)[:200]}); using fp32 torch on the CPU")
        if ref is None:
            cpu = build_serving_module(self.meta)
            cpu.load_state_dict(self.meta["state_dict"], strict=True)
            with torch.no_grad():
                ref = cpu.eval()(torch.from_numpy(imgs))[0].numpy()
            against = "torch-fp32-cpu"
        return min_cosine(got, ref), against


# --- ONNX Runtime ---------------------------------------------------------------------------


def ort_session(path, params, instance_kind, device_id, gpu):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if gpu:
        if "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        if "TensorrtExecutionProvider" in available:
            cache = params.get("trt_cache_path", "/tmp/trt_cache")
            providers.insert(0, ("TensorrtExecutionProvider", {
                "device_id": device_id, "trt_fp16_enable": params.get("precision", "fp16") == "fp16",
                "trt_engine_cache_enable": True, "trt_engine_cache_path": cache}))
    elif instance_kind == "GPU" and "CUDAExecutionProvider" in available:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    return ort.InferenceSession(path, opts, providers=providers)


def ort_has_gpu():
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


# --- the Triton model -----------------------------------------------------------------------


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.logger = pb_utils.Logger
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        self.input = config["input"][0]
        self.input_shape = tuple(int(d) for d in self.input["dims"])
        self.output_names = [o["name"] for o in config["output"]]
        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        if params.get("device", "auto") == "cuda":
            # a KIND_CPU instance that still computes on GPU 0 (for servers without GPU instance support)
            kind = "GPU"
        engine = params.get("engine", "onnxruntime")
        if engine == "auto":
            engine = self._pick_engine(kind, onnx_path)
        self.engine_name = engine
        if engine == "torch":
            self._init_torch(params, kind, device_id, version_dir, onnx_path)
        elif engine in ("onnxruntime", "onnxruntime-gpu"):
            self._init_ort(params, kind, device_id, onnx_path, gpu=engine == "onnxruntime-gpu")
        else:
            raise RuntimeError(f"unknown engine {engine!r} (auto, torch, onnxruntime, onnxruntime-gpu)")

    def _pick_engine(self, kind, onnx_path):
        # an export without ONNX (imgsearch export --no-onnx) leaves the torch engine only
        if kind == "GPU" and os.path.exists(onnx_path) and ort_has_gpu():
            return "onnxruntime-gpu"
        try:
            import torch

            if kind == "GPU" and torch.cuda.is_available():
                return "torch"
        except ImportError:
            pass
        return "onnxruntime"

    def _init_ort(self, params, kind, device_id, path, gpu):
        # torch (when there) moves tensors with DLPack; else numpy, which must be < 2
        self.io = "numpy"
        if gpu:
            try:
                import torch  # noqa: F401

                self.io = "dlpack"
            except ImportError:
                pass
        if self.io == "numpy" and not numpy_is_safe():
            raise RuntimeError(NUMPY_2_MESSAGE.format(version=np.__version__))
        self.session = ort_session(path, params, kind, device_id, gpu)
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise RuntimeError(f"config outputs {missing} are not in {path} (graph has {sorted(graph_outputs)})")
        if self.io == "dlpack":
            self._dlpack_setup()
        self.logger.log_info(f"loaded {path} with {self.session.get_providers()[0]}, outputs {self.output_names}, "
                             f"tensors via {self.io}")

    def _init_torch(self, params, kind, device_id, version_dir, onnx_path):
        import torch

        self._dlpack_setup()
        self.io = "dlpack"
        device = f"cuda:{device_id}" if kind == "GPU" else "cpu"
        if kind == "GPU" and not torch.cuda.is_available():
            raise RuntimeError("a GPU instance, but torch sees no CUDA device")
        buckets = [int(b) for b in params.get("graph_buckets", "").split(",") if b.strip()]
        precision = params.get("precision", "fp16" if kind == "GPU" else "fp32")
        graphs = params.get("cuda_graphs", "true").lower() in ("1", "true", "yes")
        weights = os.path.join(version_dir, params.get("weights_file", "weights.pt"))
        if not os.path.exists(weights):
            raise RuntimeError(f"{weights} is missing: the torch engine needs it (re-run imgsearch export)")
        self.encoder = TorchEncoder(weights, device, precision, graphs, buckets, self.input_shape[0],
                                    log=self.logger.log_info)
        names = ["embedding", "probs"][: self.encoder.n_outputs]
        if names != self.output_names:
            raise RuntimeError(f"config outputs {self.output_names} but {weights} gives {names}")
        threshold = float(params.get("parity_min_cosine", "0.999"))
        cos, against = self.encoder.parity(onnx_path, int(params.get("parity_images", "4")))
        msg = (f"torch engine on {device}: {self.encoder.meta['arch']} {precision}, channels_last, "
               f"cuda graphs {'on' if self.encoder.cuda_graphs else 'off'}, buckets {list(self.encoder.buckets)} "
               f"(prepared in {self.encoder.prepare_s:.1f}s), tensors via dlpack; "
               f"parity vs {against}: min cosine {cos:.6f} (threshold {threshold})")
        if not cos >= threshold:
            raise RuntimeError(f"parity check failed, refusing to serve: {msg}")
        self.logger.log_info(msg)

    def _dlpack_setup(self):
        import torch
        from torch.utils import dlpack

        self.torch = torch
        self.dlpack = dlpack

    # --- per request --------------------------------------------------------------------
    def _check(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input["name"])
        if tensor is None:
            raise ValueError(f"missing input {self.input['name']!r}")
        if self.io == "dlpack":
            arr = self.dlpack.from_dlpack(tensor.to_dlpack())
            ok_dtype = arr.dtype == self.torch.uint8
        else:
            arr = tensor.as_numpy()
            ok_dtype = arr.dtype == np.uint8
        if not ok_dtype:
            raise ValueError(f"input must be uint8, got {arr.dtype}")
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape or arr.shape[0] == 0:
            raise ValueError(f"input shape must be [N, {', '.join(map(str, self.input_shape))}], got {list(arr.shape)}")
        return arr

    def _infer(self, arrays):
        if self.engine_name == "torch":
            return self.encoder.run(arrays)
        if self.io == "dlpack":
            torch = self.torch
            batch = (arrays[0] if len(arrays) == 1 else torch.cat(arrays)).numpy()
            outs = self.session.run(self.output_names, {self.input["name"]: batch})
            return [torch.from_numpy(o) for o in outs]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return self.session.run(self.output_names, {self.input["name"]: batch})

    def _tensor(self, name, value):
        if self.io == "dlpack":
            return pb_utils.Tensor.from_dlpack(name, self.dlpack.to_dlpack(value.contiguous()))
        return pb_utils.Tensor(name, np.ascontiguousarray(value))

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            try:
                arrays.append(self._check(request))
                owners.append(i)
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if arrays:
            try:
                outputs = self._infer(arrays)
            except Exception as e:  # noqa: BLE001 - report per request, keep serving
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {e}"))
            else:
                start = 0
                for i, arr in zip(owners, arrays):
                    end = start + int(arr.shape[0])
                    responses[i] = pb_utils.InferenceResponse(
                        [self._tensor(name, out[start:end]) for name, out in zip(self.output_names, outputs)])
                    start = end
        return responses

    def finalize(self):
        self.session = None
        self.encoder = None
