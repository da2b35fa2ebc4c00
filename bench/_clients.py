"""Closed-loop streaming clients for bench/serve.py, spread over processes as real clients are:
one Python process sending, reading and parsing 16 or 64 SSE streams is itself busy for
milliseconds per burst, which would count in every request's time to first token. Kept free of
torch so that the spawned client processes start quickly."""

import asyncio
import json
import multiprocessing
import random
import time

NEW, PROMPT_LEN = 64, 48
STREAMS_PER_PROCESS = 4


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


async def one(client, url, key, model, prompt, max_tokens=NEW):
    """One streamed completion: (time to first token, completion tokens, total time)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async with client.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):  # the last chunk: exact token count
                n = chunk["usage"]["completion_tokens"]
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
    return ttft, n, time.perf_counter() - t0


def _client_process(url, key, plans, prompt, start_at):
    """One closed-loop stream per plan (each sends its next request when the last one ends),
    from wall-clock time `start_at`."""
    import httpx

    async def run():
        limits = httpx.Limits(max_connections=len(plans) + 4)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:

            async def stream(plan):
                return [await one(c, url, key, model, prompt) for model in plan]

            await asyncio.sleep(max(0.0, start_at - time.time()))
            cpu0 = time.process_time()
            results = await asyncio.gather(*(stream(plan) for plan in plans))
            return [r for rs in results for r in rs], time.time(), time.process_time() - cpu0

    return asyncio.run(run())


def drive(url, key, plans):
    """One stream per plan (the models of its requests, in order), STREAMS_PER_PROCESS per client
    process, all starting together: aggregate tok/s, TTFT p50/p99."""
    concurrency = len(plans)
    rnd = random.Random(concurrency)
    prompt = " ".join(str(rnd.randrange(100, 999)) for _ in range(PROMPT_LEN))  # ~48+ tokens of text
    processes = -(-concurrency // STREAMS_PER_PROCESS)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(time.sleep, [0.2] * processes)  # every process up and importing done
        start_at = time.time() + 1.0
        runs = [
            pool.apply_async(_client_process, (url, key, plans[i::processes], prompt, start_at))
            for i in range(processes)
        ]
        outcomes = [run.get() for run in runs]
    results = [r for rs, _, _ in outcomes for r in rs]
    elapsed = max(end for _, end, _ in outcomes) - start_at
    ttfts = [r[0] for r in results if r[0] is not None]
    toks = sum(r[1] for r in results)
    return dict(
        tokens_per_s=round(toks / elapsed, 2),
        ttft_p50_s=round(pct(ttfts, 50), 4),
        ttft_p99_s=round(pct(ttfts, 99), 4),
        requests=len(results),
        distinct_models=len({model for plan in plans for model in plan}),
        chunks=toks,
        client_processes=processes,
        # The busiest client process's CPU share: near 1.0 would mean the clients are the bottleneck.
        client_cpu_share=round(max(cpu for _, _, cpu in outcomes) / elapsed, 3),
    )
