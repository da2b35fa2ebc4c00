"""Serving benchmark: naive PEFT baseline vs the Tuneforge server (app/inference/engine.py).

python3 bench/serve.py [--model-shape tinyllama|mistral7b|qwen3] [--only naive|server]
                       [--adapters 64] [--zipf-adapters 1000] [--requests-per-stream 4]
python3 bench/serve.py --device cpu     # smoke run: tiny shape, 4 + 20 adapters, 1 request a stream

A model of that shape with random weights (bench/shapes.py), 48-token prompts, 64 new tokens, greedy.
Two pools of random adapters (bf16, nonzero A and B, PEFT's file layout), generated with torch:
  standard: --adapters (64) of r=16 on every linear layer, the trainer's default;
  Zipf pool: --zipf-adapters (1,000) of r=8 on q_proj and v_proj only (1,000 all-linear r=16
             adapters would take 25 GB of disk for the 1.1B shape, 80 GB for the 7B).
  naive:  the seed's serving: the base in NF4, one request at a time, PeftModel + set_adapter per
          request, over 8 standard adapters.
  server: every adapter and a key registered in a temp data dir in one process through the service
          code that `tuneforge models import` calls (bench/_register.py), then the real server
          (`tuneforge api`, bf16 base, default settings) driven by
          closed-loop streaming (SSE) httpx clients, 4 streams per client process (bench/_clients.py):
            cold load: a never-seen standard adapter's first-request TTFT minus a warm one's (p50
                       of 16), then one unmeasured request per stream at 64 concurrent (warm-up);
            c1, c16, c64: concurrency N, stream k always on standard adapter k (c16: 16 distinct,
                       c64: 64 distinct); c1 sends 4x the requests per stream;
            c64_base_only: the same load on the base model (the LoRA overhead);
            zipf1000_c64: 64 streams, each request's adapter drawn Zipf(s=1) over ranks 1..1000 of
                       the Zipf pool (seeded).
          Aggregate generated tok/s, TTFT p50/p99, and the fraction of the bandwidth ceiling
          (docs/BENCHMARKS.md) at 1/16/64.
Results merged into docs/benchmarks/latest.json under "serve" (the 1.1B shape), "serve_7b" or
"serve_qwen3"; a --device cpu run writes them to a temp file instead.
"""

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch is imported where it is used: the spawned client processes (bench/_clients.py) import this
# module again, and start in a fraction of the time without it.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app.core.adapter_files import PEFT_PREFIX, base_linear_shapes  # noqa: E402
from app.core.model_families import describe_base_model  # noqa: E402
from bench._clients import NEW, PROMPT_LEN, drive, one, pct  # noqa: E402
from bench._processes import api_ready, wait_until  # noqa: E402
from bench._results import merge  # noqa: E402
from bench.shapes import RESULT_KEYS, SHAPES, build_checkpoint  # noqa: E402

N_NAIVE = 8
COLD_PROBES = 16
PROBE_TOKENS = 4  # a cold-load probe needs only its first token
ZIPF_S, ZIPF_SEED = 1.0, 0
# (rank, target modules; None: every linear layer) of the two adapter pools.
STANDARD_LORA = (16, None)
ZIPF_LORA = (8, ("q_proj", "v_proj"))
# H200 HBM3e: the bandwidth that bounds decoding (docs/BENCHMARKS.md, "The hardware limit").
BANDWIDTH_BYTES_PER_S = 4.8e12
TIER_SETTINGS = ("TUNEFORGE_MAX_BATCH_SIZE", "TUNEFORGE_GPU_ADAPTER_SLOTS", "TUNEFORGE_CPU_ADAPTER_CACHE")


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


def write_adapters(ckpt, dirs: list[Path], rank: int, targets: tuple[str, ...] | None, seed: int, device):
    """A random LoRA adapter (bf16, nonzero A and B) in each of `dirs` that has none yet, in the
    layout PEFT's save_pretrained writes, on `targets` (module names; None: every linear layer);
    each from its own seed, so that no two are the same file (the store dedupes by sha256)."""
    import torch
    from safetensors.torch import save_file

    shapes = {
        module: shape
        for module, shape in base_linear_shapes(Path(ckpt)).items()
        if targets is None or module.rpartition(".")[2] in targets
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(ckpt),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rpartition(".")[2] for m in shapes}),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    generator = torch.Generator(device)
    for i, path in enumerate(dirs):
        if (path / "adapter_model.safetensors").exists():
            continue
        generator.manual_seed(seed + i)

        def randn(*shape, std):
            return (std * torch.randn(shape, generator=generator, device=device)).to(torch.bfloat16).cpu()

        tensors = {}
        for module, (out_features, in_features) in shapes.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = randn(rank, in_features, std=in_features**-0.5)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = randn(out_features, rank, std=0.01)
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})  # last: done


def load_base(checkpoint):
    import torch
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


def run_naive(checkpoint, adapters: list[Path], n_requests=8):
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(checkpoint), str(adapters[0]), adapter_name="ad0")
    for i in range(1, len(adapters)):
        model.load_adapter(str(adapters[i]), adapter_name=f"ad{i}")
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
        model.set_adapter(f"ad{k % len(adapters)}")
        gen()
        torch.cuda.synchronize()
        lat.append(time.time() - t)
    dt = time.time() - t0
    loads = []
    for k in range(5):
        torch.cuda.synchronize()
        t = time.time()
        model.load_adapter(str(adapters[k % len(adapters)]), adapter_name=f"x{k}")
        torch.cuda.synchronize()
        loads.append(time.time() - t)
    return dict(
        naive_tokens_per_s=round(n_requests * NEW / dt, 2),
        naive_latency_p50_s=round(pct(lat, 50), 4),
        naive_requests=n_requests,
        naive_load_adapter_ms_p50=round(pct(loads, 50) * 1000, 1),
        naive_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
    )


def store_env(data_dir: Path, ckpt, device="cuda", app_root=ROOT) -> dict:
    """The TUNEFORGE_* environment of a data dir serving `ckpt`; `app_root` is the checkout whose
    `tuneforge` runs (bench/http_path.py compares two revisions)."""
    # The base name is the checkpoint's directory name: import checks the adapter's recorded base.
    base_name = Path(ckpt).name
    return dict(
        os.environ,
        TUNEFORGE_DATA_DIR=str(data_dir),
        TUNEFORGE_BASE_MODELS=json.dumps({base_name: str(ckpt)}),
        TUNEFORGE_SERVE_BASE_MODEL=base_name,
        TUNEFORGE_DEVICE=device,
        BENCH_APP_ROOT=str(app_root),
        PYTHONPATH=os.pathsep.join([str(app_root), *[p for p in [os.environ.get("PYTHONPATH")] if p]]),
    )


def register(env: dict, adapters: dict[str, Path]) -> tuple[str, list[str]]:
    """A key for tenant "bench" and every adapter (name -> directory) imported: (key, model ids)."""
    job = {
        "tenant": "bench",
        "base": env["TUNEFORGE_SERVE_BASE_MODEL"],
        "adapters": {name: str(path) for name, path in adapters.items()},
    }
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "_register.py")],
        env=env,
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode:
        raise RuntimeError(f"registering the adapters failed: {r.stderr[-2000:]}")
    done = json.loads(r.stdout)
    return done["key"], done["models"]


def per_stream(models: list[str], concurrency: int, requests: int) -> list[list[str]]:
    """Stream k sends all its requests to models[k] (cycling when there are fewer models)."""
    return [[models[k % len(models)]] * requests for k in range(concurrency)]


def zipf(models: list[str], concurrency: int, requests: int) -> list[list[str]]:
    """Each request's model drawn Zipf(ZIPF_S) over ranks 1..len(models), seeded."""
    rnd = random.Random(ZIPF_SEED)
    weights = [1 / rank**ZIPF_S for rank in range(1, len(models) + 1)]
    return [rnd.choices(models, weights, k=requests) for _ in range(concurrency)]


def run_server(env, key, workloads, cold_models=(), warmup=None, py_spy=None):
    """Start `tuneforge api` on the store `env` describes and measure: the cold load of each of
    `cold_models`, then, after driving `warmup` (plans) once, each of `workloads` (name -> plans)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(env, TUNEFORGE_PORT=str(port))
    # The log goes straight to $OUT (if set) so that it survives a killed run; -X faulthandler:
    # SIGABRT on a stuck run dumps every thread's stack into it.
    log_dir = Path(os.environ.get("OUT") or tempfile.gettempdir())
    log_path = log_dir / f"api-{port}.log"
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
        command, env=env, cwd=env["BENCH_APP_ROOT"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.time()
        wait_until(lambda: api_ready(url), {"api": (proc, log_path)}, "tuneforge api", timeout=300)
        out = {"api_start_s": round(time.time() - started, 1)}
        # Disk -> CPU tier -> GPU slot -> first token, minus the same with the adapter resident.
        cold = []
        for model in cold_models:
            first = asyncio.run(_probe(url, key, model))
            cold.append(first - asyncio.run(_probe(url, key, model)))
        if cold:
            loads = histogram(url, "tuneforge_adapter_load_seconds")
            # The loader thread's own time (read + verify + convert), from the server's /metrics.
            out["server_loader_ms_mean"] = round(1000 * loads["sum"] / max(loads["count"], 1), 1)
            out["adapter_load_ms_p50"] = round(pct(cold, 50) * 1000, 1)
            out["adapter_load_ms_all"] = [round(c * 1000, 1) for c in cold]
        if warmup:
            drive(url, key, warmup)
        parts = {"api_submit_ms_mean": "tuneforge_inference_submit_seconds",
                 "engine_ttft_ms_mean": "tuneforge_time_to_first_token_seconds"}  # fmt: skip
        for name, plans in workloads.items():
            before = {part: histogram(url, metric) for part, metric in parts.items()}
            cpu = None if py_spy else _cpu_seconds(proc.pid)  # (under py-spy proc is py-spy)
            r = drive(url, key, plans)
            if cpu is not None:
                # The API process's CPU time (the engine runs in a process of its own) a request and
                # as a share of the level's run, from the clients' start to the last one's end (the
                # API idles while the client processes start): near 1.0, it is the limit.
                cpu = _cpu_seconds(proc.pid) - cpu
                r["api_cpu_ms_per_request"] = round(1000 * cpu / r["requests"], 2)
                r["api_cpu_share"] = round(cpu / (r["chunks"] / r["tokens_per_s"]), 3)
            # The client's time to first token in parts: the API's handler start -> engine submit
            # (lookups, tokenizing, the preparation thread), then the engine's submit -> first
            # token; the rest is HTTP before the handler and the first event's way back out.
            for part, metric in parts.items():
                after = histogram(url, metric)
                requests = max(after["count"] - before[part]["count"], 1)
                r[part] = round(1000 * (after["sum"] - before[part]["sum"]) / requests, 2)
            r["resident_gpu_adapters_after"] = gauge(url, "tuneforge_resident_adapters", 'tier="gpu"')
            out[f"server_{name}"] = r
            out[f"{name}_tokens_per_s"] = r["tokens_per_s"]
            out[f"ttft_ms_p50_{name}"] = round(r["ttft_p50_s"] * 1000, 1)
            print(name, json.dumps(r), flush=True)
        return out
    except BaseException:
        if proc.poll() is None:
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def histogram(url, name) -> dict:
    """A Prometheus histogram's sum and count from the server's /metrics, summed over labels."""
    import httpx

    total = {"sum": 0.0, "count": 0.0}
    pattern = rf"^{name}_(sum|count)(?:{{[^}}]*}})? (\S+)$"
    for m in re.finditer(pattern, httpx.get(url + "/metrics").text, re.M):
        total[m.group(1)] += float(m.group(2))
    return total


def gauge(url, name, labels) -> float | None:
    import httpx

    m = re.search(rf"^{name}{{{labels}}} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else None


async def _probe(url, key, model):
    import httpx

    async with httpx.AsyncClient(timeout=60) as c:
        ttft, _, _ = await one(c, url, key, model, " ".join(["7"] * PROMPT_LEN), max_tokens=PROBE_TOKENS)
    return ttft


def serve(checkpoint, standard, n_zipf, per, data_dir, device, py_spy, setup: dict) -> dict:
    """The server half; the seconds each stage took go into `setup`."""
    env = store_env(data_dir, checkpoint, device)
    t = time.time()
    # Generated for this run only and deleted once imported: the store holds its own copy.
    zipf_dir = data_dir / "zipf-sources"
    zipf_sources = [zipf_dir / f"z{i:04d}" for i in range(n_zipf)]
    write_adapters(checkpoint, zipf_sources, *ZIPF_LORA, seed=10_000, device=device)
    setup["zipf_adapters"] = round(time.time() - t, 1)
    import torch

    # Give back this process's cached GPU memory (the naive half, the generated adapters): the
    # server sizes its adapter slots from the free memory.
    torch.cuda.empty_cache()
    t = time.time()
    key, models = register(
        env,
        {**{p.name: p for p in standard}, **{p.name: p for p in zipf_sources}},
    )
    shutil.rmtree(zipf_dir)
    setup["register"] = round(time.time() - t, 1)
    std_models, zipf_models = models[: len(standard)], models[len(standard) :]
    base = Path(checkpoint).name
    workloads = {
        "c1": per_stream(std_models, 1, 4 * per),
        "c16": per_stream(std_models, 16, per),
        "c64": per_stream(std_models, 64, per),
        "c64_base_only": per_stream([base], 64, per),
        f"zipf{n_zipf}_c64": zipf(zipf_models, 64, per),
    }
    t = time.time()
    out = run_server(
        env,
        key,
        workloads,
        cold_models=std_models[:COLD_PROBES],
        warmup=per_stream(std_models, 64, 1),
        py_spy=py_spy,
    )
    setup["server_run"] = round(time.time() - t, 1)
    out["server_settings"] = {name: env.get(name, "default") for name in TIER_SETTINGS}
    out["zipf_adapters"] = {
        "count": n_zipf,
        "rank": ZIPF_LORA[0],
        "target_modules": ZIPF_LORA[1],
        "s": ZIPF_S,
        "seed": ZIPF_SEED,
    }
    # Every decode step reads every bf16 weight once (a tied head is one tensor in the checkpoint).
    step_bytes = 2 * describe_base_model(base, Path(checkpoint)).parameters
    out["decode_bytes_per_step"] = step_bytes
    out["bandwidth_bytes_per_s"] = BANDWIDTH_BYTES_PER_S
    for c in (1, 16, 64):
        out[f"bandwidth_fraction_c{c}"] = round(
            out[f"c{c}_tokens_per_s"] / (c * BANDWIDTH_BYTES_PER_S / step_bytes), 4
        )
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), help="default: tinyllama (cpu: tiny)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run")
    ap.add_argument("--only", choices=["naive", "server"], default=None)
    ap.add_argument("--adapters", type=int, help="distinct standard adapters (default 64; cpu: 4)")
    ap.add_argument("--zipf-adapters", type=int, help="adapters in the Zipf pool (default 1000; cpu: 20)")
    ap.add_argument("--requests-per-stream", type=int, help="default 4; cpu: 1")
    ap.add_argument("--py-spy", metavar="PATH", help="record the API process with py-spy into PATH")
    a = ap.parse_args()
    smoke = a.device == "cpu"
    shape = a.model_shape or ("tiny" if smoke else "tinyllama")
    n_adapters = a.adapters or (4 if smoke else 64)
    n_zipf = a.zipf_adapters or (20 if smoke else 1000)
    per = a.requests_per_stream or (1 if smoke else 4)

    checkpoint = build_checkpoint(shape)
    ensure_tokenizer(checkpoint, SHAPES[shape][1]["vocab_size"])
    adapter_root = Path(os.environ.get("BENCH_ADAPTERS", f"/tmp/bench-lora-{shape}"))
    standard = [adapter_root / f"ad{i}" for i in range(n_adapters)]
    t = time.time()
    write_adapters(checkpoint, standard, *STANDARD_LORA, seed=0, device=a.device)
    out = {
        "standard_adapters": {"count": n_adapters, "rank": STANDARD_LORA[0], "target_modules": "all-linear"}
    }
    out["setup_s"] = {"standard_adapters": round(time.time() - t, 1)}
    if not smoke and a.only in (None, "naive"):  # NF4 needs CUDA
        out.update(run_naive(checkpoint, standard[:N_NAIVE]))
        print("naive", json.dumps(out), flush=True)
    if a.only in (None, "server"):
        data_dir = Path(tempfile.mkdtemp(prefix="tf-bench-"))
        try:
            out.update(serve(checkpoint, standard, n_zipf, per, data_dir, a.device, a.py_spy, out["setup_s"]))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        print("server", json.dumps({k: v for k, v in out.items() if not k.startswith("naive")}), flush=True)
    if smoke:
        path = Path(tempfile.gettempdir()) / "tf-serve-smoke.json"
        path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print("smoke run: figures in", path, "(not merged into latest.json)")
    else:
        merge(f"serve{RESULT_KEYS[shape]}", out)


if __name__ == "__main__":
    main()
