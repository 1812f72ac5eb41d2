# Trellis. `make demo` and `make test` install what they need (idempotently) and run.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps build test demo bench-xds clean

# System prerequisites. The Rust toolchain is the machine's; protos compile with protox (pure
# Rust), so no protoc is needed.
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo is required (Rust 1.88+): https://rustup.rs"; exit 1; }
	@missing=""; \
	for p in curl:curl cc:gcc python3:python3; do command -v $${p%%:*} >/dev/null || missing="$$missing $${p##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; install them (apt-get install$$missing) or run as root"; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --workspace

test: deps
	$(CARGO) test --workspace

demo: deps
	$(CARGO) build --release -p istiod-lite -p meshctl
	bash scripts/demo.sh

# Last line: snapshot_s=<x> change_p99_ms=<x> rss_mb=<x>
bench-xds: deps
	$(CARGO) build --release -p istiod-lite -p trellis-benches
	target/release/xds-scale target/release/istiod-lite

clean:
	$(CARGO) clean
	rm -rf demo-state
