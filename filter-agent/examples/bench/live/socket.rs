//! The sender for kernels that refuse XDP live frames: an AF_PACKET socket
//! bound to the sender's veth, each frame handed straight to the driver
//! (PACKET_QDISC_BYPASS), many frames per sendmmsg call. Every frame then
//! costs the sender an skb, and the receiving veth a copy into a page for
//! XDP; both are the same for every receiver in a run.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};
use filter_common::sender::FRAME_BYTES;

/// Frames per sendmmsg call.
const PER_CALL: usize = 64;
/// How long the veth may keep refusing frames (its ring full) before the
/// run fails.
const REFUSED_FOR: Duration = Duration::from_secs(1);

/// Sends `count` frames of `frames` in turn out of `ifindex`, from the
/// calling thread's network namespace; returns the wall time per frame.
/// A frame the veth drops (ENOBUFS, its ring full) is sent again, so that
/// exactly `count` reach the receiver.
pub(super) fn send(frames: &[[u8; FRAME_BYTES]], ifindex: u32, count: u32) -> anyhow::Result<f64> {
    ensure!(!frames.is_empty(), "no frames to send");
    let socket = bound_socket(ifindex)?;
    let started = Instant::now();
    let (mut sent, mut refused_since) = (0usize, None);
    let total = count as usize;
    while sent < total {
        let calls = PER_CALL.min(total - sent);
        let mut iovecs: [libc::iovec; PER_CALL] = unsafe { std::mem::zeroed() };
        let mut messages: [libc::mmsghdr; PER_CALL] = unsafe { std::mem::zeroed() };
        for (k, (iovec, message)) in iovecs.iter_mut().zip(&mut messages).enumerate() {
            let frame = &frames[(sent + k) % frames.len()];
            iovec.iov_base = frame.as_ptr() as *mut libc::c_void;
            iovec.iov_len = FRAME_BYTES;
            message.msg_hdr.msg_iov = iovec;
            message.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `messages[..calls]` point at live iovecs, which point at
        // frames that outlive the call; the kernel only reads them.
        let done = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                messages.as_mut_ptr(),
                calls as libc::c_uint,
                0,
            )
        };
        if done > 0 {
            sent += done as usize;
            refused_since = None;
            continue;
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENOBUFS) {
            bail!("sendmmsg on an AF_PACKET socket: {error}");
        }
        let since = *refused_since.get_or_insert_with(Instant::now);
        ensure!(
            since.elapsed() < REFUSED_FOR,
            "the sender's veth refused frames for {REFUSED_FOR:?} (ENOBUFS)"
        );
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(count.max(1)))
}

/// A raw packet socket that sends on `ifindex` and receives nothing
/// (protocol 0), past the qdisc.
fn bound_socket(ifindex: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain system calls on a descriptor this function owns, with
    // pointers to locals that outlive each call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        succeeded(fd, "opening an AF_PACKET socket")?;
        let socket = OwnedFd::from_raw_fd(fd);
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = ifindex as i32;
        let size = std::mem::size_of_val(&address) as libc::socklen_t;
        let bound = libc::bind(fd, (&raw const address).cast(), size);
        succeeded(bound, "binding the AF_PACKET socket to its interface")?;
        let bypass: libc::c_int = 1;
        let size = std::mem::size_of_val(&bypass) as libc::socklen_t;
        let set = libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const bypass).cast(),
            size,
        );
        succeeded(set, "PACKET_QDISC_BYPASS")?;
        Ok(socket)
    }
}

/// A system call's result: negative is the error in errno.
fn succeeded(result: libc::c_int, what: &str) -> anyhow::Result<()> {
    ensure!(result >= 0, "{what}: {}", std::io::Error::last_os_error());
    Ok(())
}
