'use strict';
// Stock @grpc/grpc-js against a real forkd: every RPC, streaming included,
// and each documented error status, with default channel options.
//
//   NODE_PATH=clients/node/node_modules node conformance.js --addr unix:PATH [--token T] --python PY
//
// Prints one line per check (`ok NAME` or `FAIL NAME: why`) and exits
// non-zero if any failed. Run by forkd/tests/clients.rs.

const path = require('path');
const { spawn } = require('child_process');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const SERVER = `
import json, os, sys, time
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "sleep":
        time.sleep(120)
    print(json.dumps({"got": line.strip(), "pid": os.getpid()}), flush=True)
`;

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const addr = args.addr;
const python = args.python || 'python3';
const tcp = !addr.startsWith('unix:');
const proto = path.join(__dirname, '..', '..', 'proto', 'forkd.proto');
const def = protoLoader.loadSync(proto, { longs: Number, enums: String, defaults: true, oneofs: true });
const v1 = grpc.loadPackageDefinition(def).forkd.v1;
// Default options: nothing but the target and insecure credentials.
const stub = new v1.Forkd(addr, grpc.credentials.createInsecure());
const md = new grpc.Metadata();
if (args.token) md.set('authorization', `Bearer ${args.token}`);
const S = grpc.status;

function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}

function unary(method, req, meta = md) {
  return new Promise((resolve, reject) => stub[method](req, meta, (e, r) => (e ? reject(e) : resolve(r))));
}

async function expectStatus(code, promise) {
  try {
    await promise;
  } catch (e) {
    assert(e.code === code, `wanted status ${code}, got ${e.code}: ${e.details}`);
    assert(e.details, 'the status has a message');
    return e.details;
  }
  throw new Error(`wanted status ${code}, the call succeeded`);
}

async function collect(call, count) {
  const evs = [];
  let done = 0;
  for await (const ev of call) {
    evs.push(ev);
    if (ev.kind === 'exited' || ev.kind === 'failed') {
      done += 1;
      if (done === count) break;
    }
  }
  call.cancel();
  return evs;
}

const results = [];
async function check(name, f) {
  try {
    await f();
    results.push([name, null]);
    console.log(`ok ${name}`);
  } catch (e) {
    results.push([name, e]);
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

async function main() {
  const st = {};
  await check('NodeInfo', async () => {
    const n = await unary('NodeInfo', {});
    assert(n.version && n.cpus >= 1 && n.kernel, JSON.stringify(n));
  });
  await check('CreateSeed(command)', async () => {
    const s = await unary('CreateSeed', { command: { argv: [python, '-c', SERVER], readyLine: 'ready', env: { CONFORMANCE: '1' } }, name: 'conformance-js' });
    assert(s.id.length === 16 && s.key.length === 32 && s.name === 'conformance-js', JSON.stringify(s));
    st.seed = { id: s.id, key: s.key };
  });
  await check('CreateSeed(pid)', async () => {
    const p = spawn(python, ['-c', SERVER], { stdio: ['pipe', 'pipe', 'inherit'] });
    try {
      await new Promise((resolve, reject) => {
        p.stdout.once('data', (d) => (String(d).startsWith('ready') ? resolve() : reject(new Error(String(d)))));
        p.once('exit', () => reject(new Error('target exited')));
      });
      const s = await unary('CreateSeed', { pid: p.pid, name: 'by-pid' });
      assert(s.sourcePid === p.pid && s.imageBytes > 0, JSON.stringify(s));
      st.pidSeed = { id: s.id, key: s.key };
    } finally {
      p.kill('SIGKILL');
    }
  });
  await check('GetSeed', async () => {
    const s = await unary('GetSeed', st.seed);
    assert(s.id === st.seed.id, JSON.stringify(s));
  });
  await check('ListSeeds', async () => {
    const ids = (await unary('ListSeeds', {})).seeds.map((s) => s.id);
    assert(ids.includes(st.seed.id) && ids.includes(st.pidSeed.id), ids);
  });
  await check('Spawn(stream)', async () => {
    const evs = await collect(stub.Spawn({ seed: st.seed, count: 3, stdin: Buffer.from('hello\n') }, md), 3);
    const byIndex = {};
    for (const ev of evs) (byIndex[ev.index] = byIndex[ev.index] || []).push(ev);
    assert(Object.keys(byIndex).length === 3, JSON.stringify(Object.keys(byIndex)));
    for (const list of Object.values(byIndex)) {
      const kinds = list.map((e) => e.kind);
      assert(kinds[0] === 'started' && kinds[1] === 'running' && kinds.includes('output'), kinds);
      const x = list[list.length - 1];
      assert(x.kind === 'exited' && x.exited.exitCode === 0 && x.exited.signal === 0, JSON.stringify(x));
      const out = JSON.parse(x.exited.stdout.toString());
      assert(out.got === 'hello' && out.pid === x.pid, JSON.stringify(out));
    }
  });
  await check('Watch(stream)', async () => {
    const watch = stub.Watch({}, md);
    const seen = [];
    watch.on('data', (ev) => seen.push(ev.kind));
    watch.on('error', (e) => {
      if (e.code !== S.CANCELLED) seen.push(`error ${e.code}`);
    });
    for (let i = 0; i < 100 && !seen.includes('exited'); i++) {
      await collect(stub.Spawn({ seed: st.seed, count: 1, stdin: Buffer.from('w\n') }, md), 1);
      await new Promise((r) => setTimeout(r, 100));
    }
    watch.cancel();
    assert(seen.includes('exited'), seen);
  });
  await check('ListInstances', async () => {
    const inst = (await unary('ListInstances', { seedId: st.seed.id })).instances;
    assert(inst.length >= 3 && inst.every((i) => i.seedId === st.seed.id), JSON.stringify(inst));
    assert(inst.some((i) => i.state === 'exited 0'), JSON.stringify(inst));
    st.ended = inst.find((i) => i.state !== 'running').id;
  });
  await check('GetInstance', async () => {
    const i = await unary('GetInstance', { instanceId: st.ended });
    assert(i.ended && i.id === st.ended && i.stdout.length > 0, JSON.stringify(i));
  });
  await check('PutInput(client stream)', async () => {
    // An input larger than one gRPC message, staged in chunks, then spawned from.
    const data = Buffer.concat([Buffer.alloc(5 << 20, 'x'), Buffer.from('\n')]);
    const ref = await new Promise((resolve, reject) => {
      const call = stub.PutInput(md, (e, r) => (e ? reject(e) : resolve(r)));
      for (let i = 0; i < data.length; i += 1 << 20) call.write({ data: data.subarray(i, i + (1 << 20)) });
      call.end();
    });
    assert(Number(ref.bytes) === data.length, JSON.stringify(ref));
    const evs = await collect(stub.Spawn({ seed: st.seed, count: 1, stdinRef: ref.id }, md), 1);
    const x = evs[evs.length - 1];
    assert(x.kind === 'exited' && x.exited.exitCode === 0, JSON.stringify(x));
    await expectStatus(S.NOT_FOUND, collect(stub.Spawn({ seed: st.seed, stdinRef: 'nope' }, md), 1));
  });
  await check('KillInstance', async () => {
    const call = stub.Spawn({ seed: st.seed, count: 1, stdin: Buffer.from('sleep\n') }, md);
    let exited = null;
    for await (const ev of call) {
      if (ev.kind === 'running') await unary('KillInstance', { instanceId: ev.instanceId });
      if (ev.kind === 'exited') {
        exited = ev;
        break;
      }
    }
    call.cancel();
    assert(exited && exited.exited.signal === 9, JSON.stringify(exited));
  });
  await check('FetchDescriptor', async () => {
    const b = await unary('FetchDescriptor', st.seed);
    assert(b.descriptor.length > 0 && b.pageServer && b.imageBytes > 0, b.pageServer);
  });
  await check('OpenPageChannel', async () => {
    const r = await unary('OpenPageChannel', { seed: st.seed, transport: 'tcp' });
    assert(r.transport === 'tcp' && r.pageServer, JSON.stringify(r));
  });
  await check('DropSeed', async () => {
    await unary('DropSeed', st.pidSeed);
  });
  await check('NOT_FOUND', async () => {
    await expectStatus(S.NOT_FOUND, unary('GetSeed', st.pidSeed));
    await expectStatus(S.NOT_FOUND, unary('KillInstance', { instanceId: 'nope' }));
  });
  await check('INVALID_ARGUMENT', async () => {
    await expectStatus(S.INVALID_ARGUMENT, collect(stub.Spawn({ seed: st.seed, prefetch: 'sideways' }, md), 1));
    await expectStatus(S.INVALID_ARGUMENT, unary('CreateSeed', {}));
  });
  await check('FAILED_PRECONDITION', async () => {
    const argv = [python, '-c', "import sys; sys.stderr.write('no ' + 'luck\\n'); sys.exit(3)"];
    const msg = await expectStatus(S.FAILED_PRECONDITION, unary('CreateSeed', { command: { argv, readyLine: 'ready' } }));
    // The command's stderr (not its argv) is in the message.
    assert(msg.includes('no luck'), msg);
    await expectStatus(S.FAILED_PRECONDITION, unary('KillInstance', { instanceId: st.ended }));
  });
  await check('DEADLINE_EXCEEDED', async () => {
    await expectStatus(S.DEADLINE_EXCEEDED, unary('CreateSeed', { command: { argv: ['sleep', '30'], readyLine: 'ready', readyTimeoutMs: 300 } }));
  });
  await check('PERMISSION_DENIED', async () => {
    const wrong = { id: st.seed.id, key: '0'.repeat(32) };
    await expectStatus(S.PERMISSION_DENIED, unary('FetchDescriptor', wrong));
    if (tcp) await expectStatus(S.PERMISSION_DENIED, unary('GetSeed', wrong));
  });
  if (tcp) {
    await check('UNAUTHENTICATED', async () => {
      await expectStatus(S.UNAUTHENTICATED, unary('NodeInfo', {}, new grpc.Metadata()));
      const bad = new grpc.Metadata();
      bad.set('authorization', 'Bearer wrong');
      await expectStatus(S.UNAUTHENTICATED, unary('NodeInfo', {}, bad));
    });
  }
  await unary('DropSeed', st.seed).catch(() => {});
  stub.close();
  const failed = results.filter(([, e]) => e).map(([n]) => n);
  const version = require('@grpc/grpc-js/package.json').version;
  console.log(`grpc-js ${version} ${tcp ? 'tcp' : 'unix'}: ${results.length - failed.length} checks ok, ${failed.length} failing ${JSON.stringify(failed)}`);
  process.exit(failed.length ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL: ${e.stack || e}`);
  process.exit(1);
});
