"""The entropy-bound block-diffusion sampler, as functions over per-row state.

Shape legend: R rows, L canvas, C vocabulary chunk, V vocab, D hidden.

One denoising step of a row (transformers' `DiffusionGemmaGenerationMixin._denoising_step`, after Block
Diffusion / EB-sampler, arXiv 2505.24857):
  1. logits of every canvas position, soft-capped, divided by the row's temperature (linear t_max -> t_min);
  2. a sample and the argmax at every position, and each position's entropy;
  3. accept the lowest-entropy positions while (cumulative entropy - the largest accepted) <= entropy_bound;
     re-noise every other position with a uniformly random token;
  4. stop once the argmax canvas is unchanged for `stability_threshold` steps and the mean entropy is under
     `confidence_threshold`, or after `max_denoising_steps`; the argmax canvas is what gets committed;
  5. softmax(scaled logits) @ embeddings feeds the next step as self-conditioning.

Rows are independent: each carries its own seed, step, temperature and stopping state, so a batch may hold rows
at different steps and a row's tokens do not depend on its batch-mates.

Two ways to draw the random numbers:
- `fast` (serving): keyed noise (model/sampling/noise.py), a pure function of (seed, canvas index, step,
  position, vocabulary block) computed on the step's device for all rows at once: no generator state, no host
  round trip, the same numbers whatever the batch. Steps 1, 2 and 5 run through the vocabulary in fixed blocks
  of `VOCAB_CHUNK` tokens with an online softmax; the sample is hierarchical and exact — inside each block one
  token by inverse CDF of its exp(logit - running max) values (one keyed uniform per position and block), and
  among blocks one by Gumbel-max over the blocks' log-masses (one keyed Gumbel number per position and block),
  kept as a running best — so P(token) = P(block) * P(token | block) = softmax, at a cost of O(1) random
  numbers per position and block instead of one per vocabulary entry. A row's tokens depend on `VOCAB_CHUNK`
  (a constant of the sampler), never on its batch. A chunk holds every row of a group at once, and a group is
  as many rows as the device's element budget allows (`element_budget`): never [rows, L, V].
- `reference` (tests, batch of one): the exact calls, shapes and order of the transformers loop after
  `torch.manual_seed(seed)` — `torch.randint` for canvases, `torch.multinomial` over full [L, V] probabilities —
  so both produce the same tokens. It materialises the full logits, which is why it is not the serving path.

Two layers: `draw_keyed` and `advance_rows` are the batched cores, pure tensor functions of [R] / [R, L] row
tensors with no host sync — the engine's model runner (deployments/model_runner.py) calls them on its persistent
per-slot device buffers. `RowState` with `draw_fast` / `advance` / `step` wraps them for lists of row objects
(the plain loop, the reference path, tests); `advance` reads back one packed status tensor: one device-to-host
sync per step.

Constraints (infill / JSON): a row's canvas may pin positions (never re-noised; the only allowed token is the pin,
so its entropy is 0 and it is always accepted) and restrict others to an allowed-token class, applied before
sampling, argmax and entropy for all rows of a chunk at once. A batch without constraints skips all of it.
A canvas may also carry a joint constraint (`CanvasConstraint.joint`: a JSON Schema's automaton, or slot minimums):
then its argmax canvas is replaced by the best one that satisfies it and its sampled canvas by a draw inside it
(model/structured/decode.py); that is one narrow hook in `_draw_group` (`JointStep`: it sees each chunk's logits
and exp values, and may recompute a few positions' logits over one vocabulary block), skipped when no row has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model import gemm
from model.sampling import noise
from model.sampling.categorical import EXP_FLOOR, exp_at_floor, pick_from_cdf
from model.sampling.params import SamplingParams
from model.structured.decode import JointStep, RegularCanvas, SlotCanvas

VOCAB_CHUNK = 8192
# Most logits elements alive per chunk on CPU: [rows, L, C]. Each element has a handful of fp32 / int64
# temporaries (logits, noise words, exponentials), so 1 << 22 elements is ~200 MB at peak.
ELEMENT_BUDGET = 1 << 22
BYTES_PER_ELEMENT = 48  # peak bytes of temporaries per [rows, L, C] element (measured order of magnitude)
DEVICE_BUDGET_FRACTION = 0.1  # share of an accelerator's free memory the sampler's chunk may use
_DEVICE_BUDGETS: dict[str, int] = {}


def element_budget(device: torch.device) -> int:
    """Elements of a [rows, L, C] chunk the sampler may hold on `device`. On an accelerator, a share of its
    free memory when first asked (one query per device); on CPU, `ELEMENT_BUDGET`."""
    if device.type == "cpu":
        return ELEMENT_BUDGET
    key = str(device)
    if key not in _DEVICE_BUDGETS:
        free, _ = torch.cuda.mem_get_info(device)
        _DEVICE_BUDGETS[key] = max(ELEMENT_BUDGET, int(free * DEVICE_BUDGET_FRACTION) // BYTES_PER_ELEMENT)
    return _DEVICE_BUDGETS[key]


def as_int64(seed: int) -> int:
    """A request seed (any integer) as the int64 with the same low 64 bits: what keyed noise consumes."""
    u = seed & ((1 << 64) - 1)
    return u - (1 << 64) if u >= 1 << 63 else u


@dataclass
class CanvasConstraint:
    """Per-position constraints of one canvas."""

    pin_ids: torch.Tensor  # [L] long, -1 where free
    class_ids: torch.Tensor  # [L] long, 0 = any token
    class_masks: torch.Tensor | None = None  # [n_classes, V] bool; row 0 unused
    joint: RegularCanvas | SlotCanvas | None = None  # ties positions together (model/structured/decode.py)

    @property
    def pinned(self) -> torch.Tensor:
        return self.pin_ids >= 0

    def allowed(self, start: int, stop: int) -> torch.Tensor:
        """[L, C] bool: which tokens of vocab slice [start, stop) each position may take."""
        vocab = torch.arange(start, stop, device=self.pin_ids.device)
        if self.class_masks is not None:
            table = self.class_masks[:, start:stop].clone()
            table[0] = True
            allowed = table[self.class_ids]
        else:
            allowed = torch.ones(
                len(self.pin_ids), stop - start, dtype=torch.bool, device=self.pin_ids.device
            )
        return torch.where(self.pinned[:, None], vocab[None, :] == self.pin_ids[:, None], allowed)

    def to(self, device: torch.device | str) -> CanvasConstraint:
        """This constraint with its tables on `device` (once per canvas, not per step)."""
        masks = self.class_masks.to(device) if self.class_masks is not None else None
        return CanvasConstraint(self.pin_ids.to(device), self.class_ids.to(device), masks, self.joint)


@dataclass
class RowState:
    """One canvas of one request, being denoised."""

    params: SamplingParams
    seed: int | None  # None: draw from torch's global RNG (reference mode); else keyed noise of this seed
    canvas: torch.Tensor  # [L] current (noisy) canvas
    argmax: torch.Tensor  # [L] latest argmax canvas (what gets committed)
    canvas_index: int = 0  # which canvas of the request: a coordinate of its keyed noise
    soft: torch.Tensor | None = None  # [L, D] self-conditioning input for the next step
    steps: int = 0
    streak: int = 0  # consecutive latest steps whose argmax canvas was the same (the stability test)
    finished: bool = False
    constraint: CanvasConstraint | None = None
    accepted: int = 0  # positions accepted in the latest step

    @classmethod
    def start(
        cls,
        params: SamplingParams,
        vocab_size: int,
        canvas_length: int,
        seed: int | None,
        constraint: CanvasConstraint | None = None,
        *,
        canvas_index: int = 0,
        device: torch.device | str = "cpu",
    ) -> RowState:
        if seed is None:  # the reference draws [batch=1, L] from the global RNG
            canvas = torch.randint(low=0, high=vocab_size, size=(1, canvas_length))[0].to(device)
        else:
            seed = as_int64(seed)
            canvas = keyed_randint(
                [seed], [canvas_index], [0], noise.STREAM_CANVAS, canvas_length, vocab_size
            )
            canvas = canvas[0].to(device)
        if constraint is not None:
            constraint = constraint.to(device)
            canvas = torch.where(constraint.pinned, constraint.pin_ids, canvas)
        return cls(params, seed, canvas, canvas.clone(), canvas_index, constraint=constraint)


def keyed_randint(seeds, canvases, steps, stream: int, length: int, high: int, device=None) -> torch.Tensor:
    """[R, length] tokens in [0, high) from keyed noise; seeds / canvases / steps are R ints each."""
    t = lambda v: torch.as_tensor(v, dtype=torch.long, device=device)  # noqa: E731
    keys = noise.position_keys(noise.row_keys(t(seeds), t(canvases), t(steps), stream), length)
    return noise.randint(keys, high)


@dataclass
class StepDraws:
    """What one step produced for R rows."""

    sampled: torch.Tensor  # [R, L]
    argmax: torch.Tensor  # [R, L]
    entropy: torch.Tensor  # [R, L] entropy of the temperature-scaled distribution
    soft: torch.Tensor  # [R, L, D] soft embeddings for self-conditioning (already embed-scaled)


@dataclass
class ConstraintTables:
    """The constraints of R rows as device tensors, so a chunk masks every row at once."""

    pins: torch.Tensor  # [R, L] pinned token, -1 where free
    classes: torch.Tensor  # [R, L] row of `table` each position draws from (0: any token)
    table: torch.Tensor  # [1 + classes of all rows, V] bool, row 0 all True

    @classmethod
    def build(cls, rows: list[RowState], L: int, V: int, device: torch.device) -> ConstraintTables | None:
        if all(r.constraint is None for r in rows):
            return None
        pins, classes, tables, offset = [], [], [torch.ones(1, V, dtype=torch.bool, device=device)], 1
        for r in rows:
            c = r.constraint
            if c is None:
                pins.append(torch.full((L,), -1, dtype=torch.long, device=device))
                classes.append(torch.zeros(L, dtype=torch.long, device=device))
                continue
            pins.append(c.pin_ids.to(device))
            ids = c.class_ids.to(device)
            if c.class_masks is None:
                classes.append(torch.zeros_like(ids))
                continue
            classes.append(torch.where(ids > 0, ids - 1 + offset, 0))
            tables.append(c.class_masks[1:].to(device))
            offset += c.class_masks.shape[0] - 1
        return cls(torch.stack(pins), torch.stack(classes), torch.cat(tables))

    def rows(self, lo: int, hi: int) -> ConstraintTables:
        return ConstraintTables(self.pins[lo:hi], self.classes[lo:hi], self.table)

    def allowed(self, start: int, stop: int) -> torch.Tensor:
        """[R, L, C] bool (or [R, 1, C], broadcast, where no row pins a position and each row has one class):
        tokens of vocab slice [start, stop) each position may take."""
        one = self._uniform()
        if one is not None:  # a third of the [R, L, C] gather's time
            return self.table[one, start:stop][:, None, :]
        vocab = torch.arange(start, stop, device=self.pins.device)
        allowed = self.table[:, start:stop][self.classes]  # [R, L, C]
        pinned = self.pins >= 0
        return torch.where(pinned[..., None], vocab == self.pins[..., None], allowed)

    def mask_(self, logits: torch.Tensor, start: int, stop: int) -> None:
        """Set logits [R, L, C] of vocab slice [start, stop) to -inf where `allowed` says no. With one class per
        row and few excluded tokens (the usual case for a JSON Schema's classes), only the excluded columns are
        written: the same result as the full masked fill, for a small fraction of its time."""
        one = self._uniform()
        if one is not None:
            excluded = ~self.table[one, start:stop]  # [R, C]
            if int(excluded.sum()) * SPARSE_MASK_SHARE <= excluded.numel():
                for r in range(logits.shape[0]):
                    logits[r].index_fill_(-1, excluded[r].nonzero().flatten(), float("-inf"))
                return
        logits.masked_fill_(~self.allowed(start, stop), float("-inf"))

    def _uniform(self) -> torch.Tensor | None:
        """[R] the one class of each row when no row pins a position, else None; checked once per step, on CPU
        only (elsewhere the check would wait for the device)."""
        if not hasattr(self, "_one_class"):
            one = self.pins.device.type == "cpu" and bool((self.pins < 0).all())
            one = one and bool((self.classes == self.classes[:, :1]).all())
            self._one_class = self.classes[:, 0] if one else None
        return self._one_class

    def allowed_tokens(self, r: int, pos: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[P, K] bool: whether row r's positions `pos` [P] may take token ids `tokens` [K]."""
        pins = self.pins[r, pos, None]  # [P, 1]
        allowed = self.table[self.classes[r, pos, None], tokens[None, :]]  # [P, K]
        return torch.where(pins >= 0, tokens[None, :] == pins, allowed)


# `ConstraintTables.mask_` writes only the excluded columns when at most 1 / SPARSE_MASK_SHARE of a chunk's
# (row, token) pairs are excluded (a column write is a strided pass over L positions: cheap only when few)
SPARSE_MASK_SHARE = 8


def _row_tensor(rows: list[RowState], value, dtype, device) -> torch.Tensor:
    return torch.tensor([value(r) for r in rows], dtype=dtype, device=device)


def inverse_temperature(
    t_min: torch.Tensor, t_max: torch.Tensor, max_steps: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """[R] float32 1 / temperature for rows at `steps` (all [R]; t_min / t_max float64). The same float64
    operations, in the same order, as `SamplingParams.temperature`, so the device and the host agree bit for bit."""
    remaining = (max_steps - steps).double()
    return (1.0 / (t_min + (t_max - t_min) * (remaining / max_steps))).float()


def draw_fast(model, hidden: torch.Tensor, rows: list[RowState]) -> StepDraws:
    """Chunked online softmax + the keyed hierarchical sample over the vocabulary for all rows. hidden [R, L, D]."""
    device = hidden.device
    f64 = lambda value: _row_tensor(rows, value, torch.float64, device)  # noqa: E731
    i64 = lambda value: _row_tensor(rows, value, torch.long, device)  # noqa: E731
    steps = i64(lambda r: r.steps)
    inv_t = inverse_temperature(
        f64(lambda r: r.params.t_min),
        f64(lambda r: r.params.t_max),
        i64(lambda r: r.params.max_denoising_steps),
        steps,
    )
    L, V = hidden.shape[1], model.embed_tokens.weight.shape[0]
    tables = ConstraintTables.build(rows, L, V, device)
    return draw_keyed(
        model, hidden, inv_t, i64(lambda r: r.seed), i64(lambda r: r.canvas_index), steps, tables, rows
    )


# The keyed streams of one denoising step, in the order of `step_keys`: the sample's block choice and its
# inverse-CDF uniform, joint constraints' per-token noise, the re-noising of rejected positions.
STEP_STREAMS = (noise.STREAM_BLOCK, noise.STREAM_INVCDF, noise.STREAM_GUMBEL, noise.STREAM_RENOISE)
BLOCK_KEYS, INVCDF_KEYS, GUMBEL_KEYS, RENOISE_KEYS = range(4)


def step_keys(seeds: torch.Tensor, canvas_index: torch.Tensor, steps: torch.Tensor, L: int) -> torch.Tensor:
    """[R, 4, L] position keys of every stream one step of R rows uses (`STEP_STREAMS` order), made at once."""
    return noise.stream_position_keys(seeds, canvas_index, steps, STEP_STREAMS, L)


@dataclass
class KeyedDraws:
    """The keyed noise of one step of R rows (model/sampling/noise.py) per (position, vocabulary block), for the
    hierarchical sample."""

    block_gumbel: torch.Tensor  # [R, L, N] float64: Gumbel noise choosing among the N blocks
    block_uniform: torch.Tensor  # [R, L, N] float64: the inverse-CDF uniform inside each block

    @classmethod
    def make(cls, keys: torch.Tensor, blocks: int) -> KeyedDraws:
        """From `step_keys` [R, 4, L]: both streams' uniforms in one pass, the Gumbel transform on one."""
        u = noise.uniform64(noise.words(keys[:, BLOCK_KEYS : INVCDF_KEYS + 1], 0, blocks))  # [R, 2, L, N]
        return cls(noise.gumbel_of_uniform(u[:, 0]), u[:, 1])  # the first: gumbel64 of the same words

    def rows(self, lo: int, hi: int) -> KeyedDraws:
        return KeyedDraws(self.block_gumbel[lo:hi], self.block_uniform[lo:hi])


def draw_keyed(
    model,
    hidden: torch.Tensor,
    inv_t: torch.Tensor,
    seeds: torch.Tensor,
    canvas_index: torch.Tensor,
    steps: torch.Tensor,
    tables: ConstraintTables | None,
    constrained: list | None = None,
    keys: torch.Tensor | None = None,
) -> StepDraws:
    """The fast draw of R rows from device tensors: hidden [R, L, D]; inv_t [R] float32; seeds, canvas_index,
    steps [R] long (the coordinates of each row's keyed noise). `constrained`: R objects with a `.constraint`
    (for joint constraints), or None when no row carries one. `keys`: this step's `step_keys` when the caller
    made them already (made here when None). No host sync (unless a joint constraint runs)."""
    R, L, D = hidden.shape
    V = model.embed_tokens.weight.shape[0]
    chunk = VOCAB_CHUNK  # read once per step: every block of this step has the same size
    keys = step_keys(seeds, canvas_index, steps, L) if keys is None else keys
    keyed = KeyedDraws.make(keys, -(-V // chunk))
    # the position keys joint constraints derive their noise from (slot minimums: per-token Gumbel noise;
    # regular languages: per-atom numbers, model/structured/decode.py)
    joint_keys = keys[:, GUMBEL_KEYS] if constrained is not None else None
    # A fixed chunk size, whatever the batch: online-softmax rounding then depends on the row alone.
    group = max(1, element_budget(hidden.device) // (L * chunk))
    parts = [
        _draw_group(
            model,
            hidden[i : i + group],
            inv_t[i : i + group, None, None],
            keyed.rows(i, i + group),
            tables.rows(i, i + group) if tables is not None else None,
            JointStep.begin(constrained[i : i + group], L, joint_keys[i : i + group])
            if constrained is not None
            else None,
            chunk,
        )
        for i in range(0, R, group)
    ]
    if len(parts) == 1:
        return parts[0]
    return StepDraws(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("sampled", "argmax", "entropy", "soft"))
    )


def _scaled_logits(
    hidden: torch.Tensor, w: torch.Tensor, cap: float | None, inv_t: torch.Tensor
) -> torch.Tensor:
    """Soft-capped, temperature-scaled fp32 logits [..., C] of hidden [..., D] against vocab rows w [C, D]."""
    # in place where the values are the same: on CPU a fresh [R, L, C] temporary costs more than the arithmetic
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = gemm.linear(flat, w, torch.float32).view(*hidden.shape[:-1], w.shape[0])  # a fresh tensor
    if cap:
        logits.div_(cap).tanh_().mul_(cap)
    return logits.mul_(inv_t)


def block_pick(e: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per position of a vocabulary block by inverse CDF. e [R, L, C] unnormalised probabilities
    (0 where masked), u [R, L] float64 uniforms in (0, 1) -> (index in the block [R, L] long, the block's
    mass [R, L]: the last element of the float32 cumulative sum, widened to float64).

    P(index j) = e_j / sum(e), up to float32 rounding of the cumulative sum (the token intervals are resolved
    to ~1e-7 of the block's mass, as fine as 24-bit Gumbel noise resolves a token). A token with e = 0 owns an
    empty interval, so it is never picked; a target rounded up to the mass itself is clamped to the last token
    with mass (the first index where the sum reaches it)."""
    cdf = torch.cumsum(e, -1)  # [R, L, C]
    mass = cdf[..., -1:].contiguous()  # [R, L, 1] (a copy: a view would keep the [R, L, C] sums alive)
    # widened once: the target and the block's log-mass both use it (one kernel per block less)
    mass64 = mass.double()
    target = (u[..., None] * mass64).float()
    return pick_from_cdf(cdf, target, mass)[..., 0], mass64[..., 0]


def _exp_below_max(d: torch.Tensor) -> torch.Tensor:
    """exp(d) for d = scaled logits - running max [R, L, C] (d <= 0, -inf where masked). On CPU, d is clamped
    in place to EXP_FLOOR first (so exp stays on its fast path) and those elements are then set to exactly 0:
    a token more than 87 nats under the running max gets no mass (the full fp32 softmax gives it < 1e-38, or
    0 below ~1e-45), so masked tokens still have none. Other devices compute exp(d) as it is.

    The clamped elements are zeroed by a threshold on the result (exp(d) <= exp(EXP_FLOOR) exactly where d was
    clamped, see `exp_at_floor`): one cheap pass instead of a comparison and a masked fill (~20x its cost)."""
    if d.device.type != "cpu":
        return torch.exp(d)
    d.clamp_(min=EXP_FLOOR)
    return torch.nn.functional.threshold_(torch.exp(d), exp_at_floor(), 0.0)


def _merge_block(state, new_m, safe_m, e, centred, weighted, cval, cidx, score, pick):
    """The running state of `_draw_group` after one more vocabulary block (online softmax, running argmax and
    running Gumbel-max over blocks). s1 is kept centred on the running max so entropy = log s0 - s1/s0 does
    not cancel."""
    m, s0, s1, soft, best_val, best_idx, draw_val, draw_idx = state
    lower = m - safe_m  # <= 0: how far the running max rose
    alpha = torch.exp(lower)
    better = cval > best_val
    best_val, best_idx = torch.where(better, cval, best_val), torch.where(better, cidx, best_idx)
    better = score > draw_val
    draw_val, draw_idx = torch.where(better, score, draw_val), torch.where(better, pick, draw_idx)
    shift = torch.where(s0 > 0, lower * s0, 0.0)  # a Python 0: no zeros tensor to fill (a kernel) per block
    s1 = (s1 + shift) * alpha + centred
    s0 = s0 * alpha + e.sum(-1)
    soft = soft * alpha[..., None] + weighted
    return new_m, s0, s1, soft, best_val, best_idx, draw_val, draw_idx


def _draw_group(
    model,
    hidden: torch.Tensor,
    inv_t: torch.Tensor,
    keyed: KeyedDraws,
    tables: ConstraintTables | None,
    joint: JointStep | None,
    chunk: int,
) -> StepDraws:
    """One pass over the vocabulary in blocks of `chunk` tokens for a group of rows. The sample is
    hierarchical and exact: inside each block one token by inverse CDF, and among blocks one by Gumbel-max over
    their log-masses (log sum exp of the block's scaled logits) — P(token) = P(block) * P(token | block) =
    softmax. Both choices are made online (a running best block), so nothing of size [R, L, V] exists."""
    R, L, D = hidden.shape
    dev = hidden.device
    weight = model.embed_tokens.weight  # [V, D] (tied LM head)
    V = weight.shape[0]
    cap = model.config.final_logit_softcapping
    # Running state over the blocks seen: max m, normaliser s0, E[logit - max] (s1), E[embedding] (soft), the
    # argmax (best_val, best_idx) and the sample (draw_val, draw_idx); None before the first block, which sets
    # it directly: updating the empty state (m = -inf, sums 0, best -inf) would give the same numbers.
    state = None
    for b, start in enumerate(range(0, V, chunk)):
        stop = min(V, start + chunk)
        w = weight if stop - start == V else weight[start:stop]  # [C, D]
        logits = _scaled_logits(hidden, w, cap, inv_t)  # [R, L, C]
        if tables is not None:
            tables.mask_(logits, start, stop)
        # argmax (first maximum wins, as torch.argmax over the full vocabulary)
        cval, cidx = logits.max(-1)
        new_m = cval if state is None else torch.maximum(state[0], cval)
        safe_m = torch.nan_to_num(new_m, nan=math.nan, posinf=0.0, neginf=0.0)  # +-inf -> 0: one kernel
        # d = logits - max [R, L, C] (in place unless the joint hook has seen the logits)
        d = logits.sub_(safe_m[..., None]) if joint is None else logits - safe_m[..., None]
        e = _exp_below_max(d)
        if joint is not None:  # per-atom statistics reuse this chunk's exp values (relative to safe_m)
            joint.chunk(logits, start, e, safe_m)
        # the sample, block by block: log-mass = log(mass) + safe_m (-inf for a block without mass: it never
        # wins, ties keep the earlier block); a block's mass below float32's range relative to the running max
        # (under e^-87) rounds to 0, as it does in the full softmax
        pick, mass = block_pick(e, keyed.block_uniform[..., b])
        score = mass.log() + safe_m.double() + keyed.block_gumbel[..., b]  # mass: float64 already
        # e * d, with 0 (not NaN) where a position's token is masked (d = -inf, e = 0): clamping d to the
        # lowest finite float changes no other element, and a zero term adds nothing to the sum. Skipped when
        # d is finite: no constraint tables, or on CPU (`_exp_below_max` clamped it).
        finite = tables is None or dev.type == "cpu"
        centred = (d if finite else d.clamp_(min=torch.finfo(d.dtype).min)).mul_(e).sum(-1)
        # probabilities times embeddings in the weight dtype (as the reference's soft input), summed in fp32
        e_w = (e if e.dtype == w.dtype else e.to(w.dtype)).reshape(R * L, -1)
        weighted = gemm.matmul(e_w, w, torch.float32).view(R, L, D)
        if start:  # block-local token indices -> vocabulary ids
            cidx, pick = cidx + start, pick + start
        if state is None:
            state = (new_m, e.sum(-1), centred, weighted, cval, cidx, score, pick)
            continue
        state = _merge_block(state, new_m, safe_m, e, centred, weighted, cval, cidx, score, pick)
    _, s0, s1, soft, _, best_idx, _, draw_idx = state
    entropy = (torch.log(s0) - s1 / s0).clamp_min(0.0)
    if joint is not None:

        def logits_of(r: int, pos: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [P, K] as above
            out = _scaled_logits(hidden[r, pos], weight[tokens], cap, inv_t[r])
            if tables is not None:
                out.masked_fill_(~tables.allowed_tokens(r, pos, tokens), float("-inf"))
            return out

        best_idx, draw_idx = joint.finish(best_idx, draw_idx, logits_of)
    # the scale is a 0-dim host tensor: an operand as it is (moving it to the device would be a copy and a sync)
    soft = (soft / s0[..., None]).to(weight.dtype) * model.embed_scale()
    return StepDraws(draw_idx, best_idx, entropy, soft)


def draw_reference(model, hidden: torch.Tensor, rows: list[RowState]) -> StepDraws:
    """The transformers loop's exact calls, for one row drawing from the global RNG."""
    if len(rows) != 1 or rows[0].seed is not None or rows[0].constraint is not None:
        raise ValueError("reference draws take exactly one unconstrained row using the global RNG")
    row = rows[0]
    R, L, _ = hidden.shape
    processed = model.logits(hidden) / row.params.temperature(row.steps)  # [1, L, V]
    V = processed.shape[-1]
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, V), num_samples=1).squeeze(-1).view(R, L)
    argmax = torch.argmax(processed, dim=-1)
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    soft = model.soft_embeddings(torch.softmax(processed.to(model.dtype), dim=-1, dtype=torch.float32))
    return StepDraws(sampled, argmax, entropy, soft)


def accept_mask(entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Lowest-entropy positions while sum(entropy) - max(entropy) <= bound. entropy [..., L] (bound a float or
    a tensor broadcasting against [..., 1]) -> bool [..., L]."""
    sorted_e, order = torch.sort(entropy, dim=-1, descending=False)
    keep = torch.cumsum(sorted_e, dim=-1) - sorted_e <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _pins(rows: list[RowState], L: int, device) -> torch.Tensor | None:
    """[R, L] pinned tokens (-1 where free), or None when no row has a constraint."""
    if all(r.constraint is None for r in rows):
        return None
    free = torch.full((L,), -1, dtype=torch.long, device=device)
    return torch.stack([free if r.constraint is None else r.constraint.pin_ids.to(device) for r in rows])


def keyed_renoise(
    seeds: torch.Tensor,
    canvas_index: torch.Tensor,
    steps: torch.Tensor,
    L: int,
    vocab_size: int,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """[R, L] replacement tokens for rejected positions, keyed by each row's (seed, canvas, step) ([R] each).
    `keys`: this step's `step_keys`, when made already."""
    if keys is None:
        keys = noise.position_keys(noise.row_keys(seeds, canvas_index, steps, noise.STREAM_RENOISE), L)
    else:
        keys = keys[:, RENOISE_KEYS]
    return noise.randint(keys, vocab_size)


def _renoise(rows: list[RowState], R: int, L: int, vocab_size: int, device) -> torch.Tensor:
    """[R, L] replacement tokens for rejected positions."""
    if rows[0].seed is None:  # reference mode (one row): the global RNG, as the transformers loop
        return torch.randint(low=0, high=vocab_size, size=(1, L))[0][None].to(device)
    i64 = lambda value: _row_tensor(rows, value, torch.long, device)  # noqa: E731
    return keyed_renoise(
        i64(lambda r: r.seed), i64(lambda r: r.canvas_index), i64(lambda r: r.steps), L, vocab_size
    )


@dataclass
class RowUpdate:
    """What one step did to R rows (all device tensors; nothing read back yet)."""

    canvas: torch.Tensor  # [R, L] the next step's input canvas
    steps: torch.Tensor  # [R] long, steps done
    streak: torch.Tensor  # [R] long, latest steps with one argmax canvas
    finished: torch.Tensor  # [R] bool, the row stops (its argmax canvas is committed)
    accepted: torch.Tensor  # [R] long, positions accepted this step


@dataclass
class RowRules:
    """The stopping and acceptance settings of R rows ([R] device tensors)."""

    entropy_bound: torch.Tensor  # float32
    confidence_threshold: torch.Tensor  # float32
    stability_threshold: torch.Tensor  # long
    max_steps: torch.Tensor  # long


def advance_rows(
    draws: StepDraws,
    canvas: torch.Tensor,
    argmax: torch.Tensor,
    steps: torch.Tensor,
    streak: torch.Tensor,
    rules: RowRules,
    renoise: torch.Tensor,
    pins: torch.Tensor | None,
) -> RowUpdate:
    """Acceptance, re-noising and the stopping test of R rows, all tensor ops (no host sync). canvas / argmax
    [R, L]: the rows' current canvas and previous argmax canvas; steps / streak [R] long: before this step;
    renoise [R, L]: tokens for rejected positions; pins [R, L] (-1 where free) or None."""
    entropy = draws.entropy
    if pins is not None:
        entropy = torch.where(pins >= 0, torch.zeros_like(entropy), entropy)
    accepted = accept_mask(entropy, rules.entropy_bound[:, None])  # [R, L]
    canvas = torch.where(accepted, draws.sampled, canvas)
    canvas = torch.where(accepted, canvas, renoise)
    if pins is not None:
        canvas = torch.where(pins >= 0, pins, canvas)
    same = (draws.argmax == argmax).all(-1)  # [R]
    confident = entropy.mean(-1) < rules.confidence_threshold
    # streak counts the latest steps with one argmax canvas; the first step has no predecessor
    streak = torch.where((steps > 0) & same, streak + 1, torch.ones_like(streak))
    steps = steps + 1
    finished = ((streak > rules.stability_threshold) & confident) | (steps >= rules.max_steps)
    return RowUpdate(canvas, steps, streak, finished, accepted.sum(-1))


def advance(rows: list[RowState], draws: StepDraws, vocab_size: int) -> None:
    """Apply acceptance, re-noising and the stopping test to every row, in place; one host sync."""
    R, L = draws.entropy.shape
    device = draws.entropy.device
    f32 = lambda value: _row_tensor(rows, value, torch.float32, device)  # noqa: E731
    i64 = lambda value: _row_tensor(rows, value, torch.long, device)  # noqa: E731
    rules = RowRules(
        f32(lambda r: r.params.entropy_bound),
        f32(lambda r: r.params.confidence_threshold),
        i64(lambda r: r.params.stability_threshold),
        i64(lambda r: r.params.max_denoising_steps),
    )
    update = advance_rows(
        draws,
        torch.stack([r.canvas for r in rows]),
        torch.stack([r.argmax for r in rows]),
        i64(lambda r: r.steps),
        i64(lambda r: r.streak),
        rules,
        _renoise(rows, R, L, vocab_size, device),
        _pins(rows, L, device),
    )
    status = torch.stack([update.streak, update.finished.long(), update.accepted], dim=1).tolist()  # one sync
    for r, (row, (streak, finished, n_accepted)) in enumerate(zip(rows, status, strict=True)):
        row.canvas, row.argmax, row.soft = update.canvas[r], draws.argmax[r], draws.soft[r]
        row.steps += 1
        row.streak = streak
        row.accepted = n_accepted
        row.finished = bool(finished)


def step(model, hidden: torch.Tensor, rows: list[RowState], rng: str = "fast") -> None:
    """Sample and advance R rows from their decoder output hidden [R, L, D]."""
    draws = draw_reference(model, hidden, rows) if rng == "reference" else draw_fast(model, hidden, rows)
    advance(rows, draws, model.config.vocab_size)
