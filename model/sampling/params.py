"""Decoding settings of one request, named and defaulted as in the reference generation config."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, named and defaulted as in the reference's generation config."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def errors(self) -> list[str]:
        """Every invalid field, each as a message that says what to change."""
        out = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens})")
        if not isinstance(self.max_denoising_steps, int) or not 1 <= self.max_denoising_steps <= 1024:
            out.append(
                f"max_denoising_steps must be an integer in [1, 1024] (got {self.max_denoising_steps})"
            )
        if not self.entropy_bound > 0:
            out.append(f"entropy_bound must be > 0 (got {self.entropy_bound})")
        if not self.t_min > 0:
            out.append(f"t_min must be > 0 (got {self.t_min})")
        if not self.t_max >= self.t_min:
            out.append(f"t_max must be >= t_min (got t_max={self.t_max}, t_min={self.t_min})")
        if not isinstance(self.stability_threshold, int) or not 0 <= self.stability_threshold <= 64:
            out.append(f"stability_threshold must be an integer in [0, 64] (got {self.stability_threshold})")
        if not self.confidence_threshold > 0:
            out.append(f"confidence_threshold must be > 0 (got {self.confidence_threshold})")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and v != v:
                out.append(f"{f.name} must be a number (got NaN)")
        return out

    def validate(self) -> SamplingParams:
        errs = self.errors()
        if errs:
            raise ValueError("; ".join(errs))
        return self

    def temperature(self, steps_done: int) -> float:
        """The reference counts steps down: at step n of N remaining, t = t_min + (t_max - t_min) * n / N."""
        remaining = self.max_denoising_steps - steps_done
        return self.t_min + (self.t_max - self.t_min) * (remaining / self.max_denoising_steps)
