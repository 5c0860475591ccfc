// A warm Node.js process (V8's JIT, libuv's event loop and thread pool,
// crypto), for the restore tests of runtimes that hold kernel objects.
// Start it as `node node_server.js` (recommended env: UV_USE_IO_URING=0,
// so libuv keeps no io_uring).
//
// It warms up (JITs fib, hashes, reads a file through the libuv thread
// pool, fires a timer), prints "ready", then answers each stdin line:
//
//   N    fib=<fib(N)> sha=<first 16 hex of sha256(line)> file=<bytes of
//        this script, read with fs.promises.readFile (libuv's thread
//        pool), or ERROR:<code>> timer=ok (after a 5 ms setTimeout)
//   pid  pid=<this process's pid, read from /proc/self>
//
// (Not process.pid: Node stores the pid once, at start-up, as a plain
// value, so a restored child would report its parent's pid.)
//
// one line per request, in order, and exits 0 at end of input.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const readline = require('readline');

function fib(n) {
  let a = 0n, b = 1n;
  for (let i = 0; i < n; i++) [a, b] = [b, a + b];
  return a;
}

function sha16(text) {
  return crypto.createHash('sha256').update(text).digest('hex').slice(0, 16);
}

function timer(ms) {
  return new Promise((resolve) => setTimeout(() => resolve('ok'), ms));
}

async function answer(line) {
  if (line === 'pid') return `pid=${fs.readlinkSync('/proc/self')}`;
  const n = Number.parseInt(line, 10);
  if (!Number.isInteger(n) || n < 0 || String(n) !== line) return `error=bad request ${JSON.stringify(line)}`;
  const [size, fired] = await Promise.all([
    fs.promises.readFile(__filename).then((data) => data.length, (err) => `ERROR:${err.code || err.message}`),
    timer(5),
  ]);
  return `fib=${fib(n)} sha=${sha16(line)} file=${size} timer=${fired}`;
}

async function warmup() {
  let acc = 0n;
  for (let i = 0; i < 20000; i++) {
    acc += fib(i % 90);
    sha16(String(i));
  }
  if (acc === 0n) throw new Error('warm-up computed nothing');
  for (let i = 0; i < 20; i++) await answer(String(i));
}

async function main() {
  // RF_NO_WARMUP set: a plain cold start (the benchmark's baseline).
  if (!process.env.RF_NO_WARMUP) await warmup();
  process.stdout.write('ready\n');
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false });
  // Answers go out in request order: each waits for the one before it.
  let chain = Promise.resolve();
  rl.on('line', (raw) => {
    const line = raw.trim();
    if (line === '') return;
    chain = chain.then(async () => { process.stdout.write((await answer(line)) + '\n'); });
  });
  rl.on('close', () => { chain.then(() => process.exit(0)); });
}

main().catch((err) => { console.error(err); process.exit(1); });
