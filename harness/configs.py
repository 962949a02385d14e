"""Checks of Triton model configs (parsed with Triton's own protobuf) that several tests make."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc


def config_tensors(cfg: mc.ModelConfig) -> dict[str, tuple[str, list[int]]]:
    """name -> (data type, dims) of every input and output."""
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in [*cfg.input, *cfg.output]}


def assert_bounded_rejecting_queue(cfg: mc.ModelConfig) -> None:
    """Dynamic batching whose queue has a limit and rejects past it, rather than queueing without end."""
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.preferred_batch_size, cfg.name
    policy = cfg.dynamic_batching.default_queue_policy
    assert policy.max_queue_size > 0, f"{cfg.name}: no max_queue_size: Triton would queue without limit"
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT, cfg.name
