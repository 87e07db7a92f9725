"""The Router: the gRPC front of blockserve, behind Ray Serve's gRPC proxy.

It only translates (grpc's `examples/python` habit): validate and normalise the request once
(deployments/requests.py; INVALID_ARGUMENT with a message that says what to fix), tokenize, stream the Engine's
events back as `GenerateEvent`s, turn tokens into text (holding back an incomplete UTF-8 tail between canvases),
apply stop strings, map failures to status codes (docs/ERRORS.md), and answer the standard health service.

Reliability: validation and tokenizing run in a worker thread (a 1 MB prompt must not stall every stream on this
event loop); every engine request carries a deadline (the client's gRPC deadline, which Serve's proxy forwards
as metadata, capped at `max_request_s`) and a lease, renewed by one task here while the request's
client is connected (`_renew_leases`), so the Engine frees the rows of a vanished client or a dead Router; a
dead or unreachable Engine replica is UNAVAILABLE (retryable) with a one-line message, never a traceback.

Method names are the RPC names because Ray Serve routes `BlockDiffusion/GenerateStream` to the ingress
deployment's `GenerateStream` method (Ray Serve 2.60's gRPC proxy routes by method name). The Engine is injected as a handle-like object with
`.options(stream=True).generate.remote(request)` and `.ready.remote()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from deployments import observability as obs
from deployments.auth import ApiKeys, Unauthenticated
from deployments.chat import ChatChoice, ChatFormat, ChatTemplate, ReplyStream, choose_format, parse_reply
from deployments.leases import client_timeout_s
from deployments.requests import ChatSupport, InvalidRequest, Prepared, RequestLimits, prepare
from deployments.scheduler import CanvasEvent, DraftEvent, ErrorEvent, FinalEvent, SchedulerLimits
from deployments.wire import UndecodableRequest
from model.config import ModelConfig
from model.sampling.params import SamplingParams
from model.structured.templates import fill
from model.tokenizer import Tokenizer
from protos.blockserve.v1 import blockserve_pb2 as pb

log = logging.getLogger("blockserve.router")

FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "stop": pb.FINISH_REASON_STOP,
    "template": pb.FINISH_REASON_TEMPLATE_DONE,
}


@dataclass
class RouterSettings:
    model_path: str
    model_name: str = "diffusiongemma"
    defaults: SamplingParams = field(default_factory=SamplingParams)
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_rows: int = SchedulerLimits.max_rows  # the Engine's row limit, reported by ModelInfo
    execution_mode: str = "fused"
    health_timeout_s: float = 2.0
    chat_format: ChatFormat | ChatChoice = field(default_factory=ChatChoice)  # a choice: by the template
    lease_s: float = 15.0  # an engine row whose lease is not renewed for this long is freed
    max_request_s: float = (
        600.0  # deadline of an engine request whose client sent none (and the cap of one that did)
    )
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    health_poll_s: float = 1.0

    request_log: obs.RequestLogSettings = field(default_factory=obs.RequestLogSettings)


HEALTH_SERVICES = ("", "blockserve.v1.BlockDiffusion")
# Ray's exceptions for a replica or handle that is gone or unreachable, by class name so deployments/ needs no
# Ray import: the client should retry (UNAVAILABLE), and the details carry no traceback.
UNAVAILABLE_ERRORS = {
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "DeploymentUnavailableError",
    "ReplicaUnavailableError",
    "WorkerCrashedError",
    "NodeDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "ObjectFetchTimedOutError",
}


def status_of(error: BaseException) -> RequestFailed:
    """An exception from a call to the Engine -> the status the client gets (no traceback in the details)."""
    if isinstance(error, RequestFailed):
        return error
    names = {c.__name__ for c in type(error).__mro__}
    if names & UNAVAILABLE_ERRORS:
        return RequestFailed(
            grpc.StatusCode.UNAVAILABLE, "the engine replica is unavailable; retry the request"
        )
    if "BackPressureError" in names:
        return RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "the engine is overloaded; retry later")
    log.error("engine call failed: %s", error, exc_info=error)
    return RequestFailed(
        grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
    )


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # Serve pickles the exception back to the proxy
        return (RequestFailed, (self.code, str(self)))


class TextAssembler:
    """Committed tokens -> text, with stop strings. Holds back a trailing U+FFFD (a UTF-8 character split
    across canvases) until the next canvas completes it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str],
        stop_ids: frozenset[int] = frozenset(),
        keep_ids: frozenset[int] = frozenset(),
    ):
        self.tokenizer, self.stop, self.stop_ids = tokenizer, stop, stop_ids
        self.keep_ids = keep_ids  # special tokens that are text here (chat markers the reply parser reads)
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, ids: list[int], final: bool = False) -> str:
        if self.stopped:  # the text ends at the stop string; tokens past it are not part of the answer
            return ""
        at = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        if at is not None:  # a stop token (chat: end of turn) ends the reply; it is not part of it
            ids, final, self.stopped = ids[:at], True, True
        self.tokens.extend(ids)
        text = self._decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
            self.tokens = self._tokens_within(len(text))
        elif not final:
            text = text.rstrip("\ufffd")
        delta = text[len(self.sent) :] if text.startswith(self.sent) else text
        self.sent = text if (cut >= 0 or final or len(text) >= len(self.sent)) else self.sent
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not self.keep_ids:
            return self.tokenizer.decode(ids)
        drop = self.tokenizer.special_ids - self.keep_ids
        return self.tokenizer.hf.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    def _tokens_within(self, n_chars: int) -> list[int]:
        """The longest token prefix whose text fits in the first n_chars characters."""
        lo, hi = 0, len(self.tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._decode(self.tokens[:mid])) <= n_chars:
                lo = mid
            else:
                hi = mid - 1
        return self.tokens[:lo]


class Router:
    def __init__(self, engine, settings: RouterSettings):
        self.engine = engine
        self.settings = settings
        self.keys = ApiKeys.load(settings.api_keys_file, settings.api_keys_env)
        self._inflight: set[str] = set()  # engine request ids whose clients are connected (leases to renew)
        self._renewer: asyncio.Task | None = None
        self.config = ModelConfig.from_file(settings.model_path)
        self.tokenizer = Tokenizer.from_dir(
            settings.model_path,
            pad_id=self.config.pad_token_id,
            eos_id=self.config.eos_token_ids[0] if self.config.eos_token_ids else -1,
            bos_id=self.config.bos_token_id,
        )
        template = ChatTemplate.from_dir(settings.model_path)
        fmt = choose_format(settings.chat_format, template.source if template else None)
        self.chat_support = ChatSupport(template, fmt)
        # a span per tokenizer call of a traced request; the same object, so caches keyed on it still hit
        self.tokenizer.encode = obs.traced_encode(self.tokenizer.encode)
        self._metrics = obs.make_metrics(obs.ROUTER_METRICS)
        if settings.request_log.enabled:
            obs.configure_request_log()

    # -- helpers -----------------------------------------------------------------------------------------
    def _authenticate(self, grpc_context) -> None:
        if not self.keys.enabled:
            return
        try:
            self.keys.check_grpc(grpc_context.invocation_metadata() if grpc_context is not None else None)
        except Unauthenticated as e:
            raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None

    async def _admit(self, request, grpc_context) -> Prepared:
        """Authenticate, then validate and tokenize in a worker thread (off this event loop)."""
        self._authenticate(grpc_context)
        if isinstance(request, UndecodableRequest):
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request bytes are not a valid {request.message_type}: {request.error}",
            )
        return await asyncio.to_thread(self._prepare, request, grpc_context)

    async def _renew_leases(self) -> None:
        """One task per Router: renew the leases of every connected request, three times per lease period."""
        period = max(0.05, self.settings.lease_s / 3)
        while self._inflight:
            try:
                self.engine.renew.remote(list(self._inflight))
            except Exception as e:  # a dead Engine replica: its requests fail on their own streams
                log.warning("lease renewal failed: %s", e)
            await asyncio.sleep(period)
        self._renewer = None

    def _track(self, request_id: str) -> None:
        self._inflight.add(request_id)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_leases(),
                context=obs.untraced_context(),  # renewals join no request's trace
            )

    def _deadline(self, grpc_context) -> float:
        """Monotonic time by which the request must end: the client's gRPC deadline (forwarded by Serve's proxy,
        cluster/serve_fixes.py), capped at `max_request_s`."""
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else None
        return time.monotonic() + client_timeout_s(metadata, self.settings.max_request_s)

    def _prepare(self, request: pb.GenerateRequest, grpc_context) -> Prepared:
        # The answer echoes the client's id (else Serve's); the engine gets a unique one since client ids may repeat.
        rid = request.request_id or (grpc_context.request_id() if grpc_context else None) or uuid.uuid4().hex
        rr = obs.router_request()
        rr.identify(rid, request.prompt)
        try:
            with rr.stage("router.validate"):
                prepared = prepare(
                    request,
                    self.tokenizer,
                    self.config,
                    self.settings.defaults,
                    self.settings.limits,
                    f"{rid}-{uuid.uuid4().hex[:8]}",
                    self.chat_support,
                )
        except InvalidRequest as e:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except RecursionError:  # a pathological structure the validators did not catch themselves
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT, "the request is nested too deeply; flatten it"
            ) from None
        prepared.client_request_id = rid
        return prepared

    @staticmethod
    def _abort(grpc_context, err: RequestFailed) -> None:
        if grpc_context is not None:
            grpc_context.set_code(err.code)
            grpc_context.set_details(str(err))

    def _slots(self, prepared: Prepared, tokens: list[int]) -> tuple[str, list[pb.SlotContent]]:
        filled = fill(prepared.layout, tokens, self.tokenizer)
        slots = [pb.SlotContent(name=n, text=s.text, token_ids=s.token_ids) for n, s in filled.slots.items()]
        return filled.text, slots

    async def _events(
        self, prepared: Prepared, deadline: float | None = None
    ) -> AsyncIterator[pb.GenerateEvent]:
        """Engine events -> GenerateEvents. Cancels the engine request when the consumer stops early.
        `deadline` (monotonic) travels to the Engine, which frees the row when it passes; None = max_request_s."""
        plan = prepared.chat
        text = TextAssembler(
            self.tokenizer,
            prepared.stop,
            plan.stop_ids if plan else frozenset(),
            plan.marker_ids if plan else frozenset(),
        )
        reply = ReplyStream(plan.format, plan.parse_tools) if plan and prepared.layout is None else None
        all_tokens: list[int] = []
        rid = prepared.engine.request_id
        s = self.settings
        timeout_s = s.max_request_s if deadline is None else deadline - time.monotonic()
        if timeout_s <= 0:
            raise RequestFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started"
            )
        with obs.router_request().current():  # the Engine's spans become children of this RPC's span
            stream = self.engine.options(stream=True).generate.remote(
                prepared.engine, timeout_s=timeout_s, lease_s=s.lease_s
            )
        self._track(rid)
        finished = False
        try:
            async for batch in stream:
                for event in self._translate(batch, prepared, text, all_tokens, reply):
                    # set before the yield: a consumer that stops at the final event closes this generator
                    # there, and the finished request must not be cancelled at the Engine
                    finished = event.HasField("final")
                    yield event
                    if finished:
                        return
        except (RequestFailed, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # the Engine replica died, its handle is lost, ...: a status, not a traceback
            raise status_of(e) from None
        finally:
            self._inflight.discard(rid)
            if not finished:  # client cancelled, deadline passed, or an error: free the engine row now
                try:
                    stream.cancel()
                    self.engine.cancel.remote(rid)
                except Exception as e:  # the lease frees the row if this message cannot be sent
                    log.info("cancel of %s not sent: %s", rid, e)

    def _translate(self, batch, prepared: Prepared, text: TextAssembler, all_tokens: list[int], reply=None):
        """One batch of engine events -> GenerateEvents (a final event ends the request)."""
        for ev in batch:
            if isinstance(ev, DraftEvent):
                yield pb.GenerateEvent(draft=self._draft(ev))
            elif isinstance(ev, CanvasEvent):
                all_tokens.extend(ev.token_ids)
                with obs.router_request().stage(
                    "router.detokenize", **{"blockserve.canvas_index": ev.canvas_index}
                ):
                    if prepared.layout is None:
                        delta = text.add(ev.token_ids, final=ev.last)
                    else:  # filler removal and normalisation need the whole layout: the text comes at the end
                        text.tokens.extend(t for t in ev.token_ids if t != self.config.pad_token_id)
                        delta = self._slots(prepared, all_tokens)[0] if ev.last else ""
                canvas = pb.Canvas(
                    canvas_index=ev.canvas_index, text_delta=delta, token_ids=ev.token_ids, steps=ev.steps
                )
                if prepared.chat is not None:
                    canvas.chat.CopyFrom(self._chat_delta(prepared, text, reply, delta, ev.last))
                yield pb.GenerateEvent(canvas=canvas)
                if text.stopped:
                    yield self._final(prepared, text, all_tokens, None, "stop")
                    return
            elif isinstance(ev, FinalEvent):
                yield self._final(prepared, text, all_tokens, ev, ev.finish_reason)
                return
            elif isinstance(ev, ErrorEvent):
                code = getattr(grpc.StatusCode, ev.code, grpc.StatusCode.INTERNAL)
                raise RequestFailed(code, ev.message)

    @staticmethod
    def _chat_delta(prepared: Prepared, text: TextAssembler, reply, delta: str, last: bool) -> pb.ChatDelta:
        if reply is None:  # json_schema: the JSON is the content; a forced call's arguments go to Final.chat
            return pb.ChatDelta(content="" if prepared.chat.forced_tool else delta)
        reasoning, content = reply.update(text.sent, final=last or text.stopped)
        return pb.ChatDelta(content=content, reasoning_content=reasoning)

    @staticmethod
    def _chat_reply(prepared: Prepared, full: str) -> pb.ChatReply:
        plan = prepared.chat
        if plan.forced_tool:
            call = pb.ToolCall(id="call_" + uuid.uuid4().hex[:24], name=plan.forced_tool, arguments=full)
            return pb.ChatReply(tool_calls=[call])
        if prepared.layout is not None:
            return pb.ChatReply(content=full)
        parsed = parse_reply(full, plan.format, tools=plan.parse_tools)
        calls = [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in parsed.tool_calls]
        return pb.ChatReply(content=parsed.content, reasoning_content=parsed.reasoning, tool_calls=calls)

    async def _with_chosen_tool(
        self, request: pb.GenerateRequest, prepared: Prepared, grpc_context, deadline: float | None = None
    ) -> Prepared:
        """tool_choice REQUIRED among several tools: first generate the tool's name (constrained to the names),
        then prepare the request again with that tool forced."""
        if prepared.chat is None or not prepared.chat.choose_tool:
            return prepared
        prepared.engine.stream_drafts = False
        name = None
        async for event in self._events(prepared, deadline):
            if event.HasField("final"):
                name = json.loads(event.final.text)
        forced = pb.GenerateRequest()
        forced.CopyFrom(request)
        forced.chat.tool_name = name
        return await asyncio.to_thread(
            self._prepare, forced, grpc_context
        )  # the tool schema compiles off the loop

    def _draft(self, ev: DraftEvent) -> pb.Draft:
        return pb.Draft(
            canvas_index=ev.canvas_index,
            step=ev.step,
            token_ids=ev.token_ids,
            text=self.tokenizer.decode(ev.token_ids),
            accepted=ev.accepted,
        )

    def _final(self, prepared: Prepared, text: TextAssembler, all_tokens, ev: FinalEvent | None, reason: str):
        text.add([], final=True)  # flush a held-back tail; Final.text is the authoritative full text
        slots = []
        full = text.sent
        if prepared.layout is not None:
            full, slots = self._slots(prepared, all_tokens)
        usage = pb.Usage(prompt_tokens=len(prepared.engine.prompt_ids), completion_tokens=len(text.tokens))
        stats = pb.GenerationStats()
        if ev is not None:
            steps = sum(ev.steps_per_canvas)
            stats = pb.GenerationStats(
                canvases=len(ev.steps_per_canvas),
                denoising_steps=steps,
                steps_per_canvas=ev.steps_per_canvas,
                tokens_per_forward=ev.tokens_per_forward,
                time_to_first_canvas_s=ev.time_to_first_canvas_s,
                total_time_s=ev.total_time_s,
                tokens_per_second=ev.completion_tokens / max(1e-9, ev.total_time_s),
                queue_time_s=ev.queue_time_s,
            )
            adapted = getattr(ev, "adaptation", None)  # deployments/load_adaptive.py
            if adapted is not None:
                stats.load_adaptation.CopyFrom(pb.LoadAdaptation(**dataclasses.asdict(adapted)))
        final = pb.Final(
            usage=usage,
            stats=stats,
            finish_reason=FINISH[reason],
            text=full,
            slots=slots,
            request_id=prepared.client_request_id,
        )
        if prepared.chat is not None:
            final.chat.CopyFrom(self._chat_reply(prepared, full))
        return pb.GenerateEvent(final=final)

    # -- RPCs --------------------------------------------------------------------------------------------
    def _observe(self, rpc: str) -> obs.RouterRequest:
        return obs.RouterRequest(rpc, self._metrics, self.settings.request_log)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator:
        rr = self._observe("GenerateStream")
        deadline = self._deadline(grpc_context)
        try:
            prepared = await self._admit(request, grpc_context)
            prepared = await self._with_chosen_tool(request, prepared, grpc_context, deadline)
            async for event in self._events(prepared, deadline):
                if event.HasField("final"):
                    rr.finish(obs.outcome_of_final(event.final))
                yield event
            rr.finish(obs.Outcome(code="INTERNAL", message="the engine stream ended without a final event"))
        except RequestFailed as e:
            # Serve applies a streaming call's status only when the generator raises after setting it
            rr.finish(obs.Outcome(code=e.code.name, message=str(e)))
            self._abort(grpc_context, e)
            raise
        except BaseException as e:
            rr.finish(obs.outcome_of_exception(e))
            raise

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        rr = self._observe("Generate")
        deadline = self._deadline(grpc_context)
        try:
            prepared = await self._admit(request, grpc_context)
            prepared = await self._with_chosen_tool(request, prepared, grpc_context, deadline)
            prepared.engine.stream_drafts = False  # a unary answer has nowhere to put drafts
            tokens: list[int] = []
            async for event in self._events(prepared, deadline):
                if event.HasField("canvas"):
                    tokens.extend(event.canvas.token_ids)
                elif event.HasField("final"):
                    f = event.final
                    rr.finish(obs.outcome_of_final(f))
                    ids = tokens if prepared.layout is not None else self._delivered(tokens, f)
                    return pb.GenerateResponse(
                        text=f.text,
                        token_ids=ids,
                        usage=f.usage,
                        stats=f.stats,
                        finish_reason=f.finish_reason,
                        slots=f.slots,
                        request_id=f.request_id,
                        chat=f.chat if f.HasField("chat") else None,
                    )
            raise RequestFailed(grpc.StatusCode.INTERNAL, "the engine stream ended without a final event")
        except RequestFailed as e:
            rr.finish(obs.Outcome(code=e.code.name, message=str(e)))
            self._abort(grpc_context, e)
            return pb.GenerateResponse()
        except BaseException as e:
            rr.finish(obs.outcome_of_exception(e))
            raise

    @staticmethod
    def _delivered(tokens: list[int], final: pb.Final) -> list[int]:
        return tokens[: final.usage.completion_tokens]

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context=None) -> pb.ModelInfoResponse:
        try:
            self._authenticate(grpc_context)
            if isinstance(request, UndecodableRequest):
                raise RequestFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request bytes are not a valid {request.message_type}",
                )
        except RequestFailed as e:
            self._abort(grpc_context, e)
            return pb.ModelInfoResponse()
        c, d = self.config, self.settings.defaults
        return pb.ModelInfoResponse(
            model_name=self.settings.model_name,
            architecture="DiffusionGemmaForBlockDiffusion",
            vocab_size=c.vocab_size,
            canvas_length=c.canvas_length,
            max_context=c.max_position_embeddings,
            num_experts=c.num_experts,
            top_k_experts=c.top_k,
            defaults=pb.DefaultSampling(
                max_new_tokens=d.max_new_tokens,
                max_denoising_steps=d.max_denoising_steps,
                entropy_bound=d.entropy_bound,
                t_min=d.t_min,
                t_max=d.t_max,
                stability_threshold=d.stability_threshold,
                confidence_threshold=d.confidence_threshold,
            ),
            max_rows=self.settings.max_rows,
            execution_mode=self.settings.execution_mode,
        )

    async def _health(self) -> int:
        try:
            ready = await asyncio.wait_for(self.engine.ready.remote(), self.settings.health_timeout_s)
            if ready:
                return health_pb2.HealthCheckResponse.SERVING
        except Exception as e:  # any failure to reach a ready engine is "not serving"
            log.info("health check: engine not ready: %s", e)
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, grpc_context=None) -> health_pb2.HealthCheckResponse:
        """Standard health: "" (the server) and blockserve.v1.BlockDiffusion are known; others NOT_FOUND.
        No API key needed: load balancers and Kubernetes probes call it."""
        service = getattr(request, "service", "")
        if service not in HEALTH_SERVICES:
            self._abort(
                grpc_context, RequestFailed(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
            )
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._health())

    async def Watch(self, request, grpc_context=None) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Standard health Watch: the status now, then each change (polled every `health_poll_s`) until the
        client leaves; an unknown service is SERVICE_UNKNOWN, as the health protocol specifies."""
        service = getattr(request, "service", "")
        if service not in HEALTH_SERVICES:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            status = await self._health()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(self.settings.health_poll_s)
