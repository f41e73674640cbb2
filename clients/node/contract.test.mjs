// Cross-language contract test: Node's official gRPC implementation (@grpc/grpc-js),
// loading proto/ directly with @grpc/proto-loader, calls every RPC of the real
// Python server over its Unix socket, plus the standard grpc.health.v1 Check.
//
// AKIDB_EMBED_PYTHON: the interpreter with the server's dependencies (default python3).
// AKIDB_EMBED_REPO: where the server and Python client code live (default: this repository).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = dirname(fileURLToPath(import.meta.url));
const repo = process.env.AKIDB_EMBED_REPO ?? resolve(here, '../..');
const python = process.env.AKIDB_EMBED_PYTHON ?? 'python3';
const OPENBLAS = '/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3';
const SERVICE = 'akidb.embedding.v1.EmbeddingService';

// Field names as the proto spells them; enums by name; 64-bit ints as strings.
const LOAD = { keepCase: true, enums: String, longs: String, defaults: true, oneofs: true };
const embedding = grpc.loadPackageDefinition(
  protoLoader.loadSync('akidb/embedding/v1/embedding_service.proto', {
    ...LOAD,
    includeDirs: [join(repo, 'proto')],
  }),
).akidb.embedding.v1;
const healthV1 = grpc.loadPackageDefinition(
  protoLoader.loadSync(join(here, 'node_modules/grpc-health-check/proto/health/v1/health.proto'), LOAD),
).grpc.health.v1;

function pythonEnv() {
  const env = {
    ...process.env,
    PYTHONPATH: `${join(repo, 'server')}:${join(repo, 'clients/python')}`,
  };
  if (!env.LD_PRELOAD && existsSync(OPENBLAS)) env.LD_PRELOAD = OPENBLAS; // MLX CPU matmuls ~50x faster
  return env;
}

// Runs the server's CLI; it SIGTERMs itself when our end of its stdin closes.
const BOOTSTRAP = `
import os, runpy, signal, sys, threading
def _watch_parent():
    while os.read(0, 4096):  # raw fd: a buffered stdin would block interpreter exit
        pass
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=_watch_parent, daemon=True).start()
sys.argv = ["akidb_embed"] + sys.argv[1:]
runpy.run_module("akidb_embed", run_name="__main__", alter_sys=True)
`;

let dir;
let socket;
let server;
let serverLog = '';
let client;
let health;

function unary(stub, method, request, deadlineMs = 60_000) {
  return new Promise((resolve, reject) => {
    stub[method](request, { deadline: Date.now() + deadlineMs }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

/** Sends every request, half-closes, and collects every response until the status. */
function bidi(stub, method, requests, deadlineMs = 120_000) {
  return new Promise((resolve, reject) => {
    const call = stub[method]({ deadline: Date.now() + deadlineMs });
    const responses = [];
    call.on('data', (r) => responses.push(r));
    call.on('error', reject);
    call.on('end', () => resolve(responses));
    for (const r of requests) call.write(r);
    call.end();
  });
}

/** The rows of a packed EmbeddingBatch: `rows` little-endian float32 vectors of `dimensions`. */
function rowsOf(batch, rows) {
  assert.ok(Buffer.isBuffer(batch.vectors));
  assert.equal(batch.vectors.length, rows * batch.dimensions * 4, 'packed float32: 4 bytes per value');
  assert.equal(batch.token_counts.length, rows);
  assert.equal(batch.truncated.length, rows);
  return Array.from({ length: rows }, (_, r) => {
    const v = new Float32Array(batch.dimensions);
    for (let i = 0; i < batch.dimensions; i++) v[i] = batch.vectors.readFloatLE((r * batch.dimensions + i) * 4);
    return v;
  });
}

const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
const dot = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0);

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'akidb-embed-node-'));
  socket = join(dir, 'embed.sock');
  server = spawn(python, ['-c', BOOTSTRAP, 'serve', '--socket', socket], {
    env: pythonEnv(),
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const keep = (chunk) => {
    serverLog = (serverLog + chunk).slice(-8000);
  };
  server.stdout.on('data', keep);
  server.stderr.on('data', keep);
  client = new embedding.EmbeddingService(`unix:${socket}`, grpc.credentials.createInsecure());
  health = new healthV1.Health(`unix:${socket}`, grpc.credentials.createInsecure());
  // Up when the socket accepts and the server reports SERVING (models loaded, warm).
  const deadline = Date.now() + 180_000;
  for (;;) {
    if (server.exitCode !== null || server.signalCode !== null) {
      throw new Error(`server exited (${server.exitCode ?? server.signalCode}):\n${serverLog}`);
    }
    try {
      const h = await unary(client, 'Health', {}, 2_000);
      if (h.status === 'SERVING_STATUS_SERVING') break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`server not SERVING after 180 s:\n${serverLog}`);
    await new Promise((r) => setTimeout(r, 200));
  }
});

after(async () => {
  client?.close();
  health?.close();
  if (server && server.exitCode === null && server.signalCode === null) {
    const exited = new Promise((r) => server.once('exit', r));
    server.stdin.end();
    const timer = setTimeout(() => server.kill('SIGKILL'), 20_000);
    await exited;
    clearTimeout(timer);
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('Embed returns unit vectors, token counts and the space, equal to the Python client', async () => {
  const texts = ['The quick brown fox jumps over the lazy dog.', 'AkiDB stores vectors.', 'Ünïcödé — 🚀'];
  const r = await unary(client, 'Embed', { texts });
  assert.ok(r.model.length > 0);
  assert.match(r.space.fingerprint, /^\S+$/);
  assert.ok(r.space.normalized);
  assert.equal(r.embeddings.dimensions, r.space.dimensions);
  const vectors = rowsOf(r.embeddings, texts.length);
  let tokens = 0;
  for (const [i, count] of r.embeddings.token_counts.entries()) {
    assert.ok(count > 2, `text ${i} has ${count} tokens`);
    assert.ok(Math.abs(norm(vectors[i]) - 1) < 1e-5);
    assert.equal(r.embeddings.truncated[i], false);
    tokens += count;
  }
  assert.equal(Number(r.total_tokens), tokens);
  assert.ok(dot(vectors[0], vectors[1]) < 0.9, 'different texts, different vectors');

  // The same texts through the Python client: the same numbers.
  const py = spawnSync(
    python,
    [
      '-c',
      `import json, sys
from akidb_embed_client import EmbedClient
with EmbedClient(sys.argv[1], timeout=120) as c:
    r = c.embed(json.loads(sys.stdin.read()))
print(json.dumps({"fingerprint": r.space.fingerprint, "vectors": r.vectors.astype(float).tolist()}))`,
      `unix:${socket}`,
    ],
    { env: pythonEnv(), input: JSON.stringify(texts), encoding: 'utf8' },
  );
  assert.equal(py.status, 0, py.stderr);
  const reference = JSON.parse(py.stdout);
  assert.equal(reference.fingerprint, r.space.fingerprint);
  let maxAbs = 0;
  for (const [i, v] of vectors.entries()) {
    v.forEach((x, j) => (maxAbs = Math.max(maxAbs, Math.abs(x - reference.vectors[i][j]))));
  }
  console.log(`node vs python client: max abs diff ${maxAbs}`);
  assert.ok(maxAbs <= 1e-6, `max abs diff ${maxAbs}`);
});

test('Embed with an unknown model is NOT_FOUND with a message naming it', async () => {
  await assert.rejects(unary(client, 'Embed', { model: 'no-such-model-xyz', texts: ['x'] }), (err) => {
    assert.equal(err.code, grpc.status.NOT_FOUND);
    assert.match(err.details, /no-such-model-xyz/);
    return true;
  });
});

test('Embed with an empty text is INVALID_ARGUMENT', async () => {
  await assert.rejects(unary(client, 'Embed', { texts: ['ok', ''] }), (err) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    return true;
  });
});

test('EmbedStream answers one message per item in order; a bad item gets its own error', async () => {
  const n = 200;
  const requests = Array.from({ length: n }, (_, i) => ({
    ids: [`item-${i}`],
    texts: [i === 57 ? '' : `document ${i}`],
  }));
  const responses = await bidi(client, 'EmbedStream', requests);
  assert.equal(responses.length, n, 'exactly one response per request message');
  assert.deepEqual(
    responses.map((r) => r.ids),
    requests.map((r) => r.ids),
  );
  let space = null;
  for (const [i, r] of responses.entries()) {
    if (r.space) space = r.space; // sent when it changes: keep the last one
    if (i === 57) {
      assert.equal(r.errors.length, 1);
      assert.equal(r.errors[0].index, 0);
      assert.equal(r.errors[0].code, grpc.status.INVALID_ARGUMENT);
      assert.ok(r.errors[0].message.length > 0);
      assert.equal(r.embeddings.vectors.length, 0, 'no row for a failed item');
    } else {
      assert.deepEqual(r.errors, [], `item ${i}: ${JSON.stringify(r.errors)}`);
      const [v] = rowsOf(r.embeddings, 1);
      assert.ok(Math.abs(norm(v) - 1) < 1e-5);
      assert.ok(space && space.fingerprint.length > 0, `item ${i} has a space`);
      assert.equal(v.length, space.dimensions);
    }
  }
  // The space comes once, then only if it changes: here it never does.
  assert.equal(responses.filter((r) => r.space).length, 1);
});

test('EmbedStream messages of many items: one response each, rows for the items without errors', async () => {
  const sizes = [1, 37, 256, 5];
  let next = 0;
  const requests = sizes.map((size) => {
    const ids = [];
    const texts = [];
    for (let i = 0; i < size; i++, next++) {
      ids.push(`m-${next}`);
      texts.push(next % 50 === 7 ? '' : `passage number ${next} about vectors`);
    }
    return { ids, texts };
  });
  const responses = await bidi(client, 'EmbedStream', requests);
  assert.equal(responses.length, requests.length);
  const unary1 = await unary(client, 'Embed', { texts: [requests[2].texts[3]] });
  const reference = rowsOf(unary1.embeddings, 1)[0];
  for (const [m, r] of responses.entries()) {
    assert.deepEqual(r.ids, requests[m].ids);
    const bad = requests[m].texts.flatMap((t, i) => (t === '' ? [i] : []));
    assert.deepEqual(
      r.errors.map((e) => e.index),
      bad,
    );
    for (const e of r.errors) assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
    const rows = rowsOf(r.embeddings, r.ids.length - bad.length);
    for (const v of rows) assert.ok(Math.abs(norm(v) - 1) < 1e-5);
    if (m === 2) {
      // Item 3 of the 256 (no failed item before it in this message): row 3, the unary vector.
      assert.ok(!bad.some((i) => i < 3));
      const maxAbs = rows[3].reduce((w, x, j) => Math.max(w, Math.abs(x - reference[j])), 0);
      assert.ok(maxAbs < 1e-4, `streamed vs unary max abs diff ${maxAbs}`);
    }
  }
  assert.ok(responses[0].space, 'the first response with vectors carries the space');
});

test('ListModels shows the default model loaded, and Embed gives its native dimension', async () => {
  const { models } = await unary(client, 'ListModels', {});
  const def = models.find((m) => m.is_default);
  assert.ok(def, 'a default model');
  assert.equal(def.state, 'MODEL_STATE_LOADED');
  assert.ok(def.dimensions > 0 && def.max_tokens > 0);
  const r = await unary(client, 'Embed', { model: def.name, texts: ['x'] });
  assert.equal(r.model, def.name);
  assert.equal(r.embeddings.dimensions, def.dimensions);
  assert.equal(rowsOf(r.embeddings, 1)[0].length, def.dimensions);
});

test('Health reports SERVING with a version and the loaded model', async () => {
  const h = await unary(client, 'Health', {});
  assert.equal(h.status, 'SERVING_STATUS_SERVING');
  assert.ok(h.version.length > 0);
  assert.ok(h.uptime_seconds > 0);
  assert.ok(h.models.length > 0);
  assert.ok(h.backend.length > 0);
  assert.ok(h.limits.max_texts_per_request > 0);
  assert.ok(h.limits.stream_window > 0);
  assert.ok(Number(h.limits.max_message_bytes) > 0);
  assert.ok(h.workers_ready <= h.workers_configured);
});

test('grpc.health.v1 Check: server and service SERVING, unknown service NOT_FOUND', async () => {
  for (const service of ['', SERVICE]) {
    const r = await unary(health, 'Check', { service });
    assert.equal(r.status, 'SERVING', `service '${service}'`);
  }
  await assert.rejects(unary(health, 'Check', { service: 'no.such.Service' }), (err) => {
    assert.equal(err.code, grpc.status.NOT_FOUND);
    return true;
  });
});

test('a deadline that has passed is DEADLINE_EXCEEDED', async () => {
  const texts = Array.from({ length: 64 }, (_, i) => `${i} ${'x'.repeat(4000)}`);
  await assert.rejects(unary(client, 'Embed', { texts }, 1), (err) => {
    assert.equal(err.code, grpc.status.DEADLINE_EXCEEDED);
    return true;
  });
});
