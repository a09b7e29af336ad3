# Build stage: the release binaries of the worker and the Opsgenie stand-in.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p opsgenie-worker -p opsgenie-standin \
 && cp target/dist/opsgenie-worker target/dist/opsgenie-standin /usr/local/bin/

# Runtime stage: a slim Debian with CA certificates, run as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin worker
COPY --from=build /usr/local/bin/opsgenie-worker /usr/local/bin/opsgenie-standin /usr/local/bin/
USER 10001
ENV LOG_FORMAT=json METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["opsgenie-worker"]
CMD ["run"]
