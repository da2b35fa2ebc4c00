"""SQLAlchemy tables. Ids are OpenAI-style prefixed strings; timestamps are unix seconds."""

import enum
import secrets
import time

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


CHECKPOINT_INFIX = ":ckpt-step-"


def checkpoint_model_id(output_model: str, step: int) -> str:
    """The model id a checkpoint is served under."""
    return f"{output_model}{CHECKPOINT_INFIX}{step}"


class Base(DeclarativeBase):
    pass


class JobStatus(enum.StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("org"))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # Which of the three training shapes the file holds (chat, prompt_completion, text).
    format: Mapped[str] = mapped_column(String(32))
    examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_status_run_after", "status", "run_after"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftjob"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.queued)
    # Set by pause on a running job; the worker checkpoints at the next step and parks the job.
    pause_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[dict | None] = mapped_column(JSON)
    # The name the adapter is published under; shown as fine_tuned_model only once it succeeded.
    output_model: Mapped[str] = mapped_column(String(512))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    # sha256 of the create request, so a reused Idempotency-Key with other parameters is refused.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    # Lease: who runs it, which attempt, until when. Every worker write is fenced by `attempt`.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[float | None] = mapped_column()
    # Infrastructure-error retries: the job is not claimable before run_after.
    infra_failures: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[float] = mapped_column(default=0.0)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    # Relative to the data dir: jobs/<job>/checkpoints/step-<N>/
    path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    job: Mapped[Job] = relationship()

    @property
    def model_id(self) -> str:
        return checkpoint_model_id(self.job.output_model, self.step)


class Model(Base):
    """A servable model id of a tenant, pointing at one immutable adapter version."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    # fine_tune | checkpoint | import
    kind: Mapped[str] = mapped_column(String(16))
    # sha256 of adapter_model.safetensors; the adapter lives under `path` (relative to the data dir).
    version: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    @property
    def parent(self) -> str:
        """A checkpoint's parent is the fine-tune it belongs to; any other model's is its base model."""
        if self.kind == "checkpoint":
            return self.id.rsplit(CHECKPOINT_INFIX, 1)[0]
        return self.base_model
