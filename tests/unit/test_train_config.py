"""The worker trains with the API's hyperparameter model: what a job records is what it runs with
("auto" resolved from the tokenized file), and a recorded value the API would refuse fails the job
with the message the API gives."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.errors import validation_message
from app.core.hyperparameters import Hyperparameters
from app.schemas import JobCreate
from tests.worker_support import HYPERPARAMETERS
from worker.errors import UserError
from worker.pipeline import JobConfig, RunInputs

JOB_FIELDS = {
    "base_model_dir": Path("-"),
    "training_file": Path("-"),
    "validation_file": None,
    "seed": 0,
    "device": "cpu",
    "checkpoint_every_steps": 10,
}


def test_recorded_hyperparameters_are_what_the_worker_trains_with():
    resolved = Hyperparameters(learning_rate_multiplier=0.5, max_seq_length=16).resolve(100, 5000)
    record = resolved.model_dump()
    job = JobConfig.from_job(record, **JOB_FIELDS)
    config = job.train_config(job.hyperparameters.resolve(100, 5000))
    assert config.model_dump(exclude={*RunInputs.model_fields, "micro_batch_tokens"}) == record
    assert config.learning_rate == pytest.approx(1e-4)


def test_a_requested_record_keeps_auto_until_the_worker_has_the_tokens():
    job = JobConfig.from_job(Hyperparameters(n_epochs=2).model_dump(), **JOB_FIELDS)
    assert (job.hyperparameters.batch_size, job.hyperparameters.n_epochs) == ("auto", 2)
    config = job.train_config(job.hyperparameters.resolve(3000, 469_000))
    assert (config.batch_size, config.n_epochs, config.learning_rate_multiplier) == (128, 2, 1.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_seq_length", 8), ("lora_r", 0), ("lora_dropout", 1.0), ("target_modules", [])],
)
def test_worker_refuses_what_the_api_refuses_with_the_same_message(name, value):
    with pytest.raises(ValidationError) as api:
        JobCreate(model="m", training_file="f", hyperparameters={name: value})
    with pytest.raises(UserError) as worker:
        JobConfig.from_job({**HYPERPARAMETERS, name: value}, **JOB_FIELDS)
    assert worker.value.code == "invalid_hyperparameters"
    assert (worker.value.message, worker.value.param) == validation_message(api.value.errors())
    assert worker.value.param == f"hyperparameters.{name}"
