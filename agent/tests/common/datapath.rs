//! Loads the data path for `BPF_PROG_TEST_RUN`, with its maps pinned under a pin
//! directory of its own that is removed on drop.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use backplane_common::{FlowKey, FlowValue, maps, reason::Counter};

pub struct TestDatapath {
    pub ebpf: Ebpf,
    pin_dir: PathBuf,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Mounts bpffs at /sys/fs/bpf if it is not mounted.
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf"))
    {
        return;
    }
    let status =
        std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status().expect("run mount");
    assert!(status.success(), "mounting bpffs at /sys/fs/bpf failed");
}

impl TestDatapath {
    /// Loads the embedded data path object with a flow table of `flows` entries.
    pub fn load(flows: u32) -> Self {
        ensure_bpffs();
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/backplane-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&pin_dir).expect("create pin dir");
        let guard = PinDirGuard(pin_dir.clone());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(maps::FLOWS, flows)
            .load(backplane::DATAPATH_OBJECT)
            .unwrap_or_else(|e| panic!("loading the data path: {e:#}"));
        let xdp: &mut Xdp = ebpf.program_mut(maps::PROG_FROM_PORT).expect("from_port").try_into().expect("xdp");
        xdp.load().unwrap_or_else(|e| panic!("from_port verifier: {e:#}"));
        let tc: &mut SchedClassifier = ebpf.program_mut(maps::PROG_TO_PORT).expect("to_port").try_into().expect("tc");
        tc.load().unwrap_or_else(|e| panic!("to_port verifier: {e:#}"));
        std::mem::forget(guard);
        Self { ebpf, pin_dir }
    }

    /// Runs `from_port` on a frame and returns the XDP action.
    #[expect(clippy::wrong_self_convention, reason = "named after the program it runs")]
    pub fn from_port(&mut self, frame: &[u8]) -> u32 {
        self.try_from_port(frame).expect("BPF_PROG_TEST_RUN from_port")
    }

    /// Runs `from_port`; the kernel refuses frames shorter than an Ethernet header.
    pub fn try_from_port(&mut self, frame: &[u8]) -> Result<u32, aya::programs::ProgramError> {
        let xdp: &mut Xdp = self.ebpf.program_mut(maps::PROG_FROM_PORT).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() };
        xdp.test_run(opts).map(|r| r.return_value)
    }

    /// Runs `to_port` on a frame and returns the TC action.
    #[expect(clippy::wrong_self_convention, reason = "named after the program it runs")]
    pub fn to_port(&mut self, frame: &[u8]) -> i32 {
        self.try_to_port(frame).expect("BPF_PROG_TEST_RUN to_port")
    }

    pub fn try_to_port(&mut self, frame: &[u8]) -> Result<i32, aya::programs::ProgramError> {
        let tc: &mut SchedClassifier = self.ebpf.program_mut(maps::PROG_TO_PORT).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() };
        tc.test_run(opts).map(|r| r.return_value.cast_signed())
    }

    /// Runs `from_port` as if the frame entered through device `ifindex` (an existing
    /// device, e.g. one of [`TestLinks`]; 1 is loopback, where a run without a context
    /// goes): the XDP context's `ingress_ifindex`.
    #[expect(clippy::wrong_self_convention, reason = "named after the program it runs")]
    pub fn from_port_on(&mut self, ifindex: u32, frame: &[u8]) -> u32 {
        self.try_from_port_on(ifindex, frame).expect("BPF_PROG_TEST_RUN from_port")
    }

    pub fn try_from_port_on(&mut self, ifindex: u32, frame: &[u8]) -> Result<u32, aya::programs::ProgramError> {
        let xdp: &mut Xdp = self.ebpf.program_mut(maps::PROG_FROM_PORT).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data 0 and data_end the frame's length.
        let len = u32::try_from(frame.len()).expect("a frame shorter than 4 GiB");
        let ctx: Vec<u8> = [0, len, 0, ifindex, 0, 0].iter().flat_map(|v: &u32| v.to_ne_bytes()).collect();
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        xdp.test_run(opts).map(|r| r.return_value)
    }

    /// Runs `to_port` as if the frame left through device `ifindex` after entering the
    /// switch through device `came_in` (0: sent by the host itself): the `__sk_buff`'s
    /// `ifindex` and `ingress_ifindex`. Both must exist, or be 0 (`came_in`) or 1.
    #[expect(clippy::wrong_self_convention, reason = "named after the program it runs")]
    pub fn to_port_on(&mut self, ifindex: u32, came_in: u32, frame: &[u8]) -> i32 {
        self.try_to_port_on(ifindex, came_in, frame).expect("BPF_PROG_TEST_RUN to_port")
    }

    pub fn try_to_port_on(
        &mut self,
        ifindex: u32,
        came_in: u32,
        frame: &[u8],
    ) -> Result<i32, aya::programs::ProgramError> {
        let tc: &mut SchedClassifier = self.ebpf.program_mut(maps::PROG_TO_PORT).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        // The head of struct __sk_buff, up to `ifindex` (the kernel zero-fills the rest):
        // `ingress_ifindex` at byte 36, `ifindex` at byte 40.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&came_in.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        tc.test_run(opts).map(|r| r.return_value.cast_signed())
    }

    /// Sum over CPUs of one counter.
    pub fn counter(&self, c: Counter) -> u64 {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.ebpf.map(maps::COUNTERS).unwrap()).unwrap();
        arr.get(&(c as u32), 0).unwrap().iter().sum()
    }

    pub fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        let m: HashMap<&MapData, FlowKey, FlowValue> = HashMap::try_from(self.ebpf.map(maps::FLOWS).unwrap()).unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }
}

/// A veth pair made for a test, so that a program can run as if on ports other than
/// loopback (`from_port_on`, `to_port_on`): `ifindex` are the two devices'. Deleted on
/// drop, also when the test panics.
pub struct TestLinks {
    name: String,
    pub ifindex: [u32; 2],
}

impl TestLinks {
    pub fn new() -> Self {
        static LINKS: AtomicU32 = AtomicU32::new(0);
        // Named as the lab names its veth ports (`bpv`, 5 base-36 digits of the pid, 2 of
        // a counter, the index), so that `backplane_lab::cleanup_stale` knows them as this
        // live process's (and removes them once it is gone); the counter runs down from
        // the top so as not to meet a lab's of this process.
        let n = 36 * 36 - 1 - LINKS.fetch_add(1, Ordering::Relaxed) % (36 * 36);
        let suffix = format!("{}{}", base36(std::process::id(), 5), base36(n, 2));
        let names = ["0", "1"].map(|index| format!("bpv{suffix}{index}"));
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().expect("run ip");
        assert!(
            ip(&["link", "add", &names[0], "type", "veth", "peer", "name", &names[1]]).success(),
            "ip link add {} type veth",
            names[0]
        );
        // Made before the ifindexes are read: a panic below still deletes the pair.
        let mut links = Self { name: names[0].clone(), ifindex: [0; 2] };
        links.ifindex = names.map(|name| {
            let text = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).expect("the link's ifindex");
            text.trim().parse::<u32>().expect("an ifindex")
        });
        links
    }
}

fn base36(mut value: u32, digits: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; digits];
    for d in out.iter_mut().rev() {
        *d = DIGITS[(value % 36) as usize];
        value /= 36;
    }
    String::from_utf8(out).expect("ASCII digits")
}

impl Drop for TestLinks {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = std::process::Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

struct PinDirGuard(PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        remove_pin_dir(&self.0);
    }
}

fn remove_pin_dir(dir: &PathBuf) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        remove_pin_dir(&self.pin_dir);
    }
}

/// Creates a hash map of `key_size` and `value_size` bytes (16 entries) and pins it at
/// `path`: a map of another layout than the data path's, as another version could leave.
pub fn pin_foreign_map(path: &std::path::Path, key_size: u32, value_size: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_HASH, key_size, value_size, 16]);
    // SAFETY: a zero-padded bpf_attr of 128 bytes that lives through the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), 128) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = i32::try_from(fd).expect("a descriptor");
    attr[1] = u64::from(fd.cast_unsigned());
    // SAFETY: as above; the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), 128) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
    // SAFETY: `fd` is ours; the pin keeps the map.
    unsafe { libc::close(fd) };
}

/// Sends one SYN from `from` to `to` on `allowed` and one on `denied` (a port the rules
/// deny) and checks that backplane runs first on `from`'s port: the denied SYN never
/// reaches `to` (a capture on its port), and `other`, another program attached after ours
/// on the same hook, saw the allowed SYN (the positive control: it runs, and gets what
/// ours passes) but never the denied one.
pub fn assert_first_in_chain(
    other: &TestDatapath,
    from: &backplane_lab::Vm,
    to: &backplane_lab::Vm,
    allowed: u16,
    denied: u16,
) {
    use super::frames::{TCP_SYN, eth, ipv4, tcp};
    let syn = |dport: u16| {
        eth(
            to.mac(),
            from.mac(),
            &[],
            0x0800,
            &ipv4(from.ip().octets(), to.ip().octets(), 6, &tcp(41000, dport, TCP_SYN, &[])),
        )
    };
    let capture = backplane_lab::Capture::start_filtered(to.host_port(), &format!("tcp dst port {denied}"));
    from.send_raw_frames(&[syn(allowed), syn(denied)]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(capture.stop().is_empty(), "the denied SYN never reached {}", to.host_port());
    let seen: Vec<(u16, u16)> = other.flows().into_iter().map(|(k, _)| (k.port_lo, k.port_hi)).collect();
    assert!(seen.iter().any(|&(a, b)| a == allowed || b == allowed), "the other program saw the allowed SYN: {seen:?}");
    assert!(seen.iter().all(|&(a, b)| a != denied && b != denied), "the other program saw the dropped SYN: {seen:?}");
}
