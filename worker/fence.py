"""Fenced writes: every write a worker makes for a job first updates the job row
`WHERE id = :id AND attempt = :attempt AND status = 'running'` in the same transaction. No row
matched means the job was cancelled or another attempt owns it now, so the write is dropped and
JobLost raised. The update also locks the row until commit, so a cancel or a takeover cannot
interleave with what the transaction writes (PostgreSQL row lock; SQLite BEGIN IMMEDIATE)."""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, JobEvent, JobStatus
from worker.errors import JobLost


class Fence:
    def __init__(self, sessions: sessionmaker[Session], job_id: str, attempt: int):
        self.sessions, self.job_id, self.attempt = sessions, job_id, attempt

    @contextmanager
    def transaction(self, **job_values) -> Iterator[Session]:
        """A transaction that holds the job; `job_values` are written to the job row."""
        values = job_values or {"attempt": Job.attempt}  # a no-op write still takes the row lock
        with self.sessions() as session, session.begin():
            result = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.attempt == self.attempt, Job.status == JobStatus.running)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                raise JobLost(self.job_id)
            yield session

    def event(self, message: str, level: str = "info", data: dict | None = None, **job_values) -> None:
        with self.transaction(**job_values) as session:
            session.add(JobEvent(job_id=self.job_id, level=level, message=message, data=data))
