"""Keyed, counter-based noise: random numbers as a pure function of (seed, canvas, step, stream, position[, index]).

Shape legend: R rows, L canvas positions, C vocabulary chunk, N vocabulary blocks.

The serving sampler draws no state from a `torch.Generator`. Every random number is a hash of its coordinates,
computed with int64 tensor ops on whatever device the step runs on, for all rows at once. A request's draws
therefore depend only on its seed and where it is in its generation — never on its batch-mates or on the device
— and no host round trip is needed to draw them.

The hash is splitmix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number generators", OOPSLA 2014): a
Weyl-sequence counter passed through a 64-bit finaliser. torch has no unsigned 64-bit arithmetic, so it runs in
int64: products wrap modulo 2**64 (two's complement), and `>>` sign-extends, so every right shift is masked to
act as a logical shift. The bits are the same as the unsigned algorithm's.

Streams: each use has its own stream tag, so no two uses ever share a number. The key of a draw is built by
absorbing, in order, the seed, the stream, the canvas index, the step and the canvas position (`row_keys`,
`position_keys`); the last coordinate, when there is one, is the index into that position's splitmix64 sequence
(`words`):
- STREAM_CANVAS, STREAM_RENOISE: one token per position (no last coordinate);
- STREAM_BLOCK (Gumbel choice among vocabulary blocks) and STREAM_INVCDF (inverse-CDF draw inside a block): one
  number per (position, block), indexed by the block number — what the serving sampler uses. Its tokens thus
  depend on the block size (the fixed `VOCAB_CHUNK` of model/sampling/sampler.py), never on the batch;
- STREAM_GUMBEL: one Gumbel number per (position, vocabulary index), for canvases with a joint constraint
  (model/structured/decode.py needs every token's perturbed score).
"""

from __future__ import annotations

import torch

STREAM_CANVAS = 1  # the uniformly random canvas a new canvas starts from
STREAM_RENOISE = 2  # tokens that replace rejected positions after a step
STREAM_GUMBEL = 3  # per-token Gumbel noise over the vocabulary (joint constraints only)
STREAM_BLOCK = 4  # per-(position, vocabulary block) Gumbel noise: which block a sample comes from
STREAM_INVCDF = 5  # per-(position, vocabulary block) uniform: which token inside the block


def _signed(u: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


GOLDEN = _signed(0x9E3779B97F4A7C15)  # the Weyl increment (2**64 / golden ratio)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (`>>` is arithmetic in torch)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 bits (a bijection of 64-bit words)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def combine(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """A new key from a key and one more coordinate (the next splitmix64 state after absorbing `value`)."""
    return mix((key ^ value) + GOLDEN)


def row_keys(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, stream: int) -> torch.Tensor:
    """Keys [R] of each row's draws at one step, from int64 tensors seeds / canvas index / step [R]."""
    key = combine(mix(seeds + GOLDEN), stream)
    return combine(combine(key, canvas), step)


def position_keys(rows: torch.Tensor, length: int) -> torch.Tensor:
    """Keys [R, L] of positions 0..L-1 of each row key rows [R] (or [..., L] for keys [...])."""
    pos = torch.arange(length, dtype=torch.long, device=rows.device)
    return combine(rows[..., None], pos)


_STREAM_TAGS: dict[tuple, torch.Tensor] = {}


def stream_position_keys(
    seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, streams: tuple[int, ...], length: int
) -> torch.Tensor:
    """Keys [R, S, L] of several streams at once: [:, i] has the bits of
    `position_keys(row_keys(seeds, canvas, step, streams[i]), length)`, in one pass of tensor ops instead of one
    per stream (each op costs microseconds on CPU; a step's sampler needs several streams)."""
    tags_key = (streams, seeds.device)
    if tags_key not in _STREAM_TAGS:  # made once per device: no per-step host-to-device copy
        _STREAM_TAGS[tags_key] = torch.tensor(streams, dtype=torch.long, device=seeds.device)
    key = combine(mix(seeds + GOLDEN)[:, None], _STREAM_TAGS[tags_key])  # [R, S]
    key = combine(combine(key, canvas[:, None]), step[:, None])
    return position_keys(key, length)


def randint(keys: torch.Tensor, high: int) -> torch.Tensor:
    """One integer in [0, high) per key (the modulo bias, high / 2**63, is negligible)."""
    return _shr(mix(keys), 1) % high


U_MAX = 1.0 - 2.0**-24  # largest float32 below 1


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """float32 in (0, 1) from the top 24 bits of each int64 word: exactly representable, never 0 or 1."""
    # the top word's midpoint (2^24 - 0.5) rounds up to 2^24 in float32: clamp it to the largest float below 1
    return ((_shr(bits, 40).float() + 0.5) * (1.0 / (1 << 24))).clamp_(max=U_MAX)


U64_MAX = 1.0 - 2.0**-53  # largest float64 below 1


def words(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """int64 words [..., n] of elements [start, stop) of each key's splitmix64 sequence (element i being the
    (i + 1)-th output), for keys [...]."""
    steps = torch.arange(start + 1, stop + 1, dtype=torch.long, device=keys.device) * GOLDEN
    return mix(keys[..., None] + steps)


def uniform64(bits: torch.Tensor) -> torch.Tensor:
    """float64 in (0, 1) from the top 53 bits of each int64 word, never 0 or 1."""
    # the top word's midpoint (2^53 - 0.5) rounds to 2^53 in float64: clamp it below 1, as `uniform` does
    return ((_shr(bits, 11).double() + 0.5) * 2.0**-53).clamp_(max=U64_MAX)


def gumbel64(bits: torch.Tensor) -> torch.Tensor:
    """float64 Gumbel noise -log(-log U) from int64 words, U from `uniform64` (finite: |noise| < 38)."""
    return gumbel_of_uniform(uniform64(bits))


def gumbel_of_uniform(u: torch.Tensor) -> torch.Tensor:
    """-log(-log u) of uniforms u in (0, 1), in place (u is overwritten and returned)."""
    return u.log_().neg_().log_().neg_()


def gumbel(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Gumbel noise [R, L, C] for vocabulary indices [start, stop) of position keys [R, L]: the splitmix64
    sequence of each position, element v being the (v + 1)-th output. -log(-log U) with U from `uniform`.

    The same arithmetic as `mix` and `uniform`, written in place: at [rows, 256, 8192] every fresh temporary
    is a large allocation, which on CPU costs more than the arithmetic itself."""
    steps = torch.arange(start + 1, stop + 1, dtype=torch.long, device=keys.device) * GOLDEN  # [C]
    h = keys[..., None] + steps  # [R, L, C]
    t = torch.empty_like(h)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(h, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)
        h.bitwise_xor_(t)
        if mult is not None:
            h.mul_(mult)
    torch.bitwise_right_shift(h, 40, out=t)
    u = t.bitwise_and_((1 << 24) - 1).float()
    u.add_(0.5).mul_(1.0 / (1 << 24)).clamp_(max=U_MAX)  # U = 1 would give +inf noise
    return u.log_().neg_().log_().neg_()
