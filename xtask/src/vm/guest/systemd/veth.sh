#!/bin/sh
# A peer namespace on veth fa0/fa1 (10.9.0.1 here, 10.9.0.2 there).
set -e
ip netns add peer
ip link add fa0 type veth peer name fa1
ip link set fa1 netns peer
ip addr add 10.9.0.1/24 dev fa0
ip link set fa0 up
ip -n peer addr add 10.9.0.2/24 dev fa1
ip -n peer link set fa1 up
ip -n peer link set lo up
