//! The TAP device the router puts on the bridge, opened with a virtio-net
//! header so the kernel can hand us TCP super-frames (TSO) and accept them
//! back (GSO): one read or write moves up to 64 KiB instead of one MTU.
//!
//! tun-rs is not used here: its offload support targets L3 TUN devices, and
//! the sleeve wants the raw virtio-net header of an L2 TAP, carried unchanged
//! to the peer that writes the frame back.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};

use weft_proto::sleeve::VNET_LEN;

/// TAP MTU: large, so the bridge never drops a frame for size on its way to the router; the
/// sleeve fragments whatever it gets.
pub const TAP_MTU: u32 = 65_521;
/// Longest a write waits for room in the TAP's queue, in milliseconds.
const WRITE_WAIT_MS: i32 = 100;

/// The router's TAP name for a bridge ("weft" → "weft-tap").
pub fn tap_name(bridge: &str) -> String {
    let base: String = bridge.chars().take(10).collect();
    format!("{base}-tap")
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Whether the kernel accepted TSO/checksum offload.
    pub offload: bool,
}

impl Tap {
    /// Creates (or opens) TAP `name` with a virtio-net header, non-blocking.
    pub fn open(name: &str, want_offload: bool) -> Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            bail!("TAP name {name:?} must be 1 to 15 bytes");
        }
        let path = CString::new("/dev/net/tun").context("path")?;
        // SAFETY: plain open(2) of a constant path.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error())
                .context("opening /dev/net/tun: is the tun module loaded and are we root (CAP_NET_ADMIN)?");
        }
        // SAFETY: raw is a freshly opened descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        for (i, b) in name.bytes().enumerate() {
            req.name[i] = b as libc::c_char;
        }
        // SAFETY: TUNSETIFF takes a pointer to an ifreq, which IfReq lays out.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("creating TAP device {name}"));
        }
        let hdr: libc::c_int = VNET_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(io::Error::last_os_error()).context("setting the TAP virtio-net header size");
        }
        let mut offload = false;
        if want_offload {
            let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } == 0 {
                offload = true;
            } else {
                tracing::warn!(error = %io::Error::last_os_error(), "TAP offload refused by the kernel; sleeve runs frame by frame");
            }
        }
        Ok(Tap { fd, name: name.to_owned(), offload })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame with its virtio-net header into `buf`. `Ok(None)` when
    /// nothing is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame with the virtio-net header that came with it. While the TAP's queue is
    /// full it waits, at most 100 ms in all, then gives up with `WouldBlock` (the
    /// caller drops the frame and counts it): the receiving thread must never stall for long.
    pub fn write(&self, vnet: &[u8; VNET_LEN], frame: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec { iov_base: vnet.as_ptr() as *mut _, iov_len: VNET_LEN },
            libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() },
        ];
        let mut waited = 0;
        loop {
            // SAFETY: both iovecs point at live buffers of the stated lengths.
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && waited < WRITE_WAIT_MS {
                wait_fd(self.fd.as_raw_fd(), libc::POLLOUT, 10);
                waited += 10;
                continue;
            }
            return Err(e);
        }
    }

    /// The raw descriptor, for poll(2).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits up to `timeout_ms` for the events of any of `fds`; returns whether one is ready (each
/// one's `revents` says which; all are cleared on a time-out or error).
pub fn wait_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> bool {
    for p in fds.iter_mut() {
        p.revents = 0;
    }
    // SAFETY: a valid array of pollfds of the given length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r <= 0 {
        for p in fds.iter_mut() {
            p.revents = 0;
        }
    }
    r > 0
}

/// Waits up to `timeout_ms` for `events` on `fd`. Returns whether it is ready.
pub fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents != 0
}
