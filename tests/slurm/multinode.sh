# Sourced by start-multinode.sh and stop-multinode.sh (after common.sh): their knobs, and the
# network the nodes live on. Each node nK is a network namespace $NETNS_PREFIX-nK with
#   - eth0, a veth into the host's bridge $BRIDGE: $NET.(10+K)/24; the host is $NET.1 on the bridge;
#   - gldummy0 with $UNREACHABLE_NET.(10+K)/32: no other node has a route to it, and the host
#     routes $UNREACHABLE_NET.0/24 to "unreachable", so that address, handed to another node,
#     fails at once (the "wrong interface advertised" case); on its own node it works. A veth
#     whose peer (gldummy0p) stays in the node: this kernel has no `dummy` link type;
#   - lo up; no default route: a node reaches the host and the other nodes, nothing else.
# The host does not forward (nothing here turns ip_forward on): no traffic leaves these namespaces.

DIR=${GYMLAUNCH_SLURM_MULTI_DIR:-/tmp/gymlaunch-slurm-multi}
DIR_KNOB=GYMLAUNCH_SLURM_MULTI_DIR
MARKER=.gymlaunch-slurm-multi   # not start.sh's marker: neither kind's stop removes the other's folder
NODES=${GYMLAUNCH_SLURM_MULTI_NODES:-2}
BRIDGE=${GYMLAUNCH_SLURM_MULTI_BRIDGE:-gl-br0}
NET=${GYMLAUNCH_SLURM_MULTI_NET:-10.124.0}
UNREACHABLE_NET=${GYMLAUNCH_SLURM_MULTI_UNREACHABLE_NET:-10.125.0}
NETNS_PREFIX=${GYMLAUNCH_SLURM_MULTI_NETNS_PREFIX:-glmn}

[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "GYMLAUNCH_SLURM_MULTI_NODES must be 1..99: $NODES"
[[ $NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "GYMLAUNCH_SLURM_MULTI_NET must be three octets (10.124.0): $NET"
[[ $UNREACHABLE_NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
    die "GYMLAUNCH_SLURM_MULTI_UNREACHABLE_NET must be three octets (10.125.0): $UNREACHABLE_NET"
# interface names are at most 15 characters: "<prefix>-n99"
[[ $NETNS_PREFIX =~ ^[a-z][a-z0-9]{0,10}$ ]] || die "GYMLAUNCH_SLURM_MULTI_NETNS_PREFIX must be [a-z][a-z0-9]{0,10}: $NETNS_PREFIX"
[[ $BRIDGE =~ ^[A-Za-z][A-Za-z0-9_.-]{0,14}$ ]] || die "GYMLAUNCH_SLURM_MULTI_BRIDGE is not an interface name: $BRIDGE"

HOST_ADDRESS=$NET.1
DUMMY=gldummy0

# network_up: bridge, namespaces, veths, addresses (each only when missing: a half-built network
# from a failed start is completed, not duplicated)
network_up() {
    local k ns veth peer
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$HOST_ADDRESS/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    ip route replace unreachable "$UNREACHABLE_NET.0/24"
    for ((k = 1; k <= NODES; k++)); do
        ns=$NETNS_PREFIX-n$k veth=$NETNS_PREFIX-n$k peer=${NETNS_PREFIX}p$k
        [[ -e /var/run/netns/$ns ]] || ip netns add "$ns"
        if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            ip link del "$veth" 2>/dev/null || true   # the host end of a pair a failed start left
            ip link del "$peer" 2>/dev/null || true
            ip link add "$veth" type veth peer name "$peer"
            ip link set "$peer" netns "$ns"
            ip -n "$ns" link set "$peer" name eth0
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$NET.$((10 + k))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link show "$DUMMY" >/dev/null 2>&1 || ip -n "$ns" link add "$DUMMY" type veth peer name "${DUMMY}p"
        ip -n "$ns" addr replace "$UNREACHABLE_NET.$((10 + k))/32" dev "$DUMMY"
        ip -n "$ns" link set "${DUMMY}p" up
        ip -n "$ns" link set "$DUMMY" up
    done
}

# node_netns_down NS: what still runs in the node's namespace killed (only this cluster's slurmd
# and job processes can run there), the namespace deleted (its veth goes with it)
node_netns_down() {
    local pids
    pids=$(ip netns pids "$1" | tr '\n' ' ')
    if [[ -n ${pids// /} ]]; then
        log "killing processes left in $1: $pids"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$1"
    log "removed network namespace $1"
}

# nodes_beyond K: the numbers of the nodes above K that have a namespace (from a start with more nodes)
nodes_beyond() {
    ip netns list | awk -v pre="$NETNS_PREFIX-n" -v k="$1" \
        'index($1, pre) == 1 { n = substr($1, length(pre) + 1); if (n ~ /^[0-9]+$/ && n + 0 > k) print n }'
}

# network_down: every namespace named $NETNS_PREFIX-n<k> (whatever the node count was), their
# veths, the bridge and the unreachable route
network_down() {
    local k veth
    for k in $(nodes_beyond 0); do node_netns_down "$NETNS_PREFIX-n$k"; done
    # host ends whose namespace is gone already, or pairs a failed start never moved
    for veth in $(ip -o link show | awk -F': ' -v p="^($NETNS_PREFIX-n|${NETNS_PREFIX}p)[0-9]+(@|\$)" '$2 ~ p { sub(/@.*/, "", $2); print $2 }'); do
        ip link del "$veth" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
        log "removed bridge $BRIDGE"
    fi
    if [[ -n $(ip route show type unreachable "$UNREACHABLE_NET.0/24") ]]; then
        ip route del unreachable "$UNREACHABLE_NET.0/24"
    fi
}
