"""/metrics in the Prometheus text format, read from the server's counters at each scrape."""

from __future__ import annotations

from typing import Any


class _Collector:
    """Builds the metric families from the live state when Prometheus scrapes (nothing to keep in step)."""

    def __init__(self, server: Any):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.server
        c, st = s.scheduler.counters, s.engine.stats
        http = CounterMetricFamily("plmtool_http_requests", "HTTP requests answered, by endpoint and status",
                                   labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(s.http_status.items()):
            http.add_metric([endpoint, str(status)], n)
        yield http
        for name, doc, value in (
            ("plmtool_sequences_finished", "sequences decoded to the end (a request with n > 1 has several)", c.requests),
            ("plmtool_sequences_cancelled", "sequences cancelled (client gone, stop string)", c.cancelled),
            ("plmtool_sequences_timed_out", "sequences past serve.request_timeout_s", c.timed_out),
            ("plmtool_sequences_failed", "sequences that ended on an engine error or shutdown", c.failed),
            ("plmtool_requests_rejected", "requests refused at admission (queue full, shutting down)", c.rejected),
            ("plmtool_generated_tokens", "tokens generated", c.tokens),
            ("plmtool_engine_steps", "batched engine steps", st.steps),
            ("plmtool_sequence_steps", "sequence steps (sum over engine steps of the sequences in them)", st.sequence_steps),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("plmtool_queue_length", "requests' sequences waiting for a row", s.scheduler.queue_length),
            ("plmtool_running_sequences", "sequences being decoded", s.scheduler.running),
            ("plmtool_max_batch", "rows of the batch (serve.max_batch)", s.engine.max_batch),
            ("plmtool_tokens_per_second", "tokens generated per second over the last 10 s", c.tokens_per_s()),
            ("plmtool_mean_accepted_tokens", "tokens per sequence step since start (1.0 for plain decoding)", st.mean_accepted),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


def metrics_text(server: Any) -> tuple[str, str]:
    """(exposition text, content type) for the server's current state."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server))
    return generate_latest(registry).decode(), CONTENT_TYPE_LATEST
