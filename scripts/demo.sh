#!/usr/bin/env bash
# Starts istiod-lite with the sample config and shows what it serves. DEMO_KEEP=1 leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
STATE=${DEMO_STATE:-demo-state}
API=127.0.0.1:15014
export TRELLIS_SERVER=http://$API

if curl -sf "http://$API/ready" >/dev/null 2>&1; then
  echo "Something already serves $API (a running istiod-lite?). Stop it, or run: pkill istiod-lite" >&2
  exit 1
fi
rm -rf "$STATE"
"$BIN/istiod-lite" --state-dir "$STATE" --config-dir manifests/sample --api-addr "$API" >"$STATE.log" 2>&1 &
PID=$!
if [ "${DEMO_KEEP:-0}" != 1 ]; then trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT; fi
for _ in $(seq 1 100); do curl -sf "http://$API/ready" >/dev/null && break; sleep 0.1; done
curl -sf "http://$API/ready" >/dev/null || { echo "istiod-lite did not start; see $STATE.log" >&2; cat "$STATE.log" >&2; exit 1; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "istiod-lite is up (pid $PID): config API $API, xDS :15010 (plain) and :15012 (TLS, CA)"
step "meshctl get namespaces";          "$BIN/meshctl" get namespaces
step "meshctl get pods -A";             "$BIN/meshctl" get pods -A
step "meshctl get services -A";         "$BIN/meshctl" get services -A
step "meshctl get authorizationpolicies,peerauthentications";  "$BIN/meshctl" get ap -A; "$BIN/meshctl" get pa -A
step "Invalid config is refused with the field and reason (nothing is written)"
printf 'apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: ["10.0.0.0/33"]}\n' | "$BIN/meshctl" apply -f - || true
step "Workload discovery resources served (GET /debug/xdsz)"
curl -s "http://$API/debug/xdsz" | python3 -c '
import json,sys
for t, items in json.load(sys.stdin).items():
    print(t)
    for i in items: print("   %-45s version %s (%d bytes)" % (i["name"], i["version"], i["bytes"]))'
step "Enrol namespace default live: meshctl label namespace default istio.io/dataplane-mode=ambient"
"$BIN/meshctl" apply -f - <<<'{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"default"}}'
"$BIN/meshctl" label namespace default istio.io/dataplane-mode=ambient
step "A node token for node1's ztunnel (CA and TLS xDS); the CA root is $STATE/ca/root-cert.pem"
"$BIN/meshctl" create token node node1
step "Explore"
cat <<EOT
  TRELLIS_SERVER=$TRELLIS_SERVER $BIN/meshctl get pods -n demo -o yaml
  curl http://$API/metrics        curl http://$API/debug/syncz
  Re-run with DEMO_KEEP=1 to keep istiod-lite running; stop it with: pkill istiod-lite
EOT
