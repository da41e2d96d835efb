"""Prometheus metrics (docs/api.md, "Metrics") and the listener that serves them, apart from the
proxy port.

Labels carry routes, configured aliases and guardrail names only: an alias a caller made up is
counted as "" so no caller can grow the label space, and no key or request id is ever a label.
Counters the gateway keeps elsewhere (usage drops, rate-limit fail-opens) are read at scrape time.
No ``_created`` series: prometheus_client adds one per counter and histogram child (when it was
first used), which doubles the series a scrape stores and which no query of docs/operations.md
reads. They are left out of this registry's scrape only; prometheus_client's global switch would
change every registry in the process.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .config import Target
from .exchange import Exchange

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SESSION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Metrics:
    def __init__(self, live_counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("aisix_requests", "Audio requests by route, alias and status.",
                                ("route", "model", "status"), registry=r)
        self.duration = Histogram("aisix_request_duration_seconds", "Whole request, arrival to last byte.",
                                  ("route",), buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("aisix_upstream_ttfb_seconds", "Last request byte sent upstream to answer headers.",
                              ("route",), buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("aisix_in_flight_requests", "Audio requests being handled.", ("route",), registry=r)
        self.bytes = Counter("aisix_bytes", "Body bytes from callers (in) and to callers (out).",
                             ("route", "direction"), registry=r)
        self.rate_limited = Counter("aisix_rate_limited", "Requests refused by a gateway rate limit.",
                                    ("scope",), registry=r)
        self.guardrail_hits = Counter("aisix_guardrail_hits", "Guardrail matches by guardrail and action.",
                                      ("guardrail", "action"), registry=r)
        self.tokens = Counter("aisix_tokens", "Tokens the upstream reported, by alias and kind.",
                              ("model", "kind"), registry=r)
        self.attempts = Counter("aisix_upstream_attempts", "Upstream attempts by alias, provider key and outcome "
                                "(the upstream status, or connect, timeout, reset, aborted).",
                                ("model", "provider_key", "outcome"), registry=r)
        self.cooling_down = Gauge("aisix_target_cooling_down", "1 while a target is cooling down, as this "
                                  "process last saw it.", ("model", "provider_key"), registry=r)
        self.sessions_open = Gauge("aisix_realtime_sessions_open", "Realtime sessions open (upgraded, not ended).",
                                   registry=r)
        self.frames = Counter("aisix_realtime_frames", "Realtime frames relayed, from callers (in) and to callers "
                              "(out).", ("direction",), registry=r)
        self.frame_bytes = Counter("aisix_realtime_frame_bytes", "Realtime frame payload bytes, from callers (in) "
                                   "and to callers (out).", ("direction",), registry=r)
        self.session_seconds = Histogram("aisix_realtime_session_duration_seconds", "Realtime session length, "
                                         "upgrade to close.", buckets=_SESSION_BUCKETS, registry=r)
        self.frames_in, self.frames_out = self.frames.labels("in"), self.frames.labels("out")
        self.frame_bytes_in, self.frame_bytes_out = self.frame_bytes.labels("in"), self.frame_bytes.labels("out")
        self.cost = Counter("aisix_cost_usd", "What requests cost by alias, from its pricing.", ("model",), registry=r)
        self.audio_seconds = Counter("aisix_audio_seconds", "Audio measured on the wire by alias: uploads (in) "
                                     "and speech answers (out).", ("model", "direction"), registry=r)
        r.register(_LiveCounters(live_counters))
        self._children: dict[tuple, tuple] = {}
        self._attempt_children: dict[tuple[str, str, str], Counter] = {}
        self._metered: dict[str, tuple[Counter, Counter, Counter]] = {}
        self._in_flight: dict[str, Gauge] = {}

    def started(self, route: str) -> None:
        gauge = self._in_flight.get(route)
        if gauge is None:
            gauge = self._in_flight[route] = self.in_flight.labels(route)
        gauge.inc()

    def finished(self, ex: Exchange, known_alias: bool) -> None:
        route = ex.route
        model = ex.model if known_alias and ex.model else ""
        key = (route, model, ex.status)
        children = self._children.get(key)
        if children is None:  # labels() costs a lookup and a lock: resolve each child set once
            children = self._children[key] = (
                self.requests.labels(route, model, str(ex.status)), self.duration.labels(route),
                self.ttfb.labels(route), self.in_flight.labels(route),
                self.bytes.labels(route, "in"), self.bytes.labels(route, "out"),
            )
        requests, duration, ttfb, in_flight, bytes_in, bytes_out = children
        requests.inc()
        duration.observe(ex.latency_ms / 1000)
        if ex.upstream_ttfb_ms is not None:
            ttfb.observe(ex.upstream_ttfb_ms / 1000)
        in_flight.dec()
        bytes_in.inc(ex.bytes_in)
        bytes_out.inc(ex.bytes_out)
        if ex.verdict is not None:
            self.guardrail_hits.labels(ex.verdict.guardrail, ex.verdict.action).inc()
        if model and (ex.cost_usd or ex.audio_seconds_in or ex.audio_seconds_out):
            metered = self._metered.get(model)
            if metered is None:  # as above: each label set resolved once
                metered = self._metered[model] = (self.cost.labels(model), self.audio_seconds.labels(model, "in"),
                                                  self.audio_seconds.labels(model, "out"))
            for child, value in zip(metered, (ex.cost_usd, ex.audio_seconds_in, ex.audio_seconds_out), strict=True):
                if value:
                    child.inc(value)
        if ex.usage is not None and model:
            for kind, value in (("input", ex.usage.input_tokens), ("output", ex.usage.output_tokens)):
                if value:
                    self.tokens.labels(model, kind).inc(value)

    def session_finished(self, ex: Exchange, known_alias: bool, seconds: float | None) -> None:
        """A realtime session's request, once it ended or was refused; ``seconds`` its length
        when it was upgraded. Its frames were counted as they passed."""
        model = ex.model if known_alias and ex.model else ""
        self.requests.labels(ex.route, model, str(ex.status)).inc()
        if seconds is not None:
            self.session_seconds.observe(seconds)
        if ex.verdict is not None:
            self.guardrail_hits.labels(ex.verdict.guardrail, ex.verdict.action).inc()
        if ex.usage is not None and model:
            for kind, value in (("input", ex.usage.input_tokens), ("output", ex.usage.output_tokens)):
                if value:
                    self.tokens.labels(model, kind).inc(value)

    def attempt(self, model: str, provider_key: str, outcome: str) -> None:
        key = (model, provider_key, outcome)
        child = self._attempt_children.get(key)
        if child is None:  # as in finished(): each label set resolved once
            child = self._attempt_children[key] = self.attempts.labels(model, provider_key, outcome)
        child.inc()

    def cooling(self, model: str, targets: Sequence[Target], cooling: Collection[int]) -> None:
        """The cooldown state of every target of an alias (targets sharing a key share a series)."""
        marks: dict[str, int] = {}
        for i, t in enumerate(targets):
            marks[t.provider_key.name] = max(marks.get(t.provider_key.name, 0), int(i in cooling))
        for name, mark in marks.items():
            self.cooling_down.labels(model, name).set(mark)

    def limited(self, scope: str) -> None:
        self.rate_limited.labels(scope).inc()

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():  # fresh families each time: ours to trim
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


class _LiveCounters:
    """Counters owned by other parts (the usage sink, the limiter), read when scraped."""

    def __init__(self, counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for name, (doc, read) in self._counters.items():
            yield CounterMetricFamily(name, doc, value=read())

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def metrics_app(metrics: Metrics) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app
