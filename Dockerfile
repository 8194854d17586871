# The lrq image: the CLI, the one-shot migration and the CPU workers (torch's CPU build), or,
# built with a CUDA wheel index and TORCH_REQUIRE_CUDA=1, the GPU workers' own image:
#   docker build -t lrq-gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg TORCH_REQUIRE_CUDA=1 .
FROM python:3.11-slim

# torch comes first, from the index the build names. Installing lrq afterwards keeps it, since
# it already satisfies lrq's torch requirement.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_REQUIRE_CUDA=0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# A GPU image whose torch has no CUDA would start workers that exit "CUDA is not available":
# fail the build instead. (torch.version.cuda is None in CPU builds.)
RUN if [ "${TORCH_REQUIRE_CUDA}" = "1" ]; then \
        python -c "import torch; assert torch.version.cuda, 'this torch has no CUDA build'"; \
    fi

WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --create-home --uid 1000 lrq

USER lrq
WORKDIR /home/lrq
# Without LRQ_DATABASE_URL / LRQ_BROKER_URL (compose sets both) lrq keeps SQLite here.
ENV LRQ_HOME=/home/lrq/.local/share/lrq

CMD ["lrq", "--help"]
