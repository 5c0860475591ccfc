#!/usr/bin/env bash
# The main job, as far as it exists: capture a warm Python process (boto3
# imported, an S3 client built) into a seed image with a ~2 ms pause, show
# the image, and show the parent carrying on as if nothing happened.
set -euo pipefail
cd "$(dirname "$0")/../.."
. forkd/scripts/deps.sh
cargo build --release -q -p forkd
FORKD=target/release/forkd
work=$(mktemp -d)
trap 'kill "$pypid" 2>/dev/null || true; rm -rf "$work"' EXIT

mkfifo "$work/in"
"$PYTHON" -c '
import sys, json, boto3
client = boto3.client("s3", region_name="us-east-1")
print("ready", flush=True)
req = json.loads(sys.stdin.readline())
print("parent answered:", json.dumps({"hello": req["name"], "region": client.meta.region_name}), flush=True)
' < "$work/in" > "$work/out" &
pypid=$!
exec 3>"$work/in"
until grep -q ready "$work/out"; do sleep 0.1; done
until grep -q '^0 ' "/proc/$pypid/syscall" 2>/dev/null; do sleep 0.01; done

echo "== forkd snapshot --pid $pypid --out $work/seed"
$FORKD snapshot --pid "$pypid" --out "$work/seed"
echo "== forkd inspect $work/seed (first lines)"
$FORKD inspect "$work/seed" | head -n 16
echo "== the parent runs on"
echo '{"name": "remotefork"}' >&3
exec 3>&-
wait "$pypid"
cat "$work/out" | grep 'parent answered'
