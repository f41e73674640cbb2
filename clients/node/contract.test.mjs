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

function vectorOf(e) {
  assert.ok(Buffer.isBuffer(e.vector));
  assert.equal(e.vector.length, e.dimensions * 4, 'packed float32: 4 bytes per dimension');
  const v = new Float32Array(e.dimensions);
  for (let i = 0; i < e.dimensions; i++) v[i] = e.vector.readFloatLE(i * 4);
  return v;
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
  assert.equal(r.embeddings.length, texts.length);
  assert.ok(r.model.length > 0);
  assert.match(r.space.fingerprint, /^\S+$/);
  assert.ok(r.space.normalized);
  const vectors = r.embeddings.map(vectorOf);
  let tokens = 0;
  for (const [i, e] of r.embeddings.entries()) {
    assert.equal(e.dimensions, r.space.dimensions);
    assert.ok(e.token_count > 2, `text ${i} has ${e.token_count} tokens`);
    assert.ok(Math.abs(norm(vectors[i]) - 1) < 1e-5);
    tokens += e.token_count;
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

test('EmbedStream answers every id in order; a bad item gets its own error', async () => {
  const n = 200;
  const requests = Array.from({ length: n }, (_, i) => ({ id: `item-${i}`, text: i === 57 ? '' : `document ${i}` }));
  const responses = await bidi(client, 'EmbedStream', requests);
  assert.deepEqual(
    responses.map((r) => r.id),
    requests.map((r) => r.id),
  );
  for (const [i, r] of responses.entries()) {
    if (i === 57) {
      assert.equal(r.result, 'error');
      assert.equal(r.error.code, grpc.status.INVALID_ARGUMENT);
      assert.ok(r.error.message.length > 0);
    } else {
      assert.equal(r.result, 'embedding', `item ${i}: ${JSON.stringify(r.error)}`);
      assert.ok(Math.abs(norm(vectorOf(r.embedding)) - 1) < 1e-5);
      assert.ok(r.space.fingerprint.length > 0);
    }
  }
});

test('ListModels shows the default model loaded, and Embed gives its native dimension', async () => {
  const { models } = await unary(client, 'ListModels', {});
  const def = models.find((m) => m.is_default);
  assert.ok(def, 'a default model');
  assert.equal(def.state, 'MODEL_STATE_LOADED');
  assert.ok(def.dimensions > 0 && def.max_tokens > 0);
  const r = await unary(client, 'Embed', { model: def.name, texts: ['x'] });
  assert.equal(r.model, def.name);
  assert.equal(r.embeddings[0].dimensions, def.dimensions);
});

test('Health reports SERVING with a version and the loaded model', async () => {
  const h = await unary(client, 'Health', {});
  assert.equal(h.status, 'SERVING_STATUS_SERVING');
  assert.ok(h.version.length > 0);
  assert.ok(h.uptime_seconds > 0);
  assert.ok(h.models.length > 0);
  assert.ok(h.backend.length > 0);
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
