"""The worker's tokenization of a big training file: rows/s, MB/s and peak memory.

python3 bench/tokenization.py [--size-mb 100] [--small-mb 1,4,16]
(Not bench/tokenize.py: a script of that name would shadow the standard library's `tokenize`.)
Needs no GPU. Writes a prompt/completion JSONL of about --size-mb MB (rows of ~1 KB as in
bench/upload.py, of words drawn from README.md and docs/, so that a token is about as many bytes as
in English prose: bench/upload.py's made-up words take twice the tokens) and tokenizes it with the
embedded base's tokenizer, each way in a fresh process: `list`, the path before `datasets` (every
row through read_rows and checked_example into a list of Examples, in one process), `load_examples`
with 1 and with 2 processes (Arrow files, `map`), and `rows`, its first stage alone (read_rows into
an Arrow file, always in one process). Memory: the measuring process's
VmHWM (peak RSS), the largest map worker's peak (RUSAGE_CHILDREN) and the process's RSS after the
load, against its RSS before it; CPU seconds of the process and its map workers, which on this shared
machine say more than the wall time. Then the --small-mb files with 1 and 2 processes, for where a
second process starts to pay (PARALLEL_MIN_BYTES in worker/data.py).
Writes docs/benchmarks/tokenize_cpu.json (section "tokenize").
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._results import LATEST, merge  # noqa: E402
from bench.upload import MB  # noqa: E402

TOKENIZER = ROOT / ".tuneforge-test-cache" / "base_models" / "SmolLM2-135M-Instruct"


def write_jsonl(path: Path, size: int, seed: int = 0) -> int:
    """Prompt/completion rows of ~1 KB until the file holds `size` bytes; returns the number of rows."""
    rnd = random.Random(seed)
    words = sorted(
        {
            w
            for doc in [ROOT / "README.md", *ROOT.glob("docs/*.md")]
            for w in doc.read_text().split()
            if w.isalpha()
        }
    )
    rows, written = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            prompt, completion = (
                " ".join(rnd.choices(words, k=rnd.randint(*n))) for n in ((25, 75), (70, 150))
            )
            line = json.dumps({"prompt": prompt, "completion": " " + completion}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return rows


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the map workers): what the work costs
    whatever else runs on the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rss(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


def measure(path: Path, way: str, tokenizer_dir: Path) -> dict:
    """One way of tokenizing `path`, in this process (run it in a fresh one)."""
    from transformers import AutoTokenizer

    from app.core.training_rows import read_rows
    from worker.data import arrow_rows, checked_example, load_examples

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    before, cpu_before = rss("VmRSS"), cpu_seconds()
    t0 = time.perf_counter()
    if way == "list":
        with open(path, "rb") as f:
            examples = [checked_example(n, row, tokenizer, 10**6, "training_file") for n, row in read_rows(f)]
        tokens = sum(len(ex.input_ids) for ex in examples)
    elif way == "rows":  # load_examples' first stage alone, in one process: read_rows into Arrow
        with tempfile.TemporaryDirectory(dir=path.parent) as cache_dir:
            examples, tokens = arrow_rows(path, Path(cache_dir) / "rows.arrow", "training_file"), 0
    else:
        examples = load_examples(path, tokenizer, 10**6, "training_file", processes=int(way))
        tokens = int(examples.lengths.sum())
    seconds = time.perf_counter() - t0
    return {
        "rows": len(examples),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds() - cpu_before, 2),
        "rows_per_s": round(len(examples) / seconds),
        "mb_per_s": round(path.stat().st_size / MB / seconds, 2),
        "rss_before_mb": round(before / MB),
        "peak_rss_mb": round(rss("VmHWM") / MB),
        "rss_after_mb": round(rss("VmRSS") / MB),
        "map_worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB),
    }


def in_fresh_process(path: Path, way: str, tokenizer_dir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(path), way, "--tokenizer", str(tokenizer_dir)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=100, help="size of the big file, in MB (10^6 bytes)")
    ap.add_argument("--small-mb", default="1,4,16", help="sizes of the files for the 1-vs-2 threshold")
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="a directory with tokenizer files")
    ap.add_argument("--measure", nargs=2, metavar=("FILE", "WAY"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(Path(a.measure[0]), a.measure[1], a.tokenizer)))
        return
    work = Path(tempfile.mkdtemp(prefix="tf-tokenize-"))
    results = {"big": {}, "small": {}}
    try:
        path = work / "big.jsonl"
        rows = write_jsonl(path, a.size_mb * MB)
        print(f"wrote {path}: {rows} rows, {path.stat().st_size / MB:.1f} MB", flush=True)
        for way in ("rows", "list", "1", "2"):
            results["big"][way] = in_fresh_process(path, way, a.tokenizer)
            print("big", way, json.dumps(results["big"][way]), flush=True)
        path.unlink()
        for size in map(int, a.small_mb.split(",")):
            path = work / f"small-{size}.jsonl"
            write_jsonl(path, size * MB)
            small = {way: in_fresh_process(path, way, a.tokenizer) for way in ("1", "2")}
            results["small"][f"{size}MB"] = small
            print("small", size, json.dumps(small), flush=True)
            path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    given = {k: v for k, v in vars(a).items() if k != "measure" and v != ap.get_default(k)}
    options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in given.items())
    merge(
        "tokenize",
        {
            "command": f"python3 bench/tokenization.py{options}",
            "cpus": len(os.sched_getaffinity(0)),
            "size_mb": a.size_mb,
            **results,
        },
        path=LATEST.parent / "tokenize_cpu.json",
    )


if __name__ == "__main__":
    main()
