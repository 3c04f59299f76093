"""Every setting of the service, in one typed place (environment prefix CATDOG_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from catdog_core.sessions import DEFAULT_SPINNING, OpenVinoPrecision, Spinning
from service.image_structure import DEFAULT_MAX_JPEG_SCANS

CONNECTION_OVERHEAD_BYTES = 16 * 1024
"""An open connection's memory besides its head: 7.6 KiB measured (RSS growth over 15,000
connections, idle or each holding a 60 KiB head, less the head), about doubled."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CATDOG_", extra="forbid")

    models_dir: Path = Path("models")
    """Folder holding manifest.json and the ONNX files it names."""
    default_model: str | None = None
    """Model used when a request names none; None means the manifest's default."""
    providers: Literal["auto", "cpu", "cuda", "openvino"] = "auto"
    """onnxruntime execution provider: auto uses CUDA when present, else OpenVINO when the installed
    onnxruntime is onnxruntime-openvino, else onnxruntime's CPU provider; one named and absent (cuda
    without a GPU) fails at start."""
    openvino_precision: OpenVinoPrecision = "fp32"
    """What the OpenVINO provider computes floating-point layers in: fp32, the answers the manifest
    measured; bf16 on CPUs with bfloat16 in hardware (AMX or AVX-512 BF16; refused at start
    elsewhere, and with any other provider), 2.6-4.2x faster for fp32 MobileNet and Xception on a
    Xeon with AMX, answers measured within a photo per source of fp32's (README, "OpenVINO")."""
    inference_workers: int | None = Field(None, ge=1, le=64)
    """Batches run at once, each on its own thread; None: one per CPU the process may use (from the
    container's CPU quota), one on CUDA (README, "Performance under contention")."""
    spare_inference_workers: int = Field(1, ge=0, le=8)
    """Inference workers beyond one per CPU, on CPU without a CPU quota, when inference_workers and
    intra_op_threads are unset; only models whose one-image run at warm-up takes at most 50 ms use
    them (registry.batches_at_once). Under MobileNet load two workers on two CPUs left 3.8-6.2 % of
    the CPU idle, a third 0.9-1.4 % (README, "Performance under contention")."""
    intra_op_threads: int | None = Field(None, ge=1)
    """Threads per inference; None shares the CPUs the process may use (CPU quota, not the host's
    cores) among the inference workers."""
    intra_op_spinning: Spinning = DEFAULT_SPINNING
    """Whether idle inference threads busy-wait for work (onnxruntime's allow_spinning; within-runs
    stops between runs). Off: as fast on a quiet machine, faster when the CPU is shared or under a
    quota (README, "Performance under contention")."""
    lone_image_on_every_core: bool = True
    """With several inference workers (one thread each), a lone image on an idle lane may run on
    a second session of its model with a thread per CPU, whichever of the two layouts its
    recent lone runs measured faster (README, "Performance under contention"). Off saves that
    session's memory (163 MiB for the five models: idle RSS 684 against 847 MiB)."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Largest micro-batch per model."""
    min_batching_gain: float = Field(0.1, ge=0, lt=1)
    """On CPU without a CPU quota, a model runs batches of more than one image only if the warm-up
    measured an image in a batch of max_batch_size at least this fraction cheaper than one alone;
    else every image runs alone, as soon as a worker is free (every image in a batch waits for the
    last; README, "Performance under contention"). 0 batches regardless, as does a CPU quota
    (batches measured more throughput there) and CUDA (where they pay many times over)."""
    max_batch_ms: float = Field(500.0, gt=0)
    """Longest predicted run time of one batch: a model whose measured batch times pass it runs
    smaller batches (never below one image), so an admitted request is not held for seconds by
    the images batched with it. Under a CPU quota, at most one quota period (100 ms in
    Kubernetes): a longer batch is throttled while every image in it waits (README,
    "Performance under contention")."""
    balance_batches: bool = False
    """A freed inference worker takes its share of the queued images (each image dealt to the
    worker predicted to finish it first), not the whole queue up to max_batch_size; ignored when a
    CPU quota leaves less than one CPU per inference worker. Shorter tails below capacity, less
    goodput under overload (README, "Performance under contention")."""
    max_wait_ms: float = Field(2.0, ge=0, le=1000)
    """While another inference worker is busy, how long a request may wait on a free one for others
    to join its batch (never past its deadline); on an idle lane a batch runs at once, and a worker
    that has just finished a batch takes what is queued at once."""
    queue_size: int = Field(64, ge=1)
    """Images admitted per model before new requests get 503 with Retry-After."""
    max_queue_wait_ms: float = Field(1000.0, gt=0)
    """Longest predicted wait before a request's batch starts (from the measured batch times):
    beyond it, 503 with Retry-After even when the queue has places. With nothing queued ahead, a
    request is always admitted behind a running batch."""
    max_concurrent_requests: int = Field(16, ge=1, le=10_000)
    """Classification requests handled at once; more get 503 with Retry-After before their body is
    read. Probes, /metrics and /models are never limited."""
    max_connections: int = Field(1024, ge=1, le=1_000_000)
    """Open connections at once. One more closes the connection that has waited longest for a
    request (idle, or its head still arriving: 503, Retry-After: 1), or is itself answered 503 and
    closed if every one is being answered. Each may hold an unfinished head of up to
    max_head_bytes, so this bounds their sum."""
    max_head_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Request line and headers together (414 for a long URL, 431 otherwise; connection closed)."""
    head_timeout_s: float = Field(10.0, gt=0, le=600)
    """Longest wait for a request's head, from the connection opening or the previous answer (408;
    a connection that sent nothing is closed without one)."""
    body_timeout_s: float = Field(10.0, gt=0, le=600)
    """Longest wait for the next piece of an upload's body (408, connection closed), and for a client
    that stopped reading to take the next piece of an answer (connection dropped)."""
    min_upload_bytes_per_s: int = Field(16_384, ge=0)
    """Slowest average upload rate accepted once body_timeout_s has passed (408); 0 turns it off."""
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    """Request body cap (413), enforced while reading, chunked uploads included."""
    max_files: int = Field(16, ge=1, le=256)
    """Most images in one multipart request."""
    max_pixels: int = Field(50_000_000, ge=1)
    """Decoded image size cap (413); Pillow's decompression-bomb guard is raised to an error."""
    max_decode_bytes: int = Field(200 * 1024 * 1024, ge=1024 * 1024)
    """Peak memory one image may take to decode, estimated from its header (413 above it): pixels
    times the bytes per pixel its mode needs (4 for RGB, 5 for 16-bit grey; JPEGs at draft scale)."""
    max_jpeg_scans: int = Field(DEFAULT_MAX_JPEG_SCANS, ge=1)
    """Most scans a JPEG may have (413 above it), counted before decoding: a progressive JPEG's
    decoding time grows with its scans times its pixels, and libjpeg's default progression writes 10."""
    decode_threads: int | None = Field(None, ge=1, le=64)
    """Thread pool size for image decoding (off the event loop); None: one per four CPUs the
    process may use (CPU quota, then affinity), at least one."""
    drain_timeout_s: float = Field(20.0, gt=0)
    """On SIGTERM: time allowed to finish in-flight and queued requests before exiting."""
    cache_max_entries: int = Field(0, ge=0, le=10_000_000)
    """Response cache size in answers (one per image, model and model version); 0 turns it off."""
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Response cache size in bytes as accounted (about 600 per answer; README, "Response cache")."""
    shadow_rate: float = Field(0.0, ge=0, le=1)
    """Fraction of the small models' answers the large model checks in the background, when the
    inference lane is idle (README, "Live quality watch"); 0 turns it off."""
    shadow_model: str | None = None
    """The model that checks them; None means the manifest cascade's large model."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve /metrics on this extra port as well (it is always on the main port)."""
    log_json: bool = False
    """Log one JSON object per line instead of plain text."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level for the service's and uvicorn's loggers."""

    def worst_case_request_memory_bytes(self, decode_threads: int) -> int:
        """The most memory requests can take on top of the loaded models (README, "Memory"):
        every open connection's unfinished head and its own bookkeeping, every admitted request's
        body, twice over while a raw body is joined from its chunks, every decode thread's
        costliest image (max_decode_bytes bounds one decode's peak), the transient copies of one
        protocol JSON body being parsed (base64 text and decoded bytes: 2.0x the body, measured
        with tracemalloc; parsing runs on the event loop, one at a time), and the response cache's
        byte bound when it is on. decode_threads: the pool's size as resolved (runtime.decode_threads)."""
        return (
            self.max_connections * (self.max_head_bytes + CONNECTION_OVERHEAD_BYTES)
            + 2 * self.max_concurrent_requests * self.max_body_bytes
            + 2 * self.max_body_bytes
            + decode_threads * self.max_decode_bytes
            + (self.cache_max_bytes if self.cache_max_entries else 0)
        )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.queue_size < self.max_batch_size:
            raise ValueError("queue_size must be at least max_batch_size")
        if self.queue_size < self.max_files:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be at least max_files ({self.max_files}): "
                "a request with max_files images could never be admitted"
            )
        return self
