"""The API process's own capacity: the real `tuneforge api` serving a tiny random Llama on the CPU,
so that the model costs little and what is measured is the path around it (auth and model lookup,
tokenizing, the engine loop's Python, detokenizing, SSE through the event loop). Runs this
checkout and another git revision (default: the last one before the serving hot-path work) one
after the other in the same run, with bench/serve.py's server half and streaming clients.

python3 bench/http_path.py [--baseline-rev 445b8db] [--requests-per-level 64]
Needs no GPU. Writes docs/benchmarks/http_path_cpu.json. Both revisions run in this venv (so both
get uvicorn's uvloop/httptools if installed). The client runs in this process and shares the
machine's cores with the server: read the ratios, not the absolute figures.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import serve  # noqa: E402
from bench._processes import cli  # noqa: E402
from bench._results import LATEST, merge  # noqa: E402
from bench.shapes import build_checkpoint  # noqa: E402

TINY = Path(tempfile.gettempdir()) / "tf-http-path" / "tiny-llama"
ADAPTERS = TINY.parent / "adapters"
VOCAB = 1000  # bench/serve.py's prompts are numbers 100..998; the word tokenizer maps "3".."999"
N_ADAPTERS = 8


def build_tiny():
    if (TINY / "config.json").exists():
        return
    build_checkpoint("tiny", str(TINY))
    serve.ensure_tokenizer(str(TINY), VOCAB)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)

    for i in range(N_ADAPTERS):
        torch.manual_seed(i)
        peft_model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        )
        peft_model.save_pretrained(ADAPTERS / f"ad{i}")
        model = peft_model.unload()


def checkout(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"tf-rev-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True)
    return path


def cli_store(root: Path) -> tuple[dict, str, list[str]]:
    """A data dir with a key and the adapters imported through `tuneforge` of the checkout `root`
    (the baseline revision predates the service bench/serve.py registers with)."""
    env = serve.store_env(Path(tempfile.mkdtemp(prefix="tf-bench-")), TINY, device="cpu", app_root=root)
    key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
    models = []
    for i in range(N_ADAPTERS):
        out = cli(env, "models", "import", str(ADAPTERS / f"ad{i}"), "--tenant", "bench", "--name", f"ad{i}")
        models.append(re.search(r"(ft:\S+)", out).group(1))
    return env, key, models


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", default="445b8db")
    ap.add_argument("--requests-per-level", type=int, default=64)
    a = ap.parse_args()
    build_tiny()
    results = {}
    for label, root in (("baseline", checkout(a.baseline_rev)), ("current", ROOT)):
        env, key, models = cli_store(root)
        workloads = {
            f"c{c}": serve.per_stream(models, c, 16 if c == 1 else max(4, a.requests_per_level // c))
            for c in (1, 16, 64)
        }
        results[label] = serve.run_server(env, key, workloads, cold_models=models)
        print(label, json.dumps(results[label]), flush=True)
    ratios = {
        key: round(results["current"][key] / results["baseline"][key], 2)
        for key in ("c1_tokens_per_s", "c16_tokens_per_s", "c64_tokens_per_s")
    }
    ratios.update(
        {
            key: round(results["baseline"][key] / results["current"][key], 2)
            for key in ("ttft_ms_p50_c16", "ttft_ms_p50_c64")
        }
    )
    print("current / baseline (TTFT: baseline / current)", json.dumps(ratios), flush=True)
    merge(
        "http_path",
        {"baseline_rev": a.baseline_rev, "cpus": os.cpu_count(), **results, "speedup": ratios},
        path=LATEST.parent / "http_path_cpu.json",
    )


if __name__ == "__main__":
    main()
