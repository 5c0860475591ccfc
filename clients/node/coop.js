'use strict';
// The cooperative client in pure JavaScript (Node's core modules only):
// a Node process makes itself a seed with `checkpoint()`, and the call
// returns twice, once in the process (the seed's id and key) and once in
// every child started from the seed (its instance id and arguments).
//
// Node cannot fork, so every thread is kept: forkd captures this process
// itself while its main thread waits in read() for forkd's answer on its
// connection to the cooperative socket; in each child that descriptor is
// a duplicate of the child's stdin, whose first line forkd writes (the
// instance id, index and args), so the same read returns there instead
// (forkd's `"all_threads": true` checkpoint).
//
//   const { checkpoint, onRestore } = require('@remotefork/forkd-client/coop');
//   const cp = await checkpoint('my-function');
//   if (cp.isChild) { ... serve, with cp.instanceId and cp.args ... }
//   else console.log(cp.seedId, cp.key);
//
// In a child: Math.random is replaced by one drawing from the OS (V8's own
// generator state would be the same in every child), and the onRestore()
// hooks run. process.pid keeps the seed's pid (Node stores it once, at
// start-up): read /proc/self for the child's.

const fs = require('fs');
const net = require('net');
const crypto = require('crypto');

const DEFAULT_SOCKET = '/run/forkd/forkd.sock.coop';
const hooks = [];

/** forkd could not make a seed of the caller. */
class CheckpointError extends Error {
  constructor(message) {
    super(message);
    this.name = 'CheckpointError';
  }
}

/** Run `fn` in every child, right after checkpoint() returns there. */
function onRestore(fn) {
  hooks.push(fn);
}

/** Sleep `ms` without the event loop (a futex wait). */
function sleepSync(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * One line from descriptor `fd`, read a byte at a time (nothing after the
 * line is taken), waiting while it has nothing (a non-blocking descriptor).
 */
function readLineSync(fd) {
  const bytes = [];
  const b = Buffer.alloc(1);
  for (;;) {
    let n;
    try {
      n = fs.readSync(fd, b, 0, 1, null);
    } catch (e) {
      if (e.code === 'EAGAIN') {
        sleepSync(1);
        continue;
      }
      throw e;
    }
    if (n === 0 || b[0] === 10) break;
    bytes.push(b[0]);
  }
  return Buffer.from(bytes).toString();
}

/** What a child runs first: a fresh Math.random, then the hooks. */
function afterRestore() {
  const w = new Uint32Array(2);
  Math.random = function random() {
    crypto.getRandomValues(w);
    return (w[0] * 2 ** 21 + (w[1] >>> 11)) / 2 ** 53;
  };
  for (const fn of hooks) fn();
}

/**
 * Make this process a seed. Resolves, in the process, to
 * `{isChild: false, seedId, key}`; in every child, to
 * `{isChild: true, instanceId, index, args}`. `socketPath` defaults to
 * FORKD_COOP_SOCKET, else /run/forkd/forkd.sock.coop.
 */
async function checkpoint(name = '', socketPath) {
  const path = socketPath || process.env.FORKD_COOP_SOCKET || DEFAULT_SOCKET;
  const sock = net.createConnection({ path });
  // Never read by libuv: the answer is read below, synchronously.
  sock.pause();
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', (e) => reject(new CheckpointError(`cannot reach forkd at ${path}: ${e.message}`)));
  });
  const fd = sock._handle && sock._handle.fd;
  if (typeof fd !== 'number' || fd < 0) {
    sock.destroy();
    throw new CheckpointError('the connection to forkd has no descriptor');
  }
  const request = { op: 'create_seed', pid: process.pid, name, all_threads: true, reply_fd: fd };
  fs.writeSync(fd, `${JSON.stringify(request)}\n`);
  // Captured in here: the caller reads forkd's answer, a child its first line.
  const line = readLineSync(fd);
  sock.destroy();
  let info;
  try {
    info = JSON.parse(line || '{}');
  } catch (e) {
    throw new CheckpointError(`forkd answered ${JSON.stringify(line)}`);
  }
  if ('instance_id' in info) {
    afterRestore();
    return { isChild: true, instanceId: info.instance_id, index: info.index, args: info.args || '' };
  }
  if (!info.ok) throw new CheckpointError(info.error || `forkd answered ${JSON.stringify(line)}`);
  return { isChild: false, seedId: info.id, key: info.key };
}

module.exports = { checkpoint, onRestore, afterRestore, readLineSync, CheckpointError };
