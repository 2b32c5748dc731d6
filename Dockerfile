# The identity worker as a container: a non-root user, dependencies in their own layer.
# Debian 12 (glibc 2.36): the release the worker is measured on (BENCHMARKS.md).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# Pinned dependencies, each checked against its hashes (requirements.lock, `make lock`).
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --prefix=/install -r requirements.lock
COPY pyproject.toml README.md ./
COPY messages ./messages
COPY tls ./tls
COPY brokers ./brokers
COPY services ./services
COPY stores ./stores
COPY worker ./worker
COPY client ./client
COPY tools ./tools
COPY courier ./courier
RUN pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin identity
COPY --from=build /install /usr/local
USER identity
# glibc backs argon2's memory with huge pages: ~30% more hashes per second (services.passwords).
ENV PYTHONUNBUFFERED=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import os,sys,urllib.request; port = os.environ.get('IDENTITY_HTTP_PORT') or '8080'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["identity-worker"]
CMD ["run"]
