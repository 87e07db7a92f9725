"""The decoder forward replayed as one CUDA graph while a batch's composition holds.

At a few rows a denoising step of the published shape issues ~8,000 kernels; measured on an H200 the host then
spends ~120 ms issuing them against ~45 ms of GPU work (bench/gpu_step.py), so the step is bound by Python and
launch overhead, not by the GPU. A CUDA graph records those launches once and replays them with one call.

A captured graph fixes every tensor address and shape it touched, so it is valid only for the exact inputs
it was captured with apart from the values of two static buffers (the canvas [R, L] and the self-conditioning
input [R, L, D], copied in before each replay). Everything else the forward reads is fixed by the batch's
`PrefixBatch` (page tables, lengths, masks and RoPE tables it caches) and the KV pool's storage, which stays
put while the engine runs (the pool is sized once on CUDA). So the graph is keyed by the prefix object (the
runner makes a new one whenever the batch's rows or a cache change), the row count and the pool's storage
address; any change drops it.

Policy: a composition is run eagerly the first time it is seen (that also fills the prefix's caches, so the
capture issues no host-to-device copy), captured on its second step and replayed from then on. A canvas takes
~27 steps, so a steady batch replays almost every step; a batch that changes every step (rows joining and
finishing under load) stays eager and pays one extra capture each time the same composition holds for two
steps. Steps without self-conditioning input (a canvas's first) always run eagerly. Only one graph is kept:
its memory pool goes back to the allocator when the composition changes.

The graph is only used where nothing in the forward leaves the device: the model's own experts (the
disaggregated mode's remote expert calls cannot be captured), on CUDA. The replay runs the same kernels on the
same addresses as an eager forward, so its outputs are the eager ones bit for bit (gpu_step.py checks tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def cuda_capture(forward: Forward, canvas: torch.Tensor, prefix, soft: torch.Tensor):
    """Record `forward(canvas, prefix, soft)` into a CUDA graph: (replay function, static output).

    Captured on a side stream with the graph API itself rather than the `torch.cuda.graph` context manager,
    which collects garbage and empties the allocator's cache before every capture: under load a batch changes
    often, and each capture would then give every cached block back to the driver."""
    device = canvas.device
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    stream = _CAPTURE_STREAMS[device]
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        # thread_local: a metrics thread reading a device tensor meanwhile neither fails nor spoils the capture
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            out = forward(canvas, prefix, soft)
        finally:
            graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay, out


class DecoderGraphs:
    """Eager forward, capture, or replay of `forward(canvas, prefix, soft)` (see the module docstring).

    `capture(forward, canvas, prefix, soft) -> (replay, output)` records the forward over static input
    buffers; the CUDA recorder by default (tests pass another, since a CPU has no graphs)."""

    def __init__(self, forward: Forward, storage: Callable[[], object], capture=cuda_capture):
        self.forward = forward
        self.storage = storage  # the KV pool's storage identity (a graph reads it by address)
        self.capture = capture
        self._prefix = None  # the composition of the current graph (or of the step before)
        self._key: tuple | None = None
        self._steps = 0  # steps of this composition so far
        self._replay = None
        self._canvas = self._soft = self._out = None
        self.captures = 0
        self.replays = 0
        self.disabled = False  # set when a capture failed

    def __call__(self, canvas: torch.Tensor, prefix, soft: torch.Tensor | None) -> torch.Tensor:
        if (
            soft is None or self.disabled
        ):  # a canvas's first step: no self-conditioning input (a different graph, run once)
            return self.forward(canvas, prefix, soft)
        key = (canvas.shape, canvas.dtype, soft.shape, soft.dtype, self.storage())
        if prefix is not self._prefix or key != self._key:
            self.drop()
            self._prefix, self._key = prefix, key
        self._steps += 1
        if self._replay is None:
            if self._steps < 2:
                return self.forward(canvas, prefix, soft)
            self._canvas, self._soft = canvas.clone(), soft.clone()
            try:
                self._replay, self._out = self.capture(self.forward, self._canvas, prefix, self._soft)
            except Exception:  # a forward that cannot be captured runs eagerly from now on; requests go on
                log.exception("capturing the decoder forward failed; running it eagerly from now on")
                self.disabled = True
                self.drop()
                return self.forward(canvas, prefix, soft)
            self.captures += 1
        self._canvas.copy_(canvas)
        self._soft.copy_(soft)
        self._replay()
        self.replays += 1
        return self._out

    def drop(self) -> None:
        """Forget the graph (its memory pool is freed with it)."""
        self._prefix = self._key = self._replay = None
        self._canvas = self._soft = self._out = None
        self._steps = 0
