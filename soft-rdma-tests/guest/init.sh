#!/bin/bash
# Guest payload: PID 1 inside the Soft-RoCE VM after the initramfs has
# switch_rooted into (tmpfs overlay over) the host's root file system.
#
# It mounts the usual pseudo file systems, builds two Soft-RoCE "nodes" in
# this one VM (see net_setup below and ../README.md), runs the built-in smoke
# tests and then the job's test binaries (or the benchmark), prints one
# PASS/FAIL line per test and a final "N passed, N failed" line after the
# marker line, and powers the VM off. The host (../run) reads the console.
set -uo pipefail   # no -e: a failing step must still reach the summary and poweroff

PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH HOME=/root TERM=dumb LANG=C.UTF-8

# Anything unexpected (set -u, a bash error) must still power off: an init
# that exits panics the kernel, and with panic=-1 -no-reboot qemu exits too,
# but say why first.
trap 'echo "rf-guest: init.sh exited unexpectedly"; poweroff -f' EXIT

# Mount unconditionally: / is the host's root seen through 9p, so until these
# are mounted /proc, /sys and /dev show the HOST's files (and `mountpoint`
# would read the host's mount table).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# devtmpfs lacks the links udev would make; bash's <(...) needs /dev/fd.
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# No fresh tmpfs on /tmp: the checkout being tested (and the job file) may
# live there, as in a CI clone under /tmp. The root is an overlay with a
# tmpfs upper layer, so /tmp is writable and writes stay in the VM anyway.
mount -t tmpfs -o mode=0755 tmpfs /run
# Keep kernel messages off the console so they do not split our result lines
# (they are still in dmesg, which is copied to the output directory).
dmesg -n 1 2>/dev/null || true
hostname soft-rdma-vm

arg() { # value of NAME= on the kernel command line
    local w
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

# ---- job description written by the host ---------------------------------
JOB=$(arg rf.job) || { echo "rf-guest: no rf.job= on the kernel command line"; exit 1; }
# shellcheck source=/dev/null
. "$JOB"   # sets RF_MODE, RF_REPO, RF_OUT, RF_TEST_TIMEOUT, RF_BENCH_BIN, ...
export RF_REPO RF_OUT RUST_BACKTRACE
[ -n "${RUST_LOG:-}" ] && export RUST_LOG
[ -n "${FORKD_LOG:-}" ] && export FORKD_LOG
# The host's output directory is shared writable (9p tag "rfout") and mounted
# at the same path, so logs written there survive the VM.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 rfout "$RF_OUT" \
    || echo "rf-guest: warning: cannot mount the output directory, logs stay in the VM"
LOGDIR=$RF_OUT/logs
mkdir -p "$LOGDIR"

ulimit -l unlimited
ulimit -n 65536 2>/dev/null || true
ulimit -c 0

NPASS=0
NFAIL=0
NIGN=0
pass() { echo "PASS $1"; NPASS=$((NPASS + 1)); }
fail() { echo "FAIL $1${2:+ ($2)}"; NFAIL=$((NFAIL + 1)); }

finish() {
    dmesg > "$LOGDIR/dmesg.txt" 2>/dev/null || true
    sync
    [ "$NIGN" -gt 0 ] && echo "rf-guest: $NIGN test(s) ignored (#[ignore]), not counted"
    echo "=== soft-rdma-tests: result ==="
    echo "$NPASS passed, $NFAIL failed"
    trap - EXIT
    sync
    poweroff -f
}

# ---- two Soft-RoCE nodes in one VM -----------------------------------------
# eth0 (node 1) and eth1 (node 2) are two virtio NICs on one qemu hub, i.e. one
# Ethernet segment that exists only inside qemu. One rxe device on each NIC
# gives two RDMA devices with distinct GIDs. Both IPs are local to this one
# kernel, so by default Linux would deliver node1->node2 packets through `lo`,
# where rxe never sees them (rxe receives per netdev). Policy routing sends
# traffic between the two addresses over the wire instead:
#   - the `local` table rule moves from priority 0 to 1000;
#   - locally generated (iif lo) packets from one node's IP to the other's
#     use a per-node table whose only route leaves through that node's NIC;
#   - incoming packets (iif eth*) skip those rules and are delivered locally;
#   - accept_local=1 / rp_filter=0 accept a local source address on input;
#   - static neighbour entries replace ARP between the two (Linux would not
#     answer ARP for a request whose source address is its own).
NODE1_IP=10.77.0.1
NODE2_IP=10.77.0.2
NODE1_MAC=52:54:00:77:00:01
NODE2_MAC=52:54:00:77:00:02

ifname_by_mac() {
    local d
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { basename "$d"; return 0; }
    done
    return 1
}

# Prints the index of the RoCE v2 GID holding IPv4 address $2 on device $1.
gid_index() {
    local dev=$1 ip=$2 f idx want hex
    hex=$(printf '%02x%02x:%02x%02x' ${ip//./ })
    want="0000:0000:0000:0000:0000:ffff:$hex"
    for f in /sys/class/infiniband/"$dev"/ports/1/gids/*; do
        idx=${f##*/}
        [ "$(cat "$f" 2>/dev/null)" = "$want" ] || continue
        [ "$(cat /sys/class/infiniband/"$dev"/ports/1/gid_attrs/types/"$idx" 2>/dev/null)" = "RoCE v2" ] \
            && { echo "$idx"; return 0; }
    done
    return 1
}

net_setup() {
    local if1 if2 i
    for i in $(seq 50); do
        if1=$(ifname_by_mac $NODE1_MAC) && if2=$(ifname_by_mac $NODE2_MAC) && break
        sleep 0.2
    done
    [ -n "${if1:-}" ] && [ -n "${if2:-}" ] || { echo "rf-guest: NICs not found"; ip link; return 1; }
    ip link set lo up
    for i in all default "$if1" "$if2"; do
        sysctl -qw net.ipv4.conf."$i".rp_filter=0
        sysctl -qw net.ipv4.conf."$i".accept_local=1
        # IPv6 is not needed; without it each rxe has fewer GIDs to confuse.
        sysctl -qw net.ipv6.conf."$i".disable_ipv6=1 2>/dev/null || true
    done
    ip addr add $NODE1_IP/32 dev "$if1"
    ip addr add $NODE2_IP/32 dev "$if2"
    ip link set "$if1" up
    ip link set "$if2" up
    ip route add table 101 $NODE2_IP dev "$if1" src $NODE1_IP
    ip route add table 102 $NODE1_IP dev "$if2" src $NODE2_IP
    ip rule add pref 100 iif lo from $NODE1_IP to $NODE2_IP lookup 101
    ip rule add pref 100 iif lo from $NODE2_IP to $NODE1_IP lookup 102
    ip rule add pref 1000 lookup local
    ip rule del pref 0 lookup local
    ip neigh replace $NODE2_IP lladdr $NODE2_MAC dev "$if1" nud permanent
    ip neigh replace $NODE1_IP lladdr $NODE1_MAC dev "$if2" nud permanent

    modprobe rdma_rxe || { echo "rf-guest: modprobe rdma_rxe failed"; return 1; }
    modprobe ib_uverbs 2>/dev/null || true
    rdma link add rxe0 type rxe netdev "$if1" || return 1
    rdma link add rxe1 type rxe netdev "$if2" || return 1
    local g1 g2
    for i in $(seq 50); do
        g1=$(gid_index rxe0 $NODE1_IP) && g2=$(gid_index rxe1 $NODE2_IP) && break
        sleep 0.2
    done
    [ -n "${g1:-}" ] && [ -n "${g2:-}" ] || { echo "rf-guest: RoCE v2 GIDs not found"; rdma link; return 1; }

    export RF_RDMA_GUEST=1
    export RF_RDMA_NODE1_IP=$NODE1_IP RF_RDMA_NODE2_IP=$NODE2_IP
    export RF_RDMA_NODE1_DEV=rxe0 RF_RDMA_NODE2_DEV=rxe1
    export RF_RDMA_NODE1_GID_INDEX=$g1 RF_RDMA_NODE2_GID_INDEX=$g2
    export RF_RDMA_NODE1_NETDEV=$if1 RF_RDMA_NODE2_NETDEV=$if2
    echo "rf-guest: node1 $RF_RDMA_NODE1_DEV on $if1 $NODE1_IP gid[$g1]=$(cat /sys/class/infiniband/rxe0/ports/1/gids/"$g1")"
    echo "rf-guest: node2 $RF_RDMA_NODE2_DEV on $if2 $NODE2_IP gid[$g2]=$(cat /sys/class/infiniband/rxe1/ports/1/gids/"$g2")"
    env | grep '^RF_' | sort > "$LOGDIR/env.txt"
}

# ---- built-in smoke tests ----------------------------------------------------
# wait_server PORT LOG: until a TCP listener is on PORT or the server said it
# waits (perftest with rdma_cm listens on an RDMA CM port, not on TCP).
# TCG makes servers slow to start.
wait_server() {
    local i
    for i in $(seq 150); do
        ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
        grep -q 'Waiting for client' "$2" 2>/dev/null && { sleep 0.5; return 0; }
        sleep 0.2
    done
    return 1
}

# server_client NAME PORT "server cmd" "client cmd": both must exit 0.
server_client() {
    local name=$1 port=$2 scmd=$3 ccmd=$4 log="$LOGDIR/smoke-$1.log" spid rc_s rc_c
    {
        echo "+ server: $scmd"
        # Line-buffered so that "Waiting for client" reaches the file at once.
        timeout 120 stdbuf -oL $scmd > "$log.server" 2>&1 &
        spid=$!
        if wait_server "$port" "$log.server"; then
            # Under TCG the server can announce itself a moment before its
            # RDMA CM listener takes connections (RDMA_CM_EVENT_REJECTED):
            # try again while the server still waits, at most three times.
            local attempt
            for attempt in 1 2 3; do
                echo "+ client (attempt $attempt): $ccmd"
                timeout 120 $ccmd; rc_c=$?
                [ "$rc_c" = 0 ] && break
                kill -0 "$spid" 2>/dev/null || break
                sleep 1
            done
        else
            echo "server never got ready (port $port)"; rc_c=99
        fi
        wait $spid; rc_s=$?
        echo "--- server output"; cat "$log.server"; rm -f "$log.server"
        echo "client rc=$rc_c server rc=$rc_s"
    } > "$log" 2>&1
    if [ "$rc_c" = 0 ] && [ "$rc_s" = 0 ]; then pass "smoke::$name"; else
        fail "smoke::$name" "client rc=$rc_c server rc=$rc_s"; sed 's/^/    | /' "$log" | tail -n 25; fi
}

tx_packets() { cat /sys/class/net/"$1"/statistics/tx_packets; }

smoke_tests() {
    local out
    out=$(ibv_devices 2>&1)
    if grep -qw rxe0 <<<"$out" && grep -qw rxe1 <<<"$out"; then pass smoke::ibv_devices
    else fail smoke::ibv_devices; echo "$out"; fi

    local gid1 gid2
    gid1=$(cat /sys/class/infiniband/rxe0/ports/1/gids/"$RF_RDMA_NODE1_GID_INDEX")
    gid2=$(cat /sys/class/infiniband/rxe1/ports/1/gids/"$RF_RDMA_NODE2_GID_INDEX")
    if [ "$gid1" != "$gid2" ]; then pass smoke::distinct_gids; else fail smoke::distinct_gids "$gid1"; fi

    local tx0 rx0
    tx0=$(tx_packets "$RF_RDMA_NODE2_NETDEV")
    rx0=$(cat /sys/class/net/"$RF_RDMA_NODE1_NETDEV"/statistics/rx_packets)
    # RC send/recv between the two devices (server on node 1, client on node 2).
    server_client rc_pingpong 18515 \
        "ibv_rc_pingpong -d rxe0 -g $RF_RDMA_NODE1_GID_INDEX -p 18515 -n 100" \
        "ibv_rc_pingpong -d rxe1 -g $RF_RDMA_NODE2_GID_INDEX -p 18515 -n 100 $RF_RDMA_NODE1_IP"
    # RDMA READ: node 2 reads node 1's memory.
    server_client rdma_read_lat 18516 \
        "ib_read_lat -d rxe0 -x $RF_RDMA_NODE1_GID_INDEX -p 18516 -n 50 -F" \
        "ib_read_lat -d rxe1 -x $RF_RDMA_NODE2_GID_INDEX -p 18516 -n 50 -F $RF_RDMA_NODE1_IP"
    # The same RDMA READ with the connection set up by rdma_cm (address
    # resolution through the policy routes below instead of GID indexes).
    server_client rdma_read_lat_rdma_cm 18517 \
        "ib_read_lat -d rxe0 -R -p 18517 -n 50 -F" \
        "ib_read_lat -d rxe1 -R -p 18517 -n 50 -F $RF_RDMA_NODE1_IP"
    # The RoCE packets must have crossed the virtual wire (eth1 -> eth0), not
    # the loopback device: otherwise the "two nodes" would be one.
    local dtx drx
    dtx=$(( $(tx_packets "$RF_RDMA_NODE2_NETDEV") - tx0 ))
    drx=$(( $(cat /sys/class/net/"$RF_RDMA_NODE1_NETDEV"/statistics/rx_packets) - rx0 ))
    if [ "$dtx" -ge 150 ] && [ "$drx" -ge 150 ]; then pass smoke::over_the_wire
    else fail smoke::over_the_wire "node2 tx $dtx, node1 rx $drx packets"; fi
}

# ---- test binaries -------------------------------------------------------------
# Each test of a libtest binary runs on its own (--exact NAME --nocapture
# --test-threads=1) so that its output, its SKIPPED line or a crash belongs to
# it alone. Inside the VM everything must run: SKIPPED counts as failed.
run_one_test() {
    local cwd=$1 bin=$2 name=$3 base log rc
    base=$(basename "$bin")
    log="$LOGDIR/test-${base}-${name//[^A-Za-z0-9_.-]/_}.log"
    ( cd "$cwd" && timeout -k 10 "${RF_TEST_TIMEOUT:-1500}" "$bin" --exact "$name" --nocapture --test-threads=1 ) > "$log" 2>&1
    rc=$?
    # Show the test's output on the console, indented, so failures can be read there.
    sed 's/^/    | /' "$log"
    # libtest's closing line for this one test, e.g.
    # "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out; ..."
    local np= nf= ni=
    read -r np nf ni < <(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$log" | tail -n 1) || true
    # A test may report cells of its own (the corpus over RDMA): each
    # "CELL ok NAME" / "CELL FAIL NAME: why" line counts as a test.
    local cell cname
    while IFS= read -r cell; do
        cname=${cell#CELL ok }
        if [ "$cname" != "$cell" ]; then pass "$cname"; continue; fi
        cname=${cell#CELL FAIL }
        fail "${cname%%: *}" "${cname#*: }"
    done < <(grep -E '^ *CELL (ok|FAIL) ' "$log" | sed 's/^ *//')
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then fail "$name" "timed out after ${RF_TEST_TIMEOUT:-1500}s"
    elif grep -q 'SKIPPED:' "$log"; then fail "$name" "SKIPPED inside the VM: $(grep -m1 -o 'SKIPPED:.*' "$log")"
    elif [ "$rc" != 0 ]; then fail "$name" "exit $rc"
    elif [ "$np" = 1 ] && [ "$nf" = 0 ]; then pass "$name"
    elif [ "$ni" = 1 ] && [ "$np" = 0 ]; then echo "IGNORED $name"; NIGN=$((NIGN + 1))
    else fail "$name" "no result line (did the test run?)"; fi
}

run_test_binary() {
    # $3, if given: run only the tests whose names end with it.
    local cwd=$1 bin=$2 suffix=${3:-} names
    echo "rf-guest: test binary $bin (cwd $cwd)${suffix:+, tests *$suffix}"
    if [ ! -x "$bin" ]; then fail "$(basename "$bin")" "test binary not found"; return; fi
    # `--list --format terse` prints "NAME: test" per test (and ": benchmark").
    names=$(cd "$cwd" && "$bin" --list --format terse 2>"$LOGDIR/list.err" | sed -n 's/: test$//p')
    if [ -n "$suffix" ]; then
        names=$(awk -v s="$suffix" 'length($0) >= length(s) && substr($0, length($0) - length(s) + 1) == s' <<<"$names")
    fi
    if [ -z "$names" ]; then
        fail "$(basename "$bin")" "lists no tests"; sed 's/^/    | /' "$LOGDIR/list.err"; return
    fi
    local n
    while IFS= read -r n; do
        run_one_test "$cwd" "$bin" "$n"
    done <<<"$names"
}

run_bench() {
    local log="$LOGDIR/bench.log" rc
    echo "rf-guest: benchmark $RF_BENCH_BIN (TCG timings are not performance figures)"
    ( cd "${RF_BENCH_CWD:-$RF_REPO}" && timeout -k 10 "${RF_BENCH_TIMEOUT:-1800}" "$RF_BENCH_BIN" --bench ${RF_BENCH_ARGS:-} ) 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then pass bench::rdma-transport; else fail bench::rdma-transport "exit $rc"; fi
}

# ---- main ------------------------------------------------------------------------
echo "rf-guest: up, kernel $(uname -r), mode $RF_MODE"
if ! net_setup > "$LOGDIR/net-setup.log" 2>&1; then
    cat "$LOGDIR/net-setup.log"
    fail setup::rxe_nodes "see $LOGDIR/net-setup.log"
    finish
fi
grep '^rf-guest:' "$LOGDIR/net-setup.log"

smoke_tests
case "$RF_MODE" in
    smoke) ;;
    tests)
        # veth for namespaced nodes, sch_netem for the slow-link test.
        modprobe veth 2>/dev/null || true
        modprobe sch_netem 2>/dev/null || true
        while read -r kind cwd bin only; do
            [ "$kind" = TEST ] || continue
            case "$only" in
                '') run_test_binary "$cwd" "$bin" ;;
                '*'*) run_test_binary "$cwd" "$bin" "${only#\*}" ;;
                *) run_one_test "$cwd" "$bin" "$only" ;;
            esac
        done < "$RF_TESTS_FILE" ;;
    bench) run_bench ;;
    *) fail "mode:$RF_MODE" "unknown mode" ;;
esac
finish
