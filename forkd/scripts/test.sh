#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit and
# integration, as root on real processes). Installs what it needs first.
set -euo pipefail
# Root is needed (ptrace, userfaultfd, namespaces): as another user, run
# again under sudo; as root (sudo or not) go on.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "$0: must run as root (and sudo is not installed)" >&2; exit 1; }
    exec sudo -E bash "$0" "$@"
fi
cd "$(dirname "$0")/../.."
. forkd/scripts/deps.sh

# No incremental caches: a clean run would write GBs of them and never
# read them back. The disk this starts with, and ends with, is printed.
export CARGO_INCREMENTAL=0
echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free"
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo doc --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
echo "== cargo build (the C tests link libremotefork.so)"
cargo build --workspace
echo "== cargo test"
# --nocapture: a test that cannot run here says "SKIPPED: <reason>", and
# that line must be seen; such a test is not counted as passed below.
# --no-fail-fast: every test binary runs; the summary below counts them all.
# Test scratch (seed images, node state) of earlier runs: several GB each.
rm -rf target/tmp
set +e
cargo test --workspace --no-fail-fast -- --nocapture 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
set -e
# A skipped test's name runs to the first blank (names hold "::").
skipped=$(grep -o 'SKIPPED: [^ ]*' target/test-output.txt | sort -u | wc -l)
echo "== skipped (not counted as passed): $skipped"
grep -o 'SKIPPED: .*' target/test-output.txt | sort -u || true
passed=$(grep -E '^test result:' target/test-output.txt | awk '{s += $4} END {print s + 0}')
failed=$(grep -E '^test result:' target/test-output.txt | awk '{s += $6} END {print s + 0}')
echo "== the restore-case corpus (forkd/tests/corpus.rs), case x mode"
bash forkd/scripts/corpus-matrix.sh target/test-output.txt || true
# The last binary's scratch is kept only when something failed.
[ "$status" = 0 ] && [ -z "${RF_KEEP_SCRATCH:-}" ] && rm -rf target/tmp
echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ $(du -sh target | cut -f1)"
echo "tests: $((passed - skipped)) passed, $failed failed, $skipped skipped"
exit "$status"
