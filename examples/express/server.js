// An express server run by ca-supervisor as a custom runtime (FC's protocol).
//
// The supervisor starts one of these per worker with its port in
// FC_SERVER_PORT (and PORT), waits for GET /healthz, then sends it:
//   POST /invoke       event invocations (the body is the event)
//   POST /initialize   once per worker, before any invocation (hooks = ["initialize"])
//   GET  /pre-stop     before the worker is stopped (hooks = ["pre-stop"])
//   anything else      HTTP-trigger requests, passed as the client sent them
'use strict';

const crypto = require('node:crypto');
const express = require('express');

const app = express();
const port = Number(process.env.FC_SERVER_PORT || process.env.PORT || 9000);
const greeting = process.env.GREETING || 'hello';
let initializedAt = null;
let invocations = 0;

app.disable('x-powered-by');

app.get('/healthz', (req, res) => res.type('text/plain').send('ok'));

app.post('/initialize', (req, res) => {
  initializedAt = new Date().toISOString();
  console.log(`initialized (request ${req.get('x-fc-request-id')})`);
  res.status(200).end();
});

app.get(['/pre-freeze', '/pre-stop'], (req, res) => {
  console.log(`${req.path.slice(1)} hook (request ${req.get('x-fc-request-id')})`);
  res.status(200).end();
});

// The event function. Report a failure the FC way: status 404, x-fc-status:
// 404 and a JSON body with errorType and errorMessage.
app.post('/invoke', express.raw({ type: () => true, limit: '6mb' }), (req, res) => {
  invocations += 1;
  const requestId = req.get('x-fc-request-id');
  const text = req.body.length ? req.body.toString('utf8') : '';
  console.log(`invoke ${invocations}: ${req.body.length} bytes`);
  if (text.trim() === 'fail') {
    res.status(404).set('x-fc-status', '404').json({
      errorType: 'Error',
      errorMessage: 'the event asked to fail',
      stackTrace: new Error('the event asked to fail').stack.split('\n'),
    });
    return;
  }
  let event;
  try {
    event = text ? JSON.parse(text) : {};
  } catch {
    event = text;
  }
  const name = (event && typeof event === 'object' && event.name) || 'world';
  res.set('x-fc-status', '200').json({ [greeting]: name, event, requestId, initializedAt });
});

// ---- HTTP-trigger routes ----

app.get('/hello', (req, res) => {
  res.type('text/plain').send(`${greeting}, ${req.query.name || 'world'}!\n`);
});

// Written in pieces, with pauses: the client sees each piece as it is written.
app.get('/stream', (req, res) => {
  const count = Math.min(Number(req.query.n || 5), 1000);
  const delay = Math.min(Number(req.query.delay || 50), 10000);
  res.type('text/plain');
  res.flushHeaders();
  let index = 0;
  const next = () => {
    if (index >= count) {
      res.end();
      return;
    }
    res.write(`chunk ${index}\n`);
    index += 1;
    setTimeout(next, delay);
  };
  req.on('close', () => { index = count; });
  next();
});

// Everything else: what the client sent, with the body's size and hash
// (streamed through the hash, never held whole).
app.all('*', (req, res) => {
  const hash = crypto.createHash('sha256');
  let size = 0;
  let head = Buffer.alloc(0);
  req.on('data', (chunk) => {
    hash.update(chunk);
    size += chunk.length;
    if (head.length < 256) head = Buffer.concat([head, chunk.subarray(0, 256 - head.length)]);
  });
  req.on('end', () => {
    res.json({
      method: req.method,
      path: req.path,
      query: req.query,
      headers: req.rawHeaders,
      body_bytes: size,
      body_sha256: hash.digest('hex'),
      body: head.toString('utf8'),
    });
  });
});

const server = app.listen(port, '0.0.0.0', () => {
  console.log(`express listening on port ${port}`);
});

// SIGTERM (the worker is stopping): finish what is in flight, then exit.
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
