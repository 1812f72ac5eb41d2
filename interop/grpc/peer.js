// A @grpc/grpc-js-xds peer for Trellis's proxyless gRPC interop tests; the same commands and
// output as peer.py, so the tests drive both languages alike.
//
//   node peer.js server NAME ADDR   serve /trellis.interop.Echo/Call through xDS, answering NAME
//                                   (after MS milliseconds when the request is `sleep:MS`)
//   node peer.js client             read `call TARGET N [DEADLINE_S [REQUEST]]` /
//                                   `plain ADDR N [DEADLINE_S [REQUEST]]` lines, print JSON lines
'use strict';
const grpc = require('@grpc/grpc-js');
const xds = require('@grpc/grpc-js-xds');
const readline = require('readline');

xds.register();

const identity = (b) => b;
const service = {
  Call: {
    path: '/trellis.interop.Echo/Call',
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  },
};
const EchoClient = grpc.makeGenericClientConstructor(service, 'Echo');

function serve(name, addr) {
  const server = new xds.XdsServer();
  const answer = (call, cb) => {
    const req = call.request.toString();
    const ms = req.startsWith('sleep:') ? Number(req.slice(6)) : 0;
    setTimeout(() => cb(null, Buffer.from(name)), ms);
  };
  server.addService(service, { Call: answer });
  const creds = new xds.XdsServerCredentials(grpc.ServerCredentials.createInsecure());
  server.bindAsync(addr, creds, (err) => {
    if (err) {
      console.error(`bind ${addr}: ${err.message}`);
      process.exit(1);
    }
    console.log(JSON.stringify({ listening: addr, name }));
  });
  process.on('SIGTERM', () => server.tryShutdown(() => process.exit(0)));
}

function callOnce(client, timeoutS, request) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + timeoutS * 1000);
    client.Call(Buffer.from(request), { deadline }, (err, reply) => resolve({ err, reply }));
  });
}

async function runCalls(client, n, timeoutS, request) {
  const ok = {};
  const errors = {};
  const details = [];
  for (let i = 0; i < n; i++) {
    const { err, reply } = await callOnce(client, timeoutS, request);
    if (err) {
      const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
      errors[code] = (errors[code] || 0) + 1;
      if (details.length < 3) details.push(`${code}: ${err.details}`);
    } else {
      const name = reply.toString();
      ok[name] = (ok[name] || 0) + 1;
    }
  }
  return { ok, errors, details };
}

async function client() {
  const clients = new Map();
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const parts = line.trim().split(/\s+/);
    if (parts.length < 3) continue;
    const [cmd, target, nStr, timeoutStr, request = 'ping'] = parts;
    const n = Number(nStr);
    const timeoutS = timeoutStr ? Number(timeoutStr) : 5;
    let result;
    if (cmd === 'call') {
      if (!clients.has(target)) {
        const creds = new xds.XdsChannelCredentials(grpc.credentials.createInsecure());
        clients.set(target, new EchoClient(target, creds));
      }
      result = await runCalls(clients.get(target), n, timeoutS, request);
    } else if (cmd === 'plain') {
      const c = new EchoClient(target, grpc.credentials.createInsecure());
      result = await runCalls(c, n, timeoutS, request);
      c.close();
    } else {
      result = { error: `unknown command ${cmd}` };
    }
    console.log(JSON.stringify(result));
  }
  for (const c of clients.values()) c.close();
  process.exit(0);
}

if (process.argv[2] === 'server') serve(process.argv[3], process.argv[4]);
else client();
