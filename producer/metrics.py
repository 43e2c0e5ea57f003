"""Prometheus metrics of a client, in one class that takes the registry (the worker's `WorkerMetrics` twin).

Exported only when asked: `Client(url, metrics=ClientMetrics(registry))`; serve the registry the way
the application already does, e.g. `prometheus_client.start_http_server(9100, registry=registry)`.

Names follow `jetinfer_client_<noun>_{total|seconds}`, labels are drawn from the fixed set (`model`,
`status`; the status is `ok` or the wire error code of the reply). Every request that was published
ends as exactly one reply or one timeout, so `requests_total == sum(replies_total) + timeouts_total`
once nothing is in flight. Requests refused before they were published (`unknown_model`, over the
server's `max_payload`) are raised to the caller and not counted as sent. Re-sends (`<id>~r<n>`) are
counted apart: every one in `resent_total`, and those of requests a worker acknowledged without their
reply reaching the client (a reply lost in a server that died) in `lost_replies_total` too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["ClientMetrics"]

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ClientMetrics:
    """Every metric a client exports: requests sent, replies by status, latency, timeouts, duplicates,
    re-sends."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "jetinfer_client_requests",
            "Requests published to infer.<model> (stored by JetStream)",
            ["model"],
            registry=registry,
        )
        self.replies = Counter(
            "jetinfer_client_replies",
            "Replies received, by status (ok or the error code)",
            ["model", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "jetinfer_client_request_duration_seconds",
            "Time from the publish to the reply, by status",
            ["model", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.timeouts = Counter(
            "jetinfer_client_timeouts",
            "Requests published that got no reply within their timeout",
            ["model"],
            registry=registry,
        )
        self.duplicate_replies = Counter(
            "jetinfer_client_duplicate_replies",
            "Replies dropped because their request was already answered or given up (at-least-once delivery)",
            registry=registry,
        )
        self.resent_requests = Counter(
            "jetinfer_client_resent",
            "Requests published again as <id>~r<n> (after a reconnect, or acknowledged without a reply)",
            ["model"],
            registry=registry,
        )
        self.lost_replies = Counter(
            "jetinfer_client_lost_replies",
            "Requests a worker acknowledged whose reply never came (lost in a server), published again",
            ["model"],
            registry=registry,
        )

    def sent(self, model: str) -> None:
        """Count a request JetStream stored."""
        self.requests.labels(model=model).inc()

    def replied(self, model: str, status: str, seconds: float) -> None:
        """Count a reply (`ok` or its error code) and observe its latency."""
        self.replies.labels(model=model, status=status).inc()
        self.request_duration.labels(model=model, status=status).observe(max(0.0, seconds))

    def timed_out(self, model: str) -> None:
        """Count a request whose reply did not come in time."""
        self.timeouts.labels(model=model).inc()

    def duplicate(self) -> None:
        """Count a reply dropped as a duplicate."""
        self.duplicate_replies.inc()

    def resent(self, model: str, *, lost_reply: bool) -> None:
        """Count a request published again; `lost_reply`: because it was acknowledged without a reply."""
        self.resent_requests.labels(model=model).inc()
        if lost_reply:
            self.lost_replies.labels(model=model).inc()
