"""Denoising steps replayed as CUDA graphs while a batch's composition holds.

At a few rows a denoising step of the published shape issues ~8,000 kernels; measured on an H200 the host then
spent ~120 ms issuing them against ~45 ms of GPU work (bench/gpu_step.py): the step was bound by Python and launch
overhead, not by the GPU. A CUDA graph records the launches once and replays them with one call.

Two kinds, both kept by the ModelRunner on CUDA:
- `StepGraphs`: the whole step of a batch without constrained rows — gathers from the row buffers, the decoder,
  the keyed sampler, acceptance, re-noising, the write-backs and the packed status. All of it reads and writes
  buffers that stay put (the runner's row buffers and slot index, the prefix's tables, the KV pool), so a replay
  is the step; only the status is read back afterwards.
- `DecoderGraphs`: the decoder forward alone, for batches with constrained rows (their sampling consults host
  tables and callbacks that a graph cannot hold); its two inputs (canvas [R, L], self-conditioning input
  [R, L, D]) are copied into static buffers before each replay.

A captured graph fixes every tensor address and shape it touched, so it is valid only while its batch holds:
graphs are keyed by the batch's `PrefixBatch` object (the runner makes a new one whenever the batch's rows or a
cache change), the rows and the KV pool's storage (sized once on CUDA; any growth voids the graph), and for a
step which rows stream drafts. Any change drops the graph.

Policy: a composition runs eagerly the first time it is seen (that also fills every lazily made cache, so the
capture copies nothing from the host), is captured on its second step and replayed from then on. A canvas takes
~27 steps, so a steady batch replays almost every step; a batch that changes every step (rows joining and
finishing under load) stays eager. Steps without self-conditioning input (when every row is at its first step)
run eagerly. The runner keeps one graph at a time. Each capture gets a memory pool of its own: a pool id of the
caching allocator is dead once every graph captured into it is gone (capturing into it again fails an internal
assert), and with one graph at a time there is nothing to share; a dropped graph's pool goes back to the
allocator's cache, which frees it when an allocation would otherwise run out of memory. A capture that runs out
of memory leaves that batch eager (the next batch tries again); one that fails otherwise (something in the step
left the device) is logged once and leaves the runner eager for good, both kinds (a broken capture may leave the
allocator recording, so no other capture is tried).

Graphs are used only where nothing in the step leaves the device: the model's own experts (the disaggregated
mode's remote expert calls cannot be captured) through one grouped kernel per projection (model/gemm.py's
batch-invariant kernel, or `torch._grouped_mm`; the per-expert fallback reads group sizes back to the host), on
CUDA. A replay runs the same kernels on the same addresses as the eager step, so its
tokens are the eager ones (gpu_step.py checks it on the GPU; tests/deployments/test_decoder_graphs.py checks the
policy and the runner's wiring on CPU with a stand-in recorder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def cuda_capture(body: Callable[[], object], device: torch.device | None = None):
    """Record `body()` (device work only) into a CUDA graph on `device` (the model's; default: the current
    one): (replay function, the body's static output). The graph gets a private memory pool.

    Captured on a side stream of `device` with the graph API itself rather than the `torch.cuda.graph` context
    manager, which collects garbage and empties the allocator's cache before every capture: under load a batch
    changes often, and each capture would then give every cached block back to the driver. The capture runs
    with `device` current: a body whose kernels went to another device's stream would record an empty graph
    (a warning, not an error) and every replay would then do nothing."""
    device = torch.device(device if device is not None else "cuda")
    if device.index is None:  # "cuda": the current device
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        if device not in _CAPTURE_STREAMS:
            _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
        stream = _CAPTURE_STREAMS[device]
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # thread_local: a metrics thread reading a device tensor meanwhile neither fails nor spoils it
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = body()
            except BaseException:
                try:  # end the broken capture; the body's error is the one to report (out of memory, say)
                    graph.capture_end()
                except Exception:
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay, out


class GraphState:
    """What the graph kinds of one runner share: whether a failed capture has turned graphs off for good."""

    def __init__(self):
        self.disabled = False


class _Graphs:
    """The policy both kinds share: eager on a batch's first step, captured on its second, replayed after; any
    change of `prefix` (by identity) or `key` drops the graph; a capture that runs out of memory leaves that
    batch eager, one that fails otherwise leaves this object eager for good (logged once)."""

    what = "the graph"  # named in the log

    def __init__(self, capture=cuda_capture, state: GraphState | None = None):
        self.capture = capture
        self.state = state if state is not None else GraphState()  # shared by a runner's kinds
        self._prefix = None  # the composition of the current graph (or of the step before)
        self._key: tuple | None = None
        self._steps = 0  # steps of this composition so far
        self._replay = self._out = self._body = None
        self.captures = 0
        self.replays = 0

    @property
    def disabled(self) -> bool:
        """A capture of this kind, or of another kind sharing its state, failed: eager from now on."""
        return self.state.disabled

    def _run(self, key: tuple, prefix, eager, body, prepare=None, refill=None):
        """`eager()` runs the work as it is; `body()` is what gets captured; `prepare()` (if any) makes the
        buffers the graph will read, just before the capture; `refill()` (if any) copies this step's inputs into
        them before each replay."""
        if self.disabled:
            return eager()
        if prefix is not self._prefix or key != self._key:
            self.drop()
            self._prefix, self._key = prefix, key
        self._steps += 1
        if self._replay is None:
            if self._steps < 2:  # eager once: fills every lazily made cache, so the capture copies nothing in
                return eager()
            if prepare is not None:
                prepare()
            try:
                self._replay, self._out = self.capture(body)
            except torch.cuda.OutOfMemoryError:  # no room for a graph now: eager, and try at the next batch
                log.warning("no memory to capture %s; running it eagerly for this batch", self.what)
                self.drop()
                self._prefix, self._key, self._steps = prefix, key, -(1 << 30)  # not again for this batch
                return eager()
            except Exception:  # work that cannot be captured runs eagerly from now on; requests go on
                log.exception("capturing %s failed; running every step eagerly from now on", self.what)
                self.state.disabled = True
                self.drop()
                return eager()
            self._body = body  # keeps what the graph reads by address (index tensors it closes over) alive
            self.captures += 1
        if refill is not None:
            refill()
        self._replay()
        self.replays += 1
        return self._out

    def drop(self) -> None:
        """Forget the graph (its memory pool is freed with it)."""
        self._prefix = self._key = self._replay = self._out = self._body = None
        self._steps = 0


class StepGraphs(_Graphs):
    """Eager run, capture, or replay of a whole denoising step's device work (see the module docstring).

    `body()` reads everything from buffers whose addresses stay put while the batch holds (the runner's row
    buffers, its slot index, the prefix's tables, the KV pool) and returns its outputs; `key` names all the
    host-side choices the body makes (rows, which rows stream drafts, the pool's storage) and `prefix` the
    batch's PrefixBatch. `capture(body) -> (replay, output)`: the CUDA recorder by default."""

    what = "the denoising step"

    def __call__(self, key: tuple, prefix, body: Callable[[], object]):
        return self._run(key, prefix, body, body)


class DecoderGraphs(_Graphs):
    """Eager forward, capture, or replay of `forward(canvas, prefix, soft)` (see the module docstring).

    `capture(body) -> (replay, output)` records `body()`, here the forward over static input buffers; the CUDA
    recorder by default (tests pass another, since a CPU has no graphs)."""

    what = "the decoder forward"

    def __init__(
        self,
        forward: Forward,
        storage: Callable[[], object],
        capture=cuda_capture,
        state: GraphState | None = None,
    ):
        super().__init__(capture, state)
        self.forward = forward
        self.storage = storage  # the KV pool's storage identity (a graph reads it by address)
        self._canvas = self._soft = None  # the static input buffers of the current graph

    def __call__(self, canvas: torch.Tensor, prefix, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is None:  # a canvas's first step: no self-conditioning input (a different graph, run once)
            return self.forward(canvas, prefix, soft)

        def prepare():  # the graph's static inputs
            self._canvas, self._soft = canvas.clone(), soft.clone()

        def refill():
            self._canvas.copy_(canvas)
            self._soft.copy_(soft)

        key = (canvas.shape, canvas.dtype, soft.shape, soft.dtype, self.storage())
        eager = lambda: self.forward(canvas, prefix, soft)  # noqa: E731
        body = lambda: self.forward(self._canvas, prefix, self._soft)  # noqa: E731
        return self._run(key, prefix, eager, body, prepare, refill)

    def drop(self) -> None:
        super().drop()
        self._canvas = self._soft = None
