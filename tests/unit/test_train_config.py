"""The worker trains with the API's hyperparameter model: what a job records is what it runs with,
and a recorded value the API would refuse fails the job with the message the API gives."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.errors import validation_message
from app.core.hyperparameters import Hyperparameters
from app.schemas import JobCreate
from tests.worker_support import HYPERPARAMETERS
from worker.errors import UserError
from worker.pipeline import TrainConfig

JOB_FIELDS = {
    "base_model_dir": Path("-"),
    "training_file": Path("-"),
    "validation_file": None,
    "seed": 0,
    "device": "cpu",
    "checkpoint_every_steps": 10,
}


def test_recorded_hyperparameters_are_what_the_worker_trains_with():
    record = (
        Hyperparameters(learning_rate_multiplier=0.5, max_seq_length=16).resolve(examples=100).model_dump()
    )
    config = TrainConfig.from_job(record, **JOB_FIELDS)
    assert config.model_dump(exclude=set(JOB_FIELDS)) == record
    assert config.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_seq_length", 8), ("lora_r", 0), ("lora_dropout", 1.0), ("target_modules", [])],
)
def test_worker_refuses_what_the_api_refuses_with_the_same_message(name, value):
    with pytest.raises(ValidationError) as api:
        JobCreate(model="m", training_file="f", hyperparameters={name: value})
    with pytest.raises(UserError) as worker:
        TrainConfig.from_job({**HYPERPARAMETERS, name: value}, **JOB_FIELDS)
    assert worker.value.code == "invalid_hyperparameters"
    assert (worker.value.message, worker.value.param) == validation_message(api.value.errors())
    assert worker.value.param == f"hyperparameters.{name}"
