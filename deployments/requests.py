"""Validate and normalise a `GenerateRequest` once, at the Router: proto in, `Prepared` (engine request + what
the Router needs to build the answer) out, or `InvalidRequest` whose message says what to fix.

Every field is checked, and all problems are reported together so a client fixes them in one round trip.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

from deployments.scheduler import EngineRequest
from model.config import ModelConfig
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint
from model.structured.json_schema import (
    InvalidSchemaError,
    SchemaLimits,
    UnsupportedSchemaError,
    compile_schema,
)
from model.structured.templates import Fixed, Layout, Slot, Template, TemplateError, TemplateLimits, layout
from model.structured.token_classes import token_classes_for
from model.tokenizer import Tokenizer
from protos.blockserve.v1 import blockserve_pb2 as pb

SAMPLING_FIELDS = (
    "max_denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
)


class InvalidRequest(ValueError):
    """Answered as INVALID_ARGUMENT with this message."""


@dataclass
class RequestLimits:
    max_new_tokens: int = 4096
    max_prompt_chars: int = 1 << 20
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_request_id_chars: int = 128
    max_schema_chars: int = 65536


@dataclass
class Prepared:
    engine: EngineRequest
    stop: list[str] = field(default_factory=list)
    layout: Layout | None = None
    client_request_id: str = ""


def _prompt_ids(
    req: pb.GenerateRequest, tokenizer: Tokenizer, cfg: ModelConfig, limits: RequestLimits, errors
):
    which = req.WhichOneof("prompt_input")
    if which is None:
        errors.append("set either prompt (text) or prompt_token_ids")
        return []
    if which == "prompt":
        if not req.prompt:
            errors.append("prompt is empty: send some text")
            return []
        if len(req.prompt) > limits.max_prompt_chars:
            errors.append(f"prompt has {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}")
            return []
        ids = tokenizer.encode(req.prompt)
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids
    ids = list(req.prompt_token_ids.ids)
    if not ids:
        errors.append("prompt_token_ids.ids is empty: send at least one token id")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        errors.append(f"prompt_token_ids has ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    return ids


def _sampling(
    req: pb.GenerateRequest, defaults: SamplingParams, limits: RequestLimits, errors
) -> SamplingParams:
    values = {name: getattr(defaults, name) for name in SAMPLING_FIELDS}
    for name in SAMPLING_FIELDS:
        if req.sampling.HasField(name):
            values[name] = getattr(req.sampling, name)
    for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
        if not math.isfinite(values[name]):
            errors.append(f"sampling.{name} must be a finite number (got {values[name]})")
    max_new = req.max_new_tokens or defaults.max_new_tokens
    if max_new > limits.max_new_tokens:
        errors.append(f"max_new_tokens={max_new} exceeds this server's limit of {limits.max_new_tokens}")
    params = SamplingParams(max_new_tokens=max_new, **values)
    errors.extend(f"sampling.{e}" if not e.startswith("max_new") else e for e in params.errors())
    return params


def _stop(req: pb.GenerateRequest, limits: RequestLimits, errors) -> list[str]:
    stop = list(req.stop)
    if len(stop) > limits.max_stop_strings:
        errors.append(f"stop has {len(stop)} strings; at most {limits.max_stop_strings} are allowed")
    for i, s in enumerate(stop):
        if not s:
            errors.append(f"stop[{i}] is empty: remove it or give a non-empty string")
        elif len(s) > limits.max_stop_chars:
            errors.append(f"stop[{i}] has {len(s)} characters; the limit is {limits.max_stop_chars}")
    return stop


def _template(
    req: pb.GenerateRequest, tokenizer: Tokenizer, limits: RequestLimits, errors
) -> Template | None:
    which = req.WhichOneof("structure")
    if which is None:
        return None
    if which == "json_schema":
        if len(req.json_schema) > limits.max_schema_chars:
            errors.append(
                f"json_schema has {len(req.json_schema)} characters; the limit is {limits.max_schema_chars}"
            )
            return None
        try:
            schema = json.loads(req.json_schema)
        except json.JSONDecodeError as e:
            errors.append(f"json_schema is not valid JSON: {e}")
            return None
        try:
            return compile_schema(schema, tokenizer, SchemaLimits())
        except (UnsupportedSchemaError, InvalidSchemaError, TemplateError) as e:
            errors.append(f"json_schema: {e}")
            return None
    parts = []
    try:
        for i, part in enumerate(req.template.parts):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(Fixed(part.text))
            elif kind == "slot":
                parts.append(Slot(part.slot.name, part.slot.max_tokens))
            else:
                errors.append(f"template.parts[{i}] is empty: set text or slot")
        return Template(tuple(parts))
    except (TemplateError, ValueError) as e:
        errors.append(f"template: {e}")
        return None


def _constraints(lay: Layout) -> list[CanvasConstraint]:
    table = lay.mask_table()  # [C, V], row 0 all True; shared by every canvas of the request
    out = []
    for i in range(lay.num_canvases):
        pins, classes = lay.canvas(i)
        out.append(CanvasConstraint(pins, classes, table))
    return out


def prepare(
    req: pb.GenerateRequest,
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    defaults: SamplingParams,
    limits: RequestLimits,
    request_id: str,
) -> Prepared:
    errors: list[str] = []
    prompt = _prompt_ids(req, tokenizer, cfg, limits, errors)
    params = _sampling(req, defaults, limits, errors)
    stop = _stop(req, limits, errors)
    if len(req.request_id) > limits.max_request_id_chars:
        errors.append(
            f"request_id has {len(req.request_id)} characters; the limit is {limits.max_request_id_chars}"
        )
    template = _template(req, tokenizer, limits, errors)
    lay = None
    if template is not None:
        try:
            classes = token_classes_for(tokenizer, cfg.vocab_size)
            lay = layout(template, tokenizer, cfg.canvas_length, TemplateLimits(), classes)
        except (TemplateError, ValueError) as e:
            errors.append(f"template: {e}")
    if template is not None and stop:
        errors.append("stop strings cannot be combined with template or json_schema (their length is fixed)")
    if errors:
        raise InvalidRequest("; ".join(errors))
    new_positions = (
        lay.num_positions if lay else math.ceil(params.max_new_tokens / cfg.canvas_length) * cfg.canvas_length
    )
    if len(prompt) + new_positions > cfg.max_position_embeddings:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + {new_positions} generated positions exceeds the model's context of "
            f"{cfg.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
        )
    seed = req.seed if req.HasField("seed") else random.getrandbits(63)
    engine = EngineRequest(
        request_id=request_id,
        prompt_ids=prompt,
        params=params,
        seed=seed,
        stream_drafts=req.stream_drafts,
        constraints=_constraints(lay) if lay else None,
    )
    return Prepared(engine, stop, lay)
