#!/usr/bin/env bash
# The main job: two forkd "nodes" on loopback. A warm Python (boto3
# imported, an S3 client built) becomes a seed on node A; node B starts
# children from it, paging A's memory over the TCP page server; each child
# answers a request with the parent's imported modules and state.
set -euo pipefail
# Root is needed (ptrace, userfaultfd, namespaces): as another user, run
# again under sudo; as root (sudo or not) go on.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "$0: must run as root (and sudo is not installed)" >&2; exit 1; }
    exec sudo -E bash "$0" "$@"
fi
cd "$(dirname "$0")/../.."
. forkd/scripts/deps.sh
cargo build --release -q -p forkd
FORKD=$PWD/target/release/forkd
CTL=$PWD/target/release/forkctl
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "demo-token" > "$work/token"
port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
A_GRPC=127.0.0.1:$(port); A_PAGES=127.0.0.1:$(port)
"$FORKD" serve --socket "$work/a.sock" --state-dir "$work/a" --listen "$A_GRPC" --page-listen "$A_PAGES" \
    --token-file "$work/token" 2> "$work/a.log" & pids+=($!)
"$FORKD" serve --socket "$work/b.sock" --state-dir "$work/b" --token-file "$work/token" 2> "$work/b.log" & pids+=($!)
for s in a b; do until [ -S "$work/$s.sock" ]; do sleep 0.05; done; done
echo "== two nodes: A (gRPC $A_GRPC, pages $A_PAGES) and B, both forkd on loopback"

cat > "$work/function.py" <<'PY'
import sys, os, json, boto3
client = boto3.client("s3", region_name="us-east-1")   # the warm state
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps({"hello": req["name"], "pid": os.getpid(), "region": client.meta.region_name,
                      "endpoint": client.meta.endpoint_url}), flush=True)
PY
echo "== 1. on A: forkctl seed create --ready-line ready -- python3 function.py"
SEED=$("$CTL" --addr "unix:$work/a.sock" seed create --ready-line ready -- "$PYTHON" "$work/function.py")
REF=$("$CTL" --addr "unix:$work/a.sock" seed ref "$SEED" --origin "$A_GRPC")
echo "   seed $SEED; portable reference ${REF%%#*}#<key>"

echo '{"name": "remote fork"}' > "$work/request.json"
cat > "$work/show.py" <<'PY'
import json, sys
r = json.loads(sys.stdin.read())
for c in r["children"]:
    print("   child %s (pid %s): %s | answer after %.1f ms, running after %.1f ms, %d faults"
          % (c["index"], c["pid"], c["stdout"].strip(), c.get("first_output_ms", 0), c["time_to_running_ms"], c["faults"]))
print("   %d started, %d failed" % (r["started"], r["failed"]))
PY
echo "== 2. on B: forkctl spawn REF --count 5 (memory paged from A over TCP; the first child"
echo "   builds B's template of the seed, restored once and never run; the others are forked from it)"
"$CTL" --addr "unix:$work/b.sock" --json spawn "$REF" --count 5 --stdin "$work/request.json" | "$PYTHON" "$work/show.py"
echo "== 3. on B again, with the working set recorded by the first children"
"$CTL" --addr "unix:$work/b.sock" --json spawn "$REF" --count 5 --prefetch recorded --stdin "$work/request.json" | "$PYTHON" "$work/show.py"
echo "== 4. on B once more: its template (with the working set) is built, children are forked from it"
"$CTL" --addr "unix:$work/b.sock" --json spawn "$REF" --count 5 --prefetch recorded --stdin "$work/request.json" | "$PYTHON" "$work/show.py"
echo "== done: 15 children on B from a seed on A, memory over TCP (logs: A and B forkd stderr)"
