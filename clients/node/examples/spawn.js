'use strict';
// forkd from Node: make a seed of a warm function, start children from it,
// talk to them, list and kill instances, read the node.
//
//   (cd clients/node && npm install)
//   node clients/node/examples/spawn.js [ADDR] [PYTHON]
//
// ADDR is unix:PATH or HOST:PORT (then FORKD_TOKEN_FILE names the token
// file); default FORKD_ADDR or unix:/run/forkd/forkd.sock. The function is
// a small Python program (PYTHON, default python3).

const { ForkdClient, ForkdError } = require('..');

const FUNCTION = `
import json, os, sys, time
table = [i * i for i in range(100000)]
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("sleep"):
        time.sleep(req["sleep"])
    print(json.dumps({"pid": os.getpid(), "n": req["n"], "square": table[req["n"]]}), flush=True)
`;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function main() {
  const forkd = new ForkdClient({ addr: process.argv[2] });
  const python = process.argv[3] || 'python3';
  try {
    const node = await forkd.nodeInfo();
    console.log(`node ${node.hostname}: forkd ${node.version}, ${node.seeds} seeds, ${node.instancesRunning} running`);

    const seed = await forkd.createSeed({ command: [python, '-c', FUNCTION], readyLine: 'ready', name: 'node-example' });
    console.log(`seed ${seed.id}: ${(seed.imageBytes / 2 ** 20).toFixed(1)} MiB, parent paused ${seed.pauseUs} us`);

    // Three children, one request each; every one answers from the warm
    // table. ID#KEY: over TCP, spawning needs the seed's key.
    const ref = `${seed.id}#${seed.key}`;
    // Ready before the first child: the node's template is built now.
    const ready = await forkd.prepare(ref);
    check(ready.seed === seed.id && ready.templateBuilt, JSON.stringify(ready));
    console.log(`prepared in ${ready.ms.toFixed(1)} ms`);
    for (const child of await forkd.run(ref, { count: 3, stdin: '{"n": 12}\n' })) {
      const answer = JSON.parse(child.stdout.toString());
      check(child.exitCode === 0 && answer.pid === child.pid && answer.square === 144, JSON.stringify(child));
      console.log(`child ${child.index} pid ${child.pid}: ${JSON.stringify(answer)} (running after ${child.timeToRunningMs.toFixed(1)} ms, ${child.faults} faults)`);
    }

    // Events as they happen; a long request is killed once it runs.
    for await (const ev of forkd.spawn(ref, { stdin: '{"n": 3, "sleep": 60}\n', labels: { job: 'long' } })) {
      if (ev.kind === 'running') {
        const running = (await forkd.listInstances(seed.id)).filter((i) => i.state === 'running');
        console.log(`running: ${JSON.stringify(running.map((i) => i.id))}`);
        await forkd.kill(ev.instanceId);
      } else if (ev.kind === 'exited') {
        console.log(`instance ${ev.instanceId} ended by signal ${ev.signal}`);
        check(ev.signal === 9, 'killed by SIGKILL');
      }
    }

    await forkd.dropSeed(seed.id, seed.key);
    try {
      await forkd.getSeed(seed.id, seed.key);
      check(false, 'the dropped seed is gone');
    } catch (e) {
      check(e instanceof ForkdError && e.codeName === 'NOT_FOUND', String(e));
      console.log(`dropped: ${e.details}`);
    }
  } finally {
    forkd.close();
  }
  console.log('example ok');
}

main().catch((e) => {
  console.error(`example failed: ${e.stack || e}`);
  process.exit(1);
});
