"""Prometheus metrics, all in one registry exposed on /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

# --- Inference engine ---
INFERENCE_REQUESTS = Counter(
    "tuneforge_inference_requests_total",
    "Inference requests by model and outcome",
    ["model", "outcome"],
    registry=REGISTRY,
)
TOKENS_GENERATED = Counter(
    "tuneforge_tokens_generated_total",
    "Completion tokens generated, by model",
    ["model"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tuneforge_time_to_first_token_seconds",
    "From submission to the first generated token",
    ["model"],
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INFERENCE_WAITING = Gauge(
    "tuneforge_inference_queue_depth",
    "Inference requests waiting to join the batch",
    registry=REGISTRY,
)
INFERENCE_PREEMPTIONS = Counter(
    "tuneforge_inference_preemptions_total",
    "Sequences that gave their KV blocks up to let others grow, and were prefilled again later",
    registry=REGISTRY,
)
INFERENCE_RUNNING = Gauge(
    "tuneforge_inference_running",
    "Sequences in the running batch",
    registry=REGISTRY,
)
RESIDENT_ADAPTERS = Gauge(
    "tuneforge_resident_adapters",
    "Adapters held per tier (gpu = pool slots, cpu = cache)",
    ["tier"],
    registry=REGISTRY,
)
ADAPTER_LOAD_SECONDS = Histogram(
    "tuneforge_adapter_load_seconds",
    "Loading an adapter from disk (verify, read, convert)",
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GPU_MEMORY_BYTES = Gauge(
    "tuneforge_gpu_memory_allocated_bytes",
    "GPU memory allocated by the inference engine",
    registry=REGISTRY,
)
