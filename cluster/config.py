"""`ClusterConfig`: everything an operator sets, loaded from YAML (and mirrored by the Helm chart's values).

Pydantic lives only here, at the edge; `to_engine_settings()` / `to_router_settings()` turn it into the plain
settings objects the deployments take. Each default lives once: a field that names a setting of a plain
settings object (SamplingParams, SchedulerLimits, RequestLimits, EngineSettings) takes its default from that
object, so the library, the YAML config and the Helm chart's values schema (generated from this module by
`blockserve helm-schema`) cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster import env
from deployments.chat import ChatChoice
from deployments.engine import EngineSettings, resolve_dtype
from deployments.experts import ExpertShardSettings
from deployments.load_adaptive import REQUEST_CLASSES, AdaptiveSettings, ClassLimits
from deployments.observability import RequestLogSettings
from deployments.requests import RequestLimits
from deployments.router import RouterSettings
from deployments.scheduler import SchedulerLimits
from model.sampling.params import SamplingParams

# The homes of the defaults this module mirrors.
_SAMPLING = SamplingParams()
_SCHEDULER = SchedulerLimits()
_REQUESTS = RequestLimits()
_ENGINE = EngineSettings(model_path="")
_ADAPTIVE = AdaptiveSettings()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    path: str = Field(
        default_factory=lambda: str(env.BLOCKSERVE_MODEL_PATH), description="Checkpoint directory"
    )
    name: str = Field("tiny-diffusiongemma", description="Name reported by ModelInfo")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and activations dtype. auto: bfloat16 on a CUDA device (what the checkpoint is "
        "published in; fp32 accumulation inside the kernels), float32 on CPU (CPU bf16 GEMMs are slow)",
    )
    device: str = Field(
        "cpu",
        description="torch device of the Engine: cpu, or cuda / cuda:N on GPU nodes (the Engine replica then "
        "asks Ray for engine.num_gpus GPUs)",
    )

    gemm_kernels: Literal["batch_invariant", "library"] = Field(
        "batch_invariant",
        description="Matrix products of bf16/fp16 models on CUDA. batch_invariant: one fixed-tile Triton kernel "
        "for every product, so a request's tokens do not depend on what it is batched with (the library's "
        "kernels change a row's bits with the batch size); probed at start-up, falling back to library with a "
        "warning if it fails. library: cuBLAS/CUTLASS as torch picks them. fp32 and CPU are invariant "
        "either way (model/gemm.py)",
    )

    @model_validator(mode="after")
    def _check_device(self):
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"model.device={self.device!r}: use cpu, cuda or cuda:N")
        return self

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


class AutoscalingSection(_Strict):
    """Engine replicas sized to the `slo` section (cluster/autoscaling.py says how)."""

    min_replicas: int = Field(1, ge=1, description="Fewest Engine replicas (also the count at deploy time)")
    max_replicas: int = Field(4, ge=1, description="Most Engine replicas")
    upscale_delay_s: float = Field(
        15.0, ge=0, description="Seconds a scale-up must be wanted continuously before it happens"
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="Seconds a scale-down must be wanted continuously before it happens"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"engine.autoscaling.min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}"
            )
        return self


class ClassLimitsSection(_Strict):
    """How far load-adaptive sampling may loosen one request class at full pressure."""

    max_entropy_bound: float = Field(
        ...,
        gt=0,
        description="Largest entropy_bound a request of this class may be raised to (more tokens per step)",
    )
    min_denoising_steps: int = Field(
        ..., ge=1, le=1024, description="Fewest max_denoising_steps a request of this class may be lowered to"
    )


class LoadAdaptiveSection(_Strict):
    """Load-adaptive sampling (deployments/load_adaptive.py): under SLO pressure, before new Engine replicas are
    ready, an Engine raises entropy_bound / lowers max_denoising_steps of new requests within these limits and
    reports what it applied in the response stats. Off by default; only the listed request classes adapt."""

    enabled: bool = Field(
        _ADAPTIVE.enabled, description="Adapt sampling under load (off: tokens never change)"
    )
    start_utilization: float = Field(
        _ADAPTIVE.start_utilization,
        gt=0,
        description="Pressure starts when an Engine's demanded tokens/s reach this share of its capacity (or its "
        "oldest waiting request has waited this many times the time-to-first-canvas SLO)",
    )
    full_utilization: float = Field(
        _ADAPTIVE.full_utilization,
        gt=0,
        description="... and is full (the class limits in full) at this share",
    )
    classes: dict[Literal["plain", "structured"], ClassLimitsSection] = Field(
        default_factory=dict,
        description="Limits per request class: `plain` (free text, chat) and `structured` (JSON schema, regex, "
        "templates, forced tool calls); a class not listed is never adapted",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.full_utilization <= self.start_utilization:
            raise ValueError(
                f"slo.load_adaptive.full_utilization={self.full_utilization} must exceed "
                f"start_utilization={self.start_utilization}"
            )
        return self

    def to_settings(self) -> AdaptiveSettings:
        assert set(self.classes) <= set(REQUEST_CLASSES)
        return AdaptiveSettings(
            enabled=self.enabled,
            start_utilization=self.start_utilization,
            full_utilization=self.full_utilization,
            classes={
                k: ClassLimits(v.max_entropy_bound, v.min_denoising_steps) for k, v in self.classes.items()
            },
        )


class SloSection(_Strict):
    """What every stream should get; the autoscaler sizes Engines to it (set it for your model and hardware)."""

    tokens_per_second: float = Field(
        20.0,
        gt=0,
        description="Per-request stream rate, tokens/s (whole canvases over the time between them)",
    )
    time_to_first_canvas_s: float = Field(
        2.0, gt=0, description="Time from submission to a request's first committed canvas, seconds"
    )
    load_adaptive: LoadAdaptiveSection = Field(default_factory=LoadAdaptiveSection)


class EngineSection(_Strict):
    replicas: int = Field(1, ge=1, description="Engine replicas (each holds a full model copy in fused mode)")
    autoscaling: AutoscalingSection | None = Field(
        None, description="Scale Engine replicas to the SLO; without it the replica count stays `replicas`"
    )
    max_rows: int = Field(
        _SCHEDULER.max_rows, ge=1, le=4096, description="Most canvases denoised together in one forward"
    )
    max_queue: int = Field(
        _SCHEDULER.max_queue, ge=0, description="Requests waiting for a row before RESOURCE_EXHAUSTED"
    )
    kv_cache_gib: float = Field(
        _SCHEDULER.kv_cache_bytes / 2**30, gt=0, description="KV-cache memory budget per Engine, GiB"
    )
    prefill_chunk: int = Field(
        _SCHEDULER.prefill_chunk, ge=1, description="Prompt tokens prefilled per engine iteration"
    )
    prefill_time_share: float = Field(
        _SCHEDULER.prefill_time_share,
        gt=0,
        le=1,
        description="Most of the engine's time prompt prefill may take while streams are denoising (a long "
        "prompt cannot stall running streams); 1 = no limit",
    )
    prefill_piece_work: int = Field(
        _SCHEDULER.prefill_piece_work,
        ge=0,
        description="Query-key pairs one prompt piece may attend to: after c cached prompt tokens a piece gets at "
        "most n tokens with n * (c + n) <= this (at least 16), so pieces shrink deep into a long prompt and "
        "none stalls running streams for long; 0 = always prefill_chunk",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="torch intra-op threads per Engine (0 = torch default). 1 suits CPU hosts shared with Ray "
        "and the Router: measured 5x faster than 2 threads on a busy 2-core machine",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, replay the decoder forward of a batch that holds for more than one denoising step as "
        "one CUDA graph (measured on an H200: the few-row step is bound by issuing ~8,000 kernels from Python, "
        "see bench/gpu_step.py). Fused mode only (remote experts cannot be captured); no effect on CPU",
    )
    cuda_step_graphs: bool = Field(
        False,
        description="With cuda_graphs, capture the whole denoising step of a batch without constrained rows "
        "(decoder, sampler, row updates) instead of the decoder alone. Checked on CPU with a stand-in recorder "
        "only, not yet on a GPU: run bench/gpu_step.py --step-graphs on the target GPU before turning it on",
    )
    num_gpus: float = Field(
        1.0,
        gt=0,
        le=8,
        description="GPUs each Engine replica asks Ray for when model.device is cuda; a fraction lets several "
        "replicas share one GPU (each still needs its own copy of the weights in that GPU's memory)",
    )
    token_budget: int = Field(
        8192,
        ge=1,
        description="Tokens one engine iteration may process: every running canvas's denoising step first "
        "(L tokens each), prefill and commits share the rest fairly, so a long prompt cannot starve running "
        "streams. At least one encoder piece always runs, so no request waits forever",
    )
    execution_mode: Literal["fused", "disaggregated"] = Field(
        "fused",
        description="fused: every expert inside the Engine. disaggregated: the Engine holds attention, dense MLP "
        "and routers; experts live on ExpertShard deployments (the `experts` section), called per layer",
    )
    micro_batches: int = Field(
        _ENGINE.micro_batches,
        ge=1,
        le=8,
        description="disaggregated mode: micro-batches of rows in flight per denoising step, so the Engine "
        "computes attention for one while the shards compute experts for another",
    )
    lease_s: float = Field(
        15.0,
        gt=0,
        description="An engine row is freed when the Router has not renewed its lease for this many seconds "
        "(the Router renews three times per period while the client is connected; a dead Router's rows go)",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.autoscaling is not None and self.replicas != 1:
            raise ValueError(
                f"engine.replicas={self.replicas} is a fixed count; with engine.autoscaling set min_replicas and "
                "max_replicas there instead"
            )
        return self

    @property
    def most_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas


DEFAULT_SHARDS = 2


class ExpertsSection(_Strict):
    """Where the experts live in `disaggregated` mode: contiguous ranges [a, b) of every layer, one per shard."""

    shards: int | None = Field(
        None,
        ge=1,
        description=f"ExpertShard deployments, experts split evenly ({DEFAULT_SHARDS} when neither `shards` nor "
        "`split` is set)",
    )
    split: list[int] | None = Field(
        None,
        description="Experts per shard, in order (uneven splits allowed); must sum to the model's expert count. "
        "Overrides `shards`",
    )
    replicas_per_shard: int = Field(
        1, ge=1, description="Replicas of each shard; requests load-balance over them and retry on another"
    )
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per shard replica (fractional shares one GPU between shards; 0 on CPU)"
    )
    transport: Literal["actor", "serve"] = Field(
        _ENGINE.transport,
        description="Engine -> shard data path per layer: `actor` calls each replica's expert worker as a plain "
        "Ray actor (measured the fastest hop, see bench/disaggregated.py); `serve` goes through a Serve "
        "DeploymentHandle",
    )
    call_timeout_s: float = Field(
        _ENGINE.shard_timeout_s,
        gt=0,
        description="Seconds one shard call may take before it is retried on another replica",
    )
    unavailable_after_s: float = Field(
        _ENGINE.shard_wait_s,
        gt=0,
        description="Seconds a shard may go without a live replica (while Serve replaces one) before the "
        "requests in flight fail with UNAVAILABLE",
    )
    torch_threads: int = Field(
        1, ge=0, description="torch intra-op threads per shard replica (0 = torch default)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.split is not None:
            if any(n < 1 for n in self.split):
                raise ValueError(f"experts.split={self.split}: every shard needs at least one expert")
            if self.shards is not None and self.shards != len(self.split):
                raise ValueError(
                    f"experts.shards={self.shards} but experts.split has {len(self.split)} entries; "
                    "drop `shards` or make them agree"
                )
        return self

    def sizes(self, num_experts: int) -> list[int]:
        """Experts per shard for a model with `num_experts` (a clear error when the split does not fit)."""
        from cluster.placement import even_split

        if self.split is None:
            return even_split(num_experts, self.shards or DEFAULT_SHARDS)
        if sum(self.split) != num_experts:
            raise ConfigFileError(
                f"experts.split={self.split} sums to {sum(self.split)} but the model has {num_experts} experts; "
                f"make the entries sum to {num_experts}"
            )
        return list(self.split)


class SamplingSection(_Strict):
    max_new_tokens: int = Field(_SAMPLING.max_new_tokens, ge=1, description="Default max_new_tokens")
    max_denoising_steps: int = Field(
        _SAMPLING.max_denoising_steps, ge=1, le=1024, description="Default denoising-step limit per canvas"
    )
    entropy_bound: float = Field(_SAMPLING.entropy_bound, gt=0, description="Default entropy bound (nats)")
    t_min: float = Field(_SAMPLING.t_min, gt=0, description="Default final temperature")
    t_max: float = Field(_SAMPLING.t_max, gt=0, description="Default initial temperature")
    stability_threshold: int = Field(
        _SAMPLING.stability_threshold, ge=0, le=64, description="Default stability steps"
    )
    confidence_threshold: float = Field(
        _SAMPLING.confidence_threshold, gt=0, description="Default mean-entropy stop threshold"
    )

    @model_validator(mode="after")
    def _check(self):
        errors = self.to_params().errors()
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class LimitsSection(_Strict):
    max_new_tokens: int = Field(
        _REQUESTS.max_new_tokens, ge=1, description="Largest max_new_tokens a request may ask for"
    )
    max_prompt_chars: int = Field(
        _REQUESTS.max_prompt_chars,
        ge=1,
        description="Longest prompt text, characters (checked before tokenizing)",
    )
    max_prompt_tokens: int = Field(_REQUESTS.max_prompt_tokens, ge=1, description="Longest prompt, tokens")
    max_stop_strings: int = Field(
        _REQUESTS.max_stop_strings, ge=0, description="Most stop strings per request"
    )
    max_request_s: float = Field(
        600.0, gt=0, description="Deadline of every request, seconds: its engine row is freed after this long"
    )


class ChatSection(_Strict):
    """How the served model's chat replies are marked (like vLLM's reasoning / tool-call parser choice). The
    formats and their markers live in deployments/chat.py (`FORMATS`); a marker set here overrides the format's."""

    parser: Literal["auto", "gemma4", "json"] = Field(  # the names of FORMATS (a test holds them together)
        "auto",
        description="Reply format: gemma4 (Gemma 4 / DiffusionGemma checkpoints: <|channel>thought ... <channel|>, "
        "<|tool_call>call:NAME{...}<tool_call|>, <turn|>), json (the tiny model's <think>, <tool_call>{json}"
        "</tool_call>, <end_of_turn>), or auto: gemma4 when the checkpoint's chat template writes Gemma 4's "
        "control tokens, else json",
    )
    reasoning_start: str | None = Field(None, min_length=1, description="Opens a thought block (override)")
    reasoning_end: str | None = Field(None, min_length=1, description="Closes a thought block (override)")
    tool_call_start: str | None = Field(None, min_length=1, description="Opens a tool call (override)")
    tool_call_end: str | None = Field(None, min_length=1, description="Closes a tool call (override)")
    end_of_turn: str | None = Field(None, min_length=1, description="Token that ends the reply (override)")

    def to_format(self) -> ChatChoice:
        overrides = self.model_dump(exclude={"parser"}, exclude_none=True)
        return ChatChoice(self.parser, tuple(sorted(overrides.items())))


class TlsSection(_Strict):
    """Server certificates at the proxies (cluster/tls.py). Off unless `cert_file` is set."""

    cert_file: str | None = Field(
        None,
        description="PEM certificate (chain) the gRPC and HTTP proxies present; with key_file it turns TLS on "
        "(plaintext clients are then refused)",
    )
    key_file: str | None = Field(None, description="PEM private key of cert_file (unencrypted)")
    client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)",
    )
    http: bool = Field(
        True,
        description="Serve HTTPS on the HTTP port too. Set false under KubeRay: its readiness probe and the "
        "operator's proxy health check call http://...:http_port/-/healthz in plaintext",
    )

    @model_validator(mode="after")
    def _check(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("server.tls: set both cert_file and key_file (or neither, for plaintext)")
        if self.client_ca_file and not self.cert_file:
            raise ValueError(
                "server.tls.client_ca_file needs cert_file and key_file: mutual TLS is TLS first"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class ServerSection(_Strict):
    grpc_port: int = Field(default_factory=lambda: int(env.BLOCKSERVE_GRPC_PORT), ge=1, le=65535)
    http_port: int = Field(
        8000, ge=1, le=65535, description="Ray Serve HTTP proxy port: the OpenAI-compatible API (/v1/...)"
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the gRPC and HTTP proxies and the replicas' servers bind (0.0.0.0 in a pod)",
    )
    max_queued_requests: int = Field(1024, ge=1, description="Router queue bound at the proxy")
    ray_num_cpus: int = Field(32, ge=1, description="Logical CPUs of a local Ray head started by `serve`")
    metrics_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of Ray's Prometheus endpoint, where `ray_blockserve_*` metrics are scraped "
        "(bound to the node address: 127.0.0.1 for a local `serve`)",
    )
    tls: TlsSection = Field(default_factory=TlsSection)

    def http_tls_options(self) -> dict[str, str]:
        """Serve's `http_options` keys for HTTPS at the HTTP proxy (empty: plaintext HTTP)."""
        t = self.tls
        if not (t.enabled and t.http):
            return {}
        out = {"ssl_certfile": t.cert_file, "ssl_keyfile": t.key_file}
        if t.client_ca_file:
            out["ssl_ca_certs"] = t.client_ca_file
        return out


class TelemetrySection(_Strict):
    otlp_endpoint: str = Field(
        "",
        description="OTLP/gRPC collector address for traces, e.g. http://127.0.0.1:4317. Empty: the standard "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT variables; tracing is off when neither "
        "is set",
    )
    sampling_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of requests traced when the client sends no traceparent (a client's sampled "
        "traceparent is always followed)",
    )
    service_name: str = Field(
        "blockserve", description="service.name of the spans (the OTEL_SERVICE_NAME variable wins)"
    )
    log_requests: bool = Field(
        True,
        description="Log one JSON line per finished request (id, status, tokens, canvases, steps, seconds)",
    )
    log_prompts: bool = Field(
        False, description="Include the prompt text in the request log line (it may hold personal data)"
    )


class AuthSection(_Strict):
    keys_file: str | None = Field(
        None,
        description="File of API keys, one a line, '#' comments (e.g. a mounted Kubernetes Secret). With no key "
        "from the file or the environment variable, authentication is off",
    )
    keys_env: str | None = Field(
        "BLOCKSERVE_API_KEYS",
        description="Environment variable (of the Ray processes) holding comma-separated API keys, if set",
    )


class ClusterConfig(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    server: ServerSection = Field(default_factory=ServerSection)
    chat: ChatSection = Field(default_factory=ChatSection)
    slo: SloSection = Field(default_factory=SloSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)

    @model_validator(mode="after")
    def _check(self):
        if self.sampling.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(
                f"sampling.max_new_tokens={self.sampling.max_new_tokens} exceeds "
                f"limits.max_new_tokens={self.limits.max_new_tokens}"
            )
        return self

    @classmethod
    def load(cls, path: str | Path | None) -> ClusterConfig:
        if path is None:
            return cls()
        path = Path(path)
        if not path.exists():
            raise ConfigFileError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls.model_validate(data)
        except (yaml.YAMLError, ValidationError) as e:
            raise ConfigFileError(f"invalid config {path}: {e}") from None

    def model_path(self) -> str:
        path = Path(self.model.path)
        if not (path / "config.json").exists():
            raise ConfigFileError(
                f"model.path {path} has no config.json; point it at a DiffusionGemma checkpoint directory "
                "(run `make tiny-model` to build the default one)"
            )
        return str(path.resolve())

    def expert_ranges(self) -> list[range]:
        """Experts [a, b) of each shard, checked against the checkpoint's expert count (ConfigFileError)."""
        from cluster.placement import PlacementError, ranges
        from model.config import ModelConfig

        num_experts = ModelConfig.from_file(self.model_path()).num_experts
        try:
            return ranges(self.experts.sizes(num_experts))
        except PlacementError as e:
            raise ConfigFileError(str(e)) from None

    def to_shard_settings(self) -> list[ExpertShardSettings]:
        return [
            ExpertShardSettings(
                model_path=self.model_path(),
                first=r.start,
                stop=r.stop,
                shard=i,
                # shards load the dtype the Engine resolves (`auto` decided by the device, in one place)
                dtype=str(resolve_dtype(self.model.dtype, self.model.device)).removeprefix("torch."),
                device=self.model.device,
                gemm_kernels=self.model.gemm_kernels,
                torch_threads=self.experts.torch_threads,
            )
            for i, r in enumerate(self.expert_ranges())
        ]

    def replica_model_path(self) -> str:
        """The checkpoint path the replicas open: absolute when it exists here, else as written.

        The Serve application is built wherever Ray schedules its build task (on Kubernetes, any pod), which
        need not mount the checkpoint; the replicas that load it report a missing one.
        """
        path = Path(self.model.path)
        return str(path.resolve()) if path.exists() else self.model.path

    def to_engine_settings(self) -> EngineSettings:
        e = self.engine
        return EngineSettings(
            model_path=self.replica_model_path(),
            dtype=self.model.dtype,
            device=self.model.device,
            gemm_kernels=self.model.gemm_kernels,
            limits=SchedulerLimits(
                max_rows=e.max_rows,
                max_queue=e.max_queue,
                kv_cache_bytes=int(e.kv_cache_gib * 2**30),
                prefill_chunk=e.prefill_chunk,
                prefill_time_share=e.prefill_time_share,
                prefill_piece_work=e.prefill_piece_work,
                token_budget=e.token_budget,
            ),
            torch_threads=e.torch_threads,
            cuda_graphs=e.cuda_graphs,
            cuda_step_graphs=e.cuda_step_graphs,
            execution_mode=e.execution_mode,
            micro_batches=e.micro_batches,
            transport=self.experts.transport,
            shard_timeout_s=self.experts.call_timeout_s,
            shard_wait_s=self.experts.unavailable_after_s,
            slo_tokens_per_second=self.slo.tokens_per_second,
            slo_time_to_first_canvas_s=self.slo.time_to_first_canvas_s,
            load_adaptive=self.slo.load_adaptive.to_settings(),
            max_request_s=self.limits.max_request_s,
        )

    def to_router_settings(self) -> RouterSettings:
        lim = self.limits
        return RouterSettings(
            model_path=self.replica_model_path(),
            model_name=self.model.name,
            defaults=self.sampling.to_params(),
            limits=RequestLimits(
                max_new_tokens=lim.max_new_tokens,
                max_prompt_chars=lim.max_prompt_chars,
                max_stop_strings=lim.max_stop_strings,
                max_prompt_tokens=lim.max_prompt_tokens,
            ),
            max_rows=self.engine.max_rows,
            execution_mode=self.engine.execution_mode,
            chat_format=self.chat.to_format(),
            lease_s=self.engine.lease_s,
            max_request_s=lim.max_request_s,
            api_keys_file=self.auth.keys_file,
            api_keys_env=self.auth.keys_env,
            request_log=RequestLogSettings(
                enabled=self.telemetry.log_requests, include_prompt=self.telemetry.log_prompts
            ),
        )


class ConfigFileError(ValueError):
    pass
