"""Structured output: infill templates, the JSON Schema compiler and per-position token classes."""
