"""What the engine counts, for operators: requests, tokens, latencies, the visual cache, media and vision time.

`EngineMetrics` is plain Python (no dependency): the engine records into it, batch jobs and evaluation write
its `summary()` into their run records, and `owlvid serve` exposes it at `GET /metrics` in the Prometheus
text format through `prometheus_client` (`prometheus_collector`), with vLLM's metric names where the
meaning is the same (`owlvid:` prefix instead of `vllm:`).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

# Bucket bounds (seconds) as vLLM's for the same metrics.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics): counts per upper bound, sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


class EngineMetrics:
    """Counters and histograms of one engine (thread-safe: the engine thread writes, a scrape reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0  # set by the engine after each step
        self.waiting = 0  # set by the front door that queues (the server)
        self.finished: Counter[str] = Counter()  # finish reason of the completed requests
        self.errors: Counter[str] = Counter()  # exception class of the failed / cancelled requests
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.visual_cache: Counter[str] = Counter()  # "hit" / "miss" / "reused" / "off" per image or video
        self.media_decode_s = 0.0
        self.vision_encode_s = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(TOKEN_BUCKETS)
        self.e2e = Histogram(REQUEST_BUCKETS)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def step(self, seconds: float, rows: int) -> None:
        """A decoding step of `rows` requests took `seconds`: each of them waited that long for its token."""
        with self._lock:
            self.inter_token.observe(seconds, rows)

    def request_done(self, result: Any, seconds: float) -> None:
        """A request ended: its `Generation`, or the exception it ended with; `seconds` since it arrived."""
        with self._lock:
            if isinstance(result, BaseException):
                self.errors[type(result).__name__] += 1
                return
            self.finished[result.finish_reason] += 1
            self.prompt_tokens += result.prompt_tokens
            self.generation_tokens += result.completion_tokens
            self.e2e.observe(seconds)
            for item in result.media:
                self.visual_cache[str(item.get("visual_cache"))] += 1
                self.media_decode_s += item.get("decode_s") or 0.0
                self.vision_encode_s += item.get("encode_s") or 0.0

    def summary(self) -> dict:
        """The numbers as a JSON-able dict (batch jobs' and evaluation's run records)."""
        with self._lock:
            def mean(h: Histogram) -> dict:
                return {"count": h.count, "mean_s": h.sum / h.count if h.count else None}

            return {"requests_completed": sum(self.finished.values()), "finish_reasons": dict(self.finished),
                    "requests_failed": dict(self.errors), "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens, "visual_cache": dict(self.visual_cache),
                    "media_decode_s": self.media_decode_s, "vision_encode_s": self.vision_encode_s,
                    "time_to_first_token": mean(self.ttft), "inter_token_latency": mean(self.inter_token),
                    "e2e_request_latency": mean(self.e2e)}


def prometheus_collector(metrics: EngineMetrics, model_name: str) -> Any:
    """A `prometheus_client` collector reading `metrics` at each scrape (needs the `server` extra)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class Collector:
        def collect(self) -> Iterator[Any]:
            m, labels, name = metrics, ["model_name"], [model_name]
            with m._lock:
                for metric, help_text, value in (
                        ("owlvid:num_requests_running", "Requests prefilling or decoding.", m.running),
                        ("owlvid:num_requests_waiting", "Requests queued for the engine.", m.waiting)):
                    g = GaugeMetricFamily(metric, help_text, labels=labels)
                    g.add_metric(name, value)
                    yield g
                for metric, help_text, label, counts in (
                        ("owlvid:request_success", "Requests finished, by finish reason.", "finished_reason",
                         m.finished),
                        ("owlvid:request_errors", "Requests that ended with an error, by kind.", "kind", m.errors),
                        ("owlvid:visual_cache", "Images and videos by visual-cache outcome.", "result",
                         m.visual_cache)):
                    c = CounterMetricFamily(metric, help_text, labels=[*labels, label])
                    for value, n in sorted(counts.items()):
                        c.add_metric([model_name, value], n)
                    yield c
                for metric, help_text, value in (
                        ("owlvid:prompt_tokens", "Prefilled prompt tokens.", m.prompt_tokens),
                        ("owlvid:generation_tokens", "Generated tokens.", m.generation_tokens),
                        ("owlvid:media_decode_seconds", "Seconds spent loading and decoding media.", m.media_decode_s),
                        ("owlvid:vision_encode_seconds", "Seconds spent in the vision tower.", m.vision_encode_s)):
                    c = CounterMetricFamily(metric, help_text, labels=labels)
                    c.add_metric(name, value)
                    yield c
                for metric, help_text, h in (
                        ("owlvid:time_to_first_token_seconds", "Time to first token.", m.ttft),
                        ("owlvid:inter_token_latency_seconds", "Time between tokens of a request.", m.inter_token),
                        ("owlvid:e2e_request_latency_seconds", "Request latency, arrival to last token.", m.e2e)):
                    fam = HistogramMetricFamily(metric, help_text, labels=labels)
                    fam.add_metric(name, h.cumulative(), sum_value=h.sum)
                    yield fam

    return Collector()
