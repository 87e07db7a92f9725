"""Train a DiffusionGemma-architecture model with the project's own model code (model/transformer.py).

Shape legend: B windows, N window tokens, R canvases (rows of the decoder batch), L canvas, D hidden, V vocab,
G kv heads, d head dim, E experts.

The objective, per training window of N tokens (`<bos>` + a slice of one source file, `<eos>` + `<pad>` after
the file's end), has three pieces:

1. Encoder causal LM loss. The encoder runs causally over the clean window once (what prefill / commit do at
   serving time) and predicts every next token through the tied LM head with soft-capping. This is the
   `encoder_last_hidden_state` loss transformers' `DiffusionGemmaModelOutputWithPast` documents ("to compute
   an autoregressive loss on the encoder during training"); it also trains the K/V the decoder reads.
2. Decoder denoising loss (block diffusion with uniform-token noise). The window is cut into canvases of
   `config.canvas_length` tokens at a random offset; canvas j's prefix is the clean encoder K/V of every token
   before it, exactly the cache the server holds when that canvas is decoded (sliding layers keep only the last
   `sliding_window - 1` keys, as `model/kv_cache.py` does). All canvases of all windows are denoised in one
   batched decoder call, the block-parallel training of BD3-LM (Arriola et al., 2025). Each canvas gets a noise
   level t ~ U(0, 1) and each position is independently replaced by a uniformly random token (any id, as the
   sampler's `randint(0, vocab)` canvas init and re-noising do) with probability t — uniform-noise discrete
   diffusion (Austin et al., 2021, D3PM-uniform). The loss is the cross-entropy of the clean tokens at *every*
   canvas position, unweighted: under uniform noise the model cannot tell which positions were corrupted, and
   the entropy-bound sampler keeps accepted tokens in the canvas and reads the decoder's entropy at every
   position (for acceptance and for the mean-entropy stop test), so the decoder must also be confident and
   right at uncorrupted positions. Canvas positions after `<eos>` have `<pad>` targets: what generation
   replaces them with, and a confident pad keeps the stop test reachable.
3. Self-conditioning, trained as the sampler uses it (Chen et al., 2022, "Analog Bits"): for a random half of
   the canvases a first decoder pass runs without self-conditioning (no gradient); its temperature-1 logits
   become soft embeddings softmax(logits) @ embeddings * sqrt(D) (`DiffusionGemma.soft_embeddings`, the input
   transformers' `DiffusionGemmaDecoderModel` builds from `self_conditioning_logits`); the second, trained
   pass takes them. The other half get a zero signal (what the first denoising step sees).

Plus a small Switch-Transformer load-balancing loss (Fedus et al., 2021) on the routers, so a tiny model does
not collapse onto a few experts. AdamW, linear warmup then cosine decay, gradient clipping; one seed drives
initialisation, data and noise, and the thread count is fixed, so a run is deterministic by step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.kv_cache import LayerPrefix
from model.transformer import DiffusionGemma, TokenBatch


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_seconds: float | None = None  # wall-clock budget; stops early (then the run is no longer step-exact)
    anneal_by_time: bool = False  # cosine progress = max(step, elapsed-time) fraction: always fully annealed
    batch_size: int = 16  # windows per step
    window: int = 256  # tokens per window, `<bos>` included
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    self_cond_prob: float = 0.5
    encoder_loss_weight: float = 1.0
    balance_loss_weight: float = 0.01
    seed: int = 0
    threads: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_windows: int = 32


@dataclass
class TokenData:
    """Token ids of each source file (one 1-D long tensor per file) and the special ids windows need."""

    files: list[torch.Tensor]
    bos_id: int
    eos_id: int
    pad_id: int

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer) -> TokenData:
        """Tokenize each file on its own (no specials added: windows add `<bos>` / `<eos>` themselves)."""
        specials = [tokenizer.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")]
        if None in specials:
            raise ValueError(
                "the tokenizer must define <bos>, <eos> and <pad> (model/training/bpe.py trains one that does)"
            )
        encoded = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        files = [torch.tensor(e.ids, dtype=torch.long) for e in encoded if len(e.ids) >= 2]
        if not files:
            raise ValueError("no text with at least 2 tokens to train or evaluate on")
        return cls(files, *specials)

    def check_matches(self, config: ModelConfig) -> None:
        """The ids windows use must be the ones the served config names, or generation would not stop."""
        named = {"bos": config.bos_token_id, "eos": config.eos_token_ids[0] if config.eos_token_ids else None}
        named["pad"] = config.pad_token_id
        ours = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}
        if named != ours:
            raise ValueError(f"tokenizer special ids {ours} differ from the model config's {named}")

    @property
    def num_tokens(self) -> int:
        return sum(len(f) for f in self.files)


@dataclass
class Windows:
    ids: torch.Tensor  # [B, N]
    lengths: torch.Tensor  # [B] real tokens (bos .. eos); pad after


def sample_windows(data: TokenData, count: int, length: int, g: torch.Generator) -> Windows:
    """`<bos>` + a slice of one file (files chosen in proportion to their length), `<eos>` + pads at its end."""
    sizes = torch.tensor([len(f) for f in data.files], dtype=torch.float)
    picks = torch.multinomial(sizes, count, replacement=True, generator=g).tolist()
    ids = torch.full((count, length), data.pad_id, dtype=torch.long)
    lengths = torch.zeros(count, dtype=torch.long)
    for b, f in enumerate(picks):
        tokens = data.files[f]
        # Start anywhere that leaves at least half a window of text (or at 0 for short files).
        start = int(torch.randint(0, max(1, len(tokens) - length // 2), (1,), generator=g))
        piece = tokens[start : start + length - 1]
        row = torch.cat([torch.tensor([data.bos_id]), piece])
        if start + length - 1 >= len(tokens) and len(row) < length:
            row = torch.cat([row, torch.tensor([data.eos_id])])
        ids[b, : len(row)] = row
        lengths[b] = len(row)
    return Windows(ids, lengths)


# -- model passes ----------------------------------------------------------------------------------------------


def encode_window(model: DiffusionGemma, windows: Windows):
    """Encoder mode over whole windows with gradients: final-normed hidden [B, N, D] and each layer's new
    K/V [B, G, N, d]. (`DiffusionGemma.encode` writes per-row caches without returning K/V; training needs
    the K/V of every prefix length at once, so this runs the same layers directly.)"""
    B, N = windows.ids.shape
    positions = torch.arange(N).expand(B, N)
    valid = positions < windows.lengths[:, None]
    batch = TokenBatch(windows.ids, positions, valid)
    h = model.embed(windows.ids)
    keys, values = [], []
    for layer in model.layers:
        h, k, v = layer(h, batch, None, encoder=True, moe=model.moe_backend)
        keys.append(k)
        values.append(v)
    return model.norm(h), keys, values, valid


@dataclass
class CanvasPrefix:
    """The decoder's view of R canvases' cached prefixes, cut from the encoder's window K/V.

    Duck-types `model.kv_cache.PrefixBatch` (`layers`, `lengths`), which `DiffusionGemma.denoise` reads; a
    PrefixBatch is built from per-sequence caches, which would cut the gradient path to the encoder."""

    layers: list[LayerPrefix]
    lengths: torch.Tensor  # [R] canvas start = prefix length

    def select(self, rows: torch.Tensor) -> CanvasPrefix:
        return CanvasPrefix(
            [
                LayerPrefix(p.keys[rows], p.values[rows], p.positions[rows], p.valid[rows])
                for p in self.layers
            ],
            self.lengths[rows],
        )


def canvas_prefix(config: ModelConfig, keys, values, valid, rows: torch.Tensor, starts: torch.Tensor):
    """Prefix of canvas r = window rows[r]'s keys before starts[r]; sliding layers keep the last window - 1."""
    N = valid.shape[1]
    pos = torch.arange(N).expand(len(rows), N)  # [R, N]
    before = valid[rows] & (pos < starts[:, None])
    recent = before & (pos >= starts[:, None] - (config.sliding_window - 1))
    layers = []
    for spec, k, v in zip(config.layers, keys, values, strict=True):
        mask = recent if spec.is_sliding else before
        layers.append(LayerPrefix(k[rows], v[rows], pos, mask))  # K/V [B, G, N, d] -> [R, G, N, d]
    return CanvasPrefix(layers, starts)


def cut_canvases(windows: Windows, canvas: int, g: torch.Generator):
    """Canvas starts at a random offset in [1, canvas] per window (position 0 is always `<bos>`), every
    `canvas` tokens, while the canvas fits and holds at least one real token. Returns rows [R], starts [R]."""
    B, N = windows.ids.shape
    offsets = torch.randint(1, canvas + 1, (B,), generator=g)
    rows, starts = [], []
    for b in range(B):
        for s in range(int(offsets[b]), N - canvas + 1, canvas):
            if s < int(windows.lengths[b]):
                rows.append(b)
                starts.append(s)
    if not rows:
        raise ValueError(f"window of {N} tokens holds no canvas of {canvas}; use window >= 2 * canvas_length")
    return torch.tensor(rows), torch.tensor(starts)


def corrupt(clean: torch.Tensor, vocab: int, g: torch.Generator):
    """Per-canvas noise level t ~ U(0,1); each position replaced by a uniform random token with prob t."""
    R, L = clean.shape
    t = torch.rand(R, 1, generator=g)
    hit = torch.rand(R, L, generator=g) < t
    noise = torch.randint(0, vocab, (R, L), generator=g)
    return torch.where(hit, noise, clean), t.squeeze(1)


def self_conditioning_input(model, noisy, prefix: CanvasPrefix, use: torch.Tensor) -> torch.Tensor | None:
    """Soft embeddings [R, L, D] from a no-grad first pass for rows where `use`, zeros elsewhere."""
    if not bool(use.any()):
        return None
    rows = use.nonzero().squeeze(1)
    with torch.no_grad():
        first = model.logits(model.denoise(noisy[rows], prefix.select(rows), None))  # [r, L, V] temperature 1
        soft_rows = model.soft_embeddings(torch.softmax(first, dim=-1))
    soft = torch.zeros(*noisy.shape, model.config.hidden_size, dtype=model.dtype)
    soft[rows] = soft_rows
    return soft


class RouterTap:
    """Collects router logits during a forward (hooks on each `Router.proj`) for the load-balancing loss."""

    def __init__(self, model: DiffusionGemma):
        self.logits: list[torch.Tensor] = []
        self.top_k = model.config.top_k
        self.handles = [layer.router.proj.register_forward_hook(self._hook) for layer in model.layers]

    def _hook(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():  # the trained passes only, not the self-conditioning first pass
            self.logits.append(output)

    def balance_loss(self) -> torch.Tensor:
        """Switch loss E * sum_e f_e * P_e per router call, averaged (1.0 when perfectly balanced)."""
        losses = []
        for logits in self.logits:
            probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
            E = probs.shape[-1]
            chosen = F.one_hot(probs.topk(self.top_k, dim=-1).indices, E).sum(1).float()  # [T, E]
            losses.append(E * (chosen.mean(0) / self.top_k * probs.mean(0)).sum())
        self.logits.clear()
        return torch.stack(losses).mean()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Losses:
    total: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor
    balance: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def window_losses(
    model, windows: Windows, tc: TrainConfig, g: torch.Generator, tap: RouterTap | None
) -> Losses:
    """The three-part objective of the module docstring on one batch of windows."""
    cfg = model.config
    hidden, keys, values, valid = encode_window(model, windows)
    enc_logits = model.logits(hidden[:, :-1])  # [B, N-1, V]
    enc_targets = windows.ids[:, 1:].masked_fill(~valid[:, 1:], -100)  # no loss on pads
    enc_loss = F.cross_entropy(
        enc_logits.reshape(-1, cfg.vocab_size), enc_targets.reshape(-1), ignore_index=-100
    )
    rows, starts = cut_canvases(windows, cfg.canvas_length, g)
    clean = windows.ids[rows[:, None], starts[:, None] + torch.arange(cfg.canvas_length)]  # [R, L]
    noisy, _ = corrupt(clean, cfg.vocab_size, g)
    prefix = canvas_prefix(cfg, keys, values, valid, rows, starts)
    use_sc = torch.rand(len(rows), generator=g) < tc.self_cond_prob
    soft = self_conditioning_input(model, noisy, prefix, use_sc)
    dec_logits = model.logits(model.denoise(noisy, prefix, soft))  # [R, L, V]
    dec_loss = F.cross_entropy(dec_logits.reshape(-1, cfg.vocab_size), clean.reshape(-1))
    balance = tap.balance_loss() if tap is not None else torch.zeros(())
    total = dec_loss + tc.encoder_loss_weight * enc_loss + tc.balance_loss_weight * balance
    return Losses(total, enc_loss, dec_loss, balance)


# -- training loop ---------------------------------------------------------------------------------------------


def lr_at(step: int, tc: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps` — or, with
    `anneal_by_time`, at whichever of `max_steps` and `max_seconds` comes first (not step-deterministic)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
    if tc.anneal_by_time and tc.max_seconds:
        progress = max(progress, elapsed / tc.max_seconds)
    progress = min(1.0, progress)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DiffusionGemma, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, router scales or per-expert scales)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: DiffusionGemma, data: TokenData, tc: TrainConfig, seed: int = 1234) -> dict[str, float]:
    """Held-out losses on fixed windows and fixed noise (its own generator, so every run and every seed is
    scored on the same draws). The decoder loss here is the first pass: no self-conditioning."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    windows = sample_windows(data, tc.eval_windows, tc.window, g)
    losses = window_losses(model, windows, TrainConfig(**{**asdict(tc), "self_cond_prob": 0.0}), g, None)
    model.train(was_training)
    return {"encoder_lm": float(losses.encoder), "denoising": float(losses.decoder)}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    stopped_by: str  # "max_steps" | "time"
    history: list[dict] = field(default_factory=list)  # one entry per step
    evals: list[dict] = field(default_factory=list)

    def first_last_mean(self, key: str = "total", n: int = 5) -> tuple[float, float]:
        values = [h[key] for h in self.history]
        return sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def train(
    model: DiffusionGemma,
    train_data: TokenData,
    tc: TrainConfig,
    heldout: TokenData | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model` in place for `tc.max_steps` steps or until `tc.max_seconds` have passed."""
    train_data.check_matches(model.config)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    optimizer = make_optimizer(model, tc)
    tap = RouterTap(model) if tc.balance_loss_weight > 0 else None
    result = TrainResult(steps=0, seconds=0.0, stopped_by="max_steps")
    model.train()
    t0 = time.monotonic()
    try:
        for step in range(tc.max_steps):
            if tc.max_seconds is not None and time.monotonic() - t0 >= tc.max_seconds:
                result.stopped_by = "time"
                break
            lr = lr_at(step, tc, time.monotonic() - t0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = sample_windows(train_data, tc.batch_size, tc.window, g)
            losses = window_losses(model, windows, tc, g, tap)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            elapsed = time.monotonic() - t0
            entry = {"step": step, "lr": lr, "grad_norm": float(grad_norm), "seconds": round(elapsed, 3)}
            result.history.append({**entry, **losses.floats()})
            result.steps = step + 1
            if tc.log_every and (step % tc.log_every == 0 or step == tc.max_steps - 1):
                h = result.history[-1]
                log(
                    f"step {step:5d}  loss {h['total']:.4f}  enc {h['encoder']:.4f}  dec {h['decoder']:.4f}  "
                    f"bal {h['balance']:.3f}  lr {lr:.2e}  {result.steps / elapsed:.2f} steps/s"
                )
            if heldout is not None and tc.eval_every and (step + 1) % tc.eval_every == 0:
                result.evals.append({"step": step + 1, **evaluate(model, heldout, tc)})
                log(f"held-out at step {step + 1}: {result.evals[-1]}")
    finally:
        if tap is not None:
            tap.close()
        torch.set_num_threads(threads_before)  # leave the process as we found it (tests share it)
    result.seconds = time.monotonic() - t0
    if heldout is not None and (not result.evals or result.evals[-1]["step"] != result.steps):
        result.evals.append({"step": result.steps, **evaluate(model, heldout, tc)})
        log(f"held-out at step {result.steps}: {result.evals[-1]}")
    return result
