"""Deadlines and leases of the engine's requests: the rule that no row outlives its client.

Every engine request carries a deadline (the client's, else the server's maximum) and a lease that the Router
renews while its client is connected. A request whose deadline passed or whose lease lapsed is expired, whatever
Ray Serve delivered or dropped on the way (a lost cancellation, a dead Router replica). The table is pure
bookkeeping: the Engine's scheduler thread owns it, feeds it the monotonic clock, and cancels what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Lease:
    deadline: float  # monotonic seconds; math.inf = none
    expires: float  # monotonic seconds; renewed by the Router
    lease_s: float


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    def add(self, request_id: str, now: float, timeout_s: float | None, lease_s: float | None) -> None:
        """`timeout_s` / `lease_s` of None or <= 0 mean none (a caller without a Router, e.g. a benchmark)."""
        deadline = now + timeout_s if timeout_s and timeout_s > 0 else math.inf
        lease = lease_s if lease_s and lease_s > 0 else math.inf
        self._leases[request_id] = Lease(deadline, now + lease, lease)

    def renew(self, request_ids, now: float) -> None:
        for rid in request_ids:
            lease = self._leases.get(rid)
            if lease is not None:
                lease.expires = now + lease.lease_s

    def remove(self, request_id: str) -> None:
        self._leases.pop(request_id, None)

    def expired(self, now: float) -> list[tuple[str, str]]:
        """Pop and return (request_id, why) for every request past its deadline or lease."""
        out = []
        for rid, lease in list(self._leases.items()):
            if now >= lease.deadline:
                out.append((rid, "its deadline passed"))
            elif now >= lease.expires:
                out.append((rid, "its lease lapsed (the Router stopped renewing it: client or Router gone)"))
        for rid, _ in out:
            del self._leases[rid]
        return out


# The client's gRPC deadline, as seconds remaining when Serve's proxy received the call. Serve 2.60 does not pass
# deadlines on; cluster/serve_fixes.py adds this metadata in the proxy (replacing any value a client sent).
DEADLINE_METADATA = "blockserve-deadline-s"


def client_timeout_s(metadata, maximum: float) -> float:
    """Seconds the request may run: the client's remaining deadline if it sent one, capped at `maximum`."""
    for key, value in metadata or ():
        if key == DEADLINE_METADATA:
            try:
                remaining = float(value)
            except ValueError:
                return maximum
            if math.isfinite(remaining):
                return max(0.0, min(maximum, remaining))
    return maximum
