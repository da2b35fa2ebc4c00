"""Profile the inference engine in-process (no HTTP) on a model shape with random bf16 weights
(TinyLlama-1.1B by default) and 8 random LoRA adapters (r=16, all linear): tokens/s at 1/16/64
concurrent requests, time to first token, adapter cold-load time, the GPU time of one decode step
(its CUDA graph replayed back to back, no host work between), and torch.profiler's kernel tables
of decode steps at batch 1, 16 and 64 (decode_kernels_b*.txt).

    PYTHONPATH=$PWD python bench/profile_engine.py --out /tmp/out [--model-shape mistral7b] [--tokenizer DIR]

The tokenizer (only used to turn generated ids into text) defaults to the embedded model's."""

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from app.core.artifacts import write_manifest
from app.core.settings import Settings
from app.inference.engine import Engine
from app.inference.messages import AdapterRef, Completion, Failure, GenerationRequest, SamplingParams
from bench.shapes import build_checkpoint
from tests.inference_support import write_peft_adapter

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_TOKENS, NEW_TOKENS = 48, 64


def build_model(shape: str, directory: Path, tokenizer_dir: Path) -> None:
    """One of the benchmarks' random checkpoints, plus a tokenizer for the engine."""
    build_checkpoint(shape, str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, directory / name)


def make_adapter(root: Path, base_dir: Path, seed: int) -> AdapterRef:
    staging = root / f"staging-{seed}"
    write_peft_adapter(staging, base_dir, seed, rank=16, alpha=32, targets=ALL_LINEAR, std=0.02)
    version = write_manifest(staging)
    final = root / version
    staging.rename(final)
    return AdapterRef(version, final)


async def one_request(engine, ref, seed, stats):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 32000, (PROMPT_TOKENS,), generator=g).tolist()
    started = time.perf_counter()
    stream = engine.submit(
        GenerationRequest("bench", prompt, SamplingParams(NEW_TOKENS, temperature=0.0), ref)
    )
    first = None
    while True:
        event = await stream.get()
        if first is None:
            first = time.perf_counter() - started
        if isinstance(event, Failure):
            raise event.error
        if isinstance(event, Completion):
            stats["tokens"] += event.completion_tokens
            stats["ttft"].append(first)
            stats["latency"].append(time.perf_counter() - started)
            return


async def closed_loop(engine, refs, concurrency, per_client, seed=0):
    stats = {"tokens": 0, "ttft": [], "latency": []}

    async def client(c):
        for i in range(per_client):
            await one_request(engine, refs[(c + i) % len(refs)] if refs else None, seed + c * 1000 + i, stats)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": concurrency * per_client,
        "tokens_per_s": stats["tokens"] / wall,
        "ttft_ms_p50": 1000 * statistics.median(stats["ttft"]),
        "ttft_ms_p90": 1000 * statistics.quantiles(stats["ttft"], n=10)[-1]
        if len(stats["ttft"]) > 1
        else None,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tokenizer", type=Path, default=Path(".tuneforge-test-cache/base_models/SmolLM2-135M-Instruct")
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/tf-profile"))
    parser.add_argument("--model-shape", choices=["tinyllama", "mistral7b"], default="tinyllama")
    parser.add_argument("--eager", action="store_true", help="also measure without CUDA graphs")
    parser.add_argument(
        "--base", type=Path, help="an existing checkpoint with a tokenizer (skips building one)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = args.base or args.work / args.model_shape
    if not (base_dir / "config.json").exists():
        build_model(args.model_shape, base_dir, args.tokenizer)
    adapters_root = args.work / "adapters"
    shutil.rmtree(adapters_root, ignore_errors=True)
    adapters_root.mkdir(parents=True)
    refs = [make_adapter(adapters_root, base_dir, seed) for seed in range(8)]
    cold = [make_adapter(adapters_root, base_dir, 100 + seed) for seed in range(6)]
    settings = Settings(
        data_dir=args.work / "data",
        device="cuda",
        base_models={"tinyllama": base_dir},
        serve_base_model="tinyllama",
        max_batch_size=64,
        gpu_adapter_slots=8,
        cpu_adapter_cache=32,
    )
    engine = Engine(settings)
    engine.start()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model_shape": args.model_shape,
    }
    log = open(args.out / "log.txt", "w")

    def record(name, value):
        results[name] = value
        print(name, json.dumps(value), file=log, flush=True)

    async def scenario():
        # Warm-up: every adapter resident, every batch bucket captured.
        await closed_loop(engine, refs, 64, 1, seed=10**6)
        await closed_loop(engine, refs, 16, 1, seed=2 * 10**6)
        for c in (1, 2, 4, 8, 32):
            await closed_loop(engine, refs, c, 1, seed=3 * 10**6 + c)
        record("c1", await closed_loop(engine, refs[:1], 1, 3))
        record("c16", await closed_loop(engine, refs, 16, 4))
        record("c64", await closed_loop(engine, refs, 64, 3))
        # Cold loads: each a never-seen adapter (disk -> CPU tier -> slot -> first token), first
        # alone, then while 16 requests over resident adapters run.
        alone = []
        for ref in cold[:3]:
            s = {"tokens": 0, "ttft": [], "latency": []}
            await one_request(engine, ref, 5, s)
            alone.append(1000 * s["ttft"][0])
        record("cold_first_token_ms_alone", alone)
        background = asyncio.create_task(closed_loop(engine, refs[:6], 16, 3, seed=7))
        await asyncio.sleep(0.3)
        busy = []
        for ref in cold[3:]:
            s = {"tokens": 0, "ttft": [], "latency": []}
            await one_request(engine, ref, 6, s)
            busy.append(1000 * s["ttft"][0])
        record("cold_first_token_ms_busy", busy)
        record("c16_during_cold_loads", await background)

    asyncio.run(scenario())
    from app.core.metrics import ADAPTER_LOAD_SECONDS

    samples = {s.name: s.value for m in ADAPTER_LOAD_SECONDS.collect() for s in m.samples}
    record("adapter_load_metric", {k: v for k, v in samples.items() if "_sum" in k or "_count" in k})

    # Pool write (CPU tier -> GPU slot) on its own.
    weights = engine.tiers.cpu_cache[cold[0].version]
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        with torch.inference_mode():
            engine.tiers.pool.write(8, weights)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    record("pool_write_ms", times)

    # The loader's phases for one adapter (page cache warm, as for any recently written file).
    import hashlib

    from app.inference.adapters import load_adapter_staged

    phases = {"sha256_alone": [], "load_adapter_staged": []}
    for ref in cold:
        path = ref.adapter_dir / "adapter_model.safetensors"
        t0 = time.perf_counter()
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        t1 = time.perf_counter()
        load_adapter_staged(ref, base_dir, torch.bfloat16, pin=True)
        t2 = time.perf_counter()
        phases["sha256_alone"].append(round(1000 * (t1 - t0), 2))
        phases["load_adapter_staged"].append(round(1000 * (t2 - t1), 2))
    phases["file_mb"] = round(len(data) / 1e6, 1)
    record("loader_phases_ms", phases)

    # The GPU time of a decode step: the captured graph of each batch bucket (the narrowest
    # block-table width, which holds these requests' 112 tokens) replayed back to back.
    graphs = {key[1:]: graph for key, (graph, _) in engine.decoder._graphs.items() if key[0] == "decode"}
    narrowest = min(w for _, w in graphs)
    graph_ms = {}
    for (batch, width), graph in sorted(graphs.items()):
        if width == narrowest:
            graph.replay()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                graph.replay()
            torch.cuda.synchronize()
            graph_ms[batch] = round(1000 * (time.perf_counter() - t) / 50, 3)
    record("decode_graph_ms", graph_ms)

    # Where a decode step's GPU time goes, per kernel: the same steps run eagerly (the kernels a
    # graph replays), 10 of each batch size.
    from torch.profiler import ProfilerActivity, profile

    decoder, out = engine.decoder, args.out
    decoder.use_graphs = False
    for batch in (1, 16, 64):
        tables = [[0] * decoder.max_blocks] * batch
        inputs = ([0] * batch, [100] * batch, [1 + i % 8 for i in range(batch)], tables)
        with torch.inference_mode():
            decoder.decode(*inputs).tokens()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    decoder.decode(*inputs).tokens()
        (out / f"decode_kernels_b{batch}.txt").write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        )
    decoder.use_graphs = True

    if args.eager:
        engine.decoder.use_graphs = False
        record("c16_eager", asyncio.run(closed_loop(engine, refs, 16, 2)))
        engine.decoder.use_graphs = True
    engine.stop()
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    for key in ("c1", "c16", "c64", "c16_eager", "c16_during_cold_loads"):
        if key in results:
            r = results[key]
            print(
                f"{key:24s} {r['tokens_per_s']:8.0f} tok/s  "
                f"ttft p50 {r['ttft_ms_p50']:6.1f} ms  p90 {r['ttft_ms_p90']}"
            )
    print("cold alone", results["cold_first_token_ms_alone"], "busy", results["cold_first_token_ms_busy"])
    print("pool_write_ms", results["pool_write_ms"], "load", results["adapter_load_metric"])
    print("loader phases", results["loader_phases_ms"])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
