# portcullis: common tasks. CARGO_TARGET_DIR is honoured if set.
CARGO ?= cargo

.PHONY: deps build test lint demo bench clean manifests fuzz

# deps: install the system tools the tests use (promtool, ip, iptables, nft,
# tcpdump, curl, setpriv, and kubernetes-validate from PyPI), only those
# missing; see .ci/deps.sh.
deps:
	bash .ci/deps.sh

# build: the release binary (target/release/portcullis).
build:
	$(CARGO) build --release --locked

# test: unit, binary and integration tests (not benches).
test: deps
	@echo "+ $(CARGO) test --locked"
	@$(CARGO) test --locked

# lint: formatting and clippy over every target, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# demo: a whole mesh on loopback (CA, two sidecars, an echo app).
demo:
	$(CARGO) run --release -- demo

# bench: direct vs sidecar pair (throughput, new connections/s, idle RSS);
# needs the release binary for the RSS row, hence the build first.
bench: build
	$(CARGO) bench --locked --bench pair
	$(CARGO) bench --locked --bench authz

# manifests: deploy/portcullis.yaml, the chart rendered with its defaults
# (tests/helm.rs checks it is up to date); needs Helm from `make deps`.
manifests:
	bash .ci/helm.sh
	bash .ci/manifests.sh > deploy/portcullis.yaml.tmp
	mv deploy/portcullis.yaml.tmp deploy/portcullis.yaml

# fuzz: every fuzz target for FUZZ_SECONDS (default 60) each, with
# cargo-fuzz on a nightly toolchain (skipped, exit 0, without one); fails
# only on a crash, hang or OOM. Not part of `make test`. See fuzz/run.sh.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

# clean: remove build output.
clean:
	$(CARGO) clean
