"""The one Triton client: ``await encode(uint8 batch) -> (embeddings, probs)``.

gRPC by default (HTTP optional), one channel per process, reused by every request.
Triton's and tritonclient's errors become :mod:`imgsearch.errors` here:
queue full -> :class:`TritonOverloaded`, unreachable / not ready -> :class:`TritonUnavailable`,
refused input -> :class:`TritonInvalidInput`. The same code serves the local binary and a
Triton container; only the URL differs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    TritonError,
    TritonInvalidInput,
    TritonOverloaded,
    TritonUnavailable,
    UnsupportedImage,
)
from .model_card import (
    BYTES_INPUT,
    EMBEDDING_NAME,
    ENSEMBLE_NAME,
    INPUT_NAME,
    PROBS_NAME,
)

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    embeddings: np.ndarray  # [N, D] float32, unit norm
    probs: np.ndarray | None  # [N, C] float32, or None without a classifier head


def map_triton_error(exc: Exception) -> TritonError:
    """Classify a tritonclient / grpc / aiohttp error. The single mapping point."""
    msg = str(getattr(exc, "message", lambda: None)() or exc)
    status = str(getattr(exc, "status", lambda: None)() or "")
    low = msg.lower()
    if "maximum queue size" in low or "exceeds maximum queue" in low or status in ("429", "StatusCode.RESOURCE_EXHAUSTED"):
        return TritonOverloaded(f"Triton queue is full: {msg}")
    if ("timeout" in low and "queue" in low) or "request timeout expired" in low:
        # the queue policy's REJECT on timeout says "Request timeout expired" (also inside an ensemble)
        return TritonOverloaded(f"request timed out in Triton's queue: {msg}")
    if status in ("StatusCode.INVALID_ARGUMENT", "400") or "unexpected shape" in low or "unexpected datatype" in low:
        return TritonInvalidInput(msg)
    return TritonUnavailable(f"Triton unavailable: {msg}")


_IMAGE_ERROR = re.compile(r"imgsearch:(\w+): (.*)", re.S)


def image_error_from(message: str) -> ImageError | None:
    """The typed image error that Triton's ``preprocess`` model put in an error message, if any."""
    m = _IMAGE_ERROR.search(message)
    if not m:
        return None
    for cls in (UnsupportedImage, CorruptImage, ImageTooLarge):
        if cls.code == m.group(1):
            return cls(m.group(2).strip())
    return None


# gRPC's reconnect backoff grows to 120 s while a server is down (x1.6 per try): a Triton back
# after a 50 s outage was used again only 20 s later. Capped, the channel retries every ~1 s.
MAX_RECONNECT_BACKOFF_MS = 1000


def grpc_channel_args(mod) -> list[tuple[str, int]]:
    """tritonclient's default channel options (message size, keepalive) + the capped backoff."""
    ka = mod.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", mod.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", mod.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


class TritonEncoder:
    """Async encoder over Triton. Create one per process and share it."""

    def __init__(
        self,
        url: str,
        model_name: str = "resnet152",
        protocol: str = "grpc",
        timeout_s: float = 30.0,
        ensemble_name: str = ENSEMBLE_NAME,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.ensemble_name = ensemble_name
        self.protocol = protocol
        self.timeout_s = timeout_s
        self._client = None
        self._outputs: list[str] | None = None

    # --- plumbing -------------------------------------------------------------------
    def _mod(self):
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as mod
        else:
            import tritonclient.http.aio as mod
        return mod

    def _get_client(self):
        if self._client is None:
            mod = self._mod()
            if self.protocol == "grpc":
                self._client = mod.InferenceServerClient(self.url, channel_args=grpc_channel_args(mod))
            else:
                self._client = mod.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a dead channel
                pass

    async def _model_outputs(self) -> list[str]:
        if self._outputs is None:
            client = self._get_client()
            call = client.get_model_metadata(self.model_name, as_json=True) if self.protocol == "grpc" \
                else client.get_model_metadata(self.model_name)
            try:
                meta = await asyncio.wait_for(call, self.timeout_s)  # a hung Triton must not hang us
            except asyncio.TimeoutError:
                raise TritonUnavailable(f"Triton did not answer within {self.timeout_s:.0f}s") from None
            except Exception as e:  # noqa: BLE001 - the boundary
                raise map_triton_error(e) from None
            self._outputs = [o["name"] for o in meta["outputs"]]
        return self._outputs

    async def has_probs(self) -> bool:
        return PROBS_NAME in await self._model_outputs()

    # --- health ---------------------------------------------------------------------
    async def _model_ready(self, name: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self._get_client().is_model_ready(name), 2.0))
        except Exception:  # noqa: BLE001 - not ready is the answer, whatever the cause
            return False

    async def is_ready(self) -> bool:
        return await self._model_ready(self.model_name)

    async def has_ensemble(self) -> bool:
        return await self._model_ready(self.ensemble_name)

    async def model_config(self, name: str) -> dict:
        """The model's config as Triton serves it (JSON field names as in config.pbtxt)."""
        client = self._get_client()
        try:
            if self.protocol == "grpc":
                cfg = (await client.get_model_config(name, as_json=True, client_timeout=5.0))["config"]
            else:
                cfg = await asyncio.wait_for(client.get_model_config(name), 5.0)
        except Exception as e:  # noqa: BLE001 - the boundary
            raise map_triton_error(e) from None
        return cfg

    async def bytes_path_problem(self, max_pixels: int) -> str | None:
        """Why ``encode_bytes`` cannot stand in for ``decode_image`` + ``encode`` here; None when it can.

        The ensemble must be ready, end in this encoder's model, and its first step (the
        ``preprocess`` model) must enforce the caller's pixel limit (its ``max_pixels``
        parameter): with another limit a large file or a bomb would be answered
        differently by the two paths.
        """
        if not await self.has_ensemble():
            return f"Triton has no ready ensemble {self.ensemble_name!r}"
        try:
            steps = (await self.model_config(self.ensemble_name)).get("ensemble_scheduling", {}).get("step", [])
            if not steps:
                return f"{self.ensemble_name!r} is not an ensemble"
            if steps[-1].get("model_name") != self.model_name:
                return (f"ensemble {self.ensemble_name!r} ends in model {steps[-1].get('model_name')!r}, "
                        f"not {self.model_name!r}")
            first = steps[0].get("model_name", "")
            params = (await self.model_config(first)).get("parameters", {})
        except TritonError as e:
            return f"cannot read the ensemble's config: {e}"
        served = params.get("max_pixels", {}).get("string_value", "")
        if served != str(max_pixels):
            return (f"its step {first!r} enforces max_pixels {served or 'unset'}, this process {max_pixels} "
                    "(IMGSEARCH_MAX_PIXELS): re-export with the same IMGSEARCH_MAX_PIXELS, or set it to match")
        return None

    # --- inference ------------------------------------------------------------------
    async def encode(self, pixels: np.ndarray, timeout_s: float | None = None) -> Encoded:
        """``pixels``: uint8 [N, H, W, 3] RGB. Returns unit-norm embeddings (+ probs)."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise TritonInvalidInput(f"expected uint8 [N,H,W,3], got {pixels.dtype} {list(pixels.shape)}")
        mod = self._mod()
        inp = mod.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(pixels))
        return await self._infer(self.model_name, [inp], timeout_s)

    async def encode_bytes(self, blobs: Sequence[bytes], timeout_s: float | None = None) -> Encoded:
        """Send encoded files to the ``image_search`` ensemble (decode happens in Triton).

        A file Triton's ``preprocess`` cannot use raises the same typed error as
        :func:`imgsearch.imaging.decode_image` would (UnsupportedImage, CorruptImage,
        ImageTooLarge); in a request of several files, one bad file fails the request.
        """
        if not blobs:
            raise TritonInvalidInput("encode_bytes needs at least one file")
        mod = self._mod()
        arr = np.empty((len(blobs), 1), dtype=np.object_)
        for i, b in enumerate(blobs):
            arr[i, 0] = bytes(b)
        inp = mod.InferInput(BYTES_INPUT, list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr)
        try:
            return await self._infer(self.ensemble_name, [inp], timeout_s)
        except TritonInvalidInput as e:
            raise image_error_from(str(e)) or e from None

    async def _infer(self, model: str, inputs: list, timeout_s: float | None) -> Encoded:
        names = await self._model_outputs()
        mod = self._mod()
        outputs = [mod.InferRequestedOutput(n) for n in names]
        timeout = timeout_s or self.timeout_s
        try:
            if self.protocol == "grpc":
                res = await self._get_client().infer(model, inputs, outputs=outputs, client_timeout=timeout)
            else:
                res = await asyncio.wait_for(self._get_client().infer(model, inputs, outputs=outputs), timeout)
        except asyncio.TimeoutError:
            raise TritonUnavailable(f"Triton did not answer within {timeout:.0f}s") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the boundary
            err = map_triton_error(e)
            if isinstance(err, TritonUnavailable):
                self._outputs = None  # the model may come back different
            raise err from None
        emb = res.as_numpy(EMBEDDING_NAME)
        probs = res.as_numpy(PROBS_NAME) if PROBS_NAME in names else None
        n = inputs[0].shape()[0]
        if emb is None or emb.shape[0] != n:
            raise TritonUnavailable(f"Triton returned {None if emb is None else emb.shape} embeddings for {n} inputs")
        return Encoded(np.asarray(emb, dtype=np.float32), None if probs is None else np.asarray(probs, np.float32))


async def with_backoff(fn, retries: int = 5, base_s: float = 0.2, max_s: float = 5.0):
    """Retry ``await fn()`` while Triton says its queue is full (jittered exponential)."""
    for attempt in range(retries + 1):
        try:
            return await fn()
        except TritonOverloaded:
            if attempt == retries:
                raise
            delay = min(max_s, base_s * 2**attempt) * (0.5 + random.random() / 2)
            log.debug("Triton overloaded, retry %d in %.2fs", attempt + 1, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
