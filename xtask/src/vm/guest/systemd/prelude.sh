# Sourced by every command in the systemd guest (Debian's busybox for nc).

# get HOST PORT [PATH]: an HTTP GET; fails when nothing answers within 3 s.
get() {
    printf 'GET %s HTTP/1.0\r\n\r\n' "${3:-/}" | busybox nc -w 3 "$1" "$2"
}

# get_in NETNS HOST PORT: the same from inside a network namespace.
get_in() {
    printf 'GET / HTTP/1.0\r\n\r\n' | ip netns exec "$1" busybox nc -w 3 "$2" "$3"
}
