"""The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(each with `stream: true` as server-sent events ending in `data: [DONE]`).

`OpenAIRouter` is the Router with an HTTP face: Ray Serve's HTTP proxy hands it HTTP requests (FastAPI, built per
replica by `__serve_build_asgi_app__`; cluster/app.py applies `serve.ingress`), and its gRPC proxy still calls
the Router's RPC methods on the same replica. Both APIs therefore share one validation (deployments/requests.py),
one request type (`GenerateRequest`) and one generation path, so the same seed gives the same tokens over both.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 invalid_request_error (the
message names the field), 404 for an unknown model, 429 when the engine queue is full, 503 when no engine is
ready, 500 otherwise. Streams send a draft chunk after every denoising step when `blockserve.stream_drafts` is
set (empty delta, the draft under `blockserve.draft`), a chunk per committed canvas, then the finish chunk and,
with `stream_options.include_usage`, a usage chunk.

Observability is the gRPC RPCs': each POST route is one `RouterRequest` (deployments/observability.py) labelled
by its route, so it gets a `Router.<route>` span (under Serve's `proxy_http_request` span, which continues a
client's `traceparent` header) with the validate / tokenize / detokenize stages, and the same `blockserve_*`
metrics with `rpc` = the route and `code` = the status code name of the gRPC twin (400 is INVALID_ARGUMENT,
see HTTP_STATUS); the span also carries `http.response.status_code`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments import observability as obs
from deployments import openai_protocol as oa
from deployments.auth import Unauthenticated
from deployments.chat import calls_so_far
from deployments.router import RequestFailed, Router
from deployments.tool_calls import ToolCallStream
from protos.blockserve.v1 import blockserve_pb2 as pb

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


STATUS_CODE_NAME = {status: code.name for code, status in HTTP_STATUS.items()}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def failure_response(err: RequestFailed) -> JSONResponse:
    status = HTTP_STATUS.get(err.code, 500)
    message, param = oa.openai_param(str(err)) if status == 400 else (str(err), None)
    return error_response(status, message, param)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class OpenAIRouter(Router):
    """The Router plus the OpenAI-compatible HTTP routes (same replica, same validation, same engine path)."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self)

    def observe_http(self, route: str) -> obs.RouterRequest:
        """The route's request at the Router: span, metrics and log line, as for an RPC."""
        return obs.RouterRequest(route, self._metrics, self.settings.request_log, http_method="POST")

    async def _start(self, request: pb.GenerateRequest):
        """Validate and (for tool_choice required) pick the tool: raises RequestFailed before any byte is sent.
        Validation runs in a worker thread, as for gRPC (a large prompt must not stall this event loop)."""
        prepared = await asyncio.to_thread(self._prepare, request, None)
        return await self._with_chosen_tool(request, prepared, None)

    def _draft_extra(self, ev: pb.GenerateEvent) -> dict:
        d = ev.draft
        return {
            "draft": {"canvas_index": d.canvas_index, "step": d.step, "text": d.text, "accepted": d.accepted}
        }

    async def complete(self, body: oa.CompletionBody):
        request = oa.completion_request(body, self.settings.defaults)
        prepared = await self._start(request)
        rid, model = oa.new_id("cmpl"), self.settings.model_name
        if body.stream:
            return self._stream(prepared, body, rid, "text_completion", self._completion_chunk)
        final, tokens = await self._collect(prepared)
        choice = {
            "index": 0,
            "text": final.text,
            "logprobs": None,
            "finish_reason": oa.FINISH[final.finish_reason],
        }
        extra = {"usage": oa.usage(final.usage), "blockserve": self._extra(prepared, final, tokens)}
        return oa.envelope("text_completion", rid, model, [choice], **extra)

    async def chat(self, body: oa.ChatBody):
        request = oa.chat_request(body, self.settings.defaults)
        prepared = await self._start(request)
        rid, model = oa.new_id("chatcmpl"), self.settings.model_name
        if body.stream:
            return self._stream(prepared, body, rid, "chat.completion.chunk", self._chat_chunks(prepared))
        final, tokens = await self._collect(prepared)
        reply = final.chat
        message = {
            "role": "assistant",
            "content": reply.content if not reply.tool_calls else (reply.content or None),
        }
        if reply.reasoning_content:
            message["reasoning_content"] = reply.reasoning_content
        if reply.tool_calls:
            message["tool_calls"] = oa.tool_calls(reply)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": oa.chat_finish(final)}
        extra = {"usage": oa.usage(final.usage), "blockserve": self._extra(prepared, final, tokens)}
        return oa.envelope("chat.completion", rid, model, [choice], **extra)

    def _extra(self, prepared, final: pb.Final, tokens: list[int]) -> dict:
        """The `blockserve` field of an answer: generation stats and the completion's token ids."""
        ids = tokens if prepared.layout is not None else self._delivered(tokens, final)
        return {"stats": oa.stats(final.stats), "token_ids": list(ids), "request_id": final.request_id}

    async def _collect(self, prepared) -> tuple[pb.Final, list[int]]:
        tokens: list[int] = []
        async for event in self._events(prepared):
            if event.HasField("canvas"):
                tokens.extend(event.canvas.token_ids)
            elif event.HasField("final"):
                obs.router_request().finish(obs.outcome_of_final(event.final), 200)
                return event.final, tokens
        raise RequestFailed(grpc.StatusCode.INTERNAL, "the engine stream ended without a final event")

    @staticmethod
    def _completion_chunk(event: pb.GenerateEvent) -> list[dict]:
        if event.HasField("canvas") and event.canvas.text_delta:
            return [{"index": 0, "text": event.canvas.text_delta, "logprobs": None, "finish_reason": None}]
        if event.HasField("final"):
            return [
                {
                    "index": 0,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": oa.FINISH[event.final.finish_reason],
                }
            ]
        return []

    def _chat_chunks(self, prepared):
        """A chat stream's event -> choices function. Tool calls stream as OpenAI's clients expect: per call, a
        delta with its index, id, type and name, then argument fragments as committed canvases write them (drafts
        may still change, so they carry none); what was not streamed (a forced call's arguments come whole with the
        final event) follows before the finish chunk."""
        plan = prepared.chat
        live = plan is not None and plan.parse_tools and not plan.forced_tool and prepared.layout is None
        calls, text = ToolCallStream(), []

        def choice(delta: dict, finish: str | None = None) -> dict:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        def tool_deltas(full: str) -> list[dict]:
            return [choice({"tool_calls": [d]}) for d in calls.update(calls_so_far(full, plan.format))]

        def chunks(event: pb.GenerateEvent) -> list[dict]:
            if event.HasField("canvas"):
                delta, chat = {}, event.canvas.chat
                if chat.reasoning_content:
                    delta["reasoning_content"] = chat.reasoning_content
                if chat.content:
                    delta["content"] = chat.content
                out = [choice(delta)] if delta else []
                if live:
                    text.append(event.canvas.text_delta)
                    out += tool_deltas("".join(text))
                return out
            if event.HasField("final"):
                final = event.final
                out = tool_deltas(final.text) if live else []
                out += [choice({"tool_calls": [d]}) for d in oa.unsent_tool_calls(final.chat, calls.calls)]
                return out + [choice({}, oa.chat_finish(final))]
            return []

        return chunks

    def _stream(self, prepared, body: oa.Common, rid: str, kind: str, to_choices) -> StreamingResponse:
        model = self.settings.model_name
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rr = obs.router_request()  # the route's request; the stream ends it (headers say 200 by then)

        async def events() -> AsyncIterator[str]:
            if kind == "chat.completion.chunk":  # OpenAI opens a chat stream with the role
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield sse(oa.envelope(kind, rid, model, [first]))
            try:
                async for event in self._events(prepared):
                    if event.HasField("draft"):
                        yield sse(oa.envelope(kind, rid, model, [], blockserve=self._draft_extra(event)))
                        continue
                    for choice in to_choices(event):
                        yield sse(oa.envelope(kind, rid, model, [choice]))
                    if event.HasField("final"):
                        rr.finish(obs.outcome_of_final(event.final), 200)
                        if include_usage:
                            yield sse(oa.envelope(kind, rid, model, [], usage=oa.usage(event.final.usage)))
            except RequestFailed as e:  # headers are sent: report in the stream, as OpenAI does
                rr.finish(obs.Outcome(code=e.code.name, message=str(e)), 200)
                yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
            except BaseException as e:  # the client went away (or a bug): recorded, then re-raised
                rr.finish(obs.outcome_of_exception(e), 200)
                raise
            rr.finish(
                obs.Outcome(code="INTERNAL", message="the engine stream ended without a final event"), 200
            )
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")


def unauthenticated(router: Router, request: Request) -> JSONResponse | None:
    """401 (with `WWW-Authenticate: Bearer`) unless the API key check passes (deployments/auth.py)."""
    try:
        router.keys.check_http(request.headers.get("authorization"))
    except Unauthenticated as e:
        response = error_response(401, str(e), None, "invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return None


# FastAPI >= 0.165 traces and meters requests itself, continuing the HTTP `traceparent` as a second server span
# beside Ray Serve's proxy span (two roots for one request) and, with OTLP variables set, may add exporters of its
# own. Serve already traces the hop and the Router records the route: FastAPI's telemetry stays off.
FASTAPI_TELEMETRY_OFF = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}


def new_fastapi(**kwargs) -> FastAPI:
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:  # older FastAPI has no own telemetry
        kwargs["telemetry"] = FASTAPI_TELEMETRY_OFF
    return FastAPI(**kwargs)


def build_app(router: OpenAIRouter) -> FastAPI:
    app = new_fastapi(title="blockserve OpenAI-compatible API")

    async def handle(request: Request, cls, run, route: str):
        rr = router.observe_http(route)
        try:
            response = await answer(request, cls, run)
        except BaseException as e:
            rr.finish(obs.outcome_of_exception(e), 500)
            raise
        if isinstance(response, JSONResponse):  # an error answer (successes finish in _collect / the stream)
            status = response.status_code
            message = json.loads(response.body)["error"]["message"]
            rr.finish(obs.Outcome(code=STATUS_CODE_NAME.get(status, "INTERNAL"), message=message), status)
        return response

    async def answer(request: Request, cls, run):
        denied = unauthenticated(router, request)
        if denied is not None:
            return denied
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the request body is not valid JSON")
        try:
            body = oa.parse_body(cls, data)
            if body.model != router.settings.model_name:
                return error_response(
                    404,
                    f"model {body.model!r} is not served here; GET /v1/models lists "
                    f"{router.settings.model_name!r}",
                    "model",
                    "model_not_found",
                )
            return await run(body)
        except oa.BadRequest as e:
            return error_response(400, str(e), e.param)
        except RequestFailed as e:
            # recorded with the code's own name (several codes answer 500) and the message the client gets
            response = failure_response(e)
            message = json.loads(response.body)["error"]["message"]
            obs.router_request().finish(obs.Outcome(code=e.code.name, message=message), response.status_code)
            return response

    @app.get("/v1/models")
    async def models(request: Request):
        denied = unauthenticated(router, request)
        if denied is not None:
            return denied
        card = {"id": router.settings.model_name, "object": "model", "created": 0, "owned_by": "blockserve"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, oa.CompletionBody, router.complete, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, oa.ChatBody, router.chat, "/v1/chat/completions")

    return app
