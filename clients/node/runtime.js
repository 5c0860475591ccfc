#!/usr/bin/env node
'use strict';
// The Node function runtime the gateway starts (Node's core modules only).
// A user writes only a handler module:
//
//   // hello.js
//   const s3 = new (require('@aws-sdk/client-s3').S3Client)({});  // warm state
//   module.exports.handler = async (event) => ({ hello: event.name });
//   module.exports.warmup = async () => { ... };                 // optional
//
// and registers `node runtime.js hello.js` with the gateway (with
// UV_USE_IO_URING=0 in its env: libuv's io_uring rings cannot be
// recreated in a child). The runtime loads the module, awaits warmup() if
// there is one, then checkpoint(): it prints one line
// `remotefork-seed {"id": ..., "key": ...}` for the gateway and exits;
// every child connects back to the gateway (its address comes in the
// checkpoint's args) and serves invocations, one JSON line each way, as
// the Python runtime (python/remotefork/runtime.py) does:
//
//   gateway -> child   {"id": N, "event": {...}}      or {"exit": true}
//   child -> gateway   {"id": N, "ok": true, "result": ...}
//                      {"id": N, "ok": false, "error": "..."}
//
// the first line a child sends being {"hello": INSTANCE_ID, "function": NAME}.
//
// With `--ready-line LINE` it instead prints LINE once warm, reads one event
// line from stdin, prints the answer as one JSON line and exits: a seed
// captured from outside (forkd's CreateSeed with a ready line), one
// invocation per child.
//
//   node runtime.js HANDLER.js[:export] [--ready-line LINE] [--name NAME]

const fs = require('fs');
const net = require('net');
const path = require('path');
const readline = require('readline');
const { checkpoint, afterRestore, readLineSync } = require('./coop');

function usage(why) {
  process.stderr.write(`runtime.js: ${why}\nusage: node runtime.js HANDLER.js[:export] [--ready-line LINE] [--name NAME]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const a = { spec: null, readyLine: null, name: '' };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i];
    if (v === '--ready-line' || v === '--name') {
      if (i + 1 >= argv.length) usage(`${v} needs a value`);
      if (v === '--ready-line') a.readyLine = argv[++i];
      else a.name = argv[++i];
    } else if (a.spec === null) a.spec = v;
    else usage(`unexpected argument ${JSON.stringify(v)}`);
  }
  if (a.spec === null) usage('give the handler module');
  return a;
}

/** `file.js[:export]` -> [module, handler function]. */
function loadHandler(spec) {
  const i = spec.lastIndexOf(':');
  const [file, name] = i > 0 ? [spec.slice(0, i), spec.slice(i + 1)] : [spec, 'handler'];
  const mod = require(path.resolve(file));
  const fn = mod[name];
  if (typeof fn !== 'function') throw new Error(`${file} exports no function ${JSON.stringify(name)}`);
  return [mod, fn];
}

async function call(handler, event) {
  try {
    return { ok: true, result: await handler(event) };
  } catch (e) {
    return { ok: false, error: `${(e && e.name) || 'Error'}: ${(e && e.message) || e}` };
  }
}

function answerLine(answer) {
  try {
    return JSON.stringify(answer);
  } catch (e) {
    return JSON.stringify({ id: answer.id, ok: false, error: `result is not JSON: ${e.message}` });
  }
}

/** Serve invocations from the gateway at HOST:PORT until told to exit. */
function serve(handler, gateway, instanceId, fn) {
  const i = gateway.lastIndexOf(':');
  const s = net.createConnection({ host: gateway.slice(0, i), port: Number(gateway.slice(i + 1)) });
  s.setNoDelay(true);
  s.write(`${JSON.stringify({ hello: instanceId, function: fn })}\n`);
  const rl = readline.createInterface({ input: s, crlfDelay: Infinity });
  let chain = Promise.resolve();
  rl.on('line', (line) => {
    chain = chain.then(async () => {
      const msg = JSON.parse(line);
      if (msg.exit) {
        s.end(() => process.exit(0));
        return;
      }
      const answer = await call(handler, msg.event);
      answer.id = msg.id;
      s.write(`${answerLine(answer)}\n`);
    });
  });
  s.on('close', () => process.exit(0));
  s.on('error', (e) => {
    process.stderr.write(`runtime.js: the gateway connection failed: ${e.message}\n`);
    process.exit(1);
  });
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const [mod, handler] = loadHandler(a.spec);
  if (typeof mod.warmup === 'function') await mod.warmup();
  if (a.readyLine !== null) {
    const warm = fs.readlinkSync('/proc/self');
    process.stdout.write(`${a.readyLine}\n`);
    // Captured here, blocked in read(0).
    const line = readLineSync(0);
    if (fs.readlinkSync('/proc/self') !== warm) afterRestore();
    const answer = await call(handler, line.trim() ? JSON.parse(line) : null);
    process.stdout.write(`${answerLine(answer)}\n`, () => process.exit(answer.ok ? 0 : 1));
    return;
  }
  const cp = await checkpoint(a.name || a.spec);
  if (!cp.isChild) {
    process.stdout.write(`remotefork-seed ${JSON.stringify({ id: cp.seedId, key: cp.key })}\n`, () => process.exit(0));
    return;
  }
  const args = JSON.parse(cp.args || '{}');
  serve(handler, args.gateway, cp.instanceId, args.function || '');
}

main().catch((e) => {
  process.stderr.write(`runtime.js: ${(e && e.stack) || e}\n`);
  process.exit(1);
});
