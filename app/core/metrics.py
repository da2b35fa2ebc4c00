"""Prometheus metrics, exposed on /metrics: the API process's in REGISTRY; the inference engine's
in ENGINE_REGISTRY, which lives in each engine process and reaches /metrics through
`merge_families`."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

REGISTRY = CollectorRegistry()

HTTP_REQUESTS = Counter(
    "tuneforge_http_requests_total",
    "HTTP requests by route and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "tuneforge_http_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    registry=REGISTRY,
)
JOBS_BY_STATUS = Gauge(
    "tuneforge_jobs",
    "Fine-tuning jobs by status",
    ["status"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "tuneforge_queue_depth",
    "Fine-tuning jobs waiting to be claimed",
    registry=REGISTRY,
)
# The API process's share of an inference request's time to first token, before the engine's
# (tuneforge_time_to_first_token_seconds starts at this submit).
INFERENCE_SUBMIT_SECONDS = Histogram(
    "tuneforge_inference_submit_seconds",
    "From an inference handler's start to its engine submit: key and model lookup, tokenizing, "
    "and the wait for the preparation thread",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

# --- Inference engine ---
# Kept by the engine (its thread, its adapter loader), in the engine process.
ENGINE_REGISTRY = CollectorRegistry()

INFERENCE_REQUESTS = Counter(
    "tuneforge_inference_requests_total",
    "Inference requests by model and outcome",
    ["model", "outcome"],
    registry=ENGINE_REGISTRY,
)
TOKENS_GENERATED = Counter(
    "tuneforge_tokens_generated_total",
    "Completion tokens generated, by model",
    ["model"],
    registry=ENGINE_REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tuneforge_time_to_first_token_seconds",
    "From submission to the first generated token",
    ["model"],
    registry=ENGINE_REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INFERENCE_WAITING = Gauge(
    "tuneforge_inference_queue_depth",
    "Inference requests waiting to join the batch",
    registry=ENGINE_REGISTRY,
)
INFERENCE_PREEMPTIONS = Counter(
    "tuneforge_inference_preemptions_total",
    "Sequences that gave their KV blocks up to let others grow, and were prefilled again later",
    registry=ENGINE_REGISTRY,
)
INFERENCE_RUNNING = Gauge(
    "tuneforge_inference_running",
    "Sequences in the running batch",
    registry=ENGINE_REGISTRY,
)
RESIDENT_ADAPTERS = Gauge(
    "tuneforge_resident_adapters",
    "Adapters held per tier (gpu = pool slots, cpu = cache)",
    ["tier"],
    registry=ENGINE_REGISTRY,
)
ADAPTER_LOAD_SECONDS = Histogram(
    "tuneforge_adapter_load_seconds",
    "Loading an adapter from disk (verify, read, convert)",
    registry=ENGINE_REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GPU_MEMORY_BYTES = Gauge(
    "tuneforge_gpu_memory_allocated_bytes",
    "GPU memory allocated by the inference engine",
    registry=ENGINE_REGISTRY,
)


def merge_families(per_engine: list[list[Metric]]) -> list[Metric]:
    """The metric families of several engine processes as one set: samples with the same name and
    labels added up (queue depths, tokens, GPU memory and resident adapters are totals over the
    engines; no two engines share a model label), `_created` times the earliest."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict] = {}
    for families in per_engine:
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                seen = values[family.name].get(key)
                if seen is None:
                    values[family.name][key] = sample.value
                elif sample.name.endswith("_created"):
                    values[family.name][key] = min(seen, sample.value)
                else:
                    values[family.name][key] = seen + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())
