"""Tracing and metrics end to end, on the session's real Serve app.

Tracing: an OTLP/gRPC receiver (a `TraceServiceServicer` from opentelemetry-proto) listens on the loopback
port tests/conftest.py put in every Ray process's environment before `ray.init`. A request carrying a
client's `traceparent` must come back as one trace with the client's trace id: proxy -> Router -> Engine, each
span's parent inside the trace, one `engine.canvas` span per canvas of the answer.

Metrics: Ray's Prometheus endpoint is scraped before and after known traffic; the differences must equal what
the responses report (usage, stats), and every query of the Grafana dashboard must name a scraped metric.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments import observability as obs
from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.integration.conftest import wait_for
from tests.integration.otlp import SENT, attrs, serve_receiver, traceparent, whole_trace

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "blockserve" / "dashboards" / "blockserve.json"


@pytest.fixture(scope="module")
def receiver():
    yield from serve_receiver()


def request(max_new: int, seed: int = 3) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=max_new, seed=seed)
    req.sampling.max_denoising_steps = 6
    return req


def one(spans, prefix: str):
    found = [s for s in spans if s.name.startswith(prefix)]
    assert len(found) == 1, f"expected one span named {prefix}*, got {[s.name for s in spans]}"
    return found[0]


def ancestors(span, by_id) -> list[str]:
    names = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        names.append(span.name)
    return names


def test_client_traceparent_continues_through_proxy_router_and_engine(app, receiver):
    trace_id, client_span, header = traceparent()
    canvas = app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).canvas_length
    events = list(
        app.stub.GenerateStream(request(2 * canvas + 1), metadata=[("traceparent", header)], timeout=120)
    )
    final = events[-1].final
    assert final.stats.canvases == 3

    def expected(names):
        done = any(n.startswith("proxy_grpc_request") for n in names) and "engine.generate" in names
        return done and names.count("engine.canvas") == final.stats.canvases

    spans = whole_trace(receiver, trace_id, client_span, expected)
    by_id = {s.span_id: s for s in spans}

    proxy = one(spans, "proxy_grpc_request")
    assert proxy.parent_span_id == client_span  # the client's trace continues, not a new one
    assert all(s.trace_id == trace_id for s in spans)
    assert [s.name for s in spans if s.parent_span_id not in by_id] == [proxy.name]  # one connected tree

    router = one(spans, "Router.GenerateStream")
    assert router.parent_span_id == one(spans, "replica_handle_request Router").span_id
    assert proxy.name in ancestors(router, by_id)
    assert attrs(router)["blockserve.request_id"] == final.request_id
    assert attrs(router)["rpc.grpc.status_code"] == "OK"
    assert attrs(router)["blockserve.completion_tokens"] == final.usage.completion_tokens

    validate = one(spans, "router.validate")
    assert validate.parent_span_id == router.span_id
    assert one(spans, "router.tokenize").parent_span_id == validate.span_id
    detok = [s for s in spans if s.name == "router.detokenize"]
    assert len(detok) == final.stats.canvases and all(s.parent_span_id == router.span_id for s in detok)

    engine = one(spans, "engine.generate")
    engine_path = ancestors(engine, by_id)
    assert engine_path[0].startswith("replica_handle_request Engine")
    assert "Router.GenerateStream" in engine_path  # the Engine hop hangs under the Router's span
    for name in ("engine.queue_wait", "engine.prefill"):
        assert one(spans, name).parent_span_id == engine.span_id
    canvases = sorted(
        (s for s in spans if s.name == "engine.canvas"), key=lambda s: attrs(s)["blockserve.canvas_index"]
    )
    assert all(c.parent_span_id == engine.span_id for c in canvases)
    assert [attrs(c)["blockserve.steps"] for c in canvases] == list(final.stats.steps_per_canvas)
    assert sum(attrs(c)["blockserve.tokens"] for c in canvases) == final.usage.completion_tokens
    prefill = one(spans, "engine.prefill")
    assert prefill.end_time_unix_nano <= canvases[0].start_time_unix_nano + 1
    for earlier, later in zip(canvases, canvases[1:], strict=False):
        assert earlier.end_time_unix_nano <= later.start_time_unix_nano


def post(app, route: str, body: dict, headers: dict | None = None) -> tuple[int, dict | list[dict]]:
    """POST to the OpenAI-compatible API: (status, JSON answer), or (status, the data chunks) for a stream."""
    url = f"http://127.0.0.1:{app.config.server.http_port}{route}"
    data = json.dumps({"model": "test-model", **body}).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if not body.get("stream"):
        return status, json.loads(text)
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return status, [json.loads(line) for line in lines if line != "[DONE]"]


FAST = {"blockserve": {"sampling": {"max_denoising_steps": 6}}}


def test_http_traceparent_continues_through_the_http_proxy_router_and_engine(app, receiver):
    trace_id, client_span, header = traceparent()
    messages = [{"role": "user", "content": "Add two numbers"}]
    status, answer = post(
        app,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 40, "seed": 2, **FAST},
        {"traceparent": header},
    )
    assert status == 200
    stats = answer["blockserve"]["stats"]

    def expected(names):
        done = any(n.startswith("proxy_http_request") for n in names) and "engine.generate" in names
        return done and names.count("engine.canvas") == stats["canvases"]

    spans = whole_trace(receiver, trace_id, client_span, expected)
    by_id = {s.span_id: s for s in spans}
    proxy = one(spans, "proxy_http_request")
    tree = [(s.name, s.span_id.hex(), s.parent_span_id.hex()) for s in spans]
    assert proxy.parent_span_id == client_span, tree
    assert [s.name for s in spans if s.parent_span_id not in by_id] == [proxy.name], tree  # one tree

    router = one(spans, "Router./v1/chat/completions")
    assert router.parent_span_id == one(spans, "replica_handle_request Router").span_id
    a = attrs(router)
    assert a["blockserve.request_id"] == answer["blockserve"]["request_id"]
    assert a["rpc.grpc.status_code"] == "OK" and a["http.response.status_code"] == 200
    assert a["http.route"] == "/v1/chat/completions"
    assert a["blockserve.completion_tokens"] == answer["usage"]["completion_tokens"]
    validate = one(spans, "router.validate")
    assert validate.parent_span_id == router.span_id
    assert one(spans, "router.tokenize").parent_span_id == validate.span_id
    detok = [s for s in spans if s.name == "router.detokenize"]
    assert len(detok) == stats["canvases"] and all(s.parent_span_id == router.span_id for s in detok)
    engine = one(spans, "engine.generate")
    assert "Router./v1/chat/completions" in ancestors(engine, by_id)

    # a refused request: the span records the status (400 <-> INVALID_ARGUMENT) and the message
    trace_id, _, header = traceparent()
    status, error = post(
        app, "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, {"traceparent": header}
    )
    assert status == 400

    def refused():
        found = [s for s in receiver.trace(trace_id) if s.name == "Router./v1/completions"]
        return found[0] if found else None

    span = wait_for(refused, timeout=30, what="the refused HTTP request's Router span")
    assert attrs(span)["http.response.status_code"] == 400
    assert attrs(span)["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert span.status.code == span.status.STATUS_CODE_ERROR and "max_tokens" in span.status.message


def test_failed_request_records_its_status_code_on_the_span(app, receiver):
    trace_id, _, header = traceparent()
    bad = request(max_new=4)
    bad.sampling.t_min = -1.0
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Generate(bad, metadata=[("traceparent", header)], timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def router_span():
        found = [s for s in receiver.trace(trace_id) if s.name == "Router.Generate"]
        return found[0] if found else None

    span = wait_for(router_span, timeout=30, what="the failed request's Router span")
    assert attrs(span)["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert span.status.code == span.status.STATUS_CODE_ERROR and "t_min" in span.status.message
    assert "engine.generate" not in [s.name for s in receiver.trace(trace_id)]  # it never reached the Engine


def test_requests_without_traceparent_are_not_traced_in_tests(app, receiver):
    app.stub.Generate(request(max_new=3), timeout=60)
    trace_id, _, header = traceparent()
    app.stub.Generate(request(max_new=3), metadata=[("traceparent", header)], timeout=60)
    wait_for(lambda: receiver.trace(trace_id), timeout=30, what="the traced request's spans")
    # the session samples at ratio 0: every span received belongs to a trace a test started on purpose
    with receiver.lock:
        traces = {s.trace_id for s in receiver.spans}
    assert trace_id in traces and traces <= SENT


# -- metrics -------------------------------------------------------------------------------------------------


def metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def scrape() -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels we select on): value} of the blockserve series."""
    with urllib.request.urlopen(metrics_url(), timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_blockserve_"):
                labels = tuple(
                    sorted((k, v) for k, v in s.labels.items() if k in ("rpc", "code", "le", "replica"))
                )
                out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def settled_scrape() -> dict:
    """A scrape whose counters and histograms no longer change: earlier traffic has all been exported (Ray
    exports every second). Gauges are left out: they follow the Engine's state."""
    previous = None

    def same():
        nonlocal previous
        current = scrape()
        totals = {k: v for k, v in current.items() if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}
        stable, previous = totals == previous, totals
        return current if stable else None

    return wait_for(same, timeout=60, interval=2.5, what="metrics to settle")


def cumulative(after: dict, before: dict, name: str, rpc: str | None = None) -> dict[float, float]:
    """{bucket edge: observations <= edge} added between the scrapes."""
    out: dict[float, float] = {}
    for (n, ls), v in after.items():
        labels = dict(ls)
        if n == f"{name}_bucket" and rpc in (None, labels.get("rpc")):
            edge = float(labels["le"])
            out[edge] = out.get(edge, 0.0) + v - before.get((n, ls), 0.0)
    return out


def expected_cumulative(observed: list[float], name: str) -> dict[float, float]:
    spec = next(s for s in obs.METRICS if f"ray_{s.name}" == name)
    return {e: float(sum(v <= e for v in observed)) for e in (*spec.buckets, float("inf"))}


def delta(after: dict, before: dict, name: str, **labels) -> float:
    want = set(labels.items())
    total = 0.0
    for (n, ls), v in after.items():
        if n == name and want <= set(ls):
            total += v - before.get((n, ls), 0.0)
    return total


@pytest.fixture(scope="module")
def traffic(app):
    before = settled_scrape()
    replies = [app.stub.Generate(request(max_new=n, seed=n), timeout=120) for n in (1, 20, 45)]
    streamed = [
        list(app.stub.GenerateStream(request(max_new=n, seed=n), timeout=120))[-1].final for n in (7, 33)
    ]
    bad = request(max_new=4)
    bad.max_new_tokens = 10**9
    with pytest.raises(grpc.RpcError):
        app.stub.Generate(bad, timeout=60)
    # the same through the OpenAI-compatible routes: answers (one streamed) and one refusal
    http = {
        "/v1/completions": [
            post(app, "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": n, "seed": n, **FAST})[1]
            for n in (3, 30)
        ],
        "/v1/chat/completions": [
            post(app, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 20, "seed": 4, **FAST})[1],
            final_chunk(post(app, "/v1/chat/completions", STREAMED_CHAT)[1]),
        ],
    }
    assert post(app, "/v1/chat/completions", {"messages": [], **FAST})[0] == 400

    def exported():
        now = scrape()
        return now if delta(now, before, "ray_blockserve_requests_total") == 11 else None

    after = wait_for(exported, timeout=60, what="the traffic's request counts in the scrape")
    after = settled_scrape()  # the Engine's and the Router's series arrive in separate exports
    return before, after, replies, streamed, http


MESSAGES = [{"role": "user", "content": "Sort a list"}]
STREAMED_CHAT = {
    "messages": MESSAGES,
    "max_tokens": 36,
    "seed": 5,
    "stream": True,
    "stream_options": {"include_usage": True},
    "blockserve": {"sampling": {"max_denoising_steps": 6}, "stream_drafts": False},
}


def final_chunk(chunks: list[dict]) -> dict:
    """A stream's usage chunk; its stats come from the same request's unary twin (same seed, same tokens)."""
    return next(c for c in chunks if c.get("usage"))


def test_scraped_metrics_match_the_responses(app, traffic):
    before, after, replies, streamed, _ = traffic
    d = lambda name, **labels: delta(after, before, f"ray_blockserve_{name}", **labels)  # noqa: E731

    assert d("requests_total", rpc="Generate", code="OK") == len(replies)
    assert d("requests_total", rpc="GenerateStream", code="OK") == len(streamed)
    assert d("requests_total", rpc="Generate", code="INVALID_ARGUMENT") == 1
    for rpc, answers in (("Generate", replies), ("GenerateStream", streamed)):
        assert d("generation_tokens_total", rpc=rpc) == sum(a.usage.completion_tokens for a in answers)
        assert d("prompt_tokens_total", rpc=rpc) == sum(a.usage.prompt_tokens for a in answers)
        assert d("canvases_total", rpc=rpc) == sum(a.stats.canvases for a in answers)
        for hist in ("request_latency_seconds", "time_to_first_canvas_seconds", "tokens_per_forward"):
            assert d(f"{hist}_count", rpc=rpc) == len(answers)  # failed requests are counted, not timed
        steps = [s for a in answers for s in a.stats.steps_per_canvas]
        assert d("steps_per_canvas_count", rpc=rpc) == len(steps)
        assert d("denoising_steps_total", rpc=rpc) == sum(steps)
        # Ray 2.60 rebuilds a histogram's _sum from bucket midpoints, so each observation is checked by the
        # bucket it landed in: the cumulative bucket counts must be those of the responses' own values
        for hist, observed in (
            ("steps_per_canvas", steps),
            ("time_to_first_canvas_seconds", [a.stats.time_to_first_canvas_s for a in answers]),
            ("tokens_per_forward", [a.stats.tokens_per_forward for a in answers]),
            ("request_tokens_per_second", [a.stats.tokens_per_second for a in answers]),
        ):
            name = f"ray_blockserve_{hist}"
            assert cumulative(after, before, name, rpc) == expected_cumulative(observed, name), hist

    forwards = d("forwards_total")
    assert forwards >= max(sum(a.stats.steps_per_canvas) for a in replies)  # requests ran one after another
    assert d("rows_per_forward_count") == forwards
    # each row of a forward is one denoising step of one request (the HTTP traffic's too: steps by route are
    # checked against the answers in the HTTP test)
    grpc_steps = sum(a.stats.denoising_steps for a in replies + streamed)
    assert (
        d("denoising_steps_total", rpc="Generate") + d("denoising_steps_total", rpc="GenerateStream")
        == grpc_steps
    )
    assert d("rows_forwarded_total") == d("denoising_steps_total") > grpc_steps
    # every token a layer's MoE sees goes to exactly top_k experts
    from model.config import ModelConfig

    cfg = ModelConfig.from_file(app.model_path)
    routed = d("expert_tokens_total")
    assert routed > 0 and routed % (cfg.top_k * cfg.num_layers) == 0
    gauges = lambda name: [v for (n, _), v in after.items() if n == f"ray_blockserve_{name}"]  # noqa: E731
    assert app.config.engine.kv_cache_gib * 2**30 in gauges("kv_cache_budget_bytes")  # one per Engine replica
    assert set(gauges("active_rows")) == {0} and set(gauges("queue_depth")) == {0}  # all requests finished
    assert set(gauges("kv_cache_used_bytes")) == {0}


def test_http_routes_are_measured_like_the_rpcs(app, traffic):
    before, after, _, _, http = traffic
    d = lambda name, **labels: delta(after, before, f"ray_blockserve_{name}", **labels)  # noqa: E731

    assert d("requests_total", rpc="/v1/completions", code="OK") == 2
    assert d("requests_total", rpc="/v1/chat/completions", code="OK") == 2
    assert d("requests_total", rpc="/v1/chat/completions", code="INVALID_ARGUMENT") == 1
    for route, answers in http.items():
        usages = [a["usage"] for a in answers]
        assert d("generation_tokens_total", rpc=route) == sum(u["completion_tokens"] for u in usages)
        assert d("prompt_tokens_total", rpc=route) == sum(u["prompt_tokens"] for u in usages)
        for hist in ("request_latency_seconds", "time_to_first_canvas_seconds", "tokens_per_forward"):
            assert d(f"{hist}_count", rpc=route) == len(answers)
        unary = [a for a in answers if "blockserve" in a]  # a stream's usage chunk carries no stats
        steps = [s for a in unary for s in a["blockserve"]["stats"]["steps_per_canvas"]]
        if len(unary) == len(answers):
            assert d("steps_per_canvas_count", rpc=route) == len(steps)
            assert d("denoising_steps_total", rpc=route) == sum(steps)
        else:
            assert d("steps_per_canvas_count", rpc=route) >= len(steps) + 1


def test_every_dashboard_query_names_a_scraped_metric(traffic):
    import re

    _, after, _, _, _ = traffic
    scraped = {name for name, _ in after}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    # counted only on CUDA, where a batch's forward replays a graph: on this CPU server no graph exists, and a Ray
    # counter has no series until its first increment (it refuses 0); tests/deployments/test_observability.py
    # checks what they count, tests/cluster/test_telemetry.py that they are registered
    cuda_only = {"ray_blockserve_cuda_graph_replays_total", "ray_blockserve_cuda_graph_captures_total"}
    for expr in exprs:
        names = re.findall(r"ray_blockserve_\w+", expr)
        assert names, f"query names no blockserve metric: {expr}"
        missing = [n for n in names if n not in scraped and n not in cuda_only]
        assert not missing, f"{missing} (in {expr}) not in the scrape"
    assert not cuda_only & scraped  # and indeed absent here
    # the SLO panels pick bucket edges from variables: each choice must be an `le` the scrape has
    les = {dict(labels).get("le") for name, labels in after if name.endswith("_bucket")}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "custom":
            assert {o["value"] for o in var["options"]} <= les, var["name"]
