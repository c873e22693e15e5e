# The portcullis image: one static binary at /usr/local/bin/portcullis (the
# path the chart and the injector use), run as UID/GID 1500.
#
# NOT BUILT OR TESTED HERE: the development machines cannot build images.
# The chart's tests render and validate manifests only.
#
#   docker build -t ghcr.io/portcullis/portcullis:0.1.0 .
#
# The same image runs every component: `ca serve` (identity service),
# `webhook` (injector), `run` (the injected portcullis-proxy) and `init`
# (the injected portcullis-init, which the pod runs as root with NET_ADMIN
# and NET_RAW and which calls nft, iptables-nft or iptables-legacy: the
# runtime stage ships those, which is why it is not distroless).

# --- build: a static musl binary (rustls + ring, no OpenSSL)
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin portcullis \
 && install -D -m 0755 target/x86_64-unknown-linux-musl/release/portcullis /out/portcullis

# --- runtime
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1500 portcullis \
 && useradd --system --uid 1500 --gid 1500 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin portcullis
COPY --from=build /out/portcullis /usr/local/bin/portcullis
USER 1500:1500
EXPOSE 15001 15006 15012 15020 8443
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["--help"]
