'use strict';
// A gRPC client for forkd: seeds, spawns and their events, instances, the
// node. Loads forkd.proto at run time with @grpc/proto-loader (no code
// generation) and talks to forkd with @grpc/grpc-js, default channel
// options. README.md has the API; examples/spawn.js runs it.

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_ADDR = 'unix:/run/forkd/forkd.sock';

/** Where forkd.proto is: FORKD_PROTO, the packed copy, or the repository's. */
function protoPath() {
  const candidates = [
    process.env.FORKD_PROTO,
    path.join(__dirname, 'proto', 'forkd.proto'),
    path.join(__dirname, '..', '..', 'forkd', 'proto', 'forkd.proto'),
  ].filter(Boolean);
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) {
    throw new Error(`forkd.proto not found (tried ${candidates.join(', ')}); set FORKD_PROTO`);
  }
  return found;
}

/** The forkd.v1 package (its Forkd service constructor and messages). */
function loadForkd(proto = protoPath()) {
  const def = protoLoader.loadSync(proto, {
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).forkd.v1;
}

/** A call forkd refused or that failed; `code` is the gRPC status number, `codeName` its name. */
class ForkdError extends Error {
  constructor(err) {
    const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || 'UNKNOWN';
    super(`${err.details || err.message} (${codeName})`);
    this.name = 'ForkdError';
    this.code = err.code;
    this.codeName = codeName;
    this.details = err.details || err.message;
  }
}

/** `ADDR/ID#KEY`, `ID#KEY` or `ID` -> {origin, id, key}, as forkctl reads them. */
function parseRef(ref) {
  let origin = '';
  let rest = ref;
  const slash = ref.lastIndexOf('/');
  if (slash >= 0) {
    origin = ref.slice(0, slash);
    rest = ref.slice(slash + 1);
  }
  const hash = rest.indexOf('#');
  return hash >= 0
    ? { origin, id: rest.slice(0, hash), key: rest.slice(hash + 1) }
    : { origin, id: rest, key: '' };
}

/** One instance event, flattened: kind is started, running, output, exited or failed. */
function event(ev) {
  const out = {
    kind: ev.kind,
    instanceId: ev.instanceId,
    seedId: ev.seedId,
    pid: ev.pid,
    index: ev.index,
  };
  if (ev.kind === 'running') out.timeToRunningMs = ev.running.timeToRunningMs;
  if (ev.kind === 'output') {
    out.data = ev.output.data;
    out.sinceSpawnMs = ev.output.sinceSpawnMs;
  }
  if (ev.kind === 'exited') {
    const x = ev.exited;
    const killed = x.signal !== 0;
    Object.assign(out, {
      exitCode: killed ? null : x.exitCode,
      signal: killed ? x.signal : null,
      reason: x.reason,
      stdout: x.stdout,
      faults: x.faults,
      pagesInstalled: x.pagesInstalled,
    });
  }
  if (ev.kind === 'failed') out.reason = ev.failed.reason;
  return out;
}

class ForkdClient {
  /**
   * @param {{addr?: string, token?: string, tokenFile?: string}} [opts]
   *   addr: `unix:PATH` or `HOST:PORT` [FORKD_ADDR, else the default socket];
   *   the bearer token for TCP, or a file holding it [FORKD_TOKEN_FILE].
   */
  constructor(opts = {}) {
    this.addr = opts.addr || process.env.FORKD_ADDR || DEFAULT_ADDR;
    let token = opts.token;
    const tokenFile = opts.tokenFile || (token ? undefined : process.env.FORKD_TOKEN_FILE);
    if (!token && tokenFile) token = fs.readFileSync(tokenFile, 'utf8').trim();
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
    const v1 = loadForkd();
    this.stub = new v1.Forkd(this.addr, grpc.credentials.createInsecure());
  }

  close() {
    this.stub.close();
  }

  _unary(method, req) {
    return new Promise((resolve, reject) => {
      this.stub[method](req, this.metadata, (err, res) => (err ? reject(new ForkdError(err)) : resolve(res)));
    });
  }

  async *_stream(method, req, count) {
    const call = this.stub[method](req, this.metadata);
    let ended = 0;
    try {
      for await (const ev of call) {
        const e = event(ev);
        yield e;
        if (count && (e.kind === 'exited' || e.kind === 'failed') && ++ended === count) return;
      }
    } catch (err) {
      throw err.code !== undefined ? new ForkdError(err) : err;
    } finally {
      call.cancel();
    }
  }

  /**
   * Capture process `pid`, or start `command` and capture it once it
   * prints `readyLine` on stdout (`env` is added to forkd's).
   */
  createSeed({ pid, command, readyLine = '', readyTimeoutMs = 0, cwd = '', env = {}, name = '' } = {}) {
    if ((pid === undefined) === (command === undefined)) {
      return Promise.reject(new TypeError('give pid or command (with readyLine)'));
    }
    const req = pid !== undefined
      ? { pid, name }
      : { command: { argv: command, readyLine, readyTimeoutMs, cwd, env }, name };
    return this._unary('CreateSeed', req);
  }

  getSeed(id, key = '') {
    return this._unary('GetSeed', { id, key });
  }

  async listSeeds() {
    return (await this._unary('ListSeeds', {})).seeds;
  }

  async dropSeed(id, key = '') {
    await this._unary('DropSeed', { id, key });
  }

  /**
   * Start `count` children from `seed` (an id, `ID#KEY` or `ADDR/ID#KEY`),
   * each given `stdin` whole; an async iterator of their events that ends
   * when every child has exited or failed.
   */
  spawn(seed, { count = 1, stdin = Buffer.alloc(0), prefetch = '', eager = false, labels = {}, args = '', origin = '', noTemplate = false, captureStdout = true } = {}) {
    if (!(count >= 1)) throw new RangeError('count must be at least 1');
    const r = parseRef(seed);
    const req = {
      seed: { id: r.id, key: r.key },
      count,
      stdin: Buffer.from(stdin),
      stdout: captureStdout ? 'STDOUT_MODE_CAPTURE' : 'STDOUT_MODE_NULL',
      labels,
      prefetch,
      eager,
      args,
      origin: origin || r.origin,
      noTemplate,
    };
    return this._stream('Spawn', req, count);
  }

  /**
   * Make the node ready to start children of `seed` in this mode without
   * starting one (another node's seed and container rootfs fetched, the
   * node's template built and its spare forked): `{ seed, templateBuilt, ms }`.
   */
  async prepare(seed, { prefetch = '', eager = false, origin = '', noTemplate = false } = {}) {
    const r = parseRef(seed);
    const p = await this._unary('PrepareSeed', { seed: { id: r.id, key: r.key }, prefetch, eager, origin: origin || r.origin, noTemplate });
    return { seed: p.seedId, templateBuilt: p.templateBuilt, ms: p.ms };
  }

  /** spawn() and wait for every child: one result per child, by index. */
  async run(seed, opts = {}) {
    const count = opts.count || 1;
    const kids = Array.from({ length: count }, (_, index) => ({ index, instanceId: '', pid: 0, exitCode: null, signal: null, reason: '', stdout: Buffer.alloc(0), faults: 0 }));
    for await (const ev of this.spawn(seed, opts)) {
      const k = kids[ev.index];
      k.instanceId = ev.instanceId;
      if (ev.pid) k.pid = ev.pid;
      if (ev.kind === 'running') k.timeToRunningMs = ev.timeToRunningMs;
      if (ev.kind === 'exited') Object.assign(k, { exitCode: ev.exitCode, signal: ev.signal, reason: ev.reason, stdout: ev.stdout, faults: ev.faults, pagesInstalled: ev.pagesInstalled });
      if (ev.kind === 'failed') k.reason = ev.reason;
    }
    return kids;
  }

  async listInstances(seedId = '') {
    return (await this._unary('ListInstances', { seedId })).instances;
  }

  async kill(instanceId) {
    await this._unary('KillInstance', { instanceId });
  }

  /** Every instance event of this node from now on (break out of the loop to end it). */
  watch() {
    return this._stream('Watch', {}, 0);
  }

  nodeInfo() {
    return this._unary('NodeInfo', {});
  }
}

module.exports = { ForkdClient, ForkdError, parseRef, loadForkd, protoPath, DEFAULT_ADDR };
