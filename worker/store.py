"""Checkpoints and published adapters on the artifact store.

Each is written into a temp dir on the same filesystem as its final place (next to it; in the job's
dir for an adapter, whose place is named by its hash), fsynced, and renamed inside a fenced
transaction that also inserts its rows: the rename happens only while this attempt owns the job,
and a crash before the commit leaves no row (and at most a complete, unreferenced directory).
"""

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.artifacts import publish_dir, remove_stale_temps, temp_sibling, write_manifest
from app.core.settings import Settings
from app.models import Checkpoint, JobEvent, JobStatus, Model, checkpoint_model_id, now
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


@contextmanager
def _publishing(
    settings: Settings,
    fence: Fence,
    job,
    write: Callable[[Path], None],
    *,
    model_id: str,
    kind: str,
    final: Path | None,
    adapter_dir: str = "",
    manifest: dict | None = None,
    job_values: dict | None = None,
) -> Iterator[tuple[Session, str]]:
    """Publish a model version of `job` under `model_id`: `write` fills a temp dir, the adapter in
    it (at `adapter_dir`) gets its manifest, then one fenced transaction renames the dir to `final`,
    writes `job_values` to the job and inserts the Model row and whatever the caller adds in its
    `with` block. `final` None means adapters/<version>/: content-addressed, so a directory already
    there holds the same weights and may be another model's. Yields (session, version)."""
    tmp = temp_sibling(final or job_dir(settings, job.id) / "publish")
    try:
        write(tmp)
        version = write_manifest(
            tmp / adapter_dir,
            base_model=job.model,
            hyperparameters=job.hyperparameters,
            job_id=job.id,
            **(manifest or {}),
        )
        target = final or settings.adapters_dir / version
        target.parent.mkdir(parents=True, exist_ok=True)
        faults.crash_point("publish_before_rename")
        with fence.transaction(**(job_values or {})) as session:
            if final is not None and final.exists():  # renamed by an attempt that crashed before its commit
                shutil.rmtree(final)
            publish_dir(tmp, target)
            faults.crash_point("publish_before_commit")
            session.add(
                Model(
                    id=model_id,
                    tenant_id=job.tenant_id,
                    base_model=job.model,
                    kind=kind,
                    version=version,
                    path=(target / adapter_dir).relative_to(settings.data_dir).as_posix(),
                    job_id=job.id,
                )
            )
            yield session, version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    settings: Settings, fence: Fence, job, step: int, write: Callable[[Path], None], metrics: dict
) -> None:
    """jobs/<job>/checkpoints/step-<N>/ with adapter/ and state/; rows for the checkpoint and its
    servable model id; older checkpoints beyond settings.keep_checkpoints are pruned."""
    final = checkpoints_dir(settings, job.id) / f"step-{step}"
    model_id = checkpoint_model_id(job.output_model, step)
    with _publishing(
        settings,
        fence,
        job,
        write,
        model_id=model_id,
        kind="checkpoint",
        final=final,
        adapter_dir="adapter",
        manifest={"step": step},
    ) as (session, _version):
        relative = final.relative_to(settings.data_dir).as_posix()
        session.add(Checkpoint(job_id=job.id, step=step, path=relative, metrics=metrics))
        session.add(
            JobEvent(
                job_id=job.id,
                message=f"Checkpoint saved at step {step}",
                data={"step": step, "checkpoint": model_id},
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


def publish_adapter(
    settings: Settings, fence: Fence, job, save_adapter: Callable[[Path], None], trained_tokens: int
) -> str:
    """adapters/<sha256>/ (adapter_config.json, adapter_model.safetensors, manifest.json), then the
    job's success and its Model row, all in one fenced transaction. Returns the version."""
    succeeded = {
        "status": JobStatus.succeeded,
        "fine_tuned_model": job.output_model,
        "trained_tokens": trained_tokens,
        "finished_at": now(),
        "lease_expires_at": None,
    }
    with _publishing(
        settings,
        fence,
        job,
        save_adapter,
        model_id=job.output_model,
        kind="fine_tune",
        final=None,
        job_values=succeeded,
    ) as (session, version):
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
