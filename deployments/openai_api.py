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
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments import openai_protocol as oa
from deployments.auth import Unauthenticated
from deployments.router import RequestFailed, Router
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

    async def _start(self, request: pb.GenerateRequest):
        """Validate and (for tool_choice required) pick the tool: raises RequestFailed before any byte is sent."""
        prepared = self._prepare(request, None)
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
            return self._stream(prepared, body, rid, "chat.completion.chunk", self._chat_chunk)
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

    @staticmethod
    def _chat_chunk(event: pb.GenerateEvent) -> list[dict]:
        if event.HasField("canvas"):
            delta = {}
            if event.canvas.chat.reasoning_content:
                delta["reasoning_content"] = event.canvas.chat.reasoning_content
            if event.canvas.chat.content:
                delta["content"] = event.canvas.chat.content
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}] if delta else []
        if event.HasField("final"):
            final, chunks = event.final, []
            if final.chat.tool_calls:
                delta = {"tool_calls": oa.tool_calls(final.chat, with_index=True)}
                chunks.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})
            chunks.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": oa.chat_finish(final)})
            return chunks
        return []

    def _stream(self, prepared, body: oa.Common, rid: str, kind: str, to_choices) -> StreamingResponse:
        model = self.settings.model_name
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

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
                    if event.HasField("final") and include_usage:
                        yield sse(oa.envelope(kind, rid, model, [], usage=oa.usage(event.final.usage)))
            except RequestFailed as e:  # headers are sent: report in the stream, as OpenAI does
                yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
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


def build_app(router: OpenAIRouter) -> FastAPI:
    app = FastAPI(title="blockserve OpenAI-compatible API")

    async def handle(request: Request, cls, run):
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
            return failure_response(e)

    @app.get("/v1/models")
    async def models(request: Request):
        denied = unauthenticated(router, request)
        if denied is not None:
            return denied
        card = {"id": router.settings.model_name, "object": "model", "created": 0, "owned_by": "blockserve"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, oa.CompletionBody, router.complete)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, oa.ChatBody, router.chat)

    return app
