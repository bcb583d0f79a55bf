//! The wire of a tap "VM": a thread that copies Ethernet frames between the host's tap
//! (a bridge port, as QEMU's would be) and a tap named `eth0` inside the VM's namespace.
//!
//! ```text
//!  host namespace                                   VM namespace
//!  bridge ── bpt<suffix><n> ══ /dev/net/tun fd ⇄ forwarder ⇄ /dev/net/tun fd ══ eth0 ── IP stack
//! ```
//!
//! What the VM's stack transmits on `eth0` is read from the namespace fd and written to
//! the host fd: the host tap *receives* it, exactly as frames a QEMU guest sends (XDP on
//! the tap sees them). What the bridge sends out of the host tap is read from the host fd
//! and written to the namespace fd, so `eth0` receives it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::thread::JoinHandle;

use crate::netns::in_netns;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens /dev/net/tun and attaches it to the tap `name` in the calling thread's network
/// namespace, creating a non-persistent tap if none has that name. The descriptor is
/// non-blocking.
pub(crate) fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: path is a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    assert!(name.len() < libc::IFNAMSIZ, "tap name {name:?} is too long");
    for (slot, byte) in req.name.iter_mut().zip(name.bytes()) {
        *slot = byte.cast_signed();
    }
    req.flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI).expect("flags fit");
    // SAFETY: req is a valid ifreq-shaped buffer that outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &raw mut req) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
    }
    Ok(fd)
}

/// The running forwarder; dropping it stops the thread and closes both descriptors (which
/// deletes the namespace's non-persistent `eth0`).
#[derive(Debug)]
pub(crate) struct TapForwarder {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl TapForwarder {
    /// Attaches to the existing host tap `host_tap`, creates `eth0` inside `netns`, and
    /// starts copying frames. Panics with context on failure.
    pub(crate) fn start(host_tap: &str, netns: &str) -> TapForwarder {
        let host = open_tap(host_tap).unwrap_or_else(|e| panic!("cannot attach to host tap {host_tap}: {e}"));
        let guest =
            in_netns(netns, || open_tap("eth0")).unwrap_or_else(|e| panic!("cannot create tap eth0 in {netns}: {e}"));
        // SAFETY: eventfd has no memory effects.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(stop >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: stop was just created and is owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_raw = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name(format!("tap-{host_tap}"))
            .spawn(move || forward(&host, &guest, stop_raw))
            .expect("cannot spawn the tap forwarder thread");
        TapForwarder { stop, thread: Some(thread) }
    }
}

impl Drop for TapForwarder {
    fn drop(&mut self) {
        // SAFETY: the eventfd is open until `self.stop` drops, after the join below.
        unsafe { libc::eventfd_write(self.stop.as_raw_fd(), 1) };
        if let Some(thread) = self.thread.take() {
            let _ignored = thread.join();
        }
    }
}

/// Copies frames both ways until the stop eventfd fires or a descriptor fails.
fn forward(host: &OwnedFd, guest: &OwnedFd, stop: RawFd) {
    let mut buf = vec![0u8; 65_536];
    let mut fds = [
        libc::pollfd { fd: host.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: guest.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: fds is a valid array of 3 pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[2].revents != 0 {
            return;
        }
        for (from, to) in [(0, 1), (1, 0)] {
            let revents = fds[from].revents;
            if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return;
            }
            if revents & libc::POLLIN != 0 {
                copy_available(fds[from].fd, fds[to].fd, &mut buf);
            }
        }
    }
}

/// Copies every frame that can be read now; a frame the other side refuses (its interface
/// is down, say) is dropped, as a wire would.
fn copy_available(from: RawFd, to: RawFd, buf: &mut [u8]) {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(len) = usize::try_from(n) else { return };
        if len == 0 {
            return;
        }
        // SAFETY: the first `len` bytes of buf were just written by read.
        let _written = unsafe { libc::write(to, buf.as_ptr().cast(), len) };
    }
}
