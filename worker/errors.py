"""The worker's exception tree: what the user must fix, what the platform retries, and the signal
that this worker no longer owns the job."""


class WorkerError(Exception):
    pass


class UserError(WorkerError):
    """Bad data or impossible hyperparameters: the job fails at once, retrying cannot help."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def as_error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


class InfraError(WorkerError):
    """A failure of the machine or a dependency (disk, GPU, database): retried with backoff."""


class JobLost(WorkerError):
    """A fenced write matched no row: the job was cancelled or another attempt took it over."""
