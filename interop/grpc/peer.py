"""A grpcio peer for Trellis's proxyless gRPC interop tests.

`server NAME ADDR` serves `/trellis.interop.Echo/Call` through xDS (`grpc.server(xds=True)`) and
answers every call with NAME (after MS milliseconds when the request is `sleep:MS`). `client`
reads commands from stdin, one per line, and prints one JSON line per command:

    call TARGET N [DEADLINE_S [REQUEST]]   N unary calls through xDS credentials (TARGET is
                                           usually xds:///host:port); request `ping` by default
    plain ADDR N [DEADLINE_S [REQUEST]]    N calls over a plaintext channel that bypasses xDS

Messages are raw bytes, so no generated stubs are needed. The bootstrap comes from
GRPC_XDS_BOOTSTRAP, as for any grpcio application.
"""
import json
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import grpc.experimental

METHOD = "/trellis.interop.Echo/Call"


def serve(name, addr):
    def call(request, context):
        if request.startswith(b"sleep:"):
            time.sleep(int(request[6:]) / 1000)
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "trellis.interop.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), xds=True)
    server.add_generic_rpc_handlers((handler,))
    server.add_secure_port(addr, grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    server.start()
    print(json.dumps({"listening": addr, "name": name}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1)


def run_calls(channel, n, timeout, request):
    stub = channel.unary_unary(METHOD)
    ok, errors, details = {}, {}, []
    for _ in range(n):
        try:
            reply = stub(request, timeout=timeout).decode()
            ok[reply] = ok.get(reply, 0) + 1
        except grpc.RpcError as e:
            code = e.code().name
            errors[code] = errors.get(code, 0) + 1
            if len(details) < 3:
                details.append(f"{code}: {e.details()}")
    return {"ok": ok, "errors": errors, "details": details}


def client():
    channels = {}
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd, target, n = parts[0], parts[1], int(parts[2])
        timeout = float(parts[3]) if len(parts) > 3 else 5.0
        request = parts[4].encode() if len(parts) > 4 else b"ping"
        if cmd == "call":
            if target not in channels:
                creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
                channels[target] = grpc.secure_channel(target, creds)
            result = run_calls(channels[target], n, timeout, request)
        elif cmd == "plain":
            with grpc.insecure_channel(target) as ch:
                result = run_calls(ch, n, timeout, request)
        else:
            result = {"error": f"unknown command {cmd}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2], sys.argv[3])
    else:
        client()
