"""Cluster side of blockserve: configuration, the Ray Serve app builder, autoscaling, telemetry, CLI."""
