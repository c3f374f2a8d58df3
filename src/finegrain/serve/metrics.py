"""Prometheus metrics in the text exposition format (version 0.0.4), with no client library.

Counters, gauges and histograms with labels; every update takes a lock, so the event loop and
the batching thread can both write. `Metrics.render()` is what `GET /metrics` returns.
"""

from __future__ import annotations

import bisect
import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = float(value)

    def render(self) -> list[str]:
        if not self._values and not self.label_names:
            return self.header() + [f"{self.name} 0"]
        return super().render()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}  # per label set: counts per bucket and +Inf, sum, count

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0.0] * (len(self.buckets) + 3))
            series[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket whose bound is >= value
            series[-2] += value
            series[-1] += 1

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            cumulative = 0.0
            for bound, count in zip((*self.buckets, math.inf), series):
                cumulative += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_number(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {_number(series[-1])}")
        return lines


class Metrics:
    """The server's metrics, all named `finegrain_*`."""

    def __init__(self) -> None:
        self.requests = Counter("finegrain_requests_total", "HTTP requests by endpoint and status code.", ("endpoint", "status"))
        self.latency = Histogram(
            "finegrain_request_duration_seconds", "Time from request to response (streams: to the last byte).",
            LATENCY_BUCKETS, ("endpoint",),
        )
        self.batch_size = Histogram("finegrain_batch_size", "Texts or prompts per model batch.", BATCH_BUCKETS)
        self.queue_depth = Gauge("finegrain_queue_depth", "Jobs waiting for the model.")
        self.in_flight = Gauge("finegrain_requests_in_flight", "Requests being answered.")
        self.tokens = Counter("finegrain_generated_tokens_total", "Tokens generated, by model.", ("model",))
        self.rejected = Counter("finegrain_rejected_total", "Requests refused before the model, by reason.", ("reason",))

    def render(self) -> str:
        metrics = (self.requests, self.latency, self.batch_size, self.queue_depth, self.in_flight, self.tokens, self.rejected)
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"
