"""The architectures the exporter knows, importable without torch (CLI start-up)."""

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
