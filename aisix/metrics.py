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

from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .config import Model, Target
from .exchange import Exchange

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SESSION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class _Count:
    """One counter series as a plain number (what a frame adds to, without a lock)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _Histogram:
    """One histogram series as plain numbers: a bucket count per bound (and +Inf), and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: le is inclusive
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as the text format writes them."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


def _le(bound: float) -> str:
    return floatToGoString(bound)  # prometheus_client's own spelling: 0.005, 1.0, 600.0


class _Requests(Collector):
    """The audio routes' per-request series (tokens too: most transcriptions report them), kept
    as plain numbers and turned into families when scraped: a request adds to a few dict entries
    instead of calling prometheus_client's children (a lock, a check and a method call per
    series: a tenth of the gateway's own work per request)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}          # route, model, status
        self.duration: dict[str, _Histogram] = {}                    # route
        self.ttfb: dict[str, _Histogram] = {}                        # route
        self.in_flight: dict[str, int] = {}                          # route
        self.bytes: dict[tuple[str, str], int] = {}                  # route, direction
        self.attempts: dict[tuple[str, str, str], int] = {}          # model, provider key, outcome
        self.cost: dict[str, float] = {}                             # model
        self.tokens: dict[tuple[str, str], int] = {}                 # model, kind
        self.frames = {"in": _Count(), "out": _Count()}              # realtime, direction
        self.frame_bytes = {"in": _Count(), "out": _Count()}         # realtime, direction
        self.audio_seconds: dict[tuple[str, str], float] = {}       # model, direction

    def histogram(self, series: dict[str, _Histogram], route: str) -> _Histogram:
        h = series.get(route)
        if h is None:
            h = series[route] = _Histogram(_LATENCY_BUCKETS)
        return h

    def collect(self) -> Iterator[Metric]:
        yield _counter("aisix_requests", "Audio requests by route, alias and status.",
                       ("route", "model", "status"), self.requests)
        for name, doc, series in (
                ("aisix_request_duration_seconds", "Whole request, arrival to last byte.", self.duration),
                ("aisix_upstream_ttfb_seconds", "Last request byte sent upstream to answer headers.", self.ttfb)):
            family = HistogramMetricFamily(name, doc, labels=("route",))
            for route, h in list(series.items()):
                family.add_metric((route,), h.buckets(), h.sum)
            yield family
        gauge = GaugeMetricFamily("aisix_in_flight_requests", "Audio requests being handled.", labels=("route",))
        for route, n in list(self.in_flight.items()):
            gauge.add_metric((route,), n)
        yield gauge
        yield _counter("aisix_bytes", "Body bytes from callers (in) and to callers (out).",
                       ("route", "direction"), self.bytes)
        yield _counter("aisix_upstream_attempts", "Upstream attempts by alias, provider key and outcome "
                       "(the upstream status, or connect, timeout, reset, aborted).",
                       ("model", "provider_key", "outcome"), self.attempts)
        yield _counter("aisix_tokens", "Tokens the upstream reported, by alias and kind.", ("model", "kind"),
                       self.tokens)
        yield _counter("aisix_realtime_frames", "Realtime frames relayed, from callers (in) and to callers (out).",
                       ("direction",), {(d, ): c.value for d, c in self.frames.items()})
        yield _counter("aisix_realtime_frame_bytes", "Realtime frame payload bytes, from callers (in) and to "
                       "callers (out).", ("direction",), {(d, ): c.value for d, c in self.frame_bytes.items()})
        yield _counter("aisix_cost_usd", "What requests cost by alias, from its pricing.", ("model",),
                       {(m,): v for m, v in list(self.cost.items())})
        yield _counter("aisix_audio_seconds", "Audio measured on the wire by alias: uploads (in) and speech "
                       "answers (out).", ("model", "direction"), self.audio_seconds)

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def _counter(name: str, doc: str, labels: Sequence[str], values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in list(values.items()):
        family.add_metric(key, value)
    return family


class Metrics:
    def __init__(self, live_counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._hot = hot = _Requests()
        r.register(hot)
        self.rate_limited = Counter("aisix_rate_limited", "Requests refused by a gateway rate limit.",
                                    ("scope",), registry=r)
        self.guardrail_hits = Counter("aisix_guardrail_hits", "Guardrail matches by guardrail and action.",
                                      ("guardrail", "action"), registry=r)
        self.cooling_down = Gauge("aisix_target_cooling_down", "1 while a target is cooling down, as this "
                                  "process last saw it.", ("model", "provider_key"), registry=r)
        self.sessions_open = Gauge("aisix_realtime_sessions_open", "Realtime sessions open (upgraded, not ended).",
                                   registry=r)
        self.session_seconds = Histogram("aisix_realtime_session_duration_seconds", "Realtime session length, "
                                         "upgrade to close.", buckets=_SESSION_BUCKETS, registry=r)
        # Counted per frame (thousands a second per session at most): plain numbers, as above.
        self.frames_in, self.frames_out = hot.frames["in"], hot.frames["out"]
        self.frame_bytes_in, self.frame_bytes_out = hot.frame_bytes["in"], hot.frame_bytes["out"]
        r.register(_LiveCounters(live_counters))
        self._cooling: dict[str, dict[str, int]] = {}  # alias -> the marks last set
        self._clear: dict[str, Sequence[Target]] = {}  # alias -> its targets, when none was cooling down
        self._models: Mapping[str, Model] | None = None  # the aliases as of the last reload

    def started(self, route: str) -> None:
        in_flight = self._hot.in_flight
        in_flight[route] = in_flight.get(route, 0) + 1

    def finished(self, ex: Exchange, known_alias: bool) -> None:
        hot, route = self._hot, ex.route
        model = ex.model if known_alias and ex.model else ""
        key = (route, model, str(ex.status))
        hot.requests[key] = hot.requests.get(key, 0) + 1
        hot.histogram(hot.duration, route).observe(ex.latency_ms / 1000)
        if ex.upstream_ttfb_ms is not None:
            hot.histogram(hot.ttfb, route).observe(ex.upstream_ttfb_ms / 1000)
        hot.in_flight[route] -= 1
        counts = hot.bytes
        for direction, n in (("in", ex.bytes_in), ("out", ex.bytes_out)):
            counts[(route, direction)] = counts.get((route, direction), 0) + n
        if ex.verdict is not None:
            self.guardrail_hits.labels(ex.verdict.guardrail, ex.verdict.action).inc()
        if model:
            if ex.cost_usd:
                hot.cost[model] = hot.cost.get(model, 0.0) + ex.cost_usd
            audio = hot.audio_seconds
            for direction, seconds in (("in", ex.audio_seconds_in), ("out", ex.audio_seconds_out)):
                if seconds:
                    audio[(model, direction)] = audio.get((model, direction), 0.0) + seconds
            if ex.usage is not None:
                self._tokens(model, ex)

    def _tokens(self, model: str, ex: Exchange) -> None:
        assert ex.usage is not None
        tokens = self._hot.tokens
        for kind, value in (("input", ex.usage.input_tokens), ("output", ex.usage.output_tokens)):
            if value:
                tokens[(model, kind)] = tokens.get((model, kind), 0) + value

    def session_finished(self, ex: Exchange, known_alias: bool, seconds: float | None) -> None:
        """A realtime session's request, once it ended or was refused; ``seconds`` its length
        when it was upgraded. Its frames were counted as they passed."""
        model = ex.model if known_alias and ex.model else ""
        key = (ex.route, model, str(ex.status))
        self._hot.requests[key] = self._hot.requests.get(key, 0) + 1
        if seconds is not None:
            self.session_seconds.observe(seconds)
        if ex.verdict is not None:
            self.guardrail_hits.labels(ex.verdict.guardrail, ex.verdict.action).inc()
        if model:
            if ex.cost_usd:
                self._hot.cost[model] = self._hot.cost.get(model, 0.0) + ex.cost_usd
            if ex.usage is not None:
                self._tokens(model, ex)

    def attempt(self, model: str, provider_key: str, outcome: str) -> None:
        attempts = self._hot.attempts
        key = (model, provider_key, outcome)
        attempts[key] = attempts.get(key, 0) + 1

    def cooling(self, model: str, targets: Sequence[Target], cooling: Collection[int]) -> None:
        """The cooldown state of every target of an alias (targets sharing a key share a series)."""
        if not cooling and self._clear.get(model) is targets:  # every request of a healthy routed alias
            return
        if self._models is not None:
            current = self._models.get(model)
            if current is None or current.targets is not targets:
                return  # a request admitted before a reload: it must not set again what the reload dropped
        marks: dict[str, int] = {}
        for i, t in enumerate(targets):
            marks[t.provider_key.name] = max(marks.get(t.provider_key.name, 0), int(i in cooling))
        if cooling:
            self._clear.pop(model, None)
        else:  # these very targets (a reload that changes them sets their series again)
            self._clear[model] = targets
        if self._cooling.get(model) == marks:
            return
        self._cooling[model] = marks
        for name, mark in marks.items():
            self.cooling_down.labels(model, name).set(mark)

    def reconfigured(self, models: Mapping[str, Model]) -> None:
        """After a reload: the cooling-down series of aliases and targets no longer routed are
        dropped. Left at 1, a removed target would read as cooling down (and alert) until a restart.
        Requests still under way with the previous aliases set none of them from now on."""
        self._models = models
        for alias, marks in list(self._cooling.items()):
            model = models.get(alias)  # only aliases with two or more targets have the series
            routed = model.targets if model is not None and len(model.targets) > 1 else ()
            keep = {t.provider_key.name for t in routed}
            for name in [n for n in marks if n not in keep]:
                self.cooling_down.remove(alias, name)
                del marks[name]
            if not marks:
                del self._cooling[alias]
        for alias in [a for a in self._clear if a not in models]:
            del self._clear[alias]

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
