# portcullis: common tasks. CARGO_TARGET_DIR is honoured if set.
CARGO ?= cargo

.PHONY: deps build test lint demo bench soak clean manifests man image fuzz

# deps: install the system tools the tests use (prometheus, promtool, ip,
# iptables, nft, tcpdump, curl, setpriv, and kubernetes-validate from PyPI),
# only those missing; see .ci/deps.sh.
deps:
	bash .ci/deps.sh

# build: the release binary (target/release/portcullis).
build:
	$(CARGO) build --release --locked

# test: unit, binary and integration tests (not benches). The release
# binary comes first: tests/image.rs packages it into the image.
test: deps build
	@echo "+ $(CARGO) test --locked"
	@$(CARGO) test --locked

# lint: formatting and clippy over every target, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# demo: a whole mesh on loopback (CA, two sidecars, an echo app).
demo:
	$(CARGO) run --release -- demo

# bench: direct vs sidecar pair (throughput, new connections/s, HTTP
# requests/s and CPU per request, memory per idle connection), authorization
# costs, and what post-quantum key exchange adds to a handshake; the memory
# and HTTP rows run the release binary. Rows comparing with nginx and
# haproxy pairs, and wrk as the load generator, need those installed (the
# bench says which rows it skipped). See benches/README.md.
BENCH_TOOLS_HINT = apt-get install -y nginx libnginx-mod-stream haproxy wrk
bench: build
	@for t in wrk nginx haproxy; do PATH="$$PATH:/usr/sbin" command -v $$t >/dev/null || \
		echo "bench: $$t is not installed; its rows are skipped or replaced (install: $(BENCH_TOOLS_HINT))"; done
	$(CARGO) bench --locked --bench pair
	$(CARGO) bench --locked --bench authz
	$(CARGO) bench --locked --bench handshake

# soak: fault and load runs that take minutes (10,000 connections held
# through a sidecar pair), against the release binary; prints the figures
# recorded in benches/README.md ("Soak"). Not part of `make test`.
soak: build
	PORTCULLIS_SOAK_BIN=$${CARGO_TARGET_DIR:-target}/release/portcullis \
		$(CARGO) test --locked --test soak -- --ignored --nocapture --test-threads 1

# manifests: deploy/portcullis.yaml, the chart rendered with its defaults
# (tests/helm.rs checks it is up to date); needs Helm from `make deps`.
manifests:
	bash .ci/helm.sh
	bash .ci/manifests.sh > deploy/portcullis.yaml.tmp
	mv deploy/portcullis.yaml.tmp deploy/portcullis.yaml

# man: the man page, generated from the command-line definitions, at
# $(CARGO_TARGET_DIR or target)/man/portcullis.1 (`man -l` reads it).
MAN_DIR ?= $(or $(CARGO_TARGET_DIR),target)/man
man:
	mkdir -p $(MAN_DIR)
	$(CARGO) run --quiet --locked -- man > $(MAN_DIR)/portcullis.1

# image: the container image, target/image/portcullis-<version>.oci.tar
# (ghcr.io/portcullis/portcullis:<version>, the chart's default image), from
# the release binary on `scratch` with buildah; no registry and no Docker
# engine needed. Installs buildah from Debian when missing (as root).
# Load it with `podman load -i`, `docker load -i`, `kind load image-archive`
# or `ctr images import`.
image: build
	bash .ci/image.sh

# fuzz: every fuzz target for FUZZ_SECONDS (default 60) each, with
# cargo-fuzz on a nightly toolchain (skipped, exit 0, without one); fails
# only on a crash, hang or OOM. Not part of `make test`. See fuzz/run.sh.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

# clean: remove build output.
clean:
	$(CARGO) clean
