//! Traffic between lab VMs for the tests: a long TCP stream that notes its pauses and
//! its own retransmissions, new connections, datagrams.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backplane_lab::Vm;

/// A TCP connection from `client` to `server` on an allowed port, the server sending
/// 1000 bytes every 10 ms; the client notes the longest pause between two reads, the
/// server the segments its socket retransmitted (`tcpi_total_retrans`: this connection's
/// only, so a test's denied connection retrying its SYN is not counted as a loss).
pub struct Stream {
    received: Arc<AtomicU64>,
    retransmitted: Arc<AtomicU64>,
    longest_pause: Arc<Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stream {
    pub fn start(client: &Vm, server: &Vm, port: u16) -> Stream {
        let listener = server.in_netns(|| TcpListener::bind(("0.0.0.0", port))).expect("listen");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let longest_pause = Arc::new(Mutex::new(Duration::ZERO));
        let retransmitted = Arc::new(AtomicU64::new(0));
        let (s, retrans) = (Arc::clone(&stop), Arc::clone(&retransmitted));
        let writer = std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else { return };
            c.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            let chunk = [7u8; 1000];
            while !s.load(Ordering::Relaxed) {
                match c.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
                retrans.store(total_retransmits(&c), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let dst = SocketAddr::new(IpAddr::V4(server.ip()), port);
        let mut conn = client.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3))).expect("connect");
        conn.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (s, r, p) = (Arc::clone(&stop), Arc::clone(&received), Arc::clone(&longest_pause));
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                        let mut longest = p.lock().unwrap();
                        *longest = (*longest).max(last.elapsed());
                        last = Instant::now();
                    }
                    Err(_) => {}
                }
            }
        });
        Stream { received, retransmitted, longest_pause, stop, threads: vec![writer, reader] }
    }

    /// Segments of this stream the server retransmitted so far.
    pub fn retransmits(&self) -> u64 {
        self.retransmitted.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn reset_pause(&self) {
        *self.longest_pause.lock().unwrap() = Duration::ZERO;
    }

    pub fn longest_pause(&self) -> Duration {
        *self.longest_pause.lock().unwrap()
    }

    /// Bytes received during `d`.
    pub fn progress(&self, d: Duration) -> u64 {
        let before = self.bytes();
        std::thread::sleep(d);
        self.bytes() - before
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Segments the kernel retransmitted on `socket` (`TCP_INFO`'s `tcpi_total_retrans`).
fn total_retransmits(socket: &TcpStream) -> u64 {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).expect("tcp_info fits");
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len)
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    u64::from(info.tcpi_total_retrans)
}

/// Whether a new TCP connection from `from` to `to:port` opens within a second.
pub fn connects(from: &Vm, to: &Vm, port: u16) -> bool {
    let listener = to.in_netns(|| TcpListener::bind(("0.0.0.0", port))).expect("listen");
    let dst = SocketAddr::new(IpAddr::V4(to.ip()), port);
    let ok = from.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(1))).is_ok();
    drop(listener);
    ok
}
