"""Prometheus metrics, all in one registry exposed on /metrics."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

HTTP_REQUESTS = Counter(
    "tuneforge_http_requests_total", "HTTP requests by route and status",
    ["method", "route", "status"], registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "tuneforge_http_request_duration_seconds", "HTTP request latency by route",
    ["method", "route"], registry=REGISTRY,
)
JOBS_BY_STATUS = Gauge(
    "tuneforge_jobs", "Fine-tuning jobs by status", ["status"], registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "tuneforge_queue_depth", "Fine-tuning jobs waiting to be claimed", registry=REGISTRY,
)
