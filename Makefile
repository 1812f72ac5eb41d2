# Trellis. `make demo` and `make test` install what they need (idempotently) and run.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps deps-net build test demo bench-xds bench-l4 clean

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

# Networking tools for the end-to-end tests and bench-l4 (network namespaces need root).
deps-net: deps
	@missing=""; \
	for p in nft:nftables tcpdump:tcpdump iperf3:iperf3 wrk:wrk ip:iproute2; do command -v $${p%%:*} >/dev/null || missing="$$missing $${p##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; install them (apt-get install$$missing) or run as root"; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --workspace

test: deps-net
	$(CARGO) test --workspace

demo: deps
	$(CARGO) build --release -p istiod-lite -p meshctl
	bash scripts/demo.sh

# Last line: snapshot_s=<x> change_p99_ms=<x> rss_mb=<x>
bench-xds: deps
	$(CARGO) build --release -p istiod-lite -p trellis-benches
	target/release/xds-scale target/release/istiod-lite

# Last line: throughput_ratio=<x> rps_ratio=<x> p99_us=<n> rss_idle_mb=<n>
bench-l4: deps-net
	$(CARGO) build --release -p istiod-lite -p meshctl -p ztunnel -p trellis-benches
	bash benches/l4/run.sh

clean:
	$(CARGO) clean
	rm -rf demo-state
