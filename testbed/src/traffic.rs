//! Real traffic: TCP connects, UDP exchanges and ICMP echoes, sent from
//! sockets that live in a chosen namespace.

use std::{
    io::{self, Read, Write},
    mem::MaybeUninit,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::{Netns, TestbedError};

/// How long one exchange may take before it counts as failed.
pub const TIMEOUT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(20);

/// A TCP and UDP echo service on `[::]:port` (IPv4 and IPv6) in a
/// namespace; stops on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Responder {
    pub fn start(ns: &Netns, port: u16) -> Result<Self, TestbedError> {
        Self::with_reply_size(ns, port, 0)
    }

    /// A responder whose TCP answer is the echo padded with zeros to
    /// `size` bytes (a bulk transfer for [`tcp_fetch`]).
    pub fn with_reply_size(ns: &Netns, port: u16, size: usize) -> Result<Self, TestbedError> {
        let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let (tcp, udp) = ns
            .run(|| -> io::Result<_> {
                let tcp = TcpListener::bind(any)?;
                tcp.set_nonblocking(true)?;
                let udp = UdpSocket::bind(any)?;
                udp.set_read_timeout(Some(POLL))?;
                Ok((tcp, udp))
            })?
            .map_err(|source| socket_error(ns, source))?;
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_stop = Arc::clone(&stop);
        let udp_stop = Arc::clone(&stop);
        let threads = vec![
            thread::spawn(move || {
                while !tcp_stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(TIMEOUT));
                            // The whole reply fits in the send buffer, so
                            // the loop never waits on a slow client.
                            let _ = stream.set_write_timeout(Some(TIMEOUT));
                            if size > 0 {
                                let _ = SockRef::from(&stream).set_send_buffer_size(4 * size);
                            }
                            let mut buf = [0u8; 64];
                            if let Ok(n) = stream.read(&mut buf) {
                                let mut reply = buf[..n].to_vec();
                                reply.resize(n.max(size), 0);
                                let _ = stream.write_all(&reply);
                            }
                        }
                        Err(_) => thread::sleep(POLL),
                    }
                }
            }),
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !udp_stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], peer);
                    }
                }
            }),
        ];
        Ok(Self { stop, threads })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Connects over TCP from `ns` (optionally from a fixed source port) and
/// exchanges a few bytes; true when the echo came back.
pub fn tcp_exchange(
    ns: &Netns,
    to: SocketAddr,
    from_port: Option<u16>,
) -> Result<bool, TestbedError> {
    tcp_attempt(ns, to, from_port).map(|(answered, _)| answered)
}

/// [`tcp_exchange`], also returning the local port used (the one the
/// kernel picked from `ip_local_port_range` when `from_port` is `None`).
/// A connection that is not answered sends exactly one SYN: the attempt
/// ends before the first retransmission.
pub fn tcp_attempt(
    ns: &Netns,
    to: SocketAddr,
    from_port: Option<u16>,
) -> Result<(bool, u16), TestbedError> {
    ns.run(|| -> io::Result<(bool, u16)> {
        let socket = bound(to, from_port)?;
        let connected = socket.connect_timeout(&to.into(), TIMEOUT).is_ok();
        let local_port = socket
            .local_addr()?
            .as_socket()
            .map_or(0, |local| local.port());
        if !connected {
            return Ok((false, local_port));
        }
        let mut stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.write_all(b"filter-agent")?;
        let mut buf = [0u8; 12];
        Ok((stream.read_exact(&mut buf).is_ok(), local_port))
    })
    .and_then(|result| result.map_err(|source| socket_error(ns, source)))
}

/// Connects over TCP from `ns` from `from` (an address of `ns`, or the
/// unspecified one, and a port), sends a request and reads the answer
/// until the server closes or `deadline` passes; the number of bytes that
/// arrived (0 when no connection was made).
pub fn tcp_fetch(
    ns: &Netns,
    to: SocketAddr,
    from: SocketAddr,
    deadline: Duration,
) -> Result<usize, TestbedError> {
    ns.run(|| -> io::Result<usize> {
        let Ok(mut stream) = bound_to(from).and_then(|socket| {
            socket.connect_timeout(&to.into(), TIMEOUT)?;
            Ok(TcpStream::from(socket))
        }) else {
            return Ok(0);
        };
        stream.write_all(b"filter-agent")?;
        let until = Instant::now() + deadline;
        let (mut received, mut buf) = (0, [0u8; 4096]);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            stream.set_read_timeout(Some(left.max(POLL)))?;
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
        Ok(received)
    })
    .and_then(|result| result.map_err(|source| socket_error(ns, source)))
}

/// Connects over TCP from `ns` from `from_port` and aborts the connection
/// at once (`SO_LINGER` 0: a RST instead of a FIN); true when it was made.
pub fn tcp_abort(ns: &Netns, to: SocketAddr, from_port: u16) -> Result<bool, TestbedError> {
    ns.run(|| -> io::Result<bool> {
        let socket = bound(to, Some(from_port))?;
        let connected = socket.connect_timeout(&to.into(), TIMEOUT).is_ok();
        socket.set_linger(Some(Duration::ZERO))?;
        Ok(connected)
    })
    .and_then(|result| result.map_err(|source| socket_error(ns, source)))
}

/// A TCP socket for `to`, bound to `from_port` if given.
fn bound(to: SocketAddr, from_port: Option<u16>) -> io::Result<Socket> {
    match from_port {
        Some(port) => bound_to(SocketAddr::new(unspecified(to.ip()), port)),
        None => Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)),
    }
}

/// A TCP socket bound to `from`.
fn bound_to(from: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(from), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&from.into())?;
    Ok(socket)
}

/// Sends one UDP datagram from `ns` and waits for its echo.
pub fn udp_exchange(ns: &Netns, to: SocketAddr) -> Result<bool, TestbedError> {
    ns.run(|| -> io::Result<bool> {
        let socket = UdpSocket::bind(SocketAddr::new(unspecified(to.ip()), 0))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.send_to(b"filter-agent", to)?;
        let mut buf = [0u8; 64];
        Ok(socket.recv_from(&mut buf).is_ok())
    })
    .and_then(|result| result.map_err(|source| socket_error(ns, source)))
}

/// Sends one ICMP/ICMPv6 echo request from `ns`; true when a reply came.
pub fn icmp_echo(ns: &Netns, to: IpAddr) -> Result<bool, TestbedError> {
    ns.run(|| -> io::Result<bool> {
        let (domain, protocol, request_type, reply_type) = match to {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
        socket.set_read_timeout(Some(POLL))?;
        let id = (std::process::id() & 0xffff) as u16;
        let mut request = [request_type, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1];
        if to.is_ipv4() {
            // The kernel fills in the checksum for ICMPv6 only.
            let checksum = internet_checksum::checksum(&request);
            request[2..4].copy_from_slice(&checksum);
        }
        socket.send_to(&request, &SocketAddr::new(to, 0).into())?;
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        while Instant::now() < deadline {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            // SAFETY: recv_from initialised the first `n` bytes.
            let data: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            // Raw IPv4 sockets deliver the IP header too.
            let icmp = match to {
                IpAddr::V4(_) => data
                    .get(usize::from(data[0] & 0x0f) * 4..)
                    .unwrap_or_default(),
                IpAddr::V6(_) => &data[..],
            };
            let from_target = from.as_socket().is_some_and(|from| from.ip() == to);
            if from_target
                && icmp.len() >= 6
                && icmp[0] == reply_type
                && icmp[4..6] == request[4..6]
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .and_then(|result| result.map_err(|source| socket_error(ns, source)))
}

fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u8; 16]),
    }
}

/// `GET path` from inside `ns` over HTTP/1.1: the status code and the body.
pub fn http_get(ns: &Netns, address: &str, path: &str) -> Result<(u16, String), TestbedError> {
    let response = ns
        .run(|| -> io::Result<String> {
            let mut stream = TcpStream::connect(address)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })?
        .map_err(|source| socket_error(ns, source))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

pub(crate) fn socket_error(ns: &Netns, source: io::Error) -> TestbedError {
    TestbedError::Socket {
        name: ns.name().to_owned(),
        source,
    }
}
