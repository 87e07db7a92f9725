"""Sampling: decoding settings, the entropy-bound sampler and the plain reference loop."""
