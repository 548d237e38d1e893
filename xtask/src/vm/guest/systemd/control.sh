#!/bin/sh
# vm-control.service: the host's commands on the second serial port (the
# first is the console), answered by the same loop as in the busybox guest.
stty raw -echo
echo "vm: ready $(uname -r)"
exec /vm/serve.sh
