"""Checkpoints and published adapters on the artifact store (app/core/storage.py).

Each is written into a local temp dir, given its manifest, and published (renamed on the data dir;
uploaded, manifests last, on S3) inside a fenced transaction that also inserts its rows: it is
published only while this attempt owns the job, and a crash before the commit leaves no row (and
at most unreferenced objects, which `tuneforge storage gc` sweeps).
"""

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.artifacts import write_manifest
from app.core.storage import ArtifactStore
from app.models import Checkpoint, JobEvent, JobStatus, Model, checkpoint_model_id, now
from worker import faults
from worker.fence import Fence


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}"


def checkpoint_key(job_id: str, step: int) -> str:
    return f"{job_key(job_id)}/checkpoints/step-{step}"


def remove_job_temps(store: ArtifactStore, job_id: str) -> None:
    """Temp dirs of this job are only written by its lease holder, so the holder may drop them."""
    store.remove_temps(job_key(job_id))
    store.remove_temps(f"{job_key(job_id)}/checkpoints")


def latest_checkpoint(session, store: ArtifactStore, job_id: str) -> Checkpoint | None:
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    )
    # The manifest is published last: with it, the whole checkpoint is there.
    if row is not None and store.exists(f"{row.path}/adapter/manifest.json"):
        return row
    return None


def fetch_checkpoint(store: ArtifactStore, checkpoint: Checkpoint) -> Path:
    """A local dir with the checkpoint (a download into the job's temp dirs on S3)."""
    return store.fetch_dir(checkpoint.path, near=f"{job_key(checkpoint.job_id)}/resume")


@contextmanager
def _publishing(
    store: ArtifactStore,
    fence: Fence,
    job,
    write: Callable[[Path], None],
    *,
    model_id: str,
    kind: str,
    final: str | None,
    adapter_dir: str = "",
    manifest: dict | None = None,
    job_values: dict | None = None,
) -> Iterator[tuple[Session, str]]:
    """Publish a model version of `job` under `model_id`: `write` fills a temp dir, the adapter in
    it (at `adapter_dir`) gets its manifest, then one fenced transaction publishes the dir at key
    `final`, writes `job_values` to the job and inserts the Model row and whatever the caller adds in
    its `with` block. `final` None means adapters/<version>/: content-addressed, so what is already
    there holds the same weights and may be another model's. Yields (session, version)."""
    tmp = store.temp_dir(final or f"{job_key(job.id)}/publish")
    try:
        write(tmp)
        version = write_manifest(
            tmp / adapter_dir,
            base_model=job.model,
            hyperparameters=job.hyperparameters,
            job_id=job.id,
            **(manifest or {}),
        )
        target = final or f"adapters/{version}"
        faults.crash_point("publish_before_rename")
        with fence.transaction(**(job_values or {})) as session:
            # A checkpoint's key may hold what an attempt that crashed before its commit published.
            store.publish_dir(tmp, target, replace=final is not None)
            faults.crash_point("publish_before_commit")
            session.add(
                Model(
                    id=model_id,
                    tenant_id=job.tenant_id,
                    base_model=job.model,
                    kind=kind,
                    version=version,
                    path=f"{target}/{adapter_dir}" if adapter_dir else target,
                    job_id=job.id,
                )
            )
            yield session, version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    store: ArtifactStore,
    fence: Fence,
    job,
    step: int,
    write: Callable[[Path], None],
    metrics: dict,
    keep_checkpoints: int,
) -> None:
    """jobs/<job>/checkpoints/step-<N>/ with adapter/ and state/; rows for the checkpoint and its
    servable model id; older checkpoints beyond `keep_checkpoints` are pruned."""
    final = checkpoint_key(job.id, step)
    model_id = checkpoint_model_id(job.output_model, step)
    with _publishing(
        store,
        fence,
        job,
        write,
        model_id=model_id,
        kind="checkpoint",
        final=final,
        adapter_dir="adapter",
        manifest={"step": step},
    ) as (session, _version):
        session.add(Checkpoint(job_id=job.id, step=step, path=final, metrics=metrics))
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
            .offset(keep_checkpoints)
        ).all()
        stale_keys = [c.path for c in stale]
        if stale:
            session.execute(
                delete(Model).where(
                    Model.id.in_([checkpoint_model_id(job.output_model, c.step) for c in stale])
                )
            )
            session.execute(delete(Checkpoint).where(Checkpoint.id.in_([c.id for c in stale])))
    for key in stale_keys:
        store.delete_prefix(key)


def publish_adapter(
    store: ArtifactStore, fence: Fence, job, save_adapter: Callable[[Path], None], trained_tokens: int
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
        store,
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
