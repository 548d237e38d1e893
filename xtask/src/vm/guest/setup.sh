#!/bin/sh
# The guest's network: eth0 (virtio, user networking), a peer namespace on
# veth fa0/fa1, a "container" namespace behind nftables masquerade out of
# fa0, a namespace with a wide ephemeral range, a dummy link, services.
. /vm/prelude.sh
set -e
ip netns add peer
ip link add fa0 type veth peer name fa1
ip link set fa1 netns peer
ip addr add 10.9.0.1/24 dev fa0
ip link set fa0 up
ip -n peer addr add 10.9.0.2/24 dev fa1
ip -n peer link set fa1 up
ip -n peer link set lo up

ip netns add ctr
ip link add ctr0 type veth peer name ctr1
ip link set ctr1 netns ctr
ip addr add 10.9.1.1/24 dev ctr0
ip link set ctr0 up
ip -n ctr addr add 10.9.1.2/24 dev ctr1
ip -n ctr link set ctr1 up
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
