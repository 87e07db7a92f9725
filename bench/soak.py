"""Soak: N streams at saturation for T minutes against a real local server; nothing may leak or stall.

    .venv/bin/python bench/soak.py [--minutes 10] [--streams 16] [--max-new-tokens 64] [--cancel-every 4]
        [--sample-s 10] [--lease-s 3] [--png bench/soak.png]

Starts a Ray cluster bound to loopback and the app (cluster/app.py) with a short engine lease, then runs
`--streams` closed-loop gRPC clients on 127.0.0.1 for `--minutes` (default 10): each sends `GenerateStream`
requests one after another; every `--cancel-every`-th request is cancelled after a random number of events
(the case that used to leak engine rows). Every `--sample-s` seconds it records the p50 / p99 latency of the
requests finished in that window, the resident memory (RSS) of the Engine and Router replica processes and the
Engine's active rows. At the end, after one lease period with no clients, it prints:

  requests lost   requests that ended with neither a final event nor a status the client expects
                  (CANCELLED by the client itself, RESOURCE_EXHAUSTED under overload); must be 0
  rows leaked     Engine active rows + queued requests + leases left; must be 0
  RSS growth      last sample / first sample, per process (flat = ~1.0)

and writes the time series as a PNG (latency, RSS, rows). The machine is shared: absolute latencies are noisy,
the trend within one run is what matters.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cluster import serving  # noqa: E402

EXPECTED = {"CANCELLED", "RESOURCE_EXHAUSTED"}


def replica_pids(raylet: int) -> dict[str, int]:
    """pid of the Engine and Router replica processes of our cluster (descendants of our raylet)."""
    parents, titles = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            titles[pid] = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    tree = {raylet}
    for _ in range(6):
        tree |= {p for p, pp in parents.items() if pp in tree}
    out = {}
    for pid in tree:
        for name in ("Engine", "Router"):
            if titles.get(pid, "").startswith(f"ray::ServeReplica:blockserve:{name}"):
                out[name] = pid
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Load:
    def __init__(self, stub, args):
        self.stub, self.args = stub, args
        self.lock = threading.Lock()
        self.finished: list[tuple[float, float]] = []  # (end time, latency s)
        self.counts = {"sent": 0, "final": 0, "cancelled_by_client": 0, "lost": 0}
        self.codes: dict[str, int] = {}
        self.stop = threading.Event()

    def request(self, seed: int):
        from protos.blockserve.v1 import blockserve_pb2 as pb

        req = pb.GenerateRequest(
            prompt="def soak(n):\n", max_new_tokens=self.args.max_new_tokens, seed=seed, stream_drafts=True
        )
        req.sampling.max_denoising_steps = self.args.steps
        return req

    def client(self, index: int) -> None:
        import grpc

        rng = random.Random(index)
        n = 0
        while not self.stop.is_set():
            n += 1
            cancel_at = rng.randrange(1, 6) if n % self.args.cancel_every == 0 else None
            t0 = time.monotonic()
            call = self.stub.GenerateStream(self.request(index * 100_000 + n), timeout=600)
            outcome = "lost"
            try:
                for i, event in enumerate(call):
                    if cancel_at is not None and i + 1 >= cancel_at:
                        call.cancel()
                        outcome = "cancelled_by_client"
                        break
                    if event.HasField("final"):
                        outcome = "final"
            except grpc.RpcError as e:
                code = e.code().name
                with self.lock:
                    self.codes[code] = self.codes.get(code, 0) + 1
                outcome = "cancelled_by_client" if code in EXPECTED else "lost"
            with self.lock:
                self.counts["sent"] += 1
                self.counts[outcome] += 1
                if outcome == "final":
                    self.finished.append((time.monotonic(), time.monotonic() - t0))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(t, [s["p50"] for s in samples], label="p50")
    ax[0].plot(t, [s["p99"] for s in samples], label="p99")
    ax[0].set_ylabel("stream latency, s")
    ax[0].legend()
    for name in ("Engine", "Router"):
        ax[1].plot(t, [s["rss"].get(name, float("nan")) for s in samples], label=name)
    ax[1].set_ylabel("RSS, MB")
    ax[1].legend()
    ax[2].plot(t, [s["rows"] for s in samples], label="active rows")
    ax[2].plot(t, [s["leases"] for s in samples], label="leases")
    ax[2].set_ylabel("engine")
    ax[2].set_xlabel("minutes")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="max_denoising_steps per canvas")
    p.add_argument("--cancel-every", type=int, default=4)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--lease-s", type=float, default=3.0)
    p.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    p.add_argument("--png", default=str(ROOT / "bench" / "soak.png"))
    args = p.parse_args()
    print(
        f"soak: {args.streams} streams for {args.minutes} min on 127.0.0.1, max_new_tokens {args.max_new_tokens}, "
        f"steps {args.steps}, every {args.cancel_every}th request cancelled at a random event, lease {args.lease_s}s"
    )
    engine = {"max_rows": 16, "max_queue": 64, "lease_s": args.lease_s}
    with serving({"engine": engine}, model=args.model) as server:
        _run(Load(server.stub(), args), server.engine(), server.raylet_pid(), args)


def _run(load: Load, engine, raylet: int, args) -> None:
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.streams)]
    start = time.monotonic()
    for t in threads:
        t.start()
    samples, last = [], start
    print(f"{'min':>5} {'done':>5} {'p50 s':>6} {'p99 s':>6} {'engine MB':>9} {'router MB':>9} {'rows':>4}")
    while time.monotonic() - start < args.minutes * 60:
        time.sleep(args.sample_s)
        now = time.monotonic()
        with load.lock:
            window = [lat for end, lat in load.finished if end > last]
        last = now
        stats = engine.stats.remote().result()
        pids = replica_pids(raylet)
        s = {
            "t": now - start,
            "p50": percentile(window, 0.5),
            "p99": percentile(window, 0.99),
            "rss": {name: rss_mb(pid) for name, pid in pids.items()},
            "rows": stats["active_rows"],
            "leases": stats["leases"],
        }
        samples.append(s)
        print(
            f"{s['t'] / 60:5.1f} {len(window):5d} {s['p50']:6.2f} {s['p99']:6.2f} "
            f"{s['rss'].get('Engine', float('nan')):9.0f} {s['rss'].get('Router', float('nan')):9.0f} {s['rows']:4.0f}",
            flush=True,
        )
    load.stop.set()
    for t in threads:
        t.join(timeout=600)
    time.sleep(args.lease_s * 2)  # one lease period (twice) with no clients
    stats = engine.stats.remote().result()
    leaked = stats["active_rows"] + stats["queued_requests"] + stats["leases"]
    c = load.counts
    print(
        f"\nrequests sent {c['sent']}, completed {c['final']}, cancelled by the client {c['cancelled_by_client']}, "
        f"lost {c['lost']}; status codes seen {load.codes or '{}'}"
    )
    print(
        f"rows leaked {leaked:.0f} (active {stats['active_rows']:.0f}, queued {stats['queued_requests']:.0f}, "
        f"leases {stats['leases']:.0f}); requests expired by the engine {stats['expired_requests']:.0f}"
    )
    for name in ("Engine", "Router"):
        first = next((s["rss"][name] for s in samples if name in s["rss"]), float("nan"))
        end = next((s["rss"][name] for s in reversed(samples) if name in s["rss"]), float("nan"))
        print(f"{name} RSS {first:.0f} MB -> {end:.0f} MB (x{end / first:.2f})")
    if samples:
        plot(samples, Path(args.png))
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
