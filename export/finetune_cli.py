"""Fine-tune the last stage(s) + the classifier head of a ResNet or EfficientNet-Lite0 on labelled image folders.

The original project's recipe: every layer frozen except layer4 and the head
Linear(F,256) -> ReLU -> Dropout -> Linear(256,C). EfficientNet-Lite0 trains its last two
block stages and head conv instead of layer4. AdamW, ReduceLROnPlateau, early
stopping on validation loss, random-resized-crop + flip augmentation; mixed precision on
CUDA. Images go through the gateway's decoder and the ONNX graph's normalisation, so the
model trains on the pixels it will be served.

--data is an ImageFolder tree: DIR/<class>/<image>. Stanford Dogs works as is; a folder
n02085620-Chihuahua gives the class name Chihuahua (what labels.txt will say).

The checkpoint is rewritten atomically after every epoch (best weights by val loss +
the state to resume); it loads with torch.load(weights_only=True) and exports with
`imgsearch export --weights ckpt.pt`.

examples:
  imgsearch finetune --data data/stanford-dogs/Images --out dogs.pt           # pretrained start (--weights auto)
  imgsearch finetune --data data/images --weights packaged --epochs 3 --out demo.pt   # offline, EfficientNet-Lite0
  imgsearch finetune --data Images --out dogs.pt --resume                      # continue after a kill
  imgsearch finetune --data Images --weights resnet152_dogs.pth --epochs 3     # continue the Kaggle model
  imgsearch finetune --data shapes/ --arch resnet18 --weights random --epochs 8 --out tiny.pt
  imgsearch export --weights dogs.pt && imgsearch eval --data Images
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .archs import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root: DIR/<class>/<image>")
    add_model_arguments(p)
    p.add_argument("--epochs", type=int, default=10, help="last epoch to train (0: save the untrained model) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    p.add_argument("--val-split", type=float, default=0.2, help="share of each class held out for validation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split, head init, shuffling and augmentation (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout in the head (default: %(default)s)")
    p.add_argument("--patience", type=int, default=3, help="early stop after this many epochs without a better val loss (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224,
                   help="training resolution only; the served model always takes 224 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="data loader processes (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("finetune.pt"), help="checkpoint (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue --out from its last completed epoch")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")


def run(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        data=args.data, out=args.out, arch=args.arch, weights=args.weights, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, val_split=args.val_split,
        seed=args.seed, dropout=args.dropout, patience=args.patience, workers=args.workers,
        image_size=args.image_size, resume=args.resume, force=args.force, device=args.device,
        progress=not args.no_progress,
    )
    res = finetune(cfg)
    best = next((m for m in res.metrics if m["epoch"] == res.best_epoch), None)
    if best:
        print(f"best epoch {res.best_epoch}: val loss {best['val_loss'] if best['val_loss'] is not None else '-'}"
              f", val acc {best['val_acc'] if best['val_acc'] is not None else '-'}")
    print(f"checkpoint: {res.out} (export it: imgsearch export --weights {res.out})")
    return 0
