"""Serving benchmark: naive PEFT baseline vs the Tuneforge server (app/inference/engine.py).

python3 bench/serve.py [--model-shape tinyllama|mistral7b|qwen3] [--only naive|server]
                       [--requests-per-level 64]
Both halves use a model of that shape with random weights (bench/shapes.py) and 8 random LoRA adapters
(r=16, all-linear, nonzero B); 48-token prompts, 64 new tokens, greedy.
  naive:  the seed's serving: the base in NF4, one request at a time, PeftModel + set_adapter per request.
  server: adapters imported into a temp data dir with `tuneforge models import`, a key from
          `tuneforge keys create`, the real server (`tuneforge api`, bf16 base on the GPU) driven by
          concurrent streaming (SSE)
          httpx clients (4 streams per client process, bench/_clients.py) at concurrency 1, 16, 64:
          aggregate generated tok/s, TTFT p50/p99, cold-load p50.
Results merged into docs/benchmarks/latest.json under "serve" (the 1.1B shape), "serve_7b" or "serve_qwen3".
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._clients import NEW, PROMPT_LEN, drive, one, pct  # noqa: E402
from bench._results import merge  # noqa: E402
from bench.shapes import RESULT_KEYS, SHAPES, build_checkpoint  # noqa: E402

N_AD = 8


def ensure_tokenizer(path, vocab_size=32000):
    """The random checkpoint has no tokenizer; the server needs one. A word-level tokenizer whose
    words are the ids themselves ("3".."31999"): a prompt of N numbers is N tokens."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{str(i): i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)


def load_base(checkpoint):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=bnb, device_map={"": 0}, dtype=torch.bfloat16
    )


def make_adapters(base, root: Path):
    """8 random r=16 all-linear adapters (nonzero B) saved with save_pretrained under root/ad{i}."""
    from peft import LoraConfig, get_peft_model

    for i in range(N_AD):
        p = root / f"ad{i}"
        if not (p / "adapter_model.safetensors").exists():
            torch.manual_seed(i)
            m = get_peft_model(
                base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
            )
            m.save_pretrained(str(p))
            base = m.unload()
    return base


def run_naive(base, root: Path, n_requests=8):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(root / "ad0"), adapter_name="ad0")
    for i in range(1, N_AD):
        model.load_adapter(str(root / f"ad{i}"), adapter_name=f"ad{i}")
    model.eval()
    prompt = torch.randint(3, 32000, (1, PROMPT_LEN), device="cuda", generator=None)

    def gen():
        with torch.inference_mode():
            return model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                pad_token_id=2,
            )

    gen()
    lat = []
    torch.cuda.synchronize()
    t0 = time.time()
    for k in range(n_requests):
        t = time.time()
        model.set_adapter(f"ad{k % N_AD}")
        gen()
        torch.cuda.synchronize()
        lat.append(time.time() - t)
    dt = time.time() - t0
    loads = []
    for k in range(5):
        torch.cuda.synchronize()
        t = time.time()
        model.load_adapter(str(root / f"ad{k % N_AD}"), adapter_name=f"x{k}")
        torch.cuda.synchronize()
        loads.append(time.time() - t)
    return dict(
        naive_tokens_per_s=round(n_requests * NEW / dt, 2),
        naive_latency_p50_s=round(pct(lat, 50), 4),
        naive_requests=n_requests,
        naive_load_adapter_ms_p50=round(pct(loads, 50) * 1000, 1),
        naive_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
    )


def _cli(env, *args):
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=env.get("BENCH_APP_ROOT", str(ROOT)),
    )
    if r.returncode:
        raise RuntimeError(f"tuneforge {' '.join(args)} failed: {r.stderr[-2000:]}")
    return r.stdout


def setup_store(data_dir: Path, ckpt, adapters: Path, device="cuda", app_root=ROOT):
    """A data dir with a key and the N_AD adapters imported; `app_root` is the checkout whose
    `tuneforge` runs (bench/http_path.py compares two revisions)."""
    # The base name is the checkpoint's directory name: import checks the adapter's recorded base.
    base_name = Path(ckpt).name
    env = dict(
        os.environ,
        TUNEFORGE_DATA_DIR=str(data_dir),
        TUNEFORGE_BASE_MODELS=json.dumps({base_name: str(ckpt)}),
        TUNEFORGE_SERVE_BASE_MODEL=base_name,
        TUNEFORGE_DEVICE=device,
        BENCH_APP_ROOT=str(app_root),
        PYTHONPATH=os.pathsep.join([str(app_root), *[p for p in [os.environ.get("PYTHONPATH")] if p]]),
    )
    key_out = _cli(env, "keys", "create", "--tenant", "bench")
    m = re.search(r"(tf[-_][A-Za-z0-9_\-]{16,}|sk[-_][A-Za-z0-9_\-]{16,})", key_out)
    key = m.group(1) if m else key_out.strip().split()[-1]
    models = []
    for i in range(N_AD):
        out = _cli(
            env,
            "models",
            "import",
            str(adapters / f"ad{i}"),
            "--tenant",
            "bench",
            "--name",
            f"ad{i}",
            "--base",
            base_name,
        )
        mm = re.search(r"(ft:\S+)", out)
        models.append(mm.group(1) if mm else f"ft:{base_name}:bench:ad{i}")
    return env, key, models


def run_server(per_level=64, port=8765, levels=(1, 16, 64), py_spy=None, **store):
    data_dir = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    env, key, models = setup_store(data_dir, **store)
    env["TUNEFORGE_PORT"] = str(port)
    env["TUNEFORGE_MAX_BATCH_SIZE"] = "64"  # the 64-concurrent level decodes as one batch
    # The log goes straight to $OUT (if set) so that it survives a killed run; -X faulthandler:
    # SIGABRT on a stuck run dumps every thread's stack into it.
    log_path = Path(os.environ["OUT"]) / "api.log" if os.environ.get("OUT") else data_dir / "api.log"
    command = [sys.executable, "-X", "faulthandler", "-m", "app.cli", "api"]
    if py_spy:  # sample the API process's GIL holder throughout (raw stacks, one line each)
        command = [
            "py-spy",
            "record",
            "--gil",
            "--threads",
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            py_spy,
            "--",
            *command,
        ]
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=env["BENCH_APP_ROOT"],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=False,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"tuneforge api exited ({proc.returncode}): {log_path.read_text()[-1500:]}"
                )
            if time.time() > deadline:
                raise RuntimeError("tuneforge api did not come up in 180 s")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code < 500:
                    break
            except Exception:
                time.sleep(0.5)
        # Cold load: first request to each adapter (disk -> CPU tier -> GPU slot -> first token)
        # minus a warm request to the same adapter; this also makes all 8 resident.
        cold = []
        for m in models:
            c = asyncio.run(_one_client(url, key, m))
            w = asyncio.run(_one_client(url, key, m))
            cold.append(c - w)
        loads = histogram(url, "tuneforge_adapter_load_seconds")
        out = {
            # The loader thread's own time (read + verify + convert + pin), from the server's /metrics.
            "server_loader_ms_mean": round(1000 * loads["sum"] / max(loads["count"], 1), 1),
            "server_adapter_cold_load_p50_s": round(pct(cold, 50), 4),
            "adapter_load_ms_p50": round(pct(cold, 50) * 1000, 1),
            "adapter_load_ms_all": [round(c * 1000, 1) for c in cold],
        }
        for conc in levels:
            before = histogram(url, "tuneforge_time_to_first_token_seconds")
            r = drive(url, key, models, conc, 16 if conc == 1 else max(per_level, 4 * conc))
            after = histogram(url, "tuneforge_time_to_first_token_seconds")
            # The engine's own submit -> first token, against the client's TTFT: the rest is the
            # HTTP path (auth, lookup, tokenizing, SSE).
            r["engine_ttft_ms_mean"] = round(
                1000 * (after["sum"] - before["sum"]) / max(after["count"] - before["count"], 1), 1
            )
            out[f"server_c{conc}"] = r
            out[f"c{conc}_tokens_per_s"] = r["tokens_per_s"]
            out[f"ttft_ms_p50_c{conc}"] = round(r["ttft_p50_s"] * 1000, 1)
        if "server_c64" in out:
            out["tuneforge_tokens_per_s_c64"] = out["server_c64"]["tokens_per_s"]
        return out
    except BaseException:
        if proc.poll() is None:
            import signal

            proc.send_signal(signal.SIGABRT)  # faulthandler: stacks into the log
            time.sleep(2)
        raise
    finally:
        if py_spy:  # stop the API under py-spy, which then writes its profile and exits
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            for pid in children.read_text().split() if children.exists() else []:
                os.kill(int(pid), 15)
        else:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def histogram(url, name) -> dict:
    """A Prometheus histogram's sum and count from the server's /metrics, summed over labels."""
    import httpx

    total = {"sum": 0.0, "count": 0.0}
    pattern = rf"^{name}_(sum|count)(?:{{[^}}]*}})? (\S+)$"
    for m in re.finditer(pattern, httpx.get(url + "/metrics").text, re.M):
        total[m.group(1)] += float(m.group(2))
    return total


async def _one_client(url, key, model):
    import httpx

    async with httpx.AsyncClient(timeout=60) as c:
        ttft, _, _ = await one(c, url, key, model, " ".join(["7"] * PROMPT_LEN))
    return ttft


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--only", choices=["naive", "server"], default=None)
    ap.add_argument("--requests-per-level", type=int, default=64)
    ap.add_argument("--py-spy", metavar="PATH", help="record the API process with py-spy into PATH")
    a = ap.parse_args()
    checkpoint = build_checkpoint(a.model_shape)
    ensure_tokenizer(checkpoint)
    adapters = Path(os.environ.get("BENCH_ADAPTERS", f"/tmp/bench-adapters-{a.model_shape}"))
    base = make_adapters(load_base(checkpoint), adapters)
    out = {}
    if a.only in (None, "naive"):
        out.update(run_naive(base, adapters))
        print("naive", json.dumps(out), flush=True)
    del base
    torch.cuda.empty_cache()
    if a.only in (None, "server"):
        try:
            out.update(run_server(a.requests_per_level, py_spy=a.py_spy, ckpt=checkpoint, adapters=adapters))
        except Exception as e:  # engine not ready yet: keep the naive half
            out["server_error"] = repr(e)[:500]
        print("server", json.dumps({k: v for k, v in out.items() if not k.startswith("naive")}), flush=True)
    merge(f"serve{RESULT_KEYS[a.model_shape]}", out)


if __name__ == "__main__":
    main()
