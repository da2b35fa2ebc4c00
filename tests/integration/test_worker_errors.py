"""User errors fail a job at once without retry; infrastructure errors are retried with backoff."""

import pytest

from tests.conftest import link_base_model
from tests.worker_support import (
    ARITHMETIC,
    create_file,
    create_job,
    create_tenant,
    events,
    get_job,
    wait_for,
    worker_thread,
)


def run_to_end(settings, job_id, **overrides):
    with worker_thread(settings, poll_seconds=0.1, **overrides):
        wait_for(
            lambda: get_job(job_id).status in ("succeeded", "failed"), timeout=60, message="the job to finish"
        )
    return get_job(job_id)


def assert_failed_once(job, code, param):
    assert job.status == "failed"
    assert job.error["code"] == code and job.error["param"] == param
    assert job.attempt == 1 and job.infra_failures == 0
    assert job.finished_at is not None


def test_malformed_training_line_fails_at_once_naming_the_line(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    training_file = create_file(
        settings, tenant, [ARITHMETIC[0], '{"prompt": "1+1=", "completion": 2}'], "prompt_completion"
    )
    job = run_to_end(settings, create_job(tenant, training_file))
    assert_failed_once(job, "invalid_file_format", "training_file")
    assert "Line 2" in job.error["message"]
    assert events(job.id)[-1].level == "error"


def test_example_longer_than_max_seq_length_fails_naming_the_line(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    training_file = create_file(settings, tenant, [{"text": "short"}, {"text": "word " * 100}], "text")
    job = run_to_end(settings, create_job(tenant, training_file, max_seq_length=32))
    assert_failed_once(job, "sequence_too_long", "training_file")
    assert "Line 2" in job.error["message"] and "max_seq_length=32" in job.error["message"]


@pytest.mark.slow
def test_target_module_the_model_lacks_fails_at_once(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    training_file = create_file(settings, tenant, ARITHMETIC[:2], "prompt_completion")
    job = run_to_end(
        settings, create_job(tenant, training_file, target_modules=["q_proj", "query_key_value"])
    )
    assert_failed_once(job, "invalid_hyperparameters", "hyperparameters.target_modules")
    assert "query_key_value" in job.error["message"] and "v_proj" in job.error["message"]


def test_impossible_hyperparameter_value_fails_at_once(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    training_file = create_file(settings, tenant, ARITHMETIC[:2], "prompt_completion")
    job = run_to_end(settings, create_job(tenant, training_file, lora_r=0))
    assert_failed_once(job, "invalid_hyperparameters", "hyperparameters.lora_r")


def test_infrastructure_error_is_retried_then_succeeds(settings, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_TEST_RECIPE", "noop")
    monkeypatch.setenv("TUNEFORGE_TEST_INFRA_FAILURES", "2")
    tenant = create_tenant()
    job_id = create_job(tenant, create_file(settings, tenant, ARITHMETIC[:2], "prompt_completion"))
    job = run_to_end(settings, job_id, retry_backoff_seconds=0.2, max_attempts=3)
    assert job.status == "succeeded", job.error
    assert job.attempt == 3 and job.infra_failures == 2
    retries = [e for e in events(job_id) if e.level == "warning"]
    assert [e.data["retry_in_seconds"] for e in retries] == [0.2, 0.4]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_infrastructure_errors_fail_the_job_after_max_attempts(settings, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_TEST_RECIPE", "noop")
    monkeypatch.setenv("TUNEFORGE_TEST_INFRA_FAILURES", "9")
    tenant = create_tenant()
    job_id = create_job(tenant, create_file(settings, tenant, ARITHMETIC[:2], "prompt_completion"))
    job = run_to_end(settings, job_id, retry_backoff_seconds=0.05, max_attempts=2)
    assert job.status == "failed" and job.attempt == 2 and job.infra_failures == 2
    assert job.error["code"] == "infrastructure_error"
    assert "simulated infrastructure failure" in job.error["message"]
