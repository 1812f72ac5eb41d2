#!/usr/bin/env bash
# make bench-l4: raw TCP over a veth/bridge/underlay path versus the same path through two
# Trellis ztunnels (client pod -> ztunnel node1 -> HBONE -> ztunnel node2 -> server pod), measured
# side by side in one run, as the median of ROUNDS interleaved rounds (a round during which other
# guests took more than STEAL_MAX% of the CPU is discarded and re-run). Prints ratios; the last line is
#   throughput_ratio=<x> rps_ratio=<x> p99_us=<n> rss_idle_mb=<n> ebpf_vs_nftables_rps=<x>
# The main figures use eBPF capture (ztunnel's default); the same ztunnels are then restarted with
# --capture nftables for one more wrk run, to compare the two capture modes.
set -euo pipefail

BIN=${BIN:-target/release}
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
P=bl4$$
WORK=$(mktemp -d)
U=${P}u
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P" || true); do ip netns del "$ns"; done
  umount "$WORK/bpf" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for t in iperf3 wrk nft curl; do command -v $t >/dev/null || { echo "bench-l4 needs $t (make deps-net installs it)"; exit 1; }; done
[ "$(id -u)" = 0 ] || { echo "bench-l4 needs root (network namespaces)"; exit 1; }

bg() { # bg NETNS LOGNAME CMD...: start in a netns, remember the pid
  local ns=$1 log=$2; shift 2
  ip netns exec "$ns" "$@" >"$WORK/$log.log" 2>&1 &
  pids+=($!)
}
wait_ok() { # wait_ok WHAT CMD...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what"; cat "$WORK"/*.log; exit 1
}

# --- topology: underlay netns with istiod-lite, two nodes, pods on each node's bridge --------
ip netns add $U; ip -n $U link set lo up
# Bridges get fixed MACs: one left to itself follows its lowest port's MAC (see trellis-cni).
ip -n $U link add br0 address 0a:58:ac:1e:00:01 type bridge; ip -n $U addr add 172.30.0.1/24 dev br0; ip -n $U link set br0 up
for i in 1 2; do
  N=${P}n$i; ip netns add $N
  ip -n $U link add n$i type veth peer name eth0 netns $N; ip -n $U link set n$i master br0 up
  ip -n $N link set lo up; ip -n $N addr add 172.30.0.1$i/24 dev eth0; ip -n $N link set eth0 up
  ip -n $N link add cni0 address 0a:58:0a:f4:0$i:01 type bridge; ip -n $N addr add 10.244.$i.1/24 dev cni0; ip -n $N link set cni0 up
  ip netns exec $N sysctl -qw net.ipv4.ip_forward=1
done
ip -n ${P}n1 route add 10.244.2.0/24 via 172.30.0.12
ip -n ${P}n2 route add 10.244.1.0/24 via 172.30.0.11

pod() { # pod NODE HOST NAME
  local node=$1 host=$2 ns=${P}$3 n=${P}n$1
  ip netns add $ns
  ip -n $n link add v$host type veth peer name eth0 netns $ns; ip -n $n link set v$host master cni0 up
  ip -n $ns link set lo up; ip -n $ns addr add 10.244.$node.$host/24 dev eth0; ip -n $ns link set eth0 up
  ip -n $ns route add default via 10.244.$node.1
}
pod 1 10 rawc; pod 2 10 raws; pod 1 20 meshc; pod 2 20 meshs

bg $U istiod "$BIN/istiod-lite" --state-dir "$WORK/istiod" --api-addr 172.30.0.1:15014 \
  --xds-addr 172.30.0.1:15010 --secure-addr 172.30.0.1:15012
wait_ok istiod-lite ip netns exec $U curl -sf http://172.30.0.1:15014/ready
mctl() { ip netns exec $U "$BIN/meshctl" --server http://172.30.0.1:15014 "$@"; }
mctl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: raw}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
{apiVersion: v1, kind: Pod, metadata: {name: client, namespace: raw}, spec: {nodeName: node1, serviceAccountName: client}, status: {podIP: 10.244.1.10, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: server, namespace: raw}, spec: {nodeName: node2, serviceAccountName: server}, status: {podIP: 10.244.2.10, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: client, namespace: mesh}, spec: {nodeName: node1, serviceAccountName: client}, status: {podIP: 10.244.1.20, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: server, namespace: mesh}, spec: {nodeName: node2, serviceAccountName: server}, status: {podIP: 10.244.2.20, phase: Running}}
YAML

enroll() { # enroll NODE POD NETNS
  python3 - "$WORK/agent$1.sock" "$2" "/var/run/netns/$3" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((json.dumps({"op": "add", "namespace": "mesh", "name": sys.argv[2], "netns": sys.argv[3]}) + "\n").encode())
r = json.loads(s.makefile().readline())
sys.exit(0 if r.get("ok") else "enroll failed: %s" % r)
PY
}
# Pins live on a bpffs in the host's mount namespace (`ip netns exec` hides /sys/fs/bpf).
mkdir -p "$WORK/bpf"; mount -t bpf bpf "$WORK/bpf"
for i in 1 2; do mctl create token node node$i > "$WORK/token$i"; done
ztpids=()
start_ztunnels() { # start_ztunnels CAPTURE
  ztpids=()
  for i in 1 2; do
    bg ${P}n$i ztunnel$i-$1 "$BIN/ztunnel" --node-name node$i --node-ip 172.30.0.1$i --overlay none \
      --xds-address https://172.30.0.1:15012 --root-cert "$WORK/istiod/ca/root-cert.pem" \
      --token-file "$WORK/token$i" --agent-socket "$WORK/agent$i.sock" --worker-threads "${ZTUNNEL_THREADS:-1}" \
      --capture "$1" --bpf-pin-dir "$WORK/bpf/n$i"
    ztpids+=($!)
    wait_ok "ztunnel$i" ip netns exec ${P}n$i curl -sf http://127.0.0.1:15021/healthz/ready
  done
  enroll 1 client ${P}meshc
  enroll 2 server ${P}meshs
}
stop_ztunnels() { # and release the eBPF capture they pinned
  for pid in "${ztpids[@]}"; do kill "$pid"; done
  for pid in "${ztpids[@]}"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; done
  rm -f "$WORK"/bpf/n*/links/*
}
start_ztunnels ebpf

rss_mb() { # total RSS of both ztunnels, in MB (max of the two is what a node pays)
  local m=0
  for pid in "${ztpids[@]}"; do
    local kb; kb=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
    [ "$kb" -gt "$m" ] && m=$kb
  done
  echo $((m / 1024))
}

# --- servers --------------------------------------------------------------------------------
for s in raws meshs; do
  bg ${P}$s iperf-$s iperf3 -s
  bg ${P}$s http-$s "$BIN/bench-http-server" 0.0.0.0:8080
done
wait_ok "http raw" ip netns exec ${P}raws curl -sf http://127.0.0.1:8080/
wait_ok "http mesh" ip netns exec ${P}meshs curl -sf http://127.0.0.1:8080/
wait_ok "mesh path" ip netns exec ${P}meshc curl -sf --max-time 2 http://10.244.2.20:8080/
sleep 1
RSS_IDLE=$(rss_mb)

iperf() { # iperf CLIENTNS SERVERIP -> Gbit/s
  ip netns exec ${P}$1 iperf3 -c $2 -t "$DURATION" -J | python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))'
}
to_us() { # wrk latency like 61.00us / 1.20ms / 2.00s -> microseconds
  python3 -c 'import sys,re; v,u=re.match(r"([\d.]+)(us|ms|s)$",sys.argv[1]).groups(); print(int(float(v)*{"us":1,"ms":1e3,"s":1e6}[u]))' "$1"
}
WRK_OUT=""
wrk_run() { # wrk_run CLIENTNS SERVERIP [CONNECTIONS] -> sets RPS P50 P99
  WRK_OUT=$(ip netns exec ${P}$1 wrk -t1 -c"${3:-4}" -d"${DURATION}s" --latency http://$2:8080/)
  RPS=$(awk '/Requests\/sec/ {print $2}' <<<"$WRK_OUT")
  P50=$(to_us "$(awk '$1=="50%" {print $2}' <<<"$WRK_OUT")")
  P99=$(to_us "$(awk '$1=="99%" {print $2}' <<<"$WRK_OUT")")
}

steal_pct() { # steal_pct BEFORE AFTER (two `head -1 /proc/stat` lines) -> % of CPU time the host took
  python3 -c 'import sys; a=list(map(int,sys.argv[1].split()[1:])); b=list(map(int,sys.argv[2].split()[1:])); d=[y-x for x,y in zip(a,b)]; print("%.1f" % (100*d[7]/max(1,sum(d[:8]))))' "$1" "$2"
}
median() { python3 -c 'import statistics,sys; print(statistics.median(map(float,sys.argv[1:])))' "$@"; }

# Rounds interleave raw and Trellis so that both see the same machine: on a shared 2-vCPU VM one
# 10 s run can differ from the next by 30% (host steal, where the scheduler puts four busy
# processes). Each figure is the median over the rounds; every round is printed.
R_RAW_GBPS=(); R_MESH_GBPS=(); R_RAW_RPS=(); R_MESH_RPS=(); R_RAW_P50=(); R_MESH_P50=(); R_RAW_P99=(); R_MESH_P99=()
# On a VM, how an idle vCPU waits decides what every sleep/wake-up costs, and a proxied request
# has three times as many as a direct one: print it so runs on different hosts can be compared.
halt_poll=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a)
echo "== host: $(nproc) CPUs, cpuidle $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo n/a)," \
  "guest_halt_poll_ns=${halt_poll} (0: an idle vCPU halts at once and each wake-up exits to the hypervisor)"
echo "== ${ROUNDS} rounds of: iperf3 single stream, then wrk with 4 keep-alive connections; ${DURATION}s each"
# A round during which the host took more than STEAL_MAX% of the CPU (other guests) measures the
# neighbours, not Trellis: it is printed, discarded and run again, up to MAX_ATTEMPTS rounds in all.
# The rule looks only at steal, never at the figures, so it cannot favour either side.
STEAL_MAX=${STEAL_MAX:-10}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-$((ROUNDS * 3))}
round=0; attempt=0; discarded=0
while [ "$round" -lt "$ROUNDS" ] && [ "$attempt" -lt "$MAX_ATTEMPTS" ]; do
  attempt=$((attempt + 1))
  before=$(head -1 /proc/stat)
  raw_gbps=$(iperf rawc 10.244.2.10)
  mesh_gbps=$(iperf meshc 10.244.2.20)
  wrk_run rawc 10.244.2.10; raw_rps=$RPS; raw_p50=$P50; raw_p99=$P99
  [ "$round" = 0 ] && [ ! -s "$WORK/rss_load" ] && { ( sleep $((DURATION / 2)); rss_mb > "$WORK/rss_load" ) & sampler=$!; }
  wrk_run meshc 10.244.2.20
  [ -n "${sampler:-}" ] && { wait "$sampler"; sampler=; }
  steal=$(steal_pct "$before" "$(head -1 /proc/stat)")
  line="iperf raw ${raw_gbps} / trellis ${mesh_gbps} Gbit/s; wrk raw ${raw_rps} req/s p50 ${raw_p50}us p99 ${raw_p99}us /"
  line="$line trellis ${RPS} req/s p50 ${P50}us p99 ${P99}us (host steal ${steal}%)"
  if python3 -c "import sys; sys.exit(0 if float('$steal') > $STEAL_MAX else 1)" && \
     [ $((MAX_ATTEMPTS - attempt)) -ge $((ROUNDS - round)) ]; then
    discarded=$((discarded + 1))
    echo "discarded: $line"
    continue
  fi
  round=$((round + 1))
  R_RAW_GBPS+=("$raw_gbps"); R_MESH_GBPS+=("$mesh_gbps")
  R_RAW_RPS+=("$raw_rps"); R_RAW_P50+=("$raw_p50"); R_RAW_P99+=("$raw_p99")
  R_MESH_RPS+=("$RPS"); R_MESH_P50+=("$P50"); R_MESH_P99+=("$P99")
  echo "round $round: $line"
done
echo "== ${discarded} round(s) discarded for host steal above ${STEAL_MAX}%"
RAW_GBPS=$(median "${R_RAW_GBPS[@]}"); MESH_GBPS=$(median "${R_MESH_GBPS[@]}")
RAW_RPS=$(median "${R_RAW_RPS[@]}"); MESH_RPS=$(median "${R_MESH_RPS[@]}")
RAW_P50=$(median "${R_RAW_P50[@]}"); MESH_P50=$(median "${R_MESH_P50[@]}")
RAW_P99=$(median "${R_RAW_P99[@]}"); MESH_P99=$(median "${R_MESH_P99[@]}")
MESH_P99=${MESH_P99%.*}
RSS_LOAD=$(cat "$WORK/rss_load")
echo "== medians over ${ROUNDS} rounds"
echo "iperf3   raw ${RAW_GBPS} Gbit/s   trellis ${MESH_GBPS} Gbit/s"
echo "wrk      raw ${RAW_RPS} req/s p50 ${RAW_P50}us p99 ${RAW_P99}us   trellis ${MESH_RPS} req/s p50 ${MESH_P50}us p99 ${MESH_P99}us"
echo "== ztunnel RSS (largest of the two): idle ${RSS_IDLE} MB, under load ${RSS_LOAD} MB"

# SWEEP=1: rps ratio by wrk connection count, one run each, for context only. At 4 connections
# wrk and the server each keep one vCPU busy and never sleep, the raw path's best case; a proxied
# request crosses four processes on two vCPUs, and each hop can wait for a halted vCPU to wake.
if [ "${SWEEP:-0}" = 1 ]; then
  echo "== rps by connection count (one run each)"
  for c in 1 2 4 8 16; do
    wrk_run rawc 10.244.2.10 "$c"; raw_rps=$RPS; raw_p50=$P50
    wrk_run meshc 10.244.2.20 "$c"
    echo "c=$c raw ${raw_rps} req/s p50 ${raw_p50}us / trellis ${RPS} req/s p50 ${P50}us: ratio $(python3 -c "print('%.2f' % ($RPS / $raw_rps))")"
  done
fi

echo "== capture modes: the same wrk run with --capture nftables"
stop_ztunnels
start_ztunnels nftables
wait_ok "mesh path (nftables)" ip netns exec ${P}meshc curl -sf --max-time 2 http://10.244.2.20:8080/
wrk_run meshc 10.244.2.20; NFT_RPS=$RPS; NFT_P99=$P99
echo "ebpf      ${MESH_RPS} req/s  p99 ${MESH_P99}us (median of ${ROUNDS})"
echo "nftables  ${NFT_RPS} req/s  p99 ${NFT_P99}us (one run)"
CAPTURE_RATIO=$(python3 -c "print('%.2f' % ($MESH_RPS / $NFT_RPS))")

TPUT_RATIO=$(python3 -c "print('%.2f' % ($MESH_GBPS / $RAW_GBPS))")
RPS_RATIO=$(python3 -c "print('%.2f' % ($MESH_RPS / $RAW_RPS))")
echo "targets: throughput >= 0.45, rps >= 0.25, p99 <= 600us, idle RSS <= 15 MB"
echo "throughput_ratio=${TPUT_RATIO} rps_ratio=${RPS_RATIO} p99_us=${MESH_P99} rss_idle_mb=${RSS_IDLE} ebpf_vs_nftables_rps=${CAPTURE_RATIO}"
