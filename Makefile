# Trellis. `make demo` and `make test` install what they need (idempotently) and run.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps deps-net deps-interop build test demo bench-xds bench-l4 bench-grpc-xds clean

# System prerequisites, as `path:debian-package`: a bare name is a command looked up in PATH.
# The Rust toolchain is the machine's; protos compile with protox (pure Rust), so no protoc is
# needed; ztunnel's eBPF programs are C, compiled by clang against libbpf's headers.
DEPS := curl:curl cc:gcc python3:python3 clang:clang /usr/include/bpf/bpf_helpers.h:libbpf-dev
# Networking tools for the end-to-end tests and bench-l4 (network namespaces need root), and
# Debian's CNI plugins, chained after trellis-cni in the tests.
DEPS_NET := nft:nftables tcpdump:tcpdump iperf3:iperf3 wrk:wrk ip:iproute2 iptables:iptables \
	/usr/lib/cni/portmap:containernetworking-plugins

define install_missing
	@command -v $(CARGO) >/dev/null || { echo "cargo is required (Rust 1.89+): https://rustup.rs"; exit 1; }
	@missing=""; \
	for p in $(1); do f=$${p%%:*}; \
		if [[ $$f == /* ]]; then [ -e $$f ] || missing="$$missing $${p##*:}"; \
		else command -v $$f >/dev/null || missing="$$missing $${p##*:}"; fi; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; install them (apt-get install$$missing) or run as root"; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps:
	$(call install_missing,$(DEPS))

deps-net: deps
	$(call install_missing,$(DEPS_NET))

# The real gRPC libraries the interop tests drive: grpcio from PyPI, grpc-js-xds from npm (pinned
# in interop/grpc; never vendored). Both installs are no-ops when already satisfied.
deps-interop: deps
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "missing: nodejs npm; install them or run as root"; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@python3 -m pip --version >/dev/null 2>&1 || { \
		[ "$$(id -u)" = 0 ] || { echo "missing: python3-pip; install it or run as root"; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; }
	@python3 -c 'import grpc, sys; sys.exit(grpc.__version__ != "1.85.1")' 2>/dev/null || \
		python3 -m pip install -q --disable-pip-version-check -r interop/grpc/requirements.txt || \
		python3 -m pip install -q --disable-pip-version-check --break-system-packages -r interop/grpc/requirements.txt
	@[ -d interop/grpc/node_modules/@grpc/grpc-js-xds ] || \
		npm --prefix interop/grpc ci --no-audit --no-fund --loglevel=error

build: deps
	$(CARGO) build --workspace

test: deps-net deps-interop
	$(CARGO) test --workspace

# The lab needs root (network namespaces, veth, VXLAN, eBPF): say so before a long build.
demo:
	@[ "$$(id -u)" = 0 ] || { echo "make demo needs root: the lab creates network namespaces, veth and VXLAN links and loads eBPF programs (run: sudo make demo)"; exit 1; }
	@$(MAKE) --no-print-directory deps-net
	$(CARGO) build --release -p istiod-lite -p ztunnel -p trellis-cni -p trellis-echo -p meshctl
	bash scripts/demo.sh

# Last line: snapshot_s=<x> change_p99_ms=<x> rss_mb=<x>
bench-xds: deps
	$(CARGO) build --release -p istiod-lite -p trellis-benches
	target/release/xds-scale target/release/istiod-lite

# Last line: change_to_all_ms=<x> cpu_s=<x> rss_mb=<x>
bench-grpc-xds: deps
	$(CARGO) build --release -p istiod-lite -p trellis-benches
	target/release/grpc-xds-scale target/release/istiod-lite

# Last line: throughput_ratio=<x> rps_ratio=<x> p99_us=<n> rss_idle_mb=<n>
bench-l4: deps-net
	$(CARGO) build --release -p istiod-lite -p meshctl -p ztunnel -p trellis-benches
	bash benches/l4/run.sh

clean:
	$(CARGO) clean
	rm -rf demo-state
