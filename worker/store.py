"""Checkpoints and published adapters on the artifact store.

Each is written into a temp dir next to its final place, fsynced, and renamed inside a fenced
transaction that also inserts its rows: the rename happens only while this attempt owns the job,
and a crash before the commit leaves no row (and at most a complete, unreferenced directory).
"""

import shutil
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import delete, select

from app.core.artifacts import publish_dir, remove_stale_temps, temp_sibling, write_manifest
from app.core.settings import Settings
from app.models import Checkpoint, JobEvent, JobStatus, Model, now
from worker import faults
from worker.fence import Fence


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def checkpoints_dir(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "checkpoints"


def remove_job_temps(settings: Settings, job_id: str) -> None:
    """Temp dirs of this job are only written by its lease holder, so the holder may drop them."""
    remove_stale_temps(job_dir(settings, job_id))
    remove_stale_temps(checkpoints_dir(settings, job_id))


def latest_checkpoint(session, settings: Settings, job_id: str) -> Checkpoint | None:
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    )
    if row is not None and (settings.data_dir / row.path / "state").is_dir():
        return row
    return None


def checkpoint_model_id(output_model: str, step: int) -> str:
    return f"{output_model}:ckpt-step-{step}"


def save_checkpoint(
    settings: Settings, fence: Fence, job, step: int, write: Callable[[Path], None], metrics: dict
) -> None:
    """jobs/<job>/checkpoints/step-<N>/ with adapter/ and state/; rows for the checkpoint and its
    servable model id; older checkpoints beyond settings.keep_checkpoints are pruned."""
    final = checkpoints_dir(settings, job.id) / f"step-{step}"
    relative = final.relative_to(settings.data_dir).as_posix()
    tmp = temp_sibling(final)
    try:
        write(tmp)
        version = write_manifest(
            tmp / "adapter",
            base_model=job.model,
            hyperparameters=job.hyperparameters,
            job_id=job.id,
            step=step,
        )
        with fence.transaction() as session:
            if final.exists():  # renamed by an attempt that crashed before its commit: not ours
                shutil.rmtree(final)
            publish_dir(tmp, final)
            session.add(Checkpoint(job_id=job.id, step=step, path=relative, metrics=metrics))
            session.add(
                Model(
                    id=checkpoint_model_id(job.output_model, step),
                    tenant_id=job.tenant_id,
                    base_model=job.model,
                    kind="checkpoint",
                    version=version,
                    path=f"{relative}/adapter",
                    job_id=job.id,
                )
            )
            session.add(
                JobEvent(
                    job_id=job.id,
                    message=f"Checkpoint saved at step {step}",
                    data={"step": step, "checkpoint": checkpoint_model_id(job.output_model, step)},
                )
            )
            stale = session.scalars(
                select(Checkpoint)
                .where(Checkpoint.job_id == job.id)
                .order_by(Checkpoint.step.desc())
                .offset(settings.keep_checkpoints)
            ).all()
            stale_paths = [settings.data_dir / c.path for c in stale]
            if stale:
                session.execute(
                    delete(Model).where(
                        Model.id.in_([checkpoint_model_id(job.output_model, c.step) for c in stale])
                    )
                )
                session.execute(delete(Checkpoint).where(Checkpoint.id.in_([c.id for c in stale])))
        for path in stale_paths:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_adapter(
    settings: Settings, fence: Fence, job, save_adapter: Callable[[Path], None], trained_tokens: int
) -> str:
    """adapters/<sha256>/ (adapter_config.json, adapter_model.safetensors, manifest.json), then the
    job's success and its Model row, all in one fenced transaction. Returns the version."""
    tmp = temp_sibling(job_dir(settings, job.id) / "publish")
    try:
        save_adapter(tmp)
        version = write_manifest(
            tmp, base_model=job.model, hyperparameters=job.hyperparameters, job_id=job.id
        )
        faults.crash_point("publish_before_rename")
        settings.adapters_dir.mkdir(parents=True, exist_ok=True)
        finished = now()
        with fence.transaction(
            status=JobStatus.succeeded,
            fine_tuned_model=job.output_model,
            trained_tokens=trained_tokens,
            finished_at=finished,
            lease_expires_at=None,
        ) as session:
            publish_dir(tmp, settings.adapters_dir / version)
            faults.crash_point("publish_before_commit")
            session.add(
                Model(
                    id=job.output_model,
                    tenant_id=job.tenant_id,
                    base_model=job.model,
                    kind="fine_tune",
                    version=version,
                    path=f"adapters/{version}",
                    job_id=job.id,
                )
            )
            session.add(
                JobEvent(
                    job_id=job.id,
                    message=f"New fine-tuned model created: {job.output_model}",
                    data={"fine_tuned_model": job.output_model, "version": version},
                )
            )
            session.add(
                JobEvent(
                    job_id=job.id,
                    message="The job has successfully completed",
                    data={"trained_tokens": trained_tokens},
                )
            )
        return version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
