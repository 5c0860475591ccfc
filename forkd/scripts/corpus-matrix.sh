#!/usr/bin/env bash
# Print the restore-case corpus as a matrix (case x mode) from a test
# run's output (default target/test-output.txt): ok, FAIL, or skip (a cell
# that could not run here, with its SKIPPED line in the output). The
# remote_rdma column runs in the Soft-RoCE VM (soft-rdma-tests/run counts
# its CELL lines as tests); on a host without RDMA it is "skip". Given the
# VM's console log, this script prints that column from its CELL lines.
set -euo pipefail
out=${1:-target/test-output.txt}
awk '
  BEGIN {
    nm = split("eager lazy_off lazy_window lazy_recorded template remote_tcp seed_of_seed remote_rdma", modes, " ")
    for (j = 1; j <= nm; j++) mseen[modes[j]] = 1
  }
  # A VM console log ends its lines with CR.
  { sub(/\r$/, "") }
  /Running tests\/corpus\.rs/ { on = 1; next }
  # Verdicts of the VM harness (its console log): PASS/FAIL corpus::CASE::MODE.
  /^(PASS|FAIL) corpus::[a-z_]+::[a-z_]+/ {
    split($2, p, "::"); c = p[2]; m = p[3]
    if (!(c in seen)) { seen[c] = 1; cases[++nc] = c }
    if (!(m in mseen)) { mseen[m] = 1; modes[++nm] = m }
    cell[c, m] = ($1 == "PASS" ? "ok" : "FAIL")
    next
  }
  /^ *Running / { on = 0 }
  on && /^test [a-z_]+::[a-z_]+ \.\.\. / {
    split($2, p, "::"); c = p[1]; m = p[2]; r = $4
    if (!(c in seen)) { seen[c] = 1; cases[++nc] = c }
    if (!(m in mseen)) { mseen[m] = 1; modes[++nm] = m }
    cell[c, m] = (r == "ok" ? "ok" : "FAIL")
  }
  on && /^CELL (ok|FAIL) corpus::/ {
    split($3, p, "::"); c = p[2]; m = p[3]; sub(/:$/, "", m)
    cell[c, m] = ($2 == "ok" ? "ok" : "FAIL")
  }
  on && /^SKIPPED: corpus::remote_rdma_every_case/ { rdma_skipped = 1; next }
  on && /^SKIPPED: corpus::/ {
    split($2, p, "::"); sub(/:$/, "", p[3]); skipped[p[2], p[3]] = 1
  }
  END {
    if (nc == 0) { print "corpus: no cells ran"; exit 0 }
    printf "%-16s", "case"
    for (j = 1; j <= nm; j++) printf " %-13s", modes[j]
    printf "\n"
    for (i = 1; i <= nc; i++) {
      printf "%-16s", cases[i]
      for (j = 1; j <= nm; j++) {
        v = cell[cases[i], modes[j]]
        if (skipped[cases[i], modes[j]]) v = "skip"
        if (modes[j] == "remote_rdma" && v == "" && rdma_skipped) v = "skip"
        if (v == "ok") ok++; else if (v == "FAIL") bad++; else sk++
        printf " %-13s", (v == "" ? "-" : v)
      }
      printf "\n"
    }
    printf "corpus: %d cases x %d modes: %d ok, %d failed, %d skipped or not run\n", nc, nm, ok, bad, sk
  }
' "$out"
