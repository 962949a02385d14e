"""Fine-tune the last stage(s) + the MLP head of a ResNet or EfficientNet-Lite0 on an ImageFolder dataset.

The original project's recipe: everything frozen except ``layer4`` and a new head
Linear(F,256) -> ReLU -> Dropout -> Linear(256,C) (:func:`imgsearch.export.model.mlp_head`). An
EfficientNet-Lite0 trains its last two block stages, ``conv_head`` and ``bn2`` instead of
``layer4`` (:data:`TRAINABLE`). Frozen means frozen: the frozen stages also keep their
BatchNorm statistics (they run in eval mode), so only the trainable modules differ from
the starting weights.

Train and serve see the same pixels: images are decoded by
:func:`imgsearch.imaging.decode_image` (the gateway's decoder) and normalised with
:func:`imgsearch.export.model.pixel_norm` (the ONNX graph's arithmetic). Training augments the
uint8 tensor (random resized crop from a slightly larger decode, horizontal flip);
validation uses the plain square resize that serving uses.

The checkpoint (``FINETUNE_FORMAT``) is rewritten atomically after every epoch and holds
only tensors, dicts, lists, str, int, float and bool, so it loads with
``torch.load(weights_only=True)``. Its ``state_dict`` is the best epoch by validation
loss (what ``imgsearch export`` serves); ``resume`` holds the last epoch's trainable
weights and buffers, the optimizer, scheduler, grad-scaler and RNG state, so
``--resume`` continues exactly where a killed run's last completed epoch ended.
Augmentation and shuffling are seeded by (seed, epoch, index), not by a running RNG, so
a resumed run draws the same crops as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgsearch.errors import CheckpointError, ImageError
from imgsearch.imaging import decode_image

from . import checkpoint as ckpts
from . import pretrained
from .checkpoint import FINETUNE_FORMAT
from .data import DatasetError, LabelledImages, scan_folder, split_per_class
from .model import ARCHS, build_net, feature_dim, mlp_head, pixel_norm

log = logging.getLogger(__name__)

# the last stage (ResNet) or the last two (EfficientNet's seven block stages are small) + the head
TRAINABLE = {"resnet": ("layer4", "fc"), "efficientnet": ("blocks.5", "blocks.6", "conv_head", "bn2", "fc")}
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
DECODE_MARGIN = 256 / 224  # training decodes a bit larger, then crops


@dataclass
class FinetuneConfig:
    data: Path
    out: Path = Path("finetune.pt")
    arch: str | None = None  # None: resnet152, or what a --weights checkpoint holds
    weights: str = "auto"  # auto | packaged | imagenet | random | PATH
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_split: float = 0.2
    seed: int = 0
    dropout: float = 0.2
    patience: int = 3  # epochs without a better val loss before stopping
    workers: int = 4
    image_size: int = 224  # training only; serving is always 224
    resume: bool = False
    force: bool = False
    device: str = "auto"
    progress: bool = True


@dataclass
class FinetuneResult:
    out: Path
    metrics: list[dict] = field(default_factory=list)
    epoch: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    trainable_params: int = 0
    total_params: int = 0


# --- data -----------------------------------------------------------------------------


def random_resized_crop_box(h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters, drawn from ``rng`` (top, left, height, width)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    side = min(h, w)  # fallback: the central square
    return (h - side) // 2, (w - side) // 2, side, side


def augment(img: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """Random resized crop to ``size`` + horizontal flip on a uint8 CHW tensor."""
    from torchvision.transforms.v2 import functional as TF

    top, left, ch, cw = random_resized_crop_box(img.shape[1], img.shape[2], rng)
    out = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    if rng.random() < 0.5:
        out = out.flip(-1)
    return out


class FolderDataset(Dataset):
    """(uint8 CHW image, label) pairs decoded with the serving decoder."""

    def __init__(self, data: LabelledImages, image_size: int, train: bool, seed: int = 0) -> None:
        self.data = data
        self.image_size = image_size
        self.decode_size = round(image_size * DECODE_MARGIN) if train else image_size
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # workers are forked per epoch, so they see it

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.data.paths[i]
        try:
            arr = decode_image(path.read_bytes(), size=self.decode_size)
        except ImageError as e:
            raise type(e)(f"{path}: {e}") from None
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # decoder arrays are read-only
        if self.train:
            img = augment(img, self.image_size, random.Random(f"{self.seed}:{self.epoch}:{i}"))
        return img, self.data.labels[i]


# --- model ----------------------------------------------------------------------------


def build_model(weights: str, arch: str | None, num_classes: int, dropout: float, seed: int,
                class_names: list[str] | None = None) -> tuple[nn.Module, str, str]:
    """(model with an MLP head over ``num_classes``, arch, weights tag).

    A checkpoint's own MLP head is kept when it fits (same class count, and the same
    names where the checkpoint records them); otherwise the head is new.
    """
    torch.manual_seed(seed)
    weights, arch = pretrained.resolve(weights, arch)
    if weights == pretrained.PACKAGED:
        net, _, tag, _ = ckpts.packaged_model(arch)
        arch = ckpts.PACKAGED_ARCH
    elif weights == "random":
        arch = arch or "resnet152"
        return build_net(arch, "mlp", num_classes, dropout=dropout), arch, f"random:{seed}"
    elif weights == "imagenet":
        arch = arch or "resnet152"
        net, _, tag = ckpts.imagenet_model(arch)  # offline: CheckpointError with the fix
    else:
        ck = ckpts.read_checkpoint(weights, arch)
        arch = ck.arch
        net = ckpts.load_into_model(ck, dropout)
        tag = f"checkpoint:{ck.kind}:{ck.sha256[:12]}"
        same_names = not (ck.class_names and class_names) or ck.class_names == class_names
        if ck.head == "mlp" and ck.num_classes == num_classes and same_names:
            return net, arch, tag  # continue training this head (e.g. the Kaggle checkpoint)
        log.info("%s: new %d-class head (the checkpoint's head does not fit these classes)", weights, num_classes)
    torch.manual_seed(seed)
    net.fc = mlp_head(feature_dim(arch), num_classes, dropout=dropout)
    return net, arch, tag


def trainable_modules(model: nn.Module) -> tuple[str, ...]:
    """The module paths fine-tuning trains: ``layer4`` + ``fc`` of a ResNet, the last two stages + head of an EfficientNet."""
    return TRAINABLE["efficientnet" if hasattr(model, "blocks") else "resnet"]


def _is_trainable(key: str, modules: tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


def freeze_for_finetune(model: nn.Module) -> tuple[int, int]:
    """Freeze everything but :func:`trainable_modules`; return (trainable, total) parameter counts."""
    modules = trainable_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad = _is_trainable(name, modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(p.numel() for m in modules for p in model.get_submodule(m).parameters())
    if trainable != expected or trainable == 0:  # a self-check, kept in optimised runs too
        raise RuntimeError(f"freezing went wrong: {trainable} trainable parameters, expected {expected}")
    return trainable, sum(p.numel() for p in model.parameters())


def set_train_mode(model: nn.Module) -> None:
    """Train mode for the trainable modules only: frozen stages keep their BatchNorm statistics."""
    model.eval()
    for m in trainable_modules(model):
        model.get_submodule(m).train()


def resume_keys(model: nn.Module) -> list[str]:
    """What changes during fine-tuning: the trainable parameters and the trainable stages' buffers."""
    modules = trainable_modules(model)
    return [k for k in model.state_dict() if _is_trainable(k, modules)]


# --- checkpoint ------------------------------------------------------------------------


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file, fsync, then rename: a kill never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _plain(obj):
    """Tuples -> lists, so the file holds only what the brief allows (weights_only loads it either way)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_finetune(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the boundary for torch.load
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != FINETUNE_FORMAT:
        raise CheckpointError(f"{path} is not an imgsearch finetune checkpoint ({FINETUNE_FORMAT})")
    return obj


# --- training -------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _run_epoch(model, loader, device, amp: bool, train: bool, opt=None, scaler=None, bar_desc: str = "",
               progress: bool = True, arch: str = "resnet152") -> tuple[float, float]:
    from tqdm import tqdm

    mean, std = (t.to(device) for t in pixel_norm(arch))
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=bar_desc, unit="batch", disable=not progress, leave=train, dynamic_ncols=True)
    for images, labels in bar:
        x = (images.to(device, non_blocking=True).float() - mean) / std
        y = labels.to(device, non_blocking=True)
        with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        if train:
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return total_loss / max(seen, 1), correct / max(seen, 1)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Train, checkpointing after every epoch; see the module docstring."""
    if cfg.arch is not None and cfg.arch not in ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(cfg.out)
    data = scan_folder(cfg.data)
    if len(data.class_names) < 2:
        raise DatasetError(f"{cfg.data}: fine-tuning needs at least 2 class folders, found {len(data.class_names)}")
    train_idx, val_idx = split_per_class(data, cfg.val_split, cfg.seed)
    train_data, val_data = data.subset(train_idx), data.subset(val_idx)
    C = len(data.class_names)

    previous: dict | None = None
    if out.exists():
        if cfg.resume:
            previous = load_finetune(out)
        elif not cfg.force:
            raise CheckpointError(f"{out} exists: pass --resume to continue it or --force to start over")
    elif cfg.resume:
        log.info("%s does not exist yet: starting from scratch", out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)

    if previous is not None:
        if previous.get("class_names") != data.class_names:
            raise CheckpointError(f"{out} was trained on other classes than {cfg.data} holds; cannot resume")
        if "resume" not in previous:
            raise CheckpointError(f"{out} carries no training state to resume from")
        arch = previous["arch"]
        if cfg.arch and cfg.arch != arch:
            raise CheckpointError(f"{out} holds a {arch}, not a {cfg.arch}")
        dropout = float(previous.get("dropout", cfg.dropout))
        weights_tag = str(previous.get("weights", ""))
        model = build_net(arch, "mlp", C, dropout=dropout)
        model.load_state_dict(previous["state_dict"])
        model.load_state_dict({**model.state_dict(), **previous["resume"]["model"]})
    else:
        dropout = cfg.dropout
        model, arch, weights_tag = build_model(cfg.weights, cfg.arch, C, dropout, cfg.seed, data.class_names)

    trainable, total = freeze_for_finetune(model)
    device = _device(cfg.device)
    amp = device.type == "cuda"
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    metrics: list[dict] = []
    start_epoch, best_epoch, bad_epochs, stopped = 0, 0, 0, False
    best_loss = math.inf
    best_state = _cpu(model.state_dict())
    if previous is not None:
        st = previous["resume"]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if amp and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng"]["torch"])
        if amp and st["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        metrics = list(previous.get("metrics", []))
        start_epoch = int(previous["epoch"])
        best_epoch = int(previous.get("best_epoch", start_epoch))
        best_loss = float(st["best_loss"])
        bad_epochs = int(st["bad_epochs"])
        stopped = bool(st.get("stopped_early", False))
        best_state = dict(previous["state_dict"])
        log.info("resuming %s after epoch %d (best epoch %d)", out, start_epoch, best_epoch)

    print(f"{arch} ({weights_tag}), {C} classes, {len(train_data)} train / {len(val_data)} val images; "
          f"trainable: {trainable:,} of {total:,} parameters (layer4 + head); device {device}"
          f"{', mixed precision' if amp else ''}")

    train_ds = FolderDataset(train_data, cfg.image_size, train=True, seed=cfg.seed)
    val_ds = FolderDataset(val_data, cfg.image_size, train=False)
    workers = max(0, cfg.workers)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    if workers:
        loader_kw["multiprocessing_context"] = "fork" if os.name == "posix" else None
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, **loader_kw) if len(val_ds) else None

    keep = set(resume_keys(model))

    def state(epoch: int) -> dict:
        return _plain({
            "format": FINETUNE_FORMAT,
            "arch": arch,
            "state_dict": best_state,
            "class_names": data.class_names,
            "folders": data.folders,
            "metrics": metrics,
            "epoch": epoch,
            "best_epoch": best_epoch,
            "dropout": float(dropout),
            "weights": weights_tag,
            "image_size": int(cfg.image_size),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                       if k not in ("resume", "force", "progress")},
            "resume": {
                "model": _cpu({k: v for k, v in model.state_dict().items() if k in keep}),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if amp else {},
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if amp else []},
                "best_loss": best_loss,
                "bad_epochs": bad_epochs,
                "stopped_early": stopped,
            },
        })

    if start_epoch == 0 and cfg.epochs == 0:
        save_atomic(state(0), out)  # the untrained model, in the same format (a baseline for eval)
    if stopped:
        print(f"{out} already stopped early after epoch {start_epoch}; nothing to do")
    last = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if stopped:
            break
        t0 = time.monotonic()
        train_ds.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                            drop_last=len(train_ds) > cfg.batch_size, **loader_kw)
        set_train_mode(model)
        tr_loss, tr_acc = _run_epoch(model, loader, device, amp, True, opt, scaler,
                                     f"epoch {epoch}/{cfg.epochs}", cfg.progress, arch=arch)
        model.eval()
        if val_loader is not None:
            va_loss, va_acc = _run_epoch(model, val_loader, device, amp, False, progress=False, arch=arch)
        else:
            va_loss, va_acc = tr_loss, tr_acc  # no validation split: watch the training loss
        sched.step(va_loss)
        if va_loss < best_loss:
            best_loss, best_epoch, bad_epochs = va_loss, epoch, 0
            best_state = _cpu(model.state_dict())
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        row = {"epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc,
               "val_loss": va_loss if val_loader is not None else None,
               "val_acc": va_acc if val_loader is not None else None,
               "lr": float(opt.param_groups[0]["lr"]), "seconds": round(time.monotonic() - t0, 2)}
        metrics.append(row)
        last = epoch
        save_atomic(state(epoch), out)
        print(f"epoch {epoch}: train loss {tr_loss:.4f} acc {tr_acc:.3f}"
              + (f" | val loss {va_loss:.4f} acc {va_acc:.3f}" if val_loader is not None else "")
              + f" | lr {row['lr']:.2e} | {row['seconds']:.1f}s{' (best)' if best_epoch == epoch else ''}")
        if stopped:
            print(f"early stop: val loss has not improved for {cfg.patience} epochs (best: epoch {best_epoch})")
    return FinetuneResult(out=out, metrics=metrics, epoch=last, best_epoch=best_epoch, stopped_early=stopped,
                          trainable_params=trainable, total_params=total)
