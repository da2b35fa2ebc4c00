"""Time to verify an adapter's weights against its manifest, as a load does: the whole-file sha256
(manifests without block digests) against the block digests hashed in parallel.

python3 bench/verify_adapter.py [--megabytes 50] [--repeats 21]
A random file the size of a TinyLlama r=16 all-linear fp32 adapter (~50 MB), page-cached and
mapped, as `load_adapter_staged` maps it; median of the repeats. Runs on any machine: the GPU
host has more cores for the block hashers (min(8, cpu_count)).
"""

import argparse
import hashlib
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.core.adapter_files import verify_manifest  # noqa: E402
from app.core.artifacts import WEIGHTS_FILE, write_manifest  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--megabytes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=21)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp)
        (adapter / WEIGHTS_FILE).write_bytes(os.urandom(a.megabytes * 2**20))
        version = write_manifest(adapter)
        with open(adapter / WEIGHTS_FILE, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        whole = median_ms(lambda: hashlib.sha256(data).hexdigest() == version, a.repeats)
        blocks = median_ms(lambda: verify_manifest(adapter, version, data), a.repeats)
        data.close()
    print(
        json.dumps(
            {
                "megabytes": a.megabytes,
                "cpus": os.cpu_count(),
                "whole_file_sha256_ms": whole,
                "block_digests_parallel_ms": blocks,
            }
        )
    )


if __name__ == "__main__":
    main()
