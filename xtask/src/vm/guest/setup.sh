#!/bin/sh
# The guest's network: eth0 (virtio, user networking), a peer namespace on
# veth fa0/fa1, a "container" namespace behind nftables masquerade out of
# fa0, a namespace with a wide ephemeral range, a dummy link, services.
. /vm/prelude.sh
set -e
# netns_link NS HOST_IF NS_IF HOST_ADDR NS_ADDR: a namespace joined to
# this one by a veth pair, a /24 on each end.
netns_link() {
    ip netns add "$1"
    ip link add "$2" type veth peer name "$3"
    ip link set "$3" netns "$1"
    ip addr add "$4/24" dev "$2"
    ip link set "$2" up
    ip -n "$1" addr add "$5/24" dev "$3"
    ip -n "$1" link set "$3" up
    ip -n "$1" link set lo up
}

netns_link peer fa0 fa1 10.9.0.1 10.9.0.2
netns_link ctr ctr0 ctr1 10.9.1.1 10.9.1.2
ip -n ctr route add default via 10.9.1.1
echo 1 > /proc/sys/net/ipv4/ip_forward
nft -f /vm/nat.nft

ip netns add wide
ip netns exec wide sysctl -q -w net.ipv4.ip_local_port_range="1024 65000"

# The dummy module makes dummy0 itself when it loads.
ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy
ip link set dummy0 up

httpd -p 8080 -h /www
httpd -p 9000 -h /www
ip netns exec peer httpd -p 8080 -h /www

# The operator's own tc filter on fa0's egress, at tc's default pref: the
# agent's runs before it (and lets it decide) and must leave it,
# and the clsact qdisc it sits in, alone.
tc qdisc add dev fa0 clsact
tc filter add dev fa0 egress matchall action pass
