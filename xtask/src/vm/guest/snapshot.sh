#!/bin/sh
# The kernel state the agent may touch, in a stable form: qdiscs, tc
# filters, XDP attachments, BPF links, programs and maps, and the pins.
. /vm/prelude.sh
tc qdisc show
for dev in eth0 fa0 dummy0; do
    echo "== $dev"
    tc filter show dev $dev ingress
    tc filter show dev $dev egress
    ip -d link show dev $dev | grep -o 'prog/xdp.*' || true
done
echo "== links"; bpftool link show
echo "== programs"; bpftool prog show
echo "== maps"; bpftool map show
echo "== pins"; find /sys/fs/bpf | sort
