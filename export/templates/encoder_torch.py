"""The torch engine's model: ServingModel rebuilt from ``weights.pt``, batch buckets, CUDA graphs.

Copied beside ``model.py``; imported by ``imgsearch export`` (the ``weights.pt`` format it
writes) and, outside Triton, by the raw-model benchmark in bench/gpu.py. torch is imported
when an encoder is built, not at import time.
"""

import time

import numpy as np

from .encoder_parity import Reference, measure, onnxruntime_cpu

WEIGHTS_FORMAT = "imgsearch-serving/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            # fp32 convolutions may use TF32: the start-up parity gate (encoder_parity.py) says
            # whether that is close enough
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
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeddings of uint8 NHWC numpy images, through the buckets and graphs that serve."""
        return self.run([self.torch.from_numpy(images)])[0].numpy()

    def fp32_cpu(self) -> Reference:
        """The same weights in fp32 torch on the CPU: the reference when there is no usable ONNX graph."""

        def embed(images):
            torch = self.torch
            cpu = build_serving_module(self.meta)
            cpu.load_state_dict(self.meta["state_dict"], strict=True)
            with torch.no_grad():
                return cpu.eval()(torch.from_numpy(images))[0].numpy()

        return Reference("torch-fp32-cpu", "fp32 torch on the CPU", embed)

    def references(self, onnx_path):
        return [onnxruntime_cpu(onnx_path), self.fp32_cpu()]

    def parity(self, onnx_path, n=4):
        """Min cosine of this engine's embeddings vs ONNX Runtime on the CPU (or fp32 torch), and which."""
        return measure(self.embed, self.references(onnx_path), n, self.input_size, self.log)
