"""Attention of rows with different key lengths in one batched pass: fixed-size key groups, online softmax.

Shape legend: B rows, G kv heads, Q query heads per kv head (H = G * Q), T query tokens, M = Q * T query rows of
one kv head, P keys per page (= tokens per KV page), K keys of one key group (a multiple of P), d head dim,
S keys of a dense source.

A row's keys come from one or more sources read in order — the cached prefix (pages of the KV pool, or a padded
dense tensor in training) and then the new tokens (a dense [B, G, T, d] tensor). Each source is cut into P-key
blocks (a pool page is one block) and the blocks into key groups of 1, 1, 2, 4, ... up to `GROUP_BLOCKS` blocks,
then `GROUP_BLOCKS`-block groups (`key_groups`); each group is one step of the online softmax. The pages of a
group are gathered with one index op, so a long context costs ~log2(GROUP_BLOCKS) + pages / GROUP_BLOCKS Python
iterations per layer, not one per page. A row with fewer keys than its batch-mates gets groups that are partly
or fully masked; the last group of a source is padded with masked keys to its full size.

Why this is batch-invariant bit for bit (a request's output must not depend on its batch-mates):
- every reduction has a shape fixed by the model, never by the batch: q·k over d, the softmax sum and the
  probabilities-times-values product over the K keys of one group, and a group's bounds depend only on its
  index (never on the batch's longest row); masked keys contribute exact zeros;
- a row's partial result is carried across groups in the online-softmax form (running max m, sum l, output
  acc). A group in which the row has no key leaves it unchanged *exactly*: its max is -inf, so m stays, the
  rescale factor is exp(0) = 1, and l + 0, acc + 0 are exact. So the only groups that change a row's numbers are
  its own, in the same order and with the same shapes whether it runs alone or beside 63 longer rows;
- batched GEMMs (`torch.bmm`) on CPU give each matrix the same bits whatever the batch count and row count,
  once there are at least two matrices and `MIN_GEMM_ROWS` rows (measured for every group size;
  tests/model/test_attention.py pins it). Below that CPU kernels switch algorithms, so query rows and the batch
  are padded up to those sizes.

The masks come from absolute positions: the encoder's causal sliding window (keys in (p - window, p]) and the
decoder's bidirectional view are both a comparison of key and query positions plus each key's validity; a
sliding layer's ring of pages holds positions out of order, which the masks and the softmax do not mind.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import gemm

# Tokens per KV page, and the unit of a key group's size (one home for both).
BLOCK_TOKENS = 64
# The largest key group, in pages: 32 x 64 = 2048 keys. Larger groups mean fewer Python iterations per layer
# on long contexts but larger per-row scores (`workspace_bytes`, which admission reserves).
GROUP_BLOCKS = 32


@dataclass
class KeyBlock:
    """One key group of every row."""

    keys: torch.Tensor  # [B, G, K, d]
    values: torch.Tensor  # [B, G, K, d]
    positions: torch.Tensor  # [B, K] absolute positions
    valid: torch.Tensor  # [B, K] bool
    # every key is valid in every row and precedes every query (a cached prefix): outside a sliding window the
    # mask would change nothing, so it is skipped (masked_fill over [B, H, T, K] is a large share of the cost)
    unmasked: bool = False
    # the batch rows these tensors hold (ids into the batch, on the device), when only some rows have keys in the
    # group; None: all B rows
    rows: torch.Tensor | None = None
    # (source tag, group index): names this group's mask in a forward pass's mask cache (the layers of a pass read
    # the same positions and validity); None: not cached
    mask_key: tuple | None = None


def key_groups(blocks: int) -> list[tuple[int, int]]:
    """The partition of a source's P-key blocks into the key groups the attention reads at once:
    [0, 1), [1, 2), [2, 4), [4, 8), ... (each group as long as everything before it) up to GROUP_BLOCKS, then
    GROUP_BLOCKS-wide groups, covering at least `blocks` blocks (the last group is padded with masked keys).

    A group's bounds depend only on its index, never on how many blocks the batch holds, so a row's keys fall
    into the same groups, of the same sizes, alone or beside longer rows (module docstring). A row reads at
    most about twice its own keys, in ~log2(GROUP_BLOCKS) + blocks / GROUP_BLOCKS iterations."""
    out, a = [], 0
    while a < blocks:
        size = min(max(a, 1), GROUP_BLOCKS)
        out.append((a, a + size))
        a += size
    return out


def largest_group_keys(tokens: int) -> int:
    """Keys of the largest key group a source of `tokens` keys is read in (at least one block): what one row of
    that many keys can make a single attention step hold at once."""
    return BLOCK_TOKENS * max((b - a for a, b in key_groups(-(-tokens // BLOCK_TOKENS))), default=1)


def padded_blocks(blocks: int) -> int:
    """Blocks covered by `key_groups(blocks)` (a source is padded to this many)."""
    groups = key_groups(blocks)
    return groups[-1][1] if groups else 0


class DenseKeys:
    """Keys held as one padded tensor (new tokens, or a training-time prefix), read in key groups.

    `unmasked`: every key is valid and every query may see every one of them (the decoder's canvas, whose
    attention is bidirectional): a group without padding then needs no mask. `tag`: names the source in a
    forward pass's mask cache (None: its masks are not cached)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        *,
        unmasked: bool = False,
        tag: str | None = None,
    ):
        self.keys, self.values = keys, values  # [B, G, S, d]
        self.positions, self.valid = positions, valid  # [B, S]
        self.unmasked, self.tag = unmasked, tag

    def blocks(self) -> Iterator[KeyBlock]:
        S = self.keys.shape[2]
        for i, (a, b) in enumerate(key_groups(-(-S // BLOCK_TOKENS))):
            a, b = a * BLOCK_TOKENS, b * BLOCK_TOKENS
            pad = max(0, b - S)
            if a == 0 and b == S:  # one group holds the whole source: no slicing (each op costs microseconds)
                k, v, pos, ok = self.keys, self.values, self.positions, self.valid
            else:
                k, v = self.keys[:, :, a:b], self.values[:, :, a:b]
                pos, ok = self.positions[:, a:b], self.valid[:, a:b]
            if pad:  # the last group is padded with masked zero keys: a group's shape never varies
                k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
                pos, ok = F.pad(pos, (0, pad), value=-1), F.pad(ok, (0, pad), value=False)
            mask_key = (self.tag, i) if self.tag is not None else None
            yield KeyBlock(k, v, pos, ok, self.unmasked and not pad, mask_key=mask_key)


@dataclass
class GroupRows:
    """Which rows of a paged batch have keys in one key group, and whether the group needs a mask."""

    rows: torch.Tensor | None  # ids of the rows with keys in the group (on the device); None: every row
    unmasked: bool  # every key of the group is valid in every one of those rows


def group_rows(lengths: list[int], device: torch.device | str) -> list[GroupRows]:
    """Per key group of a paged prefix whose rows hold `lengths` keys each (host ints, the cache lengths): the
    rows that have keys in it and whether it needs a mask. Built once per batch composition (PrefixBatch)."""
    pages = [-(-n // BLOCK_TOKENS) for n in lengths]
    out = []
    for a, b in key_groups(max(pages, default=0)):
        ids = [i for i, n in enumerate(pages) if n > a]
        unmasked = all(lengths[i] >= b * BLOCK_TOKENS for i in ids)
        rows = None if len(ids) == len(lengths) else torch.tensor(ids, dtype=torch.long, device=device)
        out.append(GroupRows(rows, unmasked))
    return out


class PagedKeys:
    """Keys of B rows in pages of a KV pool: block j of row b is page `table[b, j]`; the pages of one key group
    are gathered with one index op per group (K and V), for the rows that have keys in it."""

    def __init__(
        self,
        keys: torch.Tensor,  # pool [pages, G, P, d]
        values: torch.Tensor,  # pool [pages, G, P, d]
        table: torch.Tensor,  # [B, nb] page ids (masked entries point at any page)
        positions: torch.Tensor,  # [B, nb, P]
        valid: torch.Tensor,  # [B, nb, P] bool
        groups: list[GroupRows] | None = None,  # `group_rows` of the rows' lengths; None: all rows, masked
        tag: str | None = None,  # names the source in a forward pass's mask cache (None: not cached)
    ):
        pad = padded_blocks(table.shape[1]) - table.shape[1]
        if pad:  # PrefixBatch pads its tables already; masked entries read page 0
            table = F.pad(table, (0, pad))
            positions = F.pad(positions, (0, 0, 0, pad), value=-1)
            valid = F.pad(valid, (0, 0, 0, pad), value=False)
        self.keys, self.values, self.table = keys, values, table
        self.positions, self.valid = positions, valid
        self.groups, self.tag = groups, tag

    def blocks(self) -> Iterator[KeyBlock]:
        for i, (a, b) in enumerate(key_groups(self.table.shape[1])):
            which = self.groups[i] if self.groups is not None else GroupRows(None, False)
            r = which.rows
            # this group's slice first, then its rows: only the group's entries are copied
            pages, positions, valid = self.table[:, a:b], self.positions[:, a:b], self.valid[:, a:b]
            if r is not None:
                pages, positions, valid = pages[r], positions[r], valid[r]  # [B', n], [B', n, P]
            K = (b - a) * BLOCK_TOKENS
            pos, ok = positions.reshape(-1, K), valid.reshape(-1, K)
            mask_key = (self.tag, i) if self.tag is not None else None
            k, v = _gather(self.keys, pages), _gather(self.values, pages)
            yield KeyBlock(k, v, pos, ok, which.unmasked, r, mask_key)


def _gather(store: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Pool [pages, G, P, d] at page ids [B, n] -> [B, G, n * P, d] (one index op, one head-major copy; none
    when n = 1, where the head-major layout is the gathered one)."""
    B, n = pages.shape
    _, G, P, d = store.shape
    return (
        store.index_select(0, pages.reshape(-1)).view(B, n, G, P, d).transpose(1, 2).reshape(B, G, n * P, d)
    )


# Devices on which a low-precision model (bf16 / fp16) runs attention's two GEMMs in its own dtype (fp32
# accumulation inside the kernel, as the reference's eager attention in bf16 does), with the softmax and the
# running sums in fp32. On CUDA this puts them on the tensor cores: measured on an H200, fp32 score and value
# GEMMs and the upcasts feeding them were about half of a 64-row step of the published shape. CPU keeps fp32
# GEMMs (bf16 CPU kernels are slower, and the CPU path is the exactness reference).
MODEL_DTYPE_GEMM_DEVICES = ("cuda",)


def model_dtype_gemms(q: torch.Tensor) -> bool:
    """Inference only: the fp32-output GEMM has no backward pass (training keeps fp32 GEMMs)."""
    return (
        q.dtype in (torch.bfloat16, torch.float16)
        and q.device.type in MODEL_DTYPE_GEMM_DEVICES
        and not torch.is_grad_enabled()
    )


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32; no op at all when it already is (a no-op cast still costs a dispatch)."""
    return t if t.dtype == torch.float32 else t.float()


def _bmm(a: torch.Tensor, b: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """Batched GEMM whose per-matrix result does not depend on the batch count (see the module docstring).

    A single matrix on CPU becomes a batch of two: its rows cut in halves when each half keeps `min_rows` rows
    (a row's bits do not depend on its matrix's row count), else a stride-0 second copy (twice the work, no
    input copied)."""
    if a.shape[0] != 1 or a.device.type != "cpu":
        return torch.bmm(a, b)
    M = a.shape[1]
    if min_rows > 1 and M % 2 == 0 and M // 2 >= min_rows:
        return torch.bmm(a.view(2, M // 2, a.shape[2]), b.expand(2, *b.shape[1:])).view(1, M, b.shape[2])
    return torch.bmm(a.expand(2, *a.shape[1:]), b.expand(2, *b.shape[1:]))[:1]


_OUT_DTYPE_BMM: dict[tuple[str, torch.dtype], bool] = {}


def _out_dtype_bmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.bmm(..., out_dtype=float32)` runs for `dtype` operands on `device` (probed once, on tiny
    tensors, by the first eager forward: never inside a graph capture, never on the hot path)."""
    key = (str(device), dtype)
    if key not in _OUT_DTYPE_BMM:
        ok = device.type == "cuda"
        if ok:
            try:
                a = torch.ones(1, 2, 8, dtype=dtype, device=device)
                ok = bool(torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).eq(8).all())
            except torch.cuda.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_BMM[key] = ok
    return _OUT_DTYPE_BMM[key]


def _bmm_f32(a: torch.Tensor, b: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """Batched GEMM of low-precision operands with an fp32 result. Where torch has the fp32-output kernel
    (`out_dtype`, CUDA) the result is never rounded to the operands' dtype; elsewhere it is computed in their
    dtype and widened (what eager attention in bf16 does)."""
    if gemm.invariant(a):  # a GPU's batch-invariant kernel (model/gemm.py)
        return gemm.bmm(a, b, torch.float32)
    if _out_dtype_bmm(a.device, a.dtype):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return _bmm(a, b, min_rows).float()


def blocked_attention(
    q: torch.Tensor,
    sources: list,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    min_rows: int = 1,
    queries_valid: bool = False,
    masks: dict | None = None,
) -> torch.Tensor:
    """q [B, H, T, d] over the keys of `sources` (DenseKeys / PagedKeys, read in order) -> [B, H, T, d].

    Attention scale is 1 (q and k are RMS-normed). `min_rows` pads the GEMMs' query rows (CPU kernels round
    differently below a few rows). Queries that see no key (padding) get zeros. `queries_valid`: the caller
    knows every query is valid (skips the work that only padding queries need). `masks`: a forward pass's
    cache of key-group masks, shared by its layers (groups whose `mask_key` is set)."""
    B, H, T, d = q.shape
    G = sources[0].keys.shape[1]
    Q = H // G
    T_pad = max(T, -(-min_rows // Q))
    if T_pad > T:
        q = F.pad(q, (0, 0, 0, T_pad - T))
        q_pos = F.pad(q_pos, (0, T_pad - T), value=-1)
        q_valid = F.pad(q_valid, (0, T_pad - T), value=False)
        queries_valid = False
    M = Q * T_pad
    lowp = model_dtype_gemms(q)
    qg = q.reshape(B * G, M, d) if lowp else _f32(q.reshape(B * G, M, d))
    qp = q_pos[:, :, None]  # [B, T, 1]
    inplace = not torch.is_grad_enabled()  # training keeps every intermediate for the backward pass
    step = _GroupStep(G, Q, T_pad, d, causal, window, min_rows, inplace, masks if inplace else None, lowp)
    state = None  # (running max, softmax denominator, numerator @ values): [B*G, M], [B*G, M], [B*G, M, d]
    for blk in (blk for src in sources for blk in src.blocks()):
        if blk.rows is None:
            state = step(blk, qg, q_valid, qp, state)
            continue
        if state is None:  # the empty state: m = -inf, l = 0, acc = 0 (every row's first key is yet to come)
            state = (
                q.new_full((B * G, M), float("-inf"), dtype=torch.float),
                q.new_zeros(B * G, M, dtype=torch.float),
                q.new_zeros(B * G, M, d, dtype=torch.float),
            )
        # only the rows with keys in this group (for any other row it would be an exact no-op)
        r = blk.rows
        got = step(blk, _rows(qg, r, B), q_valid[r], qp[r], tuple(_rows(t, r, B) for t in state))
        state = tuple(_put(full, r, part, B, inplace) for full, part in zip(state, got, strict=True))
    _, l, acc = state  # noqa: E741
    if queries_valid:  # a valid query sees at least its own key or the canvas: l >= 1 (the max's term is 1)
        out = (acc / l[..., None]).view(B, H, T, d)  # T_pad = T here
        return out if q.dtype == torch.float32 else out.to(q.dtype)
    out = acc / torch.where(l > 0, l, 1.0)[..., None]  # [B*G, M, d]
    # padding queries get zeros (an unmasked group gave them scores; valid queries are untouched)
    out = out.view(B, G, Q, T_pad, d).masked_fill(~q_valid[:, None, None, :, None], 0.0)
    return out.view(B, H, T_pad, d)[:, :, :T].to(q.dtype)


class _GroupStep:
    """One key group's update of the online softmax for the rows in the group (see `blocked_attention`)."""

    def __init__(self, G, Q, T_pad, d, causal, window, min_rows, inplace, masks=None, lowp=False):
        self.G, self.Q, self.T, self.d = G, Q, T_pad, d
        self.causal, self.window, self.min_rows, self.inplace = causal, window, min_rows, inplace
        self.masks = masks
        self.lowp = lowp  # the two GEMMs in the model dtype (`model_dtype_gemms`)

    def hide(self, blk: KeyBlock, q_valid: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
        """[B, 1, 1, T, K] bool: the scores this group hides (made once per forward pass when cached)."""
        key = None
        if self.masks is not None and blk.mask_key is not None:
            key = (*blk.mask_key, self.causal, self.window)
            if key in self.masks:
                return self.masks[key]
        mask = blk.valid[:, None, :] & q_valid[:, :, None]  # [B, T, K]
        if self.causal:
            kp = blk.positions[:, None, :]
            mask = mask & (kp <= qp)
            if self.window is not None:
                mask = mask & (kp > qp - self.window)
        hide = ~mask[:, None, None]
        if key is not None:
            self.masks[key] = hide
        return hide

    def __call__(self, blk, qg, q_valid, qp, state):
        """state: (m, l, acc) of the rows in the group, or None before any group (then made here, as the update
        of the empty state would: m = the scores' max, l = sum p, acc = p @ v)."""
        G, Q, T_pad, d, inplace = self.G, self.Q, self.T, self.d, self.inplace
        B, K = blk.keys.shape[0], blk.keys.shape[2]
        M = Q * T_pad
        k, v = blk.keys.reshape(B * G, K, d), blk.values.reshape(B * G, K, d)
        if not self.lowp:
            k, v = _f32(k), _f32(v)
        product = _bmm_f32 if self.lowp else _bmm  # either way the scores come out in fp32
        s = product(qg, k.transpose(1, 2), self.min_rows).view(B, G, Q, T_pad, K)  # [B, G, Q, T, K]
        if not blk.unmasked or self.window is not None:
            hide = self.hide(blk, q_valid, qp)
            s = s.masked_fill_(hide, -math.inf) if inplace else s.masked_fill(hide, -math.inf)
        s = s.view(B * G, M, K)
        if state is None:  # maximum(-inf, x) = x, 0 * 0 + x = x: the same bits as updating the empty state
            m_new = s.amax(-1)
        else:
            m, l, acc = state  # noqa: E741
            m_new = torch.maximum(m, s.amax(-1))
        # no key yet: keep exp() from -inf - -inf (one kernel: only -inf changes, to 0; NaN and +inf stay)
        m_safe = torch.nan_to_num(m_new, nan=math.nan, posinf=math.inf, neginf=0.0)
        # masked keys: exp(-inf) = 0 exactly
        p = s.sub_(m_safe[..., None]).exp_() if inplace else torch.exp(s - m_safe[..., None])
        if self.lowp:  # probabilities in the model dtype times the values, the running sums in fp32
            pv = _bmm_f32(p.to(v.dtype), v, self.min_rows)
        else:
            pv = _bmm(p, v, self.min_rows)
        if state is None:
            return m_new, p.sum(-1), pv
        alpha = torch.exp(m - m_safe)  # 1 exactly when the group changed nothing, 0 before the first key
        if inplace:  # the same arithmetic, without a second copy of the running state
            l.mul_(alpha).add_(p.sum(-1))
            acc.mul_(alpha[..., None]).add_(pv)
        else:
            l = l * alpha + p.sum(-1)  # noqa: E741
            acc = acc * alpha[..., None] + pv
        return m_new, l, acc


def _rows(t: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """The given rows of a [B * G, ...] tensor -> [len(rows) * G, ...] (a copy)."""
    return t.view(B, -1, *t.shape[1:])[rows].flatten(0, 1)


def _put(full: torch.Tensor, rows: torch.Tensor, part: torch.Tensor, B: int, inplace: bool) -> torch.Tensor:
    """`full` [B * G, ...] with the given rows replaced by `part` [len(rows) * G, ...]."""
    part = part.view(len(rows), -1, *part.shape[1:])
    if inplace:
        full.view(B, -1, *full.shape[1:]).index_copy_(0, rows, part)
        return full
    return full.view(B, -1, *full.shape[1:]).index_copy(0, rows, part).flatten(0, 1)


def workspace_bytes(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    query_tokens: int,
    itemsize: int,
    cpu: bool,
    group_keys: int = GROUP_BLOCKS * BLOCK_TOKENS,
) -> int:
    """Upper bound of the transient bytes `blocked_attention` (no grad) holds per row for one layer: the query
    copies, the gathered K/V of the largest key group (the gather and its head-major copy, and fp32 copies), that
    group's scores, masks and positions, its product with the values, the fp32 running state (and its copy for a
    group of some rows), the output copies, and on CPU the extra output `_bmm` makes when a batch holds a single
    matrix. `group_keys`: the largest key group the row takes part in (default: the largest there is); a row joins
    only the groups of its own keys (`group_rows`) and of the batch's new tokens. Admission reserves it per row
    (model/kv_cache.py); bench/kv_memory.py measures the real peak against it."""
    H, G, T, d, K = num_heads, kv_heads, query_tokens, head_dim, group_keys
    f32 = 0 if itemsize == 4 else 4  # .float() copies only when the model dtype is not fp32
    query = H * T * d * (itemsize + f32)  # the reshaped query and its fp32 copy
    # K and V: each gathered page-major, then copied head-major (both alive at once), then the fp32 copies
    gathered = 2 * G * K * d * (2 * itemsize + f32)
    # scores in fp32 (in place); in a low-precision model on a device that runs the GEMMs in the model dtype
    # (`model_dtype_gemms`: not the CPU), also the scores as the GEMM wrote them where it cannot write fp32, and
    # the probabilities cast back for the values' GEMM; masks; key positions and validity
    lowp = 2 * itemsize if f32 and not cpu else 0
    scores = H * T * K * (4 + lowp) + 4 * T * K + 2 * K * 9
    state = 2 * H * T * d * 4 + 8 * H * T * 4  # acc, the group product; m, l, their updates and alpha
    output = H * T * d * (4 + 2 * itemsize)  # acc / l, then in the model dtype, transposed for o_proj
    single = H * T * (K + d) * 4 if cpu else 0  # the second output of `_bmm` on a single matrix (odd rows)
    selected = 2 * H * T * d * 4 + 2 * H * T * 4  # a group of some rows: copies of their query and state
    return query + gathered + scores + state + output + single + selected
