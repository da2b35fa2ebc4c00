"""The artifact store's sweep: objects that no database row references, once older than a grace
period (what a crash between a publish and its commit left, temp dirs, files of deleted rows).

A publish uploads before it commits its row, so a young unreferenced object may be one whose row
is about to be committed: only objects older than the grace period go. Rows reference keys
(`files/<id>.jsonl`) or prefixes (`adapters/<version>`, `jobs/<job>/checkpoints/step-<N>`).
"""

import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.storage import ARTIFACT_PREFIXES, ArtifactStore
from app.models import Checkpoint, File, Model
from app.services.files import file_key


@dataclass(frozen=True)
class Sweep:
    removed: list[str]
    removed_bytes: int
    kept_young: int  # unreferenced, but within the grace period


def referenced_keys(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session, session.begin():
        keys = {file_key(file_id) for file_id in session.scalars(select(File.id))}
        keys.update(session.scalars(select(Model.path)))
        keys.update(session.scalars(select(Checkpoint.path)))
    return keys


def _is_referenced(key: str, referenced: set[str]) -> bool:
    parts = key.split("/")
    return any("/".join(parts[:n]) in referenced for n in range(1, len(parts) + 1))


def sweep(
    sessions: sessionmaker[Session], store: ArtifactStore, grace_seconds: float, *, dry_run: bool = False
) -> Sweep:
    """Delete (or with dry_run only report) the old unreferenced objects."""
    # The rows are read after the listing: an object listed before its row commits is young.
    listed = [obj for prefix in ARTIFACT_PREFIXES for obj in store.list_objects(prefix)]
    cutoff = time.time() - grace_seconds
    referenced = referenced_keys(sessions)
    unreferenced = [obj for obj in listed if not _is_referenced(obj.key, referenced)]
    old = [obj for obj in unreferenced if obj.modified < cutoff]
    young = len(unreferenced) - len(old)
    if old and not dry_run:
        # Once more just before deleting: an old content-addressed adapter that a new row took
        # up (its publish uploads the same bytes again, then commits) since the first read stays.
        referenced = referenced_keys(sessions)
        old = [obj for obj in old if not _is_referenced(obj.key, referenced)]
        store.delete(obj.key for obj in old)
    return Sweep([obj.key for obj in old], sum(obj.size for obj in old), young)
