//! A small-packet generator and a receiver for the lab's "VMs".
//!
//! The sender writes ready-made Ethernet frames (IPv4/UDP, 60 bytes: the minimum frame,
//! 64 on a wire with its FCS) to `eth0` of the calling thread's network namespace
//! through an `AF_PACKET` socket with `PACKET_QDISC_BYPASS`, in batches of
//! `sendmmsg(2)`. Each frame's flow (source address and port) is patched in place, so
//! one flow, a few hundred, or hundreds of thousands of distinct flows cost the same.
//!
//! The receiver is a plain UDP socket drained with `recvmmsg(2)`: it counts what reached
//! an application in the destination VM.
//!
//! Both run on threads of their own inside a VM's namespace and publish running totals
//! through atomics, so that the caller samples a steady window (after a warm-up) and
//! stops them when it is done.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Length of every generated frame: Ethernet 14 + IPv4 20 + UDP 8 + 18 bytes of payload.
pub const FRAME_LEN: usize = 60;
/// Frames handed to the kernel per `sendmmsg` call.
pub const DEFAULT_BATCH: usize = 64;
/// First source port of the generated flows.
pub const SOURCE_PORT_BASE: u16 = 10_000;
/// Source ports per source address before the address advances.
pub const PORTS_PER_ADDRESS: u32 = 50_000;

const ETH_P_IP: u16 = 0x0800;
/// Datagrams per `recvmmsg` call, and the bytes kept of each (the frames carry 18).
const RECV_BATCH: usize = 256;
const RECV_BATCH_U32: u32 = 256;
const RECV_BUF: usize = 64;

/// What to send.
#[derive(Clone, Debug)]
pub struct SendSpec {
    /// Interface in the sender's namespace (`eth0` in a lab VM).
    pub ifname: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Source address of flow 0; flows beyond [`PORTS_PER_ADDRESS`] use the next addresses.
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    /// Distinct flows, visited round-robin (1 = a single flow).
    pub flows: u32,
    /// Index of the first flow: lets consecutive runs use flows not seen before.
    pub first_flow: u32,
    pub batch: usize,
    /// Stop after this many frames (None: until stopped).
    pub max_frames: Option<u64>,
}

impl SendSpec {
    /// Frames from `from`'s `eth0` to `to_mac`/`to_ip`, UDP port `dst_port`, over `flows`
    /// flows (source ports from [`SOURCE_PORT_BASE`]), in [`DEFAULT_BATCH`]es, unlimited.
    #[must_use]
    pub fn from_vm(from: &backplane_lab::Vm, to_mac: [u8; 6], to_ip: Ipv4Addr, dst_port: u16, flows: u32) -> Self {
        Self {
            ifname: "eth0".into(),
            src_mac: from.mac(),
            dst_mac: to_mac,
            src_ip: from.ip(),
            dst_ip: to_ip,
            dst_port,
            flows,
            first_flow: 0,
            batch: DEFAULT_BATCH,
            max_frames: None,
        }
    }

    /// Source address and port of flow `index`.
    #[must_use]
    pub fn flow_source(&self, index: u32) -> (Ipv4Addr, u16) {
        let ip = u32::from(self.src_ip).wrapping_add(index / PORTS_PER_ADDRESS);
        let port = SOURCE_PORT_BASE + u16::try_from(index % PORTS_PER_ADDRESS).expect("below PORTS_PER_ADDRESS");
        (Ipv4Addr::from(ip), port)
    }
}

/// Running totals of a sender.
#[derive(Debug, Default)]
pub struct SendCounters {
    /// Frames the kernel accepted.
    pub sent: AtomicU64,
    /// Frames refused by the device (`ENOBUFS`: the peer's backlog was full).
    pub refused: AtomicU64,
}

/// Running totals of a receiver.
#[derive(Debug, Default)]
pub struct RecvCounters {
    pub received: AtomicU64,
}

/// The IPv4 header checksum (RFC 791) of a 20-byte header whose checksum field is zero.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks_exact(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

/// Frame of flow `index` of `spec` (UDP checksum 0: none, as IPv4 allows).
#[must_use]
pub fn frame(spec: &SendSpec, index: u32) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&spec.src_mac);
    f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&u16::try_from(FRAME_LEN - 14).expect("small").to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[16..20].copy_from_slice(&spec.dst_ip.octets());
    f[36..38].copy_from_slice(&spec.dst_port.to_be_bytes());
    f[38..40].copy_from_slice(&u16::try_from(FRAME_LEN - 34).expect("small").to_be_bytes());
    f[42..FRAME_LEN].copy_from_slice(b"backplane-pktgen..");
    set_flow(&mut f, spec, index);
    f
}

/// Rewrites the source address, source port and IPv4 checksum of a frame for flow `index`.
fn set_flow(f: &mut [u8; FRAME_LEN], spec: &SendSpec, index: u32) {
    let (ip, port) = spec.flow_source(index);
    f[26..30].copy_from_slice(&ip.octets());
    f[34..36].copy_from_slice(&port.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let sum = ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c is a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 { Err(io::Error::last_os_error()) } else { Ok(index) }
}

/// The size of `T` as a `socklen_t`.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("small type")
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: value lives for the call; the length is that of an int.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), socklen::<i32>()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// An `AF_PACKET` socket for sending on `ifname`, bypassing the qdisc.
fn packet_socket(ifname: &str) -> anyhow::Result<(OwnedFd, libc::sockaddr_ll)> {
    let index = ifindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    // SAFETY: plain socket creation; protocol 0: the socket receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1).context("PACKET_QDISC_BYPASS")?;
    // Room for many frames in flight; root may exceed wmem_max.
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20).context("SO_SNDBUFFORCE")?;
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
    addr.sll_protocol = ETH_P_IP.to_be();
    addr.sll_ifindex = i32::try_from(index).context("ifindex")?;
    addr.sll_halen = 6;
    Ok((fd, addr))
}

/// Sends until `stop` is set (or `spec.max_frames` are sent), on the calling thread.
/// Returns the totals, which `counters` also shows while it runs.
pub fn send(spec: &SendSpec, counters: &SendCounters, stop: &AtomicBool) -> anyhow::Result<(u64, u64)> {
    if spec.flows == 0 || spec.batch == 0 {
        bail!("flows and batch must be at least 1");
    }
    let (fd, mut addr) = packet_socket(&spec.ifname)?;
    addr.sll_addr[..6].copy_from_slice(&spec.dst_mac);
    let batch = spec.batch;
    let mut frames: Vec<[u8; FRAME_LEN]> = (0..batch).map(|_| frame(spec, spec.first_flow)).collect();
    let mut iovecs: Vec<libc::iovec> =
        frames.iter_mut().map(|f| libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: FRAME_LEN }).collect();
    // SAFETY: mmsghdr is plain data; all-zero is valid, and every pointer is set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()) {
        m.msg_hdr.msg_name = (&raw mut addr).cast();
        m.msg_hdr.msg_namelen = socklen::<libc::sockaddr_ll>();
        m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
        m.msg_hdr.msg_iovlen = 1;
    }
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut flow = 0u32;
    let limit = spec.max_frames.unwrap_or(u64::MAX);
    while !stop.load(Ordering::Relaxed) && sent < limit {
        let n = usize::try_from((limit - sent).min(u64::try_from(batch).expect("small"))).expect("at most batch");
        if spec.flows > 1 || sent == 0 {
            for f in &mut frames[..n] {
                set_flow(f, spec, spec.first_flow.wrapping_add(flow));
                flow = (flow + 1) % spec.flows;
            }
        }
        let mut done = 0usize;
        while done < n {
            // SAFETY: msgs[done..n] point at live iovecs, frames and addr.
            let rc = unsafe {
                libc::sendmmsg(fd.as_raw_fd(), msgs[done..].as_mut_ptr(), u32::try_from(n - done).expect("small"), 0)
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        // The device dropped this frame; count it and go on with the next.
                        refused += 1;
                        done += 1;
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(e).context("sendmmsg"),
                }
            } else {
                done += usize::try_from(rc).expect("non-negative");
                sent += u64::try_from(rc).expect("non-negative");
            }
        }
        counters.sent.store(sent, Ordering::Relaxed);
        counters.refused.store(refused, Ordering::Relaxed);
    }
    Ok((sent, refused))
}

/// Receives UDP datagrams on `port` (all addresses of the calling thread's namespace)
/// until `stop` is set, counting them in `counters`. `ready` is set once bound.
pub fn receive(port: u16, counters: &RecvCounters, stop: &AtomicBool, ready: &AtomicBool) -> anyhow::Result<u64> {
    let socket =
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).with_context(|| format!("bind UDP {port}"))?;
    setsockopt_int(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20).context("SO_RCVBUFFORCE")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    ready.store(true, Ordering::Release);
    let mut bufs = vec![[0u8; RECV_BUF]; RECV_BATCH];
    let mut iovecs: Vec<libc::iovec> =
        bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: RECV_BUF }).collect();
    // SAFETY: mmsghdr is plain data; all-zero is valid, and the iovecs are set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..RECV_BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()) {
        m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut received = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs point at live iovecs and buffers; the timeout comes from SO_RCVTIMEO.
        let rc = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                RECV_BATCH_U32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(e).context("recvmmsg"),
            }
        }
        received += u64::try_from(rc).expect("non-negative");
        counters.received.store(received, Ordering::Relaxed);
    }
    Ok(received)
}

/// A thread running inside a network namespace; stopped and joined on drop.
pub struct NetnsThread<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<T>>>,
}

impl<T: Send + 'static> NetnsThread<T> {
    /// Starts `f(stop)` on a new thread inside `netns` (None: this process's namespace).
    pub fn spawn(
        name: &str,
        netns: Option<&str>,
        f: impl FnOnce(&AtomicBool) -> anyhow::Result<T> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let netns = netns.map(str::to_owned);
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Some(ns) = &netns {
                    backplane_lab::enter_netns(ns)?;
                }
                f(&stop2)
            })
            .expect("spawn thread");
        Self { stop, handle: Some(handle) }
    }

    /// Whether the thread has ended (by itself: an error, or its frame limit).
    #[must_use]
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and returns its result.
    pub fn stop(mut self) -> anyhow::Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().expect("joined once").join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl<T: Send + 'static> Drop for NetnsThread<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Rates measured over one window.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Rates {
    /// Frames per second the kernel accepted from the generator.
    pub sent_pps: f64,
    /// Frames per second refused at the sending device.
    pub refused_pps: f64,
    /// Datagrams per second that reached the receiving application (0 without a receiver).
    pub received_pps: f64,
    /// Frames per second counted by the caller's probe (an interface's rx packets), if any.
    pub probe_pps: f64,
}

/// A sender (and optionally a receiver) running between two namespaces.
pub struct Stream {
    send_counters: Arc<SendCounters>,
    recv_counters: Arc<RecvCounters>,
    sender: Option<NetnsThread<(u64, u64)>>,
    receiver: Option<NetnsThread<u64>>,
}

impl Stream {
    /// Starts a receiver on `recv_port` in `recv_netns` (if given), waits until it is
    /// bound, then starts the sender in `send_netns`.
    pub fn start(spec: SendSpec, send_netns: &str, receiver: Option<(&str, u16)>) -> anyhow::Result<Self> {
        let send_counters = Arc::new(SendCounters::default());
        let recv_counters = Arc::new(RecvCounters::default());
        let receiver = match receiver {
            Some((ns, port)) => {
                let ready = Arc::new(AtomicBool::new(false));
                let (c, r) = (Arc::clone(&recv_counters), Arc::clone(&ready));
                let t = NetnsThread::spawn("pktgen-recv", Some(ns), move |stop| receive(port, &c, stop, &r));
                let deadline = Instant::now() + Duration::from_secs(5);
                while !ready.load(Ordering::Acquire) {
                    if t.finished() || Instant::now() > deadline {
                        return Err(t.stop().err().unwrap_or_else(|| anyhow::anyhow!("receiver did not start")));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Some(t)
            }
            None => None,
        };
        let c = Arc::clone(&send_counters);
        let sender = NetnsThread::spawn("pktgen-send", Some(send_netns), move |stop| send(&spec, &c, stop));
        Ok(Self { send_counters, recv_counters, sender: Some(sender), receiver })
    }

    fn sample(&self) -> (Instant, u64, u64, u64) {
        (
            Instant::now(),
            self.send_counters.sent.load(Ordering::Relaxed),
            self.send_counters.refused.load(Ordering::Relaxed),
            self.recv_counters.received.load(Ordering::Relaxed),
        )
    }

    /// Waits `warmup`, then measures over `window`. Fails if the sender stopped.
    pub fn measure(&self, warmup: Duration, window: Duration) -> anyhow::Result<Rates> {
        self.measure_with(warmup, window, || Ok(0))
    }

    /// [`Stream::measure`], also reading `probe` (a running packet count) at both ends of
    /// the window.
    pub fn measure_with(
        &self,
        warmup: Duration,
        window: Duration,
        probe: impl Fn() -> anyhow::Result<u64>,
    ) -> anyhow::Result<Rates> {
        crate::isolation::sleep(warmup)?;
        let (a, pa) = (self.sample(), probe()?);
        crate::isolation::sleep(window)?;
        let (b, pb) = (self.sample(), probe()?);
        if self.sender.as_ref().is_none_or(NetnsThread::finished) {
            bail!("the generator stopped during the measurement");
        }
        let secs = (b.0 - a.0).as_secs_f64();
        let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        Ok(Rates {
            sent_pps: rate(a.1, b.1),
            refused_pps: rate(a.2, b.2),
            received_pps: rate(a.3, b.3),
            probe_pps: rate(pa, pb),
        })
    }

    /// Waits until the sender has sent its `max_frames` (or `timeout` passes); returns
    /// the time it took.
    pub fn wait_sender(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        while !self.sender.as_ref().is_none_or(NetnsThread::finished) && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(1));
        }
        started.elapsed()
    }

    /// Stops both threads; returns (sent, refused, received) totals.
    pub fn stop(mut self) -> anyhow::Result<(u64, u64, u64)> {
        let (sent, refused) = self.sender.take().expect("started").stop()?;
        // Let the last frames arrive.
        std::thread::sleep(Duration::from_millis(100));
        let received = match self.receiver.take() {
            Some(r) => r.stop()?,
            None => 0,
        };
        Ok((sent, refused, received))
    }
}

/// The generator's own ceiling on a port kind: it sends from a VM whose host port is up
/// but in no bridge, so every frame crosses the VM's link and is received and discarded
/// by the host side (addressed to a MAC that is not the port's). Nothing of the switch
/// is on the path. The lab gets a VM named `ceil<n>` for the duration.
///
/// `probe_pps` is the host port's receive rate: what crossed the link (for a tap port,
/// what the lab's userspace forwarder delivered; `sent_pps` is then what the VM's own
/// tap accepted).
pub fn ceiling(
    lab: &backplane_lab::Lab,
    kind: backplane_lab::PortKind,
    flows: u32,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Rates> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("ceil{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let vm = match kind {
        backplane_lab::PortKind::Tap => lab.add_tap_vm(&name, "10.99.0.1/24", None, None),
        _ => lab.add_veth_vm(&name, "10.99.0.1/24", None, None),
    };
    lab.unplug(&vm);
    let spec = SendSpec::from_vm(&vm, [0x02, 0x99, 0, 0, 0, 0x02], Ipv4Addr::new(10, 99, 0, 2), 9, flows);
    let stream = Stream::start(spec, vm.netns(), None)?;
    let port = vm.host_port().to_owned();
    let rates = stream.measure_with(warmup, window, || host_rx_packets(&port));
    stream.stop()?;
    rates
}

/// Received packets of interface `ifname` in this process's namespace.
pub fn host_rx_packets(ifname: &str) -> anyhow::Result<u64> {
    crate::procfs::netdev_counters()?.get(ifname).map(|c| c[0]).with_context(|| format!("no interface {ifname}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SendSpec {
        SendSpec {
            ifname: "eth0".into(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 30, 0, 10),
            dst_ip: Ipv4Addr::new(10, 40, 0, 10),
            dst_port: 9000,
            flows: 100_000,
            first_flow: 0,
            batch: 64,
            max_frames: None,
        }
    }

    #[test]
    fn frames_are_valid_ipv4_udp() {
        let s = spec();
        for index in [0, 1, 49_999, 50_000, 99_999] {
            let f = frame(&s, index);
            assert_eq!(ipv4_checksum(&f[14..34]), 0, "checksum of a valid header folds to zero");
            let (ip, port) = s.flow_source(index);
            assert_eq!(&f[26..30], &ip.octets());
            assert_eq!(u16::from_be_bytes([f[34], f[35]]), port);
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, FRAME_LEN - 14);
        }
        assert_eq!(s.flow_source(50_000), (Ipv4Addr::new(10, 30, 0, 11), SOURCE_PORT_BASE));
    }
}
