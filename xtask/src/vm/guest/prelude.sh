# Sourced by every command: busybox's shell runs its own applets before
# PATH, so iproute2's ip and tc are named by path.
ip() { /usr/sbin/ip "$@"; }
tc() { /usr/sbin/tc "$@"; }

# get HOST PORT [PATH]: an HTTP GET through busybox's nc (its wget crashes
# in this userland); fails when nothing answers within 3 s.
get() {
    printf 'GET %s HTTP/1.0\r\n\r\n' "${3:-/}" | nc -w 3 "$1" "$2"
}

# get_in NETNS HOST PORT: the same from inside a network namespace.
get_in() {
    printf 'GET / HTTP/1.0\r\n\r\n' | /usr/sbin/ip netns exec "$1" nc -w 3 "$2" "$3"
}
