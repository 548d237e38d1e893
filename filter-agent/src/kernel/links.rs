//! Link events from the kernel (rtnetlink's link group), so that the agent
//! learns at once when one of its interfaces is deleted or created again:
//! a re-created interface is a new device, and nothing attached to the old
//! one filters it. The messages themselves are not parsed; each wakeup
//! makes the agent compare its interfaces' indexes with the kernel's,
//! which also covers reports the kernel dropped when the socket overflowed.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

/// A subscription to link changes in this network namespace.
pub struct LinkWatch {
    socket: AsyncFd<Socket>,
    buffer: Vec<u8>,
}

impl LinkWatch {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32))?;
        socket.set_non_blocking(true)?;
        // SAFETY: the AsyncFd owns the socket, so its fd outlives the registration.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
        Ok(Self {
            socket,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// Waits until a link was added, changed or removed (or reports were
    /// lost), and drains what is queued. Cancel-safe.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.socket.readable().await?;
            let buffer = &mut self.buffer;
            match ready.try_io(|socket| drain(socket.get_ref(), buffer)) {
                Ok(Ok(())) => return Ok(()),
                // The queue overflowed: something changed, details lost.
                Ok(Err(err)) if err.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
    }
}

/// Reads until the socket is empty; `WouldBlock` when nothing was queued.
fn drain(socket: &Socket, buffer: &mut Vec<u8>) -> io::Result<()> {
    let mut read_any = false;
    loop {
        buffer.clear();
        match socket.recv(buffer, 0) {
            Ok(_) => read_any = true,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && read_any => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}
