# The portcullis image, for machines with a Docker engine. `make image`
# builds the same image without one (buildah, from the release binary, see
# .ci/image.sh); both run .ci/image-rootfs.sh, so the layout is the same:
#
#   /usr/local/bin/portcullis        the binary (the path the chart and the
#                                    injector use), entrypoint, user 1500:1500
#   /usr/sbin/nft, xtables-nft-multi, xtables-legacy-multi and the
#   iptables-nft / iptables-legacy names linked to them, their shared
#   libraries and the xtables modules   for `portcullis init` (run as root
#                                    with NET_ADMIN and NET_RAW by the pod)
#   /etc/passwd, group, nsswitch.conf, hosts, protocols, services
#
# and nothing else (no shell, no package manager): FROM scratch.
#
#   docker build -t ghcr.io/portcullis/portcullis:0.1.0 .
#
# The tag is ghcr.io/portcullis/portcullis:<Cargo.toml version>, the chart's
# default image (values.yaml image.repository, tag = appVersion).

# --- build: the release binary (rustls + ring, no OpenSSL)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY deploy/portcullis.yaml ./deploy/portcullis.yaml
RUN cargo build --release --locked --bin portcullis

# --- rootfs: the binary and the netfilter tools with exactly their files
FROM debian:bookworm-slim AS rootfs
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables binutils \
 && rm -rf /var/lib/apt/lists/*
COPY .ci/image-rootfs.sh /image-rootfs.sh
COPY --from=build /src/target/release/portcullis /portcullis
RUN bash /image-rootfs.sh /portcullis /rootfs

# --- runtime
FROM scratch
COPY --from=rootfs /rootfs/ /
# iptables-legacy's lock file: /run is read-only in the injected init
# container, /dev/shm is a writable tmpfs in every container.
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin \
    XTABLES_LOCKFILE=/dev/shm/xtables.lock
USER 1500:1500
EXPOSE 15001 15006 15008 15012 15020 8443
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["--help"]
