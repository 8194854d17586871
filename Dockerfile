# One image for every lrq service: the CLI, the one-shot migration and the CPU and GPU workers.
FROM python:3.11-slim

# torch comes first, from the index the build names: the CPU build by default; a CUDA one
# (e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124) for GPU hosts.
# Installing lrq afterwards keeps it, since it already satisfies lrq's torch requirement.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --create-home --uid 1000 lrq

USER lrq
WORKDIR /home/lrq
# Without LRQ_DATABASE_URL / LRQ_BROKER_URL (compose sets both) lrq keeps SQLite here.
ENV LRQ_HOME=/home/lrq/.local/share/lrq

CMD ["lrq", "--help"]
