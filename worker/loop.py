"""The worker loop: claim a job, hold its lease with a heartbeat, run the recipe, record the outcome.

Claim: one transaction picks the oldest job that is queued and due (or running with an expired
lease: its worker died) — `FOR UPDATE SKIP LOCKED` on PostgreSQL, BEGIN IMMEDIATE on SQLite — and
re-checks it with a conditional UPDATE. Every later write is fenced by the attempt (worker/fence.py).
Errors: UserError fails the job at once; anything else is an infrastructure error, retried with
exponential backoff up to settings.max_attempts; JobLost (cancelled, or taken over) stops at once.
Between jobs the worker keeps the last base model loaded (worker/hooks.py ResidentBase): each job's
LoRA is taken off it when the job ends, however it ends.
"""

import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.base_models import UnknownBaseModel, resolve_base_model
from app.core.db import make_engine
from app.core.model_families import UnsupportedBaseModel, describe_base_model
from app.core.settings import Settings
from app.core.storage import ArtifactStore, open_store
from app.models import File, Job, JobEvent, JobStatus, now
from worker import faults, store
from worker.errors import JobLost, UserError
from worker.fence import Fence
from worker.hooks import Control, ResidentBase, TrainResult
from worker.memory import cuda_allocator_environment

log = logging.getLogger("tuneforge.worker")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_seconds: float

    def delay(self, failures: int) -> float:
        return self.backoff_seconds * 2 ** (failures - 1)

    def exhausted(self, failures: int) -> bool:
        return failures >= self.max_attempts


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    tenant_id: str
    model: str
    training_file: str
    training_format: str | None
    validation_file: str | None
    hyperparameters: dict
    seed: int
    output_model: str
    attempt: int
    infra_failures: int
    claimed_at: float  # time.monotonic()


def claim_job(sessions: sessionmaker[Session], worker_id: str, settings: Settings) -> ClaimedJob | None:
    policy = RetryPolicy(settings.max_attempts, settings.retry_backoff_seconds)
    while True:
        moment = time.time()
        with sessions() as session, session.begin():
            job = session.scalars(
                select(Job)
                .where(
                    or_(
                        and_(Job.status == JobStatus.queued, Job.run_after <= moment),
                        and_(Job.status == JobStatus.running, Job.lease_expires_at < moment),
                    )
                )
                .order_by(Job.created_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            stalled = job.status == JobStatus.running
            failures = job.infra_failures + stalled  # a worker that died counts as an infrastructure failure
            guard = update(Job).where(Job.id == job.id, Job.attempt == job.attempt, Job.status == job.status)
            if stalled and policy.exhausted(failures):
                error = {
                    "code": "worker_lost",
                    "message": f"The worker running this job stopped responding {failures} times.",
                    "param": None,
                }
                if session.execute(
                    guard.values(
                        status=JobStatus.failed,
                        error=error,
                        infra_failures=failures,
                        finished_at=now(),
                        lease_expires_at=None,
                        worker_id=None,
                    )
                ).rowcount:
                    session.add(
                        JobEvent(
                            job_id=job.id, level="error", message=error["message"], data={"error": error}
                        )
                    )
                continue
            attempt = job.attempt + 1
            claimed = session.execute(
                guard.values(
                    status=JobStatus.running,
                    worker_id=worker_id,
                    attempt=attempt,
                    infra_failures=failures,
                    lease_expires_at=moment + settings.lease_seconds,
                    started_at=job.started_at or now(),
                )
            ).rowcount
            if not claimed:
                continue
            note = " after its previous worker stopped responding" if stalled else ""
            session.add(
                JobEvent(
                    job_id=job.id,
                    message=f"Attempt {attempt} started on worker {worker_id}{note}",
                    data={"attempt": attempt, "worker_id": worker_id},
                )
            )
            training_format = session.scalar(select(File.format).where(File.id == job.training_file))
            return ClaimedJob(
                id=job.id,
                tenant_id=job.tenant_id,
                model=job.model,
                training_file=job.training_file,
                training_format=training_format,
                validation_file=job.validation_file,
                hyperparameters=dict(job.hyperparameters),
                seed=job.seed,
                output_model=job.output_model,
                attempt=attempt,
                infra_failures=failures,
                claimed_at=time.monotonic(),
            )


class Lease:
    """Renews the lease every heartbeat_seconds in a background thread and answers the recipe's
    question at each step: go on, pause (the API asked), or shut down (the worker was told to)."""

    def __init__(self, fence: Fence, settings: Settings, shutdown: threading.Event):
        self.fence, self.settings, self.shutdown = fence, settings, shutdown
        self.lost = threading.Event()
        self.pause_requested = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{fence.job_id}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.settings.heartbeat_seconds):
            try:
                with self.fence.transaction(
                    lease_expires_at=time.time() + self.settings.lease_seconds
                ) as session:
                    if session.scalar(select(Job.pause_requested).where(Job.id == self.fence.job_id)):
                        self.pause_requested.set()
            except JobLost:
                self.lost.set()
                return
            except Exception:
                log.warning("lease renewal of %s failed", self.fence.job_id, exc_info=True)

    def control(self) -> Control:
        if self.lost.is_set():
            raise JobLost(self.fence.job_id)
        if self.pause_requested.is_set():
            return "pause"
        if self.shutdown.is_set():
            return "shutdown"
        return "continue"


class JobHooks:
    """TrainingHooks for one claimed attempt: control from the lease, writes through the fence."""

    def __init__(self, settings: Settings, store: ArtifactStore, job: ClaimedJob, fence: Fence, lease: Lease):
        self.settings, self.store, self.job, self.fence, self.lease = settings, store, job, fence, lease
        self.claimed_at = job.claimed_at

    def control(self) -> Control:
        return self.lease.control()

    def log(self, message: str, data: dict) -> None:
        self.fence.event(message, data=data)

    def record_hyperparameters(self, hyperparameters: dict, message: str, data: dict) -> None:
        self.fence.event(message, data=data, hyperparameters=hyperparameters)
        # Checkpoint and adapter manifests record what the job trains with, not "auto".
        self.job = dataclasses.replace(self.job, hyperparameters=hyperparameters)

    def save_checkpoint(self, step: int, write, metrics: dict) -> None:
        store.save_checkpoint(
            self.store, self.fence, self.job, step, write, metrics, self.settings.keep_checkpoints
        )


def _training_file(artifacts: ArtifactStore, job: ClaimedJob, file_id: str) -> Path:
    """The file on this machine: the data dir's own, or a download into the job's temp dirs."""
    return artifacts.fetch_file(f"files/{file_id}.jsonl", near=f"{store.job_key(job.id)}/input")


def _train(
    settings: Settings,
    artifacts: ArtifactStore,
    job: ClaimedJob,
    hooks: JobHooks,
    resident: ResidentBase,
    resume_from: Path | None,
) -> TrainResult:
    if faults.noop_recipe_enabled():
        return faults.train_noop(job.id, hooks, resume_from)
    if job.training_format is None:
        raise UserError(
            "file_not_found", f"The training file {job.training_file} no longer exists.", "training_file"
        )
    try:
        base_model_dir = resolve_base_model(job.model, settings)
    except UnknownBaseModel as exc:
        raise UserError(
            "model_not_available", f"The base model {job.model!r} is not available on this worker.", "model"
        ) from exc
    # Job creation checked the family, but the base's files may have changed since.
    try:
        describe_base_model(job.model, base_model_dir).check_supported()
    except UnsupportedBaseModel as exc:
        raise UserError("model_not_supported", str(exc), "model") from None
    from worker import pipeline, ranks  # torch is imported only by workers that train

    config = pipeline.JobConfig.from_job(
        job.hyperparameters,
        base_model_dir=base_model_dir,
        training_file=_training_file(artifacts, job, job.training_file),
        validation_file=_training_file(artifacts, job, job.validation_file) if job.validation_file else None,
        seed=job.seed,
        device=pipeline.resolve_device(settings.device),
        checkpoint_every_steps=settings.checkpoint_every_steps,
        train_memory_gib=settings.train_memory_gib,
        work_dir=artifacts.scratch / store.job_key(job.id),
    )
    return ranks.train(config, hooks, resident, resume_from, settings.worker_gpus)


def run_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    job: ClaimedJob,
    shutdown: threading.Event,
    resident: ResidentBase,
) -> None:
    fence = Fence(sessions, job.id, job.attempt)
    artifacts = open_store(settings)
    store.remove_job_temps(artifacts, job.id)
    try:
        with Lease(fence, settings, shutdown) as lease:
            faults.maybe_fail_infra(job.infra_failures)
            with sessions() as session:
                checkpoint = store.latest_checkpoint(session, artifacts, job.id)
            resume_from = store.fetch_checkpoint(artifacts, checkpoint) if checkpoint else None
            hooks = JobHooks(settings, artifacts, job, fence, lease)
            result = _train(settings, artifacts, job, hooks, resident, resume_from)
            lease.control()  # raises JobLost if the job was cancelled during the last step
            if result.outcome == "continue":
                # hooks.job: with "auto" hyperparameters resolved, as the manifest should record them
                store.publish_adapter(artifacts, fence, hooks.job, result.save_adapter, result.trained_tokens)
            elif result.outcome == "pause":
                fence.event(
                    f"Job paused at step {result.step}",
                    data={"step": result.step},
                    status=JobStatus.paused,
                    pause_requested=False,
                    lease_expires_at=None,
                    worker_id=None,
                )
            else:
                fence.event(
                    f"Worker shutting down: job released at step {result.step}; "
                    "it resumes from its last checkpoint",
                    data={"step": result.step},
                    status=JobStatus.queued,
                    lease_expires_at=None,
                    worker_id=None,
                    run_after=time.time(),
                )
    except JobLost:
        _record_lost(sessions, job)
    except UserError as exc:
        _fail(fence, exc.as_error())
    except Exception as exc:
        log.exception("job %s attempt %s failed", job.id, job.attempt)
        _retry_or_fail(settings, fence, job, exc)
    finally:
        result = None
        resident.end_job()  # first: a failing store below must not leave the LoRA on the base
        store.remove_job_temps(artifacts, job.id)
        gc.collect()
        if "torch" in sys.modules:
            from worker.pipeline import release_memory

            release_memory()


def _record_lost(sessions: sessionmaker[Session], job: ClaimedJob) -> None:
    """Say that training stopped, but only if this attempt is still the job's latest (cancelled);
    a zombie whose job was taken over writes nothing."""
    with sessions() as session, session.begin():
        row = session.execute(
            select(Job.status, Job.attempt).where(Job.id == job.id).with_for_update()
        ).first()
        if row is not None and row.attempt == job.attempt and row.status == JobStatus.cancelled:
            session.add(JobEvent(job_id=job.id, message="Job cancelled; training stopped"))
    log.info("job %s attempt %s: no longer ours, stopped", job.id, job.attempt)


def _fail(fence: Fence, error: dict, **job_values) -> None:
    try:
        fence.event(
            f"Job failed: {error['message']}",
            level="error",
            data={"error": error},
            status=JobStatus.failed,
            error=error,
            finished_at=now(),
            lease_expires_at=None,
            **job_values,
        )
    except JobLost:
        pass


def _retry_or_fail(settings: Settings, fence: Fence, job: ClaimedJob, exc: Exception) -> None:
    policy = RetryPolicy(settings.max_attempts, settings.retry_backoff_seconds)
    failures = job.infra_failures + 1
    cause = f"{type(exc).__name__}: {exc}"
    if policy.exhausted(failures):
        _fail(
            fence,
            {
                "code": "infrastructure_error",
                "message": f"Training failed {failures} times; last cause: {cause}",
                "param": None,
            },
            infra_failures=failures,
        )
        return
    delay = policy.delay(failures)
    try:
        fence.event(
            f"Attempt {job.attempt} hit an infrastructure error ({cause}); retrying in {delay:g} s",
            level="warning",
            data={"attempt": job.attempt, "retry_in_seconds": delay},
            status=JobStatus.queued,
            infra_failures=failures,
            run_after=time.time() + delay,
            lease_expires_at=None,
            worker_id=None,
        )
    except JobLost:
        pass


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_worker(settings: Settings, stop_event: threading.Event | None = None) -> None:
    """Claim and run jobs until SIGTERM/SIGINT or `stop_event`. A signal lets the running job finish
    its step, checkpoint and release its lease; then the worker exits."""
    os.environ.update(cuda_allocator_environment())  # before a job imports torch
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_id = settings.worker_id or default_worker_id()
    engine = make_engine(settings.resolved_database_url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    resident = ResidentBase()
    log.info("worker %s started", worker_id)
    try:
        while not stop.is_set():
            try:
                job = claim_job(sessions, worker_id, settings)
            except Exception:
                log.warning("claiming a job failed", exc_info=True)
                job = None
            if job is None:
                stop.wait(settings.poll_seconds)
                continue
            log.info("job %s attempt %s claimed", job.id, job.attempt)
            run_job(settings, sessions, job, stop, resident)
    finally:
        engine.dispose()
        log.info("worker %s stopped", worker_id)
