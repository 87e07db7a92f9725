# The blockserve serving image: Ray's image (Ray, Python, CUDA runtime) plus this package.
#   GPU pools (default): docker build -t blockserve:0.1.0 .
#   CPU demo:            docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu --build-arg EXTRAS= -t blockserve:0.1.0-cpu .
# Ray in the image must match the package's ray[serve] pin (2.60.0) and the chart's rayVersion.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# `gpu` adds the fused MoE kernels; empty for a CPU image.
ARG EXTRAS=gpu

WORKDIR /home/ray/blockserve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users model ./model
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users protos ./protos
# A regular (not editable) install: every Ray worker imports cluster.app:app_builder and the gRPC servicers
# from site-packages, and the tiny default model ships as package data of `model`.
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" && rm -rf /home/ray/blockserve/build

ENV RAY_USAGE_STATS_ENABLED=0
# KubeRay runs `ray start` in this image; `blockserve` is on PATH for render-serve-config and generate.
WORKDIR /home/ray
