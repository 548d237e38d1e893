#!/bin/sh
# One command per line, base64-encoded; each answer ends with "@@rc=N".
while IFS= read -r line; do
    { cat /vm/prelude.sh; echo "$line" | base64 -d; } > /tmp/command.sh
    sh /tmp/command.sh > /tmp/output 2>&1 < /dev/null
    rc=$?
    cat /tmp/output
    echo "@@rc=$rc"
done
