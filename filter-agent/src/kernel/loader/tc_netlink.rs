//! The two rtnetlink requests aya does not offer, for the guard's egress
//! fallback on kernels without TCX: whether a clsact qdisc still holds any
//! filter, and removing the qdisc. The agent removes a clsact qdisc only
//! when it created it and nobody else's filter is in it.

use std::{io, mem::size_of, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;

/// `TC_H_CLSACT`, the clsact qdisc's parent, and its two hooks.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const HOOK_INGRESS: u32 = 0xffff_fff2;
const HOOK_EGRESS: u32 = 0xffff_fff3;

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct tcmsg
    family: u8,
    pad: [u8; 3],
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

/// True when neither hook of the interface's clsact qdisc has a filter.
pub fn clsact_is_empty(ifindex: u32) -> io::Result<bool> {
    for hook in [HOOK_INGRESS, HOOK_EGRESS] {
        if count_filters(ifindex, hook)? > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes the interface's clsact qdisc (and whatever it holds).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let socket = Socket::open()?;
    socket.send(
        RTM_DELQDISC,
        NLM_F_REQUEST | NLM_F_ACK,
        ifindex,
        CLSACT_HANDLE,
        TC_H_CLSACT,
    )?;
    socket.replies(|_| {})
}

fn count_filters(ifindex: u32, hook: u32) -> io::Result<usize> {
    let socket = Socket::open()?;
    socket.send(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, ifindex, 0, hook)?;
    let mut count = 0;
    socket.replies(|kind| count += usize::from(kind == RTM_NEWTFILTER))?;
    Ok(count)
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(
        &self,
        kind: u16,
        flags: u16,
        ifindex: u32,
        handle: u32,
        parent: u32,
    ) -> io::Result<()> {
        let request = Request {
            len: size_of::<Request>() as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
            family: libc::AF_UNSPEC as u8,
            pad: [0; 3],
            ifindex: ifindex as i32,
            handle,
            parent,
            info: 0,
        };
        // SAFETY: `request` is plain old data of the length passed.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                (&raw const request).cast(),
                size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until the ack or the end of the dump, passing each
    /// message type to `each`; a netlink error becomes an `io::Error`.
    fn replies(&self, mut each: impl FnMut(u16)) -> io::Result<()> {
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: the buffer is valid for its whole length.
            let read = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if read < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buffer[..read as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("truncated netlink reply"));
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    kind => each(kind),
                }
                rest = &rest[((len + 3) & !3).min(rest.len())..];
            }
        }
    }
}
