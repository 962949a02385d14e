"""All configuration, in one pydantic-settings class (env prefix ``IMGSEARCH_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .model_card import ENSEMBLE_NAME


class Settings(BaseSettings):
    """Settings shared by the gateway, the indexer, the exporter and the load tests.

    The names (TRITON_URL, MILVUS_URI, ...) are fixed: compose files, manifests, dashboards
    and tests rely on them. docs/design.md lists them all.
    """

    model_config = SettingsConfigDict(
        env_prefix="IMGSEARCH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- Triton ---------------------------------------------------------------------
    triton_url: str | None = Field(
        None,
        description="host:port of Triton's gRPC (or HTTP) endpoint; unset = start the local tritonserver",
    )
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="how the gateway and indexer talk to Triton")
    triton_input: Literal["pixels", "bytes"] = Field(
        "pixels", description="send decoded uint8 pixels, or raw file bytes to the image_search ensemble"
    )
    triton_timeout_s: float = Field(30.0, description="deadline of every inference call")
    triton_retries: int = Field(5, description="retries with backoff when Triton's queue is full (indexer)")
    model_repository: Path = Field(Path("model_repository"), description="the Triton model repository (model cards, labels, configs)")
    model_name: str = Field("resnet152", description="the encoder model's name in Triton and in the repository")
    ensemble_name: str = Field(ENSEMBLE_NAME, description="the bytes-in ensemble (decode in Triton, then the encoder)")
    model_config_name: str = Field("cpu", description="configs/<name>.pbtxt for the local tritonserver")
    local_triton_http_port: int = Field(8100, description="ports of the local tritonserver (no TRITON_URL)")
    local_triton_grpc_port: int = Field(8101, description="(the gRPC one is the gateway's and indexer's)")
    local_triton_metrics_port: int = Field(8102, description="(Prometheus metrics)")
    triton_exit_timeout_s: int = Field(20, description="the local tritonserver's --exit-timeout-secs (drains in-flight work)")

    # --- Milvus ---------------------------------------------------------------------
    milvus_uri: str = Field("./data/milvus.db", description="a path ending in .db = Milvus Lite; http://host:19530 = a Milvus server")
    milvus_token: SecretStr | None = Field(None, description="user:password or API token of a Milvus server")
    collection: str = Field("images", description="the Milvus collection")
    milvus_timeout_s: float = Field(10.0, description="deadline of every Milvus call (a hung Milvus -> 503)")
    milvus_load_timeout_s: float = Field(300.0, description="deadline of loading the collection into memory "
                                                            "(opening it; minutes for a large one)")

    # --- images ---------------------------------------------------------------------
    image_root: Path = Field(Path("data/images"), description="indexed paths are relative to it; images are served from it only")
    image_size: int = Field(224, description="the model's input side (the model card must agree)")
    max_pixels: int = Field(50_000_000, description="decoded pixel limit; more is a decompression bomb")
    max_upload_bytes: int = Field(10 * 1024 * 1024, description="a larger upload is refused with 413")
    decode_memory_bytes: int = Field(
        512 * 1024 * 1024, description="memory the gateway's concurrent decodes may hold together (a raster's "
                                       "size as loaded); one larger than this runs alone")
    decode_wait_s: float = Field(5.0, description="how long a decode waits for decode memory before a 503")
    lingering_close_bytes: int = Field(
        64 * 1024 * 1024, description="after an early answer (413, 401, 415, shed 503), read and drop at most "
                                      "this much of the unread body so the client can read the answer")
    lingering_close_s: float = Field(10.0, description="... and for at most this long")
    body_timeout_s: float = Field(30.0, description="an upload must arrive within this (408 otherwise)")
    max_reading: int = Field(64, description="uploads being received at once before new ones are shed (503); "
                                             "they take an in-flight slot only once received")
    max_light: int = Field(64, description="image, thumbnail and /readyz requests served at once before "
                                           "more are shed (503)")
    max_connections: int = Field(1024, description="uvicorn's limit on open connections (503 past it)")
    keep_alive_s: int = Field(5, description="uvicorn closes an idle keep-alive connection after this")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a complete request head "
                                                            "(request line + headers) within this of opening, "
                                                            "a later request within this of its first byte "
                                                            "(408, then closed)")

    # --- gateway --------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="the gateway's listening address")
    port: int = Field(8000, description="the gateway's port")
    workers: int = Field(1, description="uvicorn worker processes (more than 1 needs a Milvus server URI)")
    max_inflight: int = Field(32, description="concurrent searches before the gateway sheds with 503")
    decode_threads: int = Field(4, description="threads decoding uploads off the event loop")
    retry_after_s: int = Field(1, description="Retry-After (seconds) on 503 answers")
    api_key: SecretStr | None = Field(None, description="Bearer key for write endpoints; unset = writes disabled")
    metrics_token: SecretStr | None = Field(None, description="Bearer token /metrics requires; unset = open "
                                                              "(then keep the port internal)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (JSON list); empty = none")
    store_threads: int = Field(4, description="threads for blocking Milvus calls in the gateway")
    search_batch_ms: float = Field(
        2.0, ge=0.0, le=10_000.0,
        description="dynamic batching window for Milvus searches and lookups: concurrent requests arriving "
                    "within it share one call; 0 = one call per request")
    search_batch_max: int = Field(64, ge=1, le=1024, description="most requests in one batched Milvus call")
    search_batch_calls: int = Field(
        1, ge=1, le=64, description="batched Milvus calls of a kind (search, lookup) in flight at once; requests "
                                    "arriving while all are busy form the next batch")
    search_batch_idle_send: bool = Field(
        True, description="send a batch at once when a call slot is free (a lone request does not wait the "
                          "window); off = wait for the window or a full batch")
    thumb_max_side: int = Field(256, description="longest side of the thumbnails the page shows")
    thumb_cache_items: int = Field(512, description="thumbnails kept in memory (LRU)")
    upload_prefix: str = Field(
        "upload-", description="POST /v1/images stores IMAGE_ROOT/<label>/<prefix><id>.<ext> (re-indexing keeps the label)")
    graceful_shutdown_s: float = Field(20.0, description="SIGTERM: seconds to drain in-flight requests")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
