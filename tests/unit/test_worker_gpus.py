"""TUNEFORGE_WORKER_GPUS: the devices one job trains on, a worker setting (worker/ranks.py)."""

import pytest
from pydantic import ValidationError

from app.core.hyperparameters import Hyperparameters
from app.core.settings import Settings
from app.schemas import JobCreate
from worker.ranks import training_devices


@pytest.mark.parametrize(
    ("value", "recorded"), [(None, None), ("", None), ("all", "all"), (" 1 ", "1"), ("0, 1,3", "0,1,3")]
)
def test_the_setting_is_a_list_of_device_indices_or_all(value, recorded):
    assert Settings(worker_gpus=value).worker_gpus == recorded


@pytest.mark.parametrize("value", ["0,0", "gpu0", "0;1", "-1", "1,"])
def test_anything_else_is_refused(value):
    with pytest.raises(ValidationError, match="device indices"):
        Settings(worker_gpus=value)


def test_devices_of_the_setting():
    assert training_devices(None, "cuda") is None  # the default device, in the worker's process
    assert training_devices("2", "cuda") == [2]
    assert training_devices("0,1", "cpu") == [0, 1]  # two gloo processes on the CPU
    assert training_devices("all", "cpu") is None


def test_a_job_cannot_ask_for_devices():
    schemas = (JobCreate.model_json_schema(), Hyperparameters.model_json_schema())
    fields = [name for schema in schemas for name in schema["properties"]]
    assert "hyperparameters" in fields and "lora_r" in fields
    assert not [name for name in fields if "gpu" in name or "device" in name or "rank" in name]
