"""The project's own exceptions.

Each external system (Pillow, Triton, Milvus) is wrapped at exactly one boundary, which
turns that library's errors into these. Callers (gateway, indexer, CLI) only ever see
these types, so a new failure mode of a library shows up as a bug in one place.
"""

from __future__ import annotations


class ImgsearchError(Exception):
    """Base class of every error this project raises on purpose."""

    code: str = "internal"


# --- images -------------------------------------------------------------------------


class ImageError(ImgsearchError):
    """The bytes given are not an image we can use."""

    code = "bad_image"


class UnsupportedImage(ImageError):
    """Content is not one of the allow-listed formats (checked by content, not name)."""

    code = "unsupported_media_type"


class CorruptImage(ImageError):
    """An allow-listed format whose bytes are truncated or otherwise undecodable."""

    code = "undecodable_image"


class ImageTooLarge(ImageError):
    """Decoded size over the pixel limit: a decompression bomb, or simply too big."""

    code = "image_too_large"


class UploadTooLarge(ImageError):
    """More bytes than the upload limit; detected while reading, before buffering it all."""

    code = "payload_too_large"


class DecodeBusy(ImgsearchError):
    """The memory budget for decoding stayed taken by other decodes: retry later."""

    code = "overloaded"


# --- Triton -------------------------------------------------------------------------


class TritonError(ImgsearchError):
    code = "triton_error"


class TritonOverloaded(TritonError):
    """Triton's bounded queue rejected the request: retry later."""

    code = "overloaded"


class TritonUnavailable(TritonError):
    """Triton is not reachable or the model is not ready."""

    code = "triton_unavailable"


class TritonInvalidInput(TritonError):
    """Triton refused the request itself (shape, dtype, name)."""

    code = "invalid_inference_input"


class LauncherError(ImgsearchError):
    """The local tritonserver could not be started; the message carries the log excerpt."""

    code = "triton_launch_failed"


# --- Milvus -------------------------------------------------------------------------


class StoreError(ImgsearchError):
    code = "store_error"


class StoreUnavailable(StoreError):
    """Milvus cannot be reached or the collection is not loaded.

    ``answered``: Milvus answered the call with an error, as opposed to not answering in time or
    at all; such a call may be worth repeating at once, a hung Milvus's is not.
    """

    code = "milvus_unavailable"

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class EntryRefused(StoreError):
    """Milvus (or the checks made before asking it) refused one entry: a path or label that is
    not valid UTF-8 or is over the field's byte limit. The entry's problem, not Milvus being down."""

    code = "entry_refused"


class CollectionMismatch(StoreError):
    """The collection was built by another model (dim or model card sha differ)."""

    code = "collection_mismatch"


class NotFound(StoreError):
    code = "not_found"


# --- model files --------------------------------------------------------------------


class CheckpointError(ImgsearchError):
    """A checkpoint we cannot load; the message names missing / unexpected keys."""

    code = "bad_checkpoint"


class ModelRepositoryError(ImgsearchError):
    """The model repository is missing files or its configs disagree with the model card."""

    code = "bad_model_repository"
