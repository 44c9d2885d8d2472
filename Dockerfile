# swapserve on a CUDA host: docker build -t swapserve . && \
#   docker run --gpus all -p 8001:8001 -p 8002:8002 -v /path/to/repo:/models swapserve
# (Cannot be built on the development machines, which have no Docker engine or GPU.)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 SWAPSERVE_HOME=/var/lib/swapserve
# libgrpc++-dev + pkg-config: setup.py builds the native gRPC front end and swapserve-loadgen with them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ libgrpc++-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/swapserve
ENV PATH=/opt/swapserve/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY csrc csrc
COPY protos protos
COPY src src
# PyPI's default torch wheel is the CUDA build; cupy for device memory queries.
RUN pip install --upgrade pip && pip install ".[onnx,postgres,gpu]" && rm -rf /src

VOLUME ["/models", "/var/lib/swapserve"]
EXPOSE 8001 8002 8003
# The control service stays on loopback inside the container unless a token is configured:
# pass -e SWAPSERVE_CONTROL_TOKEN=... and --control-address 0.0.0.0:8003 to reach it from outside.
ENTRYPOINT ["swapserve", "serve", "--model-repository", "/models", "--device", "auto"]
