"""The device side of the engine: the model, every sequence's KV cache, and per-row device buffers.

Shape legend: S row slots (the scheduler's `max_rows`), R rows denoised this step, L canvas, D hidden, V vocab.

`ModelRunner.execute(plan)` runs one `StepPlan` (deployments/scheduler.py): release and create caches, one
batched encoder call, start new canvases, one batched decoder forward, the fast sampler step
(model/sampling/sampler.py `draw_keyed` + `advance_rows`). Everything a row carries between steps lives in
buffers allocated once and indexed by row slot — canvas and argmax canvas [S, L], self-conditioning input
[S, L, D], step / streak / seed / canvas index [S], the row's temperature range, entropy bound and stopping
thresholds [S], constraint pins and classes [S, L] — so a step gathers R rows with one index, writes them back
with one index, and builds no per-row tensor. Host work per step is O(layers), not O(rows x ops).

The device's GEMM kernels (model/gemm.py: on CUDA in bf16, the batch-invariant kernel by default) are chosen
when the runner is made, before any step or graph capture.

On CUDA the decoder forward of a batch that holds (or, with `step_graphs`, the whole step:
`_device_step`, which makes no host read and builds no tensor from host data) is replayed as a CUDA graph
(deployments/decoder_graphs.py).

One device-to-host read per step: a packed [R, 2 + drafts x L] status (finished, accepted, and the argmax
canvases of rows that stream drafts); the argmax canvases of rows that finished are read only when one did.
`syncs` counts these reads.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from deployments.decoder_graphs import DecoderGraphs, GraphState, StepGraphs, cuda_capture
from deployments.scheduler import Admit, StartCanvas, StepPlan, StepResult
from model import gemm
from model.kv_cache import PrefixBatch
from model.moe import syncless
from model.sampling import noise
from model.sampling.sampler import (
    CanvasConstraint,
    ConstraintTables,
    RowRules,
    advance_rows,
    as_int64,
    draw_keyed,
    inverse_temperature,
    keyed_renoise,
    step_keys,
)
from model.transformer import DiffusionGemma, TokenBatch


class RowBuffers:
    """Per-slot device state of S rows (see the module docstring)."""

    def __init__(self, slots: int, L: int, D: int, dtype: torch.dtype, device: torch.device):
        long = dict(dtype=torch.long, device=device)
        self.canvas = torch.zeros(slots, L, **long)
        self.argmax = torch.zeros(slots, L, **long)
        self.soft = torch.zeros(slots, L, D, dtype=dtype, device=device)
        self.pins = torch.full((slots, L), -1, **long)  # -1 where free
        self.classes = torch.zeros(slots, L, **long)  # row of the shared class table (0: any token)
        # per-row scalars, packed by type so a canvas start writes them with two copies
        self.ints = torch.zeros(slots, 6, **long)  # seed, canvas index, steps, streak, stability, max steps
        self.floats = torch.zeros(
            slots, 4, dtype=torch.float64, device=device
        )  # t_min, t_max, bound, confidence

    SEED, CANVAS, STEPS, STREAK, STABILITY, MAX_STEPS = range(6)
    T_MIN, T_MAX, BOUND, CONFIDENCE = range(4)


class ModelRunner:
    def __init__(
        self, model: DiffusionGemma, max_rows: int, cuda_graphs: bool = True, step_graphs: bool = False
    ):
        """`cuda_graphs`: replay the decoder forward as a CUDA graph while a batch holds (deployments/
        decoder_graphs.py); only on CUDA, and only when the forward never leaves the device (the caller says).
        `step_graphs` (with `cuda_graphs`): replay the whole step of an unconstrained batch instead — not yet
        validated on a GPU, so off by default (bench/gpu_step.py --step-graphs checks and times it)."""
        self.model = model
        self.config = model.config
        self.device = model.device
        cfg = self.config
        self.rows = RowBuffers(max_rows, cfg.canvas_length, cfg.hidden_size, model.dtype, self.device)
        self.caches: dict[int, object] = {}  # slot -> its sequence's KV cache
        self._generation = [0] * max_rows  # bumped when a slot gets a new sequence (prefix cache key)
        self.constraints: list[CanvasConstraint | None] = [None] * max_rows
        self._table: torch.Tensor | None = None  # [1 + classes of all constrained slots, V] bool
        self._prefix_key: tuple | None = None
        self._prefix: PrefixBatch | None = None
        self._indexes: dict[str, tuple[tuple, torch.Tensor]] = {}  # `_device_index`: name -> (values, tensor)
        self.syncs = 0  # device-to-host reads
        # CUDA graphs (deployments/decoder_graphs.py): the whole step of an unconstrained batch, else the decoder
        self.graphs: DecoderGraphs | None = None
        self.step_graphs: StepGraphs | None = None
        # the device's GEMM kernels are chosen (and probed) now, before any step or capture (model/gemm.py)
        gemm.kernel_for(self.device, model.dtype)
        # a model whose experts fall back to one GEMM per expert reads their group sizes back to the host
        # (model/moe.py), which no graph can hold: such a model (fp32 on CUDA) runs eagerly
        if cuda_graphs and self.device.type == "cuda" and syncless(self.device, model.dtype):
            # captured on the model's device; one failed capture turns both kinds off (a shared state)
            capture, state = functools.partial(cuda_capture, device=self.device), GraphState()
            self.graphs = DecoderGraphs(model.denoise, storage=self._storage, capture=capture, state=state)
            self.step_graphs = StepGraphs(capture=capture, state=state) if step_graphs else None

    # -- sequences ---------------------------------------------------------------------------------------
    def _admit(self, admit: Admit) -> None:
        # the cache takes all its pages now, sized by what admission reserved: it never grows while it runs
        self.caches[admit.slot] = self.model.new_cache(capacity_tokens=admit.kv_tokens)
        self._generation[admit.slot] += 1

    def release(self, slot: int) -> None:
        cache = self.caches.pop(slot, None)
        if cache is not None:
            cache.release()  # its pages go back to the pool
        self._prefix_key = self._prefix = None  # the prefix's page tables name that sequence's pages
        for graphs in (self.graphs, self.step_graphs):
            if graphs is not None:
                graphs.drop()
        if self.constraints[slot] is not None:
            self.constraints[slot] = None
            self._rebuild_table()

    def reset(self) -> None:
        """Drop every sequence (after a failed step: caches may be half-written)."""
        for slot in list(self.caches):
            self.release(slot)
        self.constraints = [None] * len(self.constraints)
        self._table = None
        self._prefix_key = self._prefix = None

    def _storage(self) -> tuple:
        """The KV pool's identity and size: a graph reads the pool by address, so any growth voids it."""
        pool = self.model.kv_pool
        return id(pool), tuple(pool.pages.values())

    def graph_counts(self) -> dict[str, tuple[int, int]]:
        """CUDA graph kind -> (captures, replays) so far; empty where the runner keeps no graphs."""
        kinds = {"decoder": self.graphs, "step": self.step_graphs}
        return {kind: (g.captures, g.replays) for kind, g in kinds.items() if g is not None}

    def kv_bytes(self) -> int:
        """Bytes the live caches hold now (the prefix holds page tables only, no K/V copy)."""
        return sum(c.nbytes() for c in self.caches.values())

    # -- one step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, plan: StepPlan) -> StepResult:
        for slot in plan.release:
            self.release(slot)
        for admit in plan.admit:
            self._admit(admit)
        if plan.encode:
            self._encode(plan)
        if plan.start:
            self._start(plan.start)
        if not plan.denoise:
            return StepResult([], [])
        return self._denoise(plan)

    def _encode(self, plan: StepPlan) -> None:
        caches = [self.caches[e.slot] for e in plan.encode]
        batch = TokenBatch.from_lists(
            [e.tokens for e in plan.encode], [c.length for c in caches], self.config.pad_token_id, self.device
        )
        self.model.encode(batch, caches)

    def _start(self, starts: list[StartCanvas]) -> None:
        """Fresh canvases: uniform keyed noise (pins applied), zero self-conditioning, the row's settings."""
        rows, cfg = self.rows, self.config
        idx = torch.tensor([s.slot for s in starts], device=self.device)
        seeds = [as_int64(s.seed) for s in starts]
        ints = [
            [seed, s.canvas_index, 0, 0, s.params.stability_threshold, s.params.max_denoising_steps]
            for seed, s in zip(seeds, starts, strict=True)
        ]
        p = [s.params for s in starts]
        floats = [[q.t_min, q.t_max, q.entropy_bound, q.confidence_threshold] for q in p]
        rows.ints.index_copy_(0, idx, torch.tensor(ints, dtype=torch.long).to(self.device))
        rows.floats.index_copy_(0, idx, torch.tensor(floats, dtype=torch.float64).to(self.device))
        seeds_t, canvases_t = rows.ints[idx, rows.SEED], rows.ints[idx, rows.CANVAS]
        keys = noise.row_keys(seeds_t, canvases_t, torch.zeros_like(seeds_t), noise.STREAM_CANVAS)
        canvas = noise.randint(noise.position_keys(keys, cfg.canvas_length), cfg.vocab_size)  # [n, L]
        rows.soft.index_fill_(0, idx, 0)
        changed = False
        for i, s in enumerate(starts):
            c = s.constraint.to(self.device) if s.constraint is not None else None
            changed |= c is not None or self.constraints[s.slot] is not None
            self.constraints[s.slot] = c
            rows.pins[s.slot] = c.pin_ids if c is not None else -1
            if c is not None:
                canvas[i] = torch.where(c.pinned, c.pin_ids, canvas[i])
        rows.canvas.index_copy_(0, idx, canvas)
        rows.argmax.index_copy_(0, idx, canvas)
        if changed:
            self._rebuild_table()

    def _rebuild_table(self) -> None:
        """One class table for every constrained slot, each slot's classes offset into it (on change only)."""
        V, rows = self.config.vocab_size, self.rows
        tables, offset = [torch.ones(1, V, dtype=torch.bool, device=self.device)], 1
        for slot, c in enumerate(self.constraints):
            if c is None or c.class_masks is None:
                rows.classes[slot] = 0
                continue
            rows.classes[slot] = torch.where(c.class_ids > 0, c.class_ids - 1 + offset, 0)
            tables.append(c.class_masks[1:])
            offset += c.class_masks.shape[0] - 1
        self._table = torch.cat(tables)

    def _device_index(self, name: str, values: list[int]) -> torch.Tensor:
        """`values` as a long tensor on the device, made again only when they change (the batch changes rarely
        compared with steps; a graph reads the tensor by address, so it must not be remade while it holds)."""
        key = tuple(values)
        kept = self._indexes.get(name)
        if kept is None or kept[0] != key:
            kept = self._indexes[name] = (key, torch.tensor(values, dtype=torch.long, device=self.device))
        return kept[1]

    def _prefix_for(self, slots: list[int]) -> PrefixBatch:
        # a row's prefix is fixed while its canvas is denoised: rebuild only when the batch or a cache changes
        key = tuple((s, self._generation[s], self.caches[s].length) for s in slots)
        if key != self._prefix_key:
            self._prefix_key, self._prefix = key, PrefixBatch([self.caches[s] for s in slots])
        return self._prefix

    def _denoise(self, plan: StepPlan) -> StepResult:
        slots = plan.denoise
        prefix = self._prefix_for(slots)
        idx = self._device_index("slots", slots)
        drafts = None  # the draft rows' positions in the batch (a device index, made once per composition)
        if plan.drafts:
            position = {s: i for i, s in enumerate(slots)}
            drafts = self._device_index("drafts", [position[s] for s in plan.drafts])
        constrained = any(self.constraints[s] is not None for s in slots)
        whole = self.step_graphs is not None and not self.step_graphs.disabled
        if whole and plan.self_conditioning and not constrained:
            # the whole step as one graph; the decoder inside it runs as plain kernels (no graph in a graph)
            if self.graphs is not None:
                self.graphs.drop()
            key = (tuple(slots), tuple(plan.drafts), self._storage())
            body = lambda: self._device_step(plan, idx, prefix, drafts, self.model.denoise)  # noqa: E731
            status, argmax = self.step_graphs(key, prefix, body)
        else:
            if self.step_graphs is not None:
                self.step_graphs.drop()
            status, argmax = self._device_step(plan, idx, prefix, drafts, self.decode)
        return self._read_back(plan, status, argmax)

    def _device_step(self, plan: StepPlan, idx, prefix, drafts, decode) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoising step of the rows `idx`, device work only (no host read, no tensor made from host
        data): gathers from the row buffers, the decoder, the keyed sampler, acceptance and re-noising, the
        write-backs. Returns the packed status [R (finished) + R (accepted) + drafts x L (argmax canvases of
        the rows that stream drafts)] and the argmax canvases [R, L]."""
        rows, L, V = self.rows, self.config.canvas_length, self.config.vocab_size
        slots = plan.denoise
        canvas, argmax = rows.canvas[idx], rows.argmax[idx]  # [R, L]
        ints, floats = rows.ints[idx], rows.floats[idx]  # [R, 6], [R, 4]
        seeds, canvas_index, steps = ints[:, rows.SEED], ints[:, rows.CANVAS], ints[:, rows.STEPS]
        soft = rows.soft[idx] if plan.self_conditioning else None  # [R, L, D]; None: every row's first step
        hidden = decode(canvas, prefix, soft)
        inv_t = inverse_temperature(
            floats[:, rows.T_MIN], floats[:, rows.T_MAX], ints[:, rows.MAX_STEPS], steps
        )
        constrained = [self.constraints[s] for s in slots]
        tables = pins = joint = None
        if any(c is not None for c in constrained):
            pins = rows.pins[idx]
            tables = ConstraintTables(pins, rows.classes[idx], self._table)
            if any(c is not None and c.joint is not None for c in constrained):
                joint = [SimpleNamespace(constraint=c) for c in constrained]
        keys = step_keys(seeds, canvas_index, steps, L)  # every stream of this step's noise at once
        draws = draw_keyed(self.model, hidden, inv_t, seeds, canvas_index, steps, tables, joint, keys)
        rules = RowRules(
            floats[:, rows.BOUND].float(),
            floats[:, rows.CONFIDENCE].float(),
            ints[:, rows.STABILITY],
            ints[:, rows.MAX_STEPS],
        )
        renoise = keyed_renoise(seeds, canvas_index, steps, L, V, keys)
        update = advance_rows(draws, canvas, argmax, steps, ints[:, rows.STREAK], rules, renoise, pins)
        rows.canvas[idx] = update.canvas
        rows.argmax[idx] = draws.argmax
        rows.soft[idx] = draws.soft
        rows.ints[idx, rows.STEPS] = update.steps
        rows.ints[idx, rows.STREAK] = update.streak
        status = [update.finished.long(), update.accepted]  # [R] each
        if drafts is not None:
            status.append(draws.argmax.index_select(0, drafts).reshape(-1))  # [drafts x L]
        return torch.cat(status), draws.argmax

    def decode(self, canvas: torch.Tensor, prefix: PrefixBatch, soft: torch.Tensor | None) -> torch.Tensor:
        """The decoder forward: replayed from a CUDA graph where one is kept (DecoderGraphs), else eager."""
        if self.graphs is not None:
            return self.graphs(canvas, prefix, soft)
        return self.model.denoise(canvas, prefix, soft)

    def _read_back(self, plan: StepPlan, status: torch.Tensor, argmax: torch.Tensor) -> StepResult:
        """The step's one packed read (plus one for finished canvases, only when some finished)."""
        slots, R, L = plan.denoise, len(plan.denoise), self.config.canvas_length
        host = status.tolist()
        self.syncs += 1
        done, acc = [bool(f) for f in host[:R]], host[R : 2 * R]
        drafts = {s: host[2 * R + i * L : 2 * R + (i + 1) * L] for i, s in enumerate(plan.drafts)}
        ended = [i for i, f in enumerate(done) if f]
        committed = {slots[i]: drafts[slots[i]] for i in ended if slots[i] in drafts}  # read already
        missing = [i for i in ended if slots[i] not in drafts]
        if missing:
            canvases = argmax[missing].tolist()
            self.syncs += 1
            committed.update({slots[i]: c for i, c in zip(missing, canvases, strict=True)})
        return StepResult(done, acc, drafts, committed)
