// A minimal Node.js HTTP server for bench/custom.py: the custom-runtime function
// hit directly and through `supervisor run` (runtime = "custom").
//
// No npm dependencies: node's own `http`. Listens on 127.0.0.1:$FC_SERVER_PORT
// (else $PORT) and answers
//   GET /            200, "hello, world\n" (HTTP-trigger requests)
//   POST /invoke     200, a small JSON body saying how many bytes the event had
//   POST /initialize, GET|POST /pre-freeze, /pre-stop   200, empty (FC's lifecycle hooks)
//   anything else    404
// SERVER_PROCS=N (N > 1) runs N processes sharing the port (node's cluster
// module; the primary hands out connections round-robin): bench/custom.py's
// "direct xN" baseline. The supervisor starts one process per worker.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.env.FC_SERVER_PORT || process.env.PORT || 9000);
const procs = Math.max(1, Number(process.env.SERVER_PROCS || 1));
const HELLO = Buffer.from('hello, world\n');
const EMPTY = Buffer.alloc(0);

function reply(res, status, type, body) {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': body.length });
  res.end(body);
}

function handle(req, res) {
  const path = req.url.split('?', 1)[0];
  if (req.method === 'GET' && path === '/') {
    req.resume();
    reply(res, 200, 'text/plain', HELLO);
    return;
  }
  if (req.method === 'POST' && path === '/invoke') {
    let size = 0;
    req.on('data', (chunk) => { size += chunk.length; });
    req.on('end', () => reply(res, 200, 'application/json', Buffer.from(`{"ok":true,"bytes":${size}}`)));
    return;
  }
  req.resume();
  if (path === '/initialize' || path === '/pre-freeze' || path === '/pre-stop') {
    reply(res, 200, 'text/plain', EMPTY);
    return;
  }
  reply(res, 404, 'text/plain', Buffer.from('not found\n'));
}

if (procs > 1 && cluster.isPrimary) {
  for (let i = 0; i < procs; i += 1) cluster.fork();
  const stop = () => {
    for (const worker of Object.values(cluster.workers)) worker.kill('SIGTERM');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const server = http.createServer(handle);
  server.keepAliveTimeout = 65_000; // longer than any client's idle time here
  server.listen(port, '127.0.0.1');
  const stop = () => {
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
