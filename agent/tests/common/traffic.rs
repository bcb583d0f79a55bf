//! Traffic between lab VMs for the tests: a long TCP stream that notes its pauses, new
//! connections, datagrams, and the kernel's retransmission counter.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backplane_lab::Vm;

/// A TCP connection from `client` to `server` on an allowed port, the server sending
/// 1000 bytes every 10 ms; the client notes the longest pause between two reads.
pub struct Stream {
    received: Arc<AtomicU64>,
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
        let s = Arc::clone(&stop);
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
        Stream { received, longest_pause, stop, threads: vec![writer, reader] }
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

/// TCP segments the kernel of `vm` retransmitted so far (`TcpRetransSegs`).
pub fn retransmits(vm: &Vm) -> u64 {
    let out = vm.run(&["cat", "/proc/net/snmp"]);
    let tcp: Vec<&str> = out.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    let (_, value) = names.zip(values).find(|(n, _)| *n == "RetransSegs").expect("RetransSegs");
    value.parse().expect("a number")
}

/// Whether a new TCP connection from `from` to `to:port` opens within a second.
pub fn connects(from: &Vm, to: &Vm, port: u16) -> bool {
    let listener = to.in_netns(|| TcpListener::bind(("0.0.0.0", port))).expect("listen");
    let dst = SocketAddr::new(IpAddr::V4(to.ip()), port);
    let ok = from.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(1))).is_ok();
    drop(listener);
    ok
}
