# Tidelock's CPU image: every binary the Helm chart starts (operator, router, worker) plus the
# `tidelock` CLI, built in one stage and copied onto a slim runtime.
#
#   docker build -t tidelock:dev .
#   docker run --rm tidelock:dev tidelock-router --help
#
# The chart runs the same image with a different command per component. A test
# (tests/images.rs) checks that every binary copied below is one the workspace builds.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p tidelock-operator -p tidelock-router -p tidelock-worker -p tidelock-cli --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tidelock --create-home tidelock
COPY --from=build /src/target/release/tidelock-operator /usr/local/bin/tidelock-operator
COPY --from=build /src/target/release/tidelock-router /usr/local/bin/tidelock-router
COPY --from=build /src/target/release/tidelock-worker /usr/local/bin/tidelock-worker
COPY --from=build /src/target/release/tidelock /usr/local/bin/tidelock
USER 10001
EXPOSE 8000
ENTRYPOINT []
CMD ["tidelock-router", "--help"]
