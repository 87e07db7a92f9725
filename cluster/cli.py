"""`blockserve` command line: `serve` a local cluster, `generate` against it, `status` of a running cluster,
`plan` memory for a shape, `render-serve-config` (the Serve config document a RayService embeds), `helm-schema`
(the chart's values schema).

`serve` starts a single-node Ray on loopback (cluster/env.py applies the rules before Ray is imported),
deploys the Serve config document rendered from the ClusterConfig (cluster/serve_config.py, the document the
Helm chart embeds) and serves gRPC on 127.0.0.1:<port> until interrupted. `generate` is a gRPC client that shows
the draft canvas refining live (one terminal line per canvas) and prints throughput at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from cluster import env

API_KEY_ENV = "BLOCKSERVE_API_KEY"  # the key `generate` sends (the server's keys: auth.keys_env)


def _serve(args: argparse.Namespace) -> int:
    env.apply_loopback_env()
    import ray
    from ray import serve

    from cluster import preflight, telemetry, tls
    from cluster.config import ClusterConfig
    from cluster.serve_config import deploy, render_serve_config

    config = ClusterConfig.load(args.config)
    if args.model:
        config.model.path = args.model
    if args.port:
        config.server.grpc_port = args.port
    preflight.check(config)  # fail before starting Ray: a checkpoint that cannot load, a port in use
    # absolute: Ray workers (and the Serve app builder) may run in another directory
    config.model.path = config.model_path()
    if config.engine.execution_mode == "disaggregated":
        config.expert_ranges()  # and if the expert split does not fit the checkpoint
    traced = telemetry.apply_config(config.telemetry)  # before ray.init: every Ray process inherits it
    context = ray.init(
        **env.ray_init_kwargs(
            num_cpus=config.server.ray_num_cpus,
            bind_host=config.server.host,
            extra_env=tls.tls_env(config.server.tls),
        ),
        **telemetry.ray_init_metrics_kwargs(config.server.metrics_port),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a shell's background job starts with it ignored
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(render_serve_config(config), blocking=True)
        s = config.server
        grpc_tls = " with TLS" if s.tls.enabled else ""
        scheme = "https" if s.http_tls_options() else "http"
        print(
            f"blockserve: serving {config.model.name} on {s.host}:{s.grpc_port} (gRPC{grpc_tls}) and "
            f"{scheme}://{s.host}:{s.http_port}/v1 (OpenAI-compatible) (Ctrl-C to stop); "
            f"metrics on {config.server.host}:{config.server.metrics_port}/metrics; "
            + (f"traces to {traced['OTEL_EXPORTER_OTLP_TRACES_ENDPOINT']}" if traced else "tracing off")
            + f"; `blockserve status --address {context.address_info['gcs_address']}` shows replicas and autoscaling"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _request(args: argparse.Namespace):
    from protos.blockserve.v1 import blockserve_pb2 as pb

    req = pb.GenerateRequest(
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, stream_drafts=not args.no_drafts
    )
    if args.seed is not None:
        req.seed = args.seed
    for name in ("max_denoising_steps", "entropy_bound", "t_min", "t_max"):
        value = getattr(args, name)
        if value is not None:
            setattr(req.sampling, name, value)
    if args.json_schema:
        req.json_schema = Path(args.json_schema).read_text()
    elif args.template:
        req.template.CopyFrom(parse_template(args.template, args.slot_min_tokens))
    return req


def parse_template(spec: str, min_tokens: int | None = None):
    """`"def {{body:40}}\\n"` -> Template: text with `{{name:max_tokens}}` or `{{name:max_tokens:min_tokens}}`
    slots; `min_tokens` (the --slot-min-tokens flag) applies to slots that do not give their own."""
    import re

    from protos.blockserve.v1 import blockserve_pb2 as pb

    spec = spec.replace("\\n", "\n").replace("\\t", "\t")  # shell-friendly escapes
    template = pb.Template()
    pos = 0
    for m in re.finditer(r"\{\{(\w+):(\d+)(?::(\d+))?\}\}", spec):
        if m.start() > pos:
            template.parts.add(text=spec[pos : m.start()])
        slot = pb.Slot(name=m.group(1), max_tokens=int(m.group(2)))
        least = int(m.group(3)) if m.group(3) is not None else min_tokens
        if least is not None:
            slot.min_tokens = least
        template.parts.add(slot=slot)
        pos = m.end()
    if pos < len(spec):
        template.parts.add(text=spec[pos:])
    return template


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from cluster.tls import client_channel
    from protos.blockserve.v1 import blockserve_pb2_grpc

    req = _request(args)
    live = sys.stdout.isatty() and not args.no_drafts
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    channel = client_channel(args.address, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    with channel:
        stub = blockserve_pb2_grpc.BlockDiffusionStub(channel)
        t0 = time.perf_counter()
        try:
            for event in stub.GenerateStream(req, timeout=args.timeout, metadata=metadata):
                kind = event.WhichOneof("event")
                if kind == "draft" and live:
                    d = event.draft
                    line = d.text.replace("\n", "⏎")[:100]
                    sys.stdout.write(f"\r\033[2K[canvas {d.canvas_index} step {d.step:2d}] {line}")
                    sys.stdout.flush()
                elif kind == "canvas":
                    if live:
                        sys.stdout.write("\r\033[2K")
                    sys.stdout.write(event.canvas.text_delta)
                    sys.stdout.flush()
                elif kind == "final":
                    _print_final(event.final, time.perf_counter() - t0)
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _print_final(final, seconds: float) -> None:
    from protos.blockserve.v1 import blockserve_pb2 as pb

    s = final.stats
    print()
    for slot in final.slots:
        print(f"  slot {slot.name}: {slot.text!r}")
    print(
        f"-- {final.usage.completion_tokens} tokens in {seconds:.2f}s "
        f"({final.usage.completion_tokens / max(seconds, 1e-9):.1f} tokens/s), {s.canvases} canvases, "
        f"steps per canvas {list(s.steps_per_canvas)}, {s.tokens_per_forward:.2f} tokens/forward, "
        f"finish {pb.FinishReason.Name(final.finish_reason).removeprefix('FINISH_REASON_').lower()}",
        file=sys.stderr,
    )


def parse_bytes(text: str) -> float:
    """'80GB' / '141G' / '24GiB' / '8e10' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-mem={text!r}: write a size such as 80GB or 141GiB")
    base = 1024 if m.group(3) else 1000
    return float(m.group(1)) * base ** "_KMGT".index((m.group(2) or "_").upper())


def _plan(args: argparse.Namespace) -> int:
    from cluster.placement import Hardware, Workload, format_plan, plan
    from model.config import from_name

    cfg = from_name(args.preset_flag or args.preset)
    counts = cfg.parameter_counts()
    out = {k: f"{v / 1e9:.2f}B" for k, v in counts.items()}
    out["kv_bytes_per_token_bf16"] = cfg.kv_bytes_per_token(2)
    out["sliding_kv_bytes_per_sequence_bf16"] = cfg.sliding_kv_bytes(2)
    print(json.dumps(out, indent=2))
    if args.gpus:
        hw = Hardware(
            gpus=args.gpus,
            gpu_mem_bytes=parse_bytes(args.gpu_mem),
            hbm_bytes_per_s=args.hbm_tbps * 1e12,
            flops_per_s=args.tflops * 1e12,
            link_bytes_per_s=args.link_gbps * 1e9,
            hop_latency_s=args.hop_us * 1e-6,
        )
        work = Workload(
            rows=args.rows,
            weight_bytes=1.0 if args.weights == "fp8" else 2.0,
            kv_reserve_bytes=parse_bytes(args.kv_reserve),
        )
        print()
        print(format_plan(plan(cfg, hw, work)))
    return 0


def _status(args: argparse.Namespace) -> int:
    env.apply_loopback_env()
    from cluster.status import main_status

    return main_status(args.address, args.json)


def _render_serve_config(args: argparse.Namespace) -> int:
    import yaml

    from cluster.config import ClusterConfig
    from cluster.serve_config import deploy_schema, render_serve_config

    document = render_serve_config(ClusterConfig.load(args.config))
    deploy_schema(document)  # what Serve would reject fails here, not on the cluster
    print(yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def _helm_schema(args: argparse.Namespace) -> int:
    from cluster.helm_schema import values_schema_text

    text = values_schema_text()
    if args.output == "-":
        print(text, end="")
    else:
        Path(args.output).write_text(text)
        print(f"blockserve: wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blockserve", description="Serve block-diffusion MoE models on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start a local Ray cluster and serve gRPC on server.host (127.0.0.1)")
    s.add_argument("--config", help="ClusterConfig YAML file")
    s.add_argument("--model", help="checkpoint directory (overrides model.path)")
    s.add_argument("--port", type=int, help="gRPC port (overrides server.grpc_port)")
    s.set_defaults(fn=_serve)
    g = sub.add_parser("generate", help="stream a generation from a running server")
    g.add_argument("prompt")
    g.add_argument("--address", default=f"127.0.0.1:{env.BLOCKSERVE_GRPC_PORT}")
    g.add_argument("--max-new-tokens", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-denoising-steps", type=int)
    g.add_argument("--entropy-bound", type=float)
    g.add_argument("--t-min", type=float)
    g.add_argument("--t-max", type=float)
    g.add_argument("--no-drafts", action="store_true", help="do not stream draft canvases")
    g.add_argument(
        "--template",
        help="text with {{name:max_tokens}} or {{name:max_tokens:min_tokens}} slots, e.g. 'def {{fn:12}}():'",
    )
    g.add_argument(
        "--slot-min-tokens",
        type=int,
        help="fewest tokens every template slot must hold (server default: 1; 0 = may be empty)",
    )
    g.add_argument("--json-schema", help="file holding a JSON Schema the output must satisfy")
    g.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"API key sent as `authorization: Bearer` (default: ${API_KEY_ENV}); needed when the server has keys",
    )
    g.add_argument("--tls-ca", help="PEM CA certificate of a TLS server (server.tls): connect with TLS")
    g.add_argument(
        "--tls-cert", help="PEM client certificate, for a server that requires one (client_ca_file)"
    )
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-server-name",
        help="host name to expect in the server's certificate (default: --address's host)",
    )
    g.set_defaults(fn=_generate)
    st = sub.add_parser("status", help="applications, replicas and autoscaling of a running cluster")
    st.add_argument("--address", default="auto", help="Ray cluster address (default: the local one)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(fn=_status)
    p = sub.add_parser(
        "plan", help="parameter and KV-cache sizes of a preset; with --gpus, expert placement and step time"
    )
    p.add_argument("preset", nargs="?", default="diffusiongemma-26b-a4b")
    p.add_argument("--preset", dest="preset_flag", help="model preset (same as the positional argument)")
    p.add_argument("--gpus", type=int, help="GPUs to place the Engine and the expert shards on")
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB, 141GB")
    p.add_argument("--rows", type=int, default=1, help="canvases denoised together per step")
    p.add_argument("--weights", choices=["bf16", "fp8"], default="bf16", help="weight format")
    p.add_argument(
        "--kv-reserve", default="16GB", help="memory kept for KV cache and activations on the Engine GPU"
    )
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="GPU memory bandwidth, TB/s (H100 SXM: 3.35)")
    p.add_argument("--tflops", type=float, default=989.0, help="dense bf16 TFLOP/s (H100 SXM: 989)")
    p.add_argument("--link-gbps", type=float, default=450.0, help="GPU-to-GPU bandwidth one way, GB/s")
    p.add_argument(
        "--hop-us", type=float, default=20.0, help="latency of one GPU-to-GPU message, microseconds"
    )
    p.set_defaults(fn=_plan)
    r = sub.add_parser(
        "render-serve-config",
        help="print the Serve config document (RayService serveConfigV2, `serve run` input) of a config",
    )
    r.add_argument("--config", help="ClusterConfig YAML file (default: every default)")
    r.set_defaults(fn=_render_serve_config)
    h = sub.add_parser(
        "helm-schema", help="write the Helm chart's values.schema.json, generated from ClusterConfig"
    )
    h.add_argument(
        "--output", default="helm/blockserve/values.schema.json", help="file to write, or - for stdout"
    )
    h.set_defaults(fn=_helm_schema)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"blockserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
