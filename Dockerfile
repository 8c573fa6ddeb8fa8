# Every image of the project, one target each; build from the repository root:
#   docker build --target model-server     -t ghcr.io/recsys-operator/model-server:0.1.0 .
#   docker build --target model-server-gpu -t ghcr.io/recsys-operator/model-server:0.1.0-gpu .
#   docker build --target stream-jobs      -t ghcr.io/recsys-operator/stream-jobs:0.1.0 .
#   docker build --target operator         -t ghcr.io/recsys-operator/operator:0.1.0 .
# Each installs the project itself with the extras its commands need (pyproject.toml);
# tests/test_images.py checks what each target installs.

FROM python:3.11-slim-bookworm AS source
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .

# TorchServe (Java 17) with the retrieval handler. The operator mounts config.properties,
# log4j2.xml and metrics.yaml at /home/model-server/config and fetches the archive into
# /home/model-server/model-store.
FROM source AS torchserve
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group model-server \
 && mkdir -p /home/model-server/config /home/model-server/model-store \
 && chown -R model-server:model-server /home/model-server
# One thread per worker: TorchServe scales with workers and batching.
ENV OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TEMP=/tmp
EXPOSE 8080 8081 8082
CMD ["torchserve", "--start", "--foreground", "--ncs", \
     "--ts-config", "/home/model-server/config/config.properties", \
     "--model-store", "/home/model-server/model-store"]

FROM torchserve AS model-server
# The CPU build of torch (the version pyproject.toml pins), not PyPI's multi-GB CUDA one.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[serving]" \
 && cd / && rm -rf /src
USER 1000:1000
WORKDIR /home/model-server

FROM torchserve AS model-server-gpu
# torch from PyPI (a CUDA build; the driver comes from the node). faiss-cpu and faiss-gpu
# share the `faiss` module: remove both, then put the `gpu` extra's faiss-gpu back.
RUN pip install ".[serving,gpu]" \
 && pip uninstall -y faiss-cpu faiss-gpu \
 && python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"], sep="\n")' \
    | xargs pip install --no-deps \
 && cd / && rm -rf /src
USER 1000:1000
WORKDIR /home/model-server

# The data plane's Python parts: `recsys features run` by default; also `recsys gateway run`
# and `recsys event-log run`.
FROM source AS stream-jobs
RUN pip install ".[stream,gateway,eventlog]" && cd / && rm -rf /src
USER 1000:1000
ENTRYPOINT ["recsys"]
CMD ["features", "run"]

# The operator (the default target): `recsys operator run`.
FROM source AS operator
RUN pip install . && cd / && rm -rf /src
USER 1000:1000
ENTRYPOINT ["recsys"]
CMD ["operator", "run", "--all-namespaces", "--metrics-address=0.0.0.0:8080"]
