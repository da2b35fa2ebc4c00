"""Merge one half (train/serve) of the benchmark results into docs/benchmarks/latest.json (and $OUT)."""

import datetime
import json
import os
from pathlib import Path

LATEST = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "latest.json"


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def merge(section: str, values: dict, path: Path = LATEST) -> dict:
    """Deep-merge values into doc[section]; keeps the other half's keys untouched."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["device"] = device_name()
    doc.setdefault(section, {})

    def deep(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(doc[section], values)
    doc[section]["measured_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    out = os.environ.get("OUT")
    if out:
        Path(out, "latest.json").write_text(path.read_text())
    return doc
