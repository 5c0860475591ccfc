#!/usr/bin/env bash
# The main job, as far as it exists today: capture a warm Python (boto3
# imported, an S3 client built) into a seed with a ~2 ms pause, then start
# children from the seed on this node: lazily (pages served on demand by
# forkd's userfaultfd pager), eagerly, and many at once, each answering a
# request with the parent's imported modules and state.
set -euo pipefail
cd "$(dirname "$0")/../.."
. forkd/scripts/deps.sh
cargo build --release -q -p forkd
FORKD=target/release/forkd
work=$(mktemp -d)
pypid=""
mkfifo "$work/in"
trap '[ -n "$pypid" ] && kill "$pypid" 2>/dev/null; rm -rf "$work"' EXIT

"$PYTHON" -c '
import sys, os, json, time, boto3
client = boto3.client("s3", region_name="us-east-1")
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps({"hello": req["name"], "pid": os.getpid(), "region": client.meta.region_name,
                      "endpoint": client.meta.endpoint_url}), flush=True)
' < "$work/in" > "$work/parent.out" &
pypid=$!
exec 3>"$work/in"   # keep the parent's stdin open (and empty) while it is captured
until grep -q ready "$work/parent.out" 2>/dev/null; do sleep 0.1; done
until grep -q '^0 ' "/proc/$pypid/syscall" 2>/dev/null; do sleep 0.01; done

echo "== 1. capture the warm parent (pid $pypid): forkd snapshot --pid $pypid --out $work/seed"
$FORKD snapshot --pid "$pypid" --out "$work/seed"
exec 3>&-
kill "$pypid"; wait "$pypid" 2>/dev/null || true; pypid=""
echo "   (the parent is gone now; everything below runs from the seed)"

echo "== 2. one lazy child: echo '{\"name\": \"lazy\"}' | forkd restore $work/seed --json"
echo '{"name": "lazy"}' | $FORKD restore "$work/seed" --json 2> "$work/report.json"
cat > "$work/one.py" <<'PY'
import json, sys
r = json.loads(sys.stdin.read())
print("   child %d: running after %.1f ms, %d faults, %d pages paged in, exit %s"
      % (r["pid"], r["time_to_running_ms"], r["faults"], r["pages_installed"], r["status"]))
PY
grep -v '^forkd: warning' "$work/report.json" | tail -1 | "$PYTHON" "$work/one.py"

echo "== 3. one eager child: forkd restore --eager"
echo '{"name": "eager"}' | $FORKD restore "$work/seed" --eager 2>/dev/null

echo "== 4. ten children at once, recorded working set: forkd restore --count 10 --prefetch recorded"
cat > "$work/many.py" <<'PY'
import json, sys
r = json.loads(sys.stdin.read())
for c in r["children"]:
    print("   child %d: %s | running after %.1f ms, %d faults, %d pages from the node cache"
          % (c["pid"], c["stdout"].strip(), c["time_to_running_ms"], c["faults"], c["pages_from_cache"]))
print("   %d children, %d failed, %.0f ms in all" % (len(r["children"]), r["failed"], r["total_ms"]))
PY
echo '{"name": "fan-out"}' | $FORKD restore "$work/seed" --count 10 --prefetch recorded --json 2>/dev/null | "$PYTHON" "$work/many.py"
