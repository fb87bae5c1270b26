"""Server configuration: one pydantic-settings object, read from environment variables
(prefix ``LOOKALIKE_``) and optionally a TOML file named by ``LOOKALIKE_CONFIG`` (or ``--config``).

Precedence, highest first: arguments given to :func:`server.app.create_app` (the CLI's
flags), environment variables, the TOML file, the defaults below.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from indexer import modelspec as ms
from indexer.images import DEFAULT_MAX_PIXELS


class ServerSettings(BaseSettings):
    """Every server option, its environment variable and its default."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="ignore")

    index: Path | None = Field(None, description="index directory to serve (LOOKALIKE_INDEX)")
    model: str | None = Field(None, description=ms.INDEX_MODEL_HELP)
    pretrained: str | None = Field(None, description=ms.INDEX_PRETRAINED_HELP)
    device: str = Field("auto", description=ms.DEVICE_HELP)
    precision: Literal[ms.PRECISIONS] = Field("auto", description=ms.PRECISION_HELP)  # type: ignore[valid-type]
    labels_file: Path | None = Field(None,
                                     description="default label set (YAML/JSON); data/labels/retail.yaml if unset")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1,
                                  description="largest accepted photo, bytes (413 above); the whole multipart body of "
                                              "a search or labels request may be max_json_bytes larger")
    max_product_upload_bytes: int = Field(100 * 1024 * 1024, ge=1,
                                          description="largest accepted body of POST /v1/products (all its photos "
                                                      "and metadata together), bytes (413 above)")
    max_json_bytes: int = Field(64 * 1024, ge=1024,
                                description="largest accepted body of every other request (JSON queries, product "
                                            "patches), bytes (413 above)")
    max_labels: int = Field(100, ge=2, le=1000,
                            description="most labels one POST /v1/labels request may give (422 above)")
    max_label_chars: int = Field(100, ge=1, le=1000,
                                 description="longest label one POST /v1/labels request may give, characters "
                                             "(422 above)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest accepted image, pixels (413 above)")
    decode_memory_bytes: int = Field(
        1024 * 1024 * 1024, ge=128 * 1024 * 1024,
        description="memory that concurrent large image decodes may hold together, bytes: decodes wait for it; an "
                    "image whose decode alone needs more is refused (413). Applied by 'lookalike serve'")
    thumbnail_cache_items: int = Field(512, ge=0, description="resized product photos kept in memory")
    thumbnail_cache_bytes: int = Field(64 * 1024 * 1024, ge=0,
                                       description="most bytes of resized product photos kept in memory")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection whose request line and headers are not "
                                                            "complete this long after they start is closed, seconds")
    body_timeout_s: float = Field(30.0, gt=0, description="a connection whose request body sends nothing for this "
                                                          "long is closed, seconds")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this long, "
                                                           "seconds")
    max_connections: int = Field(2048, ge=16, description="most open client connections; beyond it the oldest one "
                                                          "still waiting for its request is closed (lowered to fit "
                                                          "the process's file descriptor limit)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024,
                                  description="most bytes of an unfinished request line plus headers the server "
                                              "buffers (400 above; h11's max_incomplete_event_size)")
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before the server accepts them")
    api_keys: str = Field("", description="comma-separated API keys; write routes need one (Authorization: Bearer "
                                          "KEY); with none set, writes are disabled")
    auth_reads: bool = Field(False, description="read routes (search, labels, products) need an API key too")
    read_only: bool = Field(False, description="never write to the index (the write routes answer 403)")
    write_timeout_s: float = Field(30.0, gt=0, le=86400,
                                   description="the longest a catalogue update waits for its turn, seconds, in "
                                               "all: a write slot (max_concurrent_writes), the index's write lock "
                                               "(held by another update, a snapshot or a rebuild, or stuck on a "
                                               "stalled disk) and SQLite's (another process writing). Past it: "
                                               "503 index_busy with Retry-After, and nothing is written")
    max_concurrent_writes: int = Field(8, ge=1, le=1000,
                                       description="catalogue updates doing work at once (embedding their photos, "
                                                   "waiting for the index's write lock); the others wait for a "
                                                   "slot on the event loop, holding no worker thread, for up to "
                                                   "write_timeout_s. Updates stuck on a slow disk then cannot take "
                                                   "the worker threads that searches need (40)")
    photo_read_timeout_s: float = Field(20.0, gt=0, le=3600,
                                        description="the longest a product photo request (GET "
                                                    "/v1/products/{id}/image) waits, seconds, in all: for a photo "
                                                    "read slot (max_concurrent_photo_reads) and for the read of the "
                                                    "photo's file and its resizing. Past it: 503 "
                                                    "photo_read_timeout with Retry-After")
    max_concurrent_photo_reads: int = Field(8, ge=1, le=1000,
                                            description="product photo files read (and resized) at once, each on "
                                                        "a thread of its own; the other requests wait on the event "
                                                        "loop, holding no thread, for up to photo_read_timeout_s. "
                                                        "Reads hung on a stalled disk or network mount then cannot "
                                                        "take the worker threads that searches need (40)")
    snapshot_interval_s: float = Field(30.0, gt=0,
                                       description="how often live writes are saved to the FAISS snapshot, seconds")
    backend: Literal[ms.BACKENDS] = Field("auto", description=ms.BACKEND_HELP)  # type: ignore[valid-type]
    batch_window_ms: float = Field(4.0, ge=0, le=1000,
                                   description="micro-batching: longest wait, ms, for concurrent image queries to "
                                               "share a forward pass (0 = embed each query alone)")
    max_batch: int = Field(16, ge=1, le=256, description="micro-batching: most image queries per forward pass")
    inference_streams: int = Field(0, ge=0, le=64,
                                   description="CPU streams for concurrent image queries (OpenVINO back-end): 0 = "
                                               "OpenVINO's choice for this CPU, 1 = one forward pass at a time on "
                                               "every core; a lone query always runs on every core")
    audit_max_photos: int = Field(100_000, ge=1,
                                  description="GET /v1/audit refuses (413) an index with more photos than this: an "
                                              "audit reads every embedding and queries the index once per photo "
                                              "(40 to 44 s at 100,000 on a loaded 2-core Xeon, "
                                              "scripts/bench_audit.py); 'lookalike audit INDEX_DIR' has no limit")
    audit_max_pairs: int = Field(100_000, ge=1,
                                 description="GET /v1/audit stops with 422 audit_too_many_pairs when more photo pairs "
                                             "than this pass the near-duplicate cosine (a threshold far too low "
                                             "for the model: photos squared pairs in memory and in the report)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="server log level")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per line")
    access_log: bool = Field(True, description="log one line per request")

    def model_spec(self) -> ms.ModelSpec:
        """The model these settings ask for; :meth:`indexer.modelspec.ModelSpec.load_for` loads it for an index."""
        return ms.ModelSpec(self.model, self.pretrained, self.precision, self.backend, self.device)

    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings, env_settings,
                                   dotenv_settings, file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("LOOKALIKE_CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)
