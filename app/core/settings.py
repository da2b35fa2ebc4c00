"""One settings object, read from TUNEFORGE_* environment variables by the CLI, the API and the worker."""

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_BASE_MODEL = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    data_dir: Path = Path("./.tuneforge")
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Artifact store (app/core/storage.py): empty or file://PATH is the data dir (or PATH);
    # s3://BUCKET/PREFIX is S3-compatible object storage, at s3_endpoint_url when it is not AWS.
    # Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, ...).
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    # An API replica on S3 keeps the adapters it serves on its local disk, by version, up to
    # both bounds (least recently used out first).
    adapter_cache_bytes: int = Field(20 * 1024**3, gt=0)
    adapter_cache_entries: int = Field(256, gt=0)
    # `tuneforge storage gc` removes unreferenced artifacts only when older than this: longer than
    # any publish takes from its first upload to its database commit.
    storage_gc_grace_seconds: float = Field(24 * 3600, ge=0)

    # Extra base models: name -> local Hugging Face checkpoint directory (JSON in the environment).
    base_models: dict[str, Path] = Field(default_factory=dict)
    # The base model the inference engine keeps resident (the embedded one or a base_models name).
    serve_base_model: str = EMBEDDED_BASE_MODEL
    # Several bases served by one API process, one engine each (JSON list); when set, it replaces
    # serve_base_model.
    serve_base_models: list[str] = Field(default_factory=list)

    # A million-row (~1 GB) training file fits; uploads are validated streaming, in bounded memory.
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    # Worker: lease and retry policy.
    worker_id: str | None = None
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 1.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 5.0
    checkpoint_every_steps: int = 50
    # GiB of GPU memory a training run may reach at its peak (micro-batches are sized to fit);
    # None: whatever the device has free.
    train_memory_gib: float | None = Field(None, gt=0)
    keep_checkpoints: int = 3
    # The devices one job trains on, data-parallel: CUDA indices as this process sees them
    # ("0,1") or "all" visible ones; unset, the first one. With device cpu, as many CPU processes
    # (gloo) as indices. A worker setting, not a job field: a tenant cannot claim a whole host.
    worker_gpus: str | None = None
    # Inference engine: adapter tiers, KV cache and batching. None: sized by the engine from the
    # device's free memory (slots), twice the slots (CPU tier), and the batch at full context
    # within half the free GPU memory (KV cache).
    gpu_adapter_slots: int | None = Field(None, ge=1)
    cpu_adapter_cache: int | None = Field(None, ge=1)
    kv_cache_tokens: int | None = Field(None, ge=1)
    # The most (padded) prompt tokens prefilled between two decode steps: a longer prompt is
    # prefilled in chunks, so running streams never wait for more than one chunk.
    prefill_chunk_tokens: int = Field(4096, ge=16)
    # Requests decoded together. 64 costs no more CUDA graphs than 32 (the step's largest bucket
    # also holds the in-step prefill rows), and the KV cache is sized within the free memory.
    max_batch_size: int = Field(64, ge=1)
    max_context_tokens: int = 2048
    # The SSE chunks a second the API process aims to write in all: with N streams open, each
    # sends its new text at most every N / this seconds (the first token and the end at once), so
    # under load a chunk carries several tokens instead of a write per token per stream. 0: every
    # token as it comes.
    stream_chunks_per_s: int = Field(4000, ge=0)

    @field_validator("storage_url")
    @classmethod
    def _storage_url_scheme(cls, url: str) -> str:
        parsed = urlparse(url)
        if url and not (parsed.scheme == "file" or (parsed.scheme == "s3" and parsed.netloc)):
            raise ValueError(f"{url!r} is neither file://PATH nor s3://BUCKET[/PREFIX]")
        return url

    @field_validator("worker_gpus")
    @classmethod
    def _device_list(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip() == "all":
            return "all"
        indices = [part.strip() for part in value.split(",")]
        if not all(part.isdigit() for part in indices) or len(set(map(int, indices))) != len(indices):
            raise ValueError('a comma-separated list of distinct device indices such as "0,1", or "all"')
        return ",".join(str(int(part)) for part in indices)

    @property
    def served_base_models(self) -> list[str]:
        return list(dict.fromkeys(self.serve_base_models)) or [self.serve_base_model]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'tuneforge.db'}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def base_models_dir(self) -> Path:
        return self.data_dir / "base_models"

    @property
    def adapter_cache_dir(self) -> Path:
        return self.data_dir / "adapter_cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
