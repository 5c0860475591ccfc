#!/usr/bin/env bash
# Several forkd "nodes" on one machine: a network namespace each, joined by
# veth pairs to a bridge, each with its own address and its own forkd.
#
#   nodes.sh up DIR [N] [FORKD]   start N nodes (default 3); writes DIR/nodes.env
#   nodes.sh down DIR             stop them and remove every namespace and link
#
# FORKD_ARGS adds flags to every forkd (e.g. --remote-commands).
# DIR/nodes.env has, per node i: NODEi_NS, NODEi_IP, NODEi_SOCK (Unix socket,
# reachable from the host), NODEi_ADDR (gRPC on TCP), NODEi_METRICS
# (Prometheus text over HTTP), NODEi_VETH (host side
# of its link), and TOKEN_FILE. Every name starts with a prefix unique to
# DIR, so several setups can coexist; `down` is safe to run twice.
set -euo pipefail
cmd=${1:?usage: nodes.sh up|down DIR [N] [FORKD]}
dir=${2:?usage: nodes.sh up|down DIR [N] [FORKD]}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
prefix=rf$(printf '%s' "$dir" | md5sum | cut -c1-4)
subnet=$(( 0x$(printf '%s' "$dir" | md5sum | cut -c5-6) % 200 + 20 ))

down() {
    for pidf in "$dir"/n*.pid; do
        [ -f "$pidf" ] || continue
        kill "$(cat "$pidf")" 2>/dev/null || true
        rm -f "$pidf"
    done
    sleep 0.2
    for ns in $(ip netns list | awk '{print $1}' | grep "^${prefix}n" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "${prefix}br" 2>/dev/null || true
}

case "$cmd" in
down)
    down
    ;;
up)
    n=${3:-3}
    forkd=${4:-forkd}
    down
    trap 'echo "nodes.sh: setup failed; tearing down" >&2; down' ERR
    echo "test-token-$prefix" > "$dir/token"
    # A /24 no other setup uses (two bridges with one subnet would make the
    # host's routes to the nodes ambiguous): start from the hash of DIR,
    # take the next free one, under a lock against concurrent setups.
    mkdir -p /run/lock
    exec 9>/run/lock/remotefork-nodes.lock
    flock 9
    for _ in $(seq 1 200); do
        ip -4 -o addr show | grep -q " 10\.77\.$subnet\." || break
        subnet=$(( (subnet - 20 + 1) % 200 + 20 ))
    done
    ip link add "${prefix}br" type bridge
    ip link set "${prefix}br" up
    # The host side gets .254 on the bridge, so tests on the host reach the nodes.
    ip addr add "10.77.$subnet.254/24" dev "${prefix}br"
    flock -u 9
    : > "$dir/nodes.env"
    echo "TOKEN_FILE=$dir/token" >> "$dir/nodes.env"
    for i in $(seq 1 "$n"); do
        ns="${prefix}n$i"
        ip="10.77.$subnet.$i"
        ip netns add "$ns"
        ip link add "${prefix}v$i" type veth peer name "${prefix}p$i"
        ip link set "${prefix}p$i" netns "$ns"
        ip link set "${prefix}v$i" master "${prefix}br" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$ip/24" dev "${prefix}p$i"
        ip -n "$ns" link set "${prefix}p$i" up
        mkdir -p "$dir/n$i"
        # nsenter joins the network namespace only: `ip netns exec` also
        # remounts /sys for it, which hides the cgroup hierarchies that
        # runc and container children's limits need.
        nsenter --net="/run/netns/$ns" -- "$forkd" serve --socket "$dir/n$i.sock" --state-dir "$dir/n$i" \
            --listen "$ip:7070" --page-listen "$ip:7071" --metrics "$ip:7072" --token-file "$dir/token" ${FORKD_TRANSPORT:+--transport "$FORKD_TRANSPORT"} \
            --page-deadline-ms "${PAGE_DEADLINE_MS:-3000}" ${FORKD_ARGS:-} > "$dir/n$i.log" 2>&1 &
        echo $! > "$dir/n$i.pid"
        {
            echo "NODE${i}_NS=$ns"
            echo "NODE${i}_IP=$ip"
            echo "NODE${i}_SOCK=$dir/n$i.sock"
            echo "NODE${i}_ADDR=$ip:7070"
            echo "NODE${i}_METRICS=$ip:7072"
            echo "NODE${i}_VETH=${prefix}v$i"
            echo "NODE${i}_PEER=${prefix}p$i"
        } >> "$dir/nodes.env"
    done
    # Wait for every forkd to answer.
    for i in $(seq 1 "$n"); do
        for _ in $(seq 1 200); do
            [ -S "$dir/n$i.sock" ] && break
            sleep 0.05
        done
        [ -S "$dir/n$i.sock" ] || { echo "nodes.sh: forkd on node $i did not start:" >&2; cat "$dir/n$i.log" >&2; false; }
    done
    trap - ERR
    echo "nodes.sh: $n nodes up ($prefix, 10.77.$subnet.0/24)" >&2
    ;;
*)
    echo "usage: nodes.sh up|down DIR [N] [FORKD]" >&2
    exit 2
    ;;
esac
