// A Node function for the gateway (clients/node/runtime.js): answers
// {"n": N} with {n, fib (a BigInt, as a string), sha (first 16 hex of the
// sha256 of String(N)), file (this file's size, read through libuv's thread
// pool), pid (from /proc/self), rnd (Math.random(), which must differ
// between children)}. warmup() JITs it first.
'use strict';

const crypto = require('crypto');
const fs = require('fs');

function fib(n) {
  let a = 0n, b = 1n;
  for (let i = 0; i < n; i++) [a, b] = [b, a + b];
  return a;
}

module.exports.handler = async (event) => {
  const n = Number(event && event.n);
  if (!Number.isInteger(n) || n < 0) throw new Error(`bad n: ${JSON.stringify(event)}`);
  const data = await fs.promises.readFile(__filename);
  await new Promise((r) => setTimeout(r, 2));
  return {
    n,
    fib: String(fib(n)),
    sha: crypto.createHash('sha256').update(String(n)).digest('hex').slice(0, 16),
    file: data.length,
    pid: Number(fs.readlinkSync('/proc/self')),
    rnd: Math.random(),
  };
};

module.exports.warmup = async () => {
  for (let i = 0; i < 2000; i++) await module.exports.handler({ n: i % 90 });
};
