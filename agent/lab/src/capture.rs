//! Packet captures with tcpdump, read back by a small pcap reader.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::ChildGuard;

/// Bytes of each packet that a capture keeps (`tcpdump -s`).
pub const SNAPLEN: u32 = 128;

/// A running `tcpdump -w`; dropping it stops tcpdump and deletes the file.
#[derive(Debug)]
pub struct Capture {
    tcpdump: ChildGuard,
    file: PathBuf,
    iface: String,
}

impl Capture {
    /// Captures everything on the host interface `iface` (a bridge port, the bridge...).
    #[must_use]
    pub fn start(iface: &str) -> Capture {
        Capture::start_in(None, iface, None)
    }

    /// Captures what matches a pcap `filter` (e.g. `"icmp or icmp6"`) on the host
    /// interface `iface`.
    #[must_use]
    pub fn start_filtered(iface: &str, filter: &str) -> Capture {
        Capture::start_in(None, iface, Some(filter))
    }

    /// Captures on `iface` in the network namespace `netns` (the host's when `None`),
    /// optionally with a pcap filter. Returns once tcpdump is really listening; panics with
    /// tcpdump's own words if it fails to start within 10 s.
    pub fn start_in(netns: Option<&str>, iface: &str, filter: Option<&str>) -> Capture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let file = std::env::temp_dir().join(format!(
            "backplane-lab-capture-{}-{}.pcap",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let snaplen = SNAPLEN.to_string();
        let file_arg = file.to_string_lossy().into_owned();
        let mut args: Vec<&str> = Vec::new();
        if let Some(netns) = netns {
            args.extend(["netns", "exec", netns]);
        }
        args.extend(["tcpdump", "-i", iface, "-w", &file_arg, "-U", "-n", "-s", &snaplen]);
        args.extend(["--immediate-mode", "-Z", "root"]);
        if let Some(filter) = filter {
            args.push(filter);
        }
        let program = if netns.is_some() { "ip" } else { args.remove(0) };
        let mut tcpdump = ChildGuard::spawn(Command::new(program).args(&args));
        assert!(
            tcpdump.wait_for_output("listening on", Duration::from_secs(10)),
            "tcpdump on {iface} did not start listening within 10 s ({:?}): {}",
            tcpdump.try_wait(),
            tcpdump.output().trim_end()
        );
        Capture { tcpdump, file, iface: iface.to_owned() }
    }

    /// Stops tcpdump (SIGINT, so it flushes) and returns every packet it captured.
    #[must_use]
    pub fn stop(mut self) -> Vec<Packet> {
        // Give packets already on their way a moment to be written.
        std::thread::sleep(Duration::from_millis(100));
        self.tcpdump.stop_with(libc::SIGINT, Duration::from_secs(5));
        let bytes = std::fs::read(&self.file)
            .unwrap_or_else(|e| panic!("cannot read the capture of {}: {e}: {}", self.iface, self.tcpdump.output()));
        read_pcap(&bytes).unwrap_or_else(|e| panic!("capture of {}: {e}", self.iface))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.tcpdump.stop_with(libc::SIGINT, Duration::from_secs(2));
        let _ignored = std::fs::remove_file(&self.file);
    }
}

/// One captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// When it was captured, since the Unix epoch.
    pub timestamp: Duration,
    /// Its length on the wire; `data` holds at most [`SNAPLEN`] bytes of it.
    pub orig_len: u32,
    /// The captured bytes, from the Ethernet header on.
    pub data: Vec<u8>,
}

impl Packet {
    /// The Ethernet type (after one 802.1Q tag, if any).
    #[must_use]
    pub fn ethertype(&self) -> Option<u16> {
        let outer = u16::from_be_bytes(self.data.get(12..14)?.try_into().ok()?);
        if outer == 0x8100 {
            return Some(u16::from_be_bytes(self.data.get(16..18)?.try_into().ok()?));
        }
        Some(outer)
    }

    /// The IP protocol number (IPv4 protocol or IPv6 next header) of an untagged frame.
    #[must_use]
    pub fn ip_protocol(&self) -> Option<u8> {
        match self.ethertype()? {
            0x0800 => self.data.get(14 + 9).copied(),
            0x86dd => self.data.get(14 + 6).copied(),
            _ => None,
        }
    }

    /// Whether this is an ICMP echo request or reply, over IPv4 or IPv6.
    #[must_use]
    pub fn is_icmp_echo(&self) -> bool {
        match (self.ethertype(), self.ip_protocol()) {
            (Some(0x0800), Some(1)) => {
                let ihl = usize::from(self.data.get(14).map_or(0, |b| b & 0x0f)) * 4;
                matches!(self.data.get(14 + ihl), Some(0 | 8))
            }
            (Some(0x86dd), Some(58)) => matches!(self.data.get(14 + 40), Some(128 | 129)),
            _ => false,
        }
    }
}

/// What is wrong with a pcap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PcapError {
    /// Shorter than the 24-byte global header.
    TooShort,
    /// The magic number is not one of a1b2c3d4 (microseconds) or a1b23c4d (nanoseconds),
    /// in either byte order.
    BadMagic(u32),
    /// A record header or body runs past the end of the file, at this offset.
    Truncated(usize),
}

impl std::fmt::Display for PcapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooShort => write!(f, "not a pcap file: shorter than its 24-byte header"),
            Self::BadMagic(magic) => write!(f, "not a pcap file: magic {magic:#010x}"),
            Self::Truncated(offset) => write!(f, "pcap record at byte {offset} is cut short"),
        }
    }
}

impl std::error::Error for PcapError {}

/// Parses a classic pcap file (not pcapng). A record cut short at the very end, as a
/// writer killed mid-record leaves it, is an error.
pub fn read_pcap(bytes: &[u8]) -> Result<Vec<Packet>, PcapError> {
    const MICRO: u32 = 0xa1b2_c3d4;
    const NANO: u32 = 0xa1b2_3c4d;
    let header = bytes.get(..24).ok_or(PcapError::TooShort)?;
    let magic_le = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let (big_endian, nanos) = match magic_le {
        MICRO => (false, false),
        NANO => (false, true),
        m if m.swap_bytes() == MICRO => (true, false),
        m if m.swap_bytes() == NANO => (true, true),
        m => return Err(PcapError::BadMagic(m)),
    };
    let word = |b: &[u8]| {
        let b: [u8; 4] = b.try_into().expect("4 bytes");
        if big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
    };
    let mut packets = Vec::new();
    let mut offset = 24;
    while offset < bytes.len() {
        let record = bytes.get(offset..offset + 16).ok_or(PcapError::Truncated(offset))?;
        let (secs, frac) = (word(&record[0..4]), word(&record[4..8]));
        let (incl_len, orig_len) = (word(&record[8..12]), word(&record[12..16]));
        let start = offset + 16;
        let end = start + usize::try_from(incl_len).map_err(|_| PcapError::Truncated(offset))?;
        let data = bytes.get(start..end).ok_or(PcapError::Truncated(offset))?.to_vec();
        let subsec = if nanos { Duration::from_nanos(u64::from(frac)) } else { Duration::from_micros(u64::from(frac)) };
        packets.push(Packet { timestamp: Duration::from_secs(u64::from(secs)) + subsec, orig_len, data });
        offset = end;
    }
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(magic: u32, big_endian: bool, records: &[(u32, u32, &[u8], u32)]) -> Vec<u8> {
        let word = |v: u32| {
            if big_endian { v.to_be_bytes() } else { v.to_le_bytes() }
        };
        let mut out = Vec::new();
        out.extend(word(magic));
        out.extend(if big_endian { 2u16.to_be_bytes() } else { 2u16.to_le_bytes() });
        out.extend(if big_endian { 4u16.to_be_bytes() } else { 4u16.to_le_bytes() });
        out.extend(word(0));
        out.extend(word(0));
        out.extend(word(SNAPLEN));
        out.extend(word(1));
        for &(secs, frac, data, orig_len) in records {
            out.extend(word(secs));
            out.extend(word(frac));
            out.extend(word(u32::try_from(data.len()).unwrap()));
            out.extend(word(orig_len));
            out.extend(data);
        }
        out
    }

    #[test]
    fn reads_microsecond_and_nanosecond_files_in_both_byte_orders() {
        for big_endian in [false, true] {
            let micro = file(0xa1b2_c3d4, big_endian, &[(10, 5, b"abc", 60), (11, 0, b"", 0)]);
            let packets = read_pcap(&micro).unwrap();
            assert_eq!(packets.len(), 2);
            assert_eq!(packets[0].timestamp, Duration::new(10, 5_000));
            assert_eq!(packets[0].orig_len, 60);
            assert_eq!(packets[0].data, b"abc");
            let nano = file(0xa1b2_3c4d, big_endian, &[(10, 5, b"abcd", 4)]);
            assert_eq!(read_pcap(&nano).unwrap()[0].timestamp, Duration::new(10, 5));
        }
    }

    #[test]
    fn rejects_bad_files() {
        assert_eq!(read_pcap(b"short"), Err(PcapError::TooShort));
        assert!(matches!(read_pcap(&[0u8; 24]), Err(PcapError::BadMagic(0))));
        let mut cut = file(0xa1b2_c3d4, false, &[(1, 1, b"abcdef", 6)]);
        cut.truncate(cut.len() - 1);
        assert_eq!(read_pcap(&cut), Err(PcapError::Truncated(24)));
    }

    #[test]
    fn classifies_icmp_echo() {
        let mut v4 = vec![0u8; 14 + 20 + 8];
        v4[12..14].copy_from_slice(&[0x08, 0x00]);
        v4[14] = 0x45;
        v4[14 + 9] = 1;
        v4[14 + 20] = 8;
        let packet = Packet { timestamp: Duration::ZERO, orig_len: 42, data: v4 };
        assert_eq!(packet.ip_protocol(), Some(1));
        assert!(packet.is_icmp_echo());
        let mut v6 = vec![0u8; 14 + 40 + 8];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6[14 + 6] = 58;
        v6[14 + 40] = 135; // neighbour solicitation
        assert!(!Packet { timestamp: Duration::ZERO, orig_len: 62, data: v6 }.is_icmp_echo());
    }
}
