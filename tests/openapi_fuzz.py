"""Fuzz the API with schemathesis: `tuneforge api` on a free port with a real SQLite database, a real
API key and seeded objects (a training file, a queued job, a fine-tune), then `schemathesis run`
over every operation in /openapi.json with its default checks (tests/schemathesis.toml).

    python -m tests.openapi_fuzz --max-examples 500    # what `make fuzz` runs

tests/e2e/test_openapi_fuzz.py runs the same with few examples."""

import argparse
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.core.base_models import resolve_base_model
from app.core.migrate import upgrade
from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from tests.conftest import BASE_MODEL_CACHE, REPO, link_base_model, running_api
from tests.inference_support import create_test_key, publish_test_adapter

CONFIG = REPO / "tests" / "schemathesis.toml"
SCHEMATHESIS = REPO / ".venv" / "bin" / "schemathesis"
FINE_TUNE = f"ft:{EMBEDDED_BASE_MODEL}:fuzz:seeded"
TRAINING_FILE = b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n'


@contextmanager
def seeded_api(data_dir: Path, base_model_dir: Path):
    """The server and the environment schemathesis runs with: the key and the seeded ids."""
    link_base_model(data_dir, base_model_dir)
    env = {
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'tuneforge.db'}",
        "TUNEFORGE_DEVICE": "cpu",
    }
    settings = Settings(data_dir=data_dir, database_url=env["TUNEFORGE_DATABASE_URL"], device="cpu")
    upgrade(settings.resolved_database_url)
    key = create_test_key(settings, "fuzz")
    publish_test_adapter(settings, "fuzz", FINE_TUNE, seed=7)
    with running_api(env) as url:
        headers = {"Authorization": f"Bearer {key}"}
        uploaded = httpx.post(
            f"{url}/v1/files",
            headers=headers,
            files={"file": ("seed.jsonl", TRAINING_FILE)},
            data={"purpose": "fine-tune"},
            timeout=60,
        )
        uploaded.raise_for_status()
        file_id = uploaded.json()["id"]
        job = httpx.post(
            f"{url}/v1/fine_tuning/jobs",
            headers=headers,
            json={"model": EMBEDDED_BASE_MODEL, "training_file": file_id},
            timeout=60,
        )
        job.raise_for_status()
        yield (
            url,
            {
                "TUNEFORGE_FUZZ_KEY": key,
                "TUNEFORGE_FUZZ_FILE_ID": file_id,
                "TUNEFORGE_FUZZ_MODELS": f"{EMBEDDED_BASE_MODEL},{FINE_TUNE}",
            },
        )


def run_schemathesis(url: str, env: dict, *args: str, timeout: float | None = None):
    """`schemathesis run` against the server's /openapi.json; its report goes to stdout."""
    return subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(CONFIG), "--no-color", "run", f"{url}/openapi.json", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-examples", type=int, default=500, help="test cases per operation and phase")
    parser.add_argument("schemathesis_args", nargs="*", help="more `schemathesis run` options, after --")
    args = parser.parse_args()
    base_model_dir = resolve_base_model(EMBEDDED_BASE_MODEL, Settings(data_dir=BASE_MODEL_CACHE))
    with tempfile.TemporaryDirectory(prefix="tuneforge-fuzz-") as tmp:
        with seeded_api(Path(tmp), base_model_dir) as (url, env):
            examples = ("--max-examples", str(args.max_examples))
            result = run_schemathesis(url, env, *examples, *args.schemathesis_args)
    sys.stdout.write(result.stdout)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
