//! What a flow is about, from the first bytes of its first payload packets: the DNS
//! query name, the TLS server name (SNI) of a `ClientHello`, the HTTP `Host`.
//!
//! The data path copies the first bytes of up to three payload-carrying packets of each
//! new flow into the `PAYLOAD_SAMPLES` ring buffer (bounded per flow, per CPU and second,
//! and by the ring's size; every skip and loss is counted there). Here each sample is
//! decoded with a bounds-checked decoder, its headers are read with `pnet` (Ethernet,
//! VLAN, IPv4/IPv6, TCP/UDP), and its payload is handed to three small parsers that
//! never trust a length. The fast path never waits for any of this. Pure: decoding and
//! parsing only; the ring buffer's reader is in [`super::rings`].

use std::sync::atomic::{AtomicU64, Ordering};

use backplane_common::{
    FlowKey,
    flow::{DIR_HI_TO_LO, DIR_LO_TO_HI, FAMILY_IPV4, FAMILY_IPV6},
    sample::{PayloadSample, SAMPLE_BYTES},
};
use pnet::packet::{
    ethernet::{EtherTypes, EthernetPacket},
    ip::{IpNextHeaderProtocol, IpNextHeaderProtocols},
    ipv4::Ipv4Packet,
    ipv6::Ipv6Packet,
    tcp::TcpPacket,
    udp::UdpPacket,
    vlan::VlanPacket,
};
use serde::{Deserialize, Serialize};

use crate::flows::events::DecodeError;

/// Longest name kept (a DNS name is at most 253 characters; a Host may carry a port).
pub const MAX_NAME: usize = 255;

/// Names found in a flow's first payload bytes; `None` when absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppInfo {
    pub dns_query: Option<String>,
    pub tls_sni: Option<String>,
    pub http_host: Option<String>,
}

impl AppInfo {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.dns_query.is_none() && self.tls_sni.is_none() && self.http_host.is_none()
    }

    /// Takes the names `other` has and `self` lacks (the first name seen stays).
    pub fn merge(&mut self, other: AppInfo) {
        if self.dns_query.is_none() {
            self.dns_query = other.dns_query;
        }
        if self.tls_sni.is_none() {
            self.tls_sni = other.tls_sni;
        }
        if self.http_host.is_none() {
            self.http_host = other.http_host;
        }
    }
}

/// A decoded sample: which flow, when, and what it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub key: FlowKey,
    pub ts_ns: u64,
    pub ifindex: u32,
    pub direction: u8,
    pub app: AppInfo,
}

/// What became of the samples read, for the metrics (`backplane_payload_samples_parsed_total`).
#[derive(Debug, Default)]
pub struct SampleStats {
    pub dns_query: AtomicU64,
    pub tls_sni: AtomicU64,
    pub http_host: AtomicU64,
    /// Well-formed samples that name nothing (other protocols, later packets).
    pub no_name: AtomicU64,
    /// Records that did not decode, or headers that did not parse.
    pub malformed: AtomicU64,
}

impl SampleStats {
    /// `(result label, count)` pairs.
    #[must_use]
    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        [
            ("dns_query", self.dns_query.load(Ordering::Relaxed)),
            ("tls_sni", self.tls_sni.load(Ordering::Relaxed)),
            ("http_host", self.http_host.load(Ordering::Relaxed)),
            ("no_name", self.no_name.load(Ordering::Relaxed)),
            ("malformed", self.malformed.load(Ordering::Relaxed)),
        ]
    }

    pub(super) fn count(&self, app: &AppInfo) {
        let bump = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
        if app.dns_query.is_some() {
            bump(&self.dns_query);
        }
        if app.tls_sni.is_some() {
            bump(&self.tls_sni);
        }
        if app.http_host.is_some() {
            bump(&self.http_host);
        }
        if app.is_empty() {
            bump(&self.no_name);
        }
    }
}

/// Size of one `PAYLOAD_SAMPLES` record.
pub const SAMPLE_RECORD_SIZE: usize = size_of::<PayloadSample>();

/// Decodes one ring buffer record; rejects a wrong length, direction, family or a
/// captured length past the buffer. Returns the header fields and the captured bytes.
pub fn decode_sample(bytes: &[u8]) -> Result<(PayloadSample, &[u8]), DecodeError> {
    if bytes.len() != SAMPLE_RECORD_SIZE {
        return Err(DecodeError::WrongLength { expected: SAMPLE_RECORD_SIZE, got: bytes.len() });
    }
    // SAFETY: the length is exactly that of a PayloadSample, which is repr(C) and made of
    // integers and byte arrays only (every bit pattern is valid); read unaligned.
    let sample: PayloadSample = unsafe { bytes.as_ptr().cast::<PayloadSample>().read_unaligned() };
    if sample.direction != DIR_LO_TO_HI && sample.direction != DIR_HI_TO_LO {
        return Err(DecodeError::BadDirection(sample.direction));
    }
    if sample.key.family != FAMILY_IPV4 && sample.key.family != FAMILY_IPV6 {
        return Err(DecodeError::BadFamily(sample.key.family));
    }
    let captured = usize::from(sample.captured);
    if captured > SAMPLE_BYTES {
        return Err(DecodeError::WrongLength { expected: SAMPLE_BYTES, got: captured });
    }
    let offset = std::mem::offset_of!(PayloadSample, data);
    Ok((sample, &bytes[offset..offset + captured]))
}

/// The transport of a frame as far as the names need it.
#[derive(Debug, PartialEq, Eq)]
pub struct Transport<'a> {
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub payload: &'a [u8],
}

/// Walks a frame's headers with pnet down to TCP or UDP; `None` for anything else or a
/// frame cut short inside its headers. The payload is cut to what the IP length says
/// (Ethernet padding is not payload) and to what was captured.
#[must_use]
pub fn transport(frame: &[u8]) -> Option<Transport<'_>> {
    let eth = EthernetPacket::new(frame)?;
    let mut ethertype = eth.get_ethertype();
    let mut offset = EthernetPacket::minimum_packet_size();
    for _ in 0..2 {
        if ethertype != EtherTypes::Vlan && ethertype != EtherTypes::QinQ {
            break;
        }
        let vlan = VlanPacket::new(frame.get(offset..)?)?;
        ethertype = vlan.get_ethertype();
        offset += VlanPacket::minimum_packet_size();
    }
    let l3 = frame.get(offset..)?;
    let (next, l4_start, l4_len) = if ethertype == EtherTypes::Ipv4 {
        let ip = Ipv4Packet::new(l3)?;
        let ihl = usize::from(ip.get_header_length()) * 4;
        let total = usize::from(ip.get_total_length());
        if ihl < 20 || total < ihl || ip.get_fragment_offset() != 0 {
            return None;
        }
        (ip.get_next_level_protocol(), ihl, total - ihl)
    } else if ethertype == EtherTypes::Ipv6 {
        let ip = Ipv6Packet::new(l3)?;
        (ip.get_next_header(), Ipv6Packet::minimum_packet_size(), usize::from(ip.get_payload_length()))
    } else {
        return None;
    };
    let l4 = l3.get(l4_start..)?;
    let l4 = &l4[..l4.len().min(l4_len)];
    match next {
        IpNextHeaderProtocols::Tcp => {
            let tcp = TcpPacket::new(l4)?;
            let data_offset = usize::from(tcp.get_data_offset()) * 4;
            let payload = l4.get(data_offset..)?;
            Some(Transport {
                proto: proto_number(next),
                sport: tcp.get_source(),
                dport: tcp.get_destination(),
                payload,
            })
        }
        IpNextHeaderProtocols::Udp => {
            let udp = UdpPacket::new(l4)?;
            let header = UdpPacket::minimum_packet_size();
            let end = usize::from(udp.get_length()).clamp(header, l4.len());
            let payload = &l4[header..end];
            Some(Transport {
                proto: proto_number(next),
                sport: udp.get_source(),
                dport: udp.get_destination(),
                payload,
            })
        }
        _ => None,
    }
}

fn proto_number(p: IpNextHeaderProtocol) -> u8 {
    p.0
}

/// Names what a frame's payload is about.
#[must_use]
pub fn app_info(t: &Transport<'_>) -> AppInfo {
    let mut app = AppInfo::default();
    let dns_port = t.sport == 53 || t.dport == 53;
    if t.proto == 17 && dns_port {
        app.dns_query = dns_query_name(t.payload);
    } else if t.proto == 6 {
        if dns_port && t.payload.len() > 2 {
            // DNS over TCP: a two-byte length before the message.
            app.dns_query = dns_query_name(&t.payload[2..]);
        }
        app.tls_sni = tls_server_name(t.payload);
        app.http_host = http_host(t.payload);
    }
    app
}

/// Keeps a name if it is plain host-name text: letters, digits, `-._:[]`, at most
/// [`MAX_NAME`] bytes; lower-cased.
fn clean_name(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_NAME {
        return None;
    }
    let ok = raw.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']'));
    ok.then(|| String::from_utf8_lossy(raw).to_ascii_lowercase())
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?])))
}

/// The first question's name of a DNS message (query or response), `.` for the root.
#[must_use]
pub fn dns_query_name(msg: &[u8]) -> Option<String> {
    if msg.len() < 12 {
        return None;
    }
    let opcode = (msg[2] >> 3) & 0x0f;
    if opcode != 0 || be16(msg, 4)? == 0 {
        return None;
    }
    let mut pos = 12;
    let mut name: Vec<u8> = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        // A question's name is never compressed; anything else is not a query we know.
        if len > 63 {
            return None;
        }
        let label = msg.get(pos..pos + len)?;
        if !name.is_empty() {
            name.push(b'.');
        }
        name.extend_from_slice(label);
        pos += len;
        if name.len() > 253 {
            return None;
        }
    }
    // QTYPE and QCLASS follow.
    msg.get(pos..pos + 4)?;
    if name.is_empty() {
        return Some(".".into());
    }
    clean_name(&name)
}

/// The `server_name` (`host_name`) of a TLS `ClientHello` at the start of `data`.
#[must_use]
pub fn tls_server_name(data: &[u8]) -> Option<String> {
    // Record: type 22 (handshake), version 3.x, length; handshake: type 1 (`ClientHello`).
    if data.len() < 9 || data[0] != 0x16 || data[1] != 0x03 || data[5] != 0x01 {
        return None;
    }
    // client_version(2) random(32)
    let mut pos = 9 + 2 + 32;
    let session_id = usize::from(*data.get(pos)?);
    pos += 1 + session_id;
    let suites = be16(data, pos)?;
    pos += 2 + suites;
    let compression = usize::from(*data.get(pos)?);
    pos += 1 + compression;
    let ext_total = be16(data, pos)?;
    pos += 2;
    let end = pos + ext_total;
    while pos + 4 <= end {
        let ext_type = be16(data, pos)?;
        let ext_len = be16(data, pos + 2)?;
        pos += 4;
        if ext_type == 0 {
            let ext = data.get(pos..pos + ext_len)?;
            let list_len = be16(ext, 0)?;
            let mut at = 2;
            while at + 3 <= (2 + list_len).min(ext.len()) {
                let name_type = ext[at];
                let name_len = be16(ext, at + 1)?;
                let name = ext.get(at + 3..at + 3 + name_len)?;
                if name_type == 0 {
                    return clean_name(name);
                }
                at += 3 + name_len;
            }
            return None;
        }
        pos += ext_len;
    }
    None
}

/// HTTP/1.x request methods recognised at the start of a payload.
const HTTP_METHODS: &[&[u8]] =
    &[b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// The `Host` header of an HTTP/1.x request at the start of `data` (complete lines only).
#[must_use]
pub fn http_host(data: &[u8]) -> Option<String> {
    if !HTTP_METHODS.iter().any(|m| data.starts_with(m)) {
        return None;
    }
    let mut lines = data.split(|&b| b == b'\n');
    let request_line = lines.next()?;
    if !request_line.ends_with(b"\r") || !request_line.windows(5).any(|w| w == b"HTTP/") {
        return None;
    }
    let mut consumed = request_line.len() + 1;
    for line in lines {
        consumed += line.len() + 1;
        // A line without its newline was cut by the capture.
        if consumed > data.len() {
            return None;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            let value = line[colon + 1..].trim_ascii();
            return clean_name(value);
        }
    }
    None
}

/// Decodes and parses one ring buffer record.
pub fn parse_record(bytes: &[u8]) -> Result<Sample, DecodeError> {
    let (header, frame) = decode_sample(bytes)?;
    let app = transport(frame).map(|t| app_info(&t)).unwrap_or_default();
    Ok(Sample { key: header.key, ts_ns: header.ts_ns, ifindex: header.ifindex, direction: header.direction, app })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DNS query for `name` (type A), as a resolver sends it.
    pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            m.push(u8::try_from(label.len()).unwrap());
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    /// A minimal TLS 1.2 `ClientHello` with an SNI extension after another extension.
    pub fn client_hello(sni: &str) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]; // ec_point_formats
        let name = sni.as_bytes();
        let n = u16::try_from(name.len()).unwrap();
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(n + 5).to_be_bytes());
        exts.extend_from_slice(&(n + 3).to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&n.to_be_bytes());
        exts.extend_from_slice(name);
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn frame_v4(proto: u8, sport: u16, dport: u16, payload: &[u8], pad_to: usize) -> Vec<u8> {
        let l4 = if proto == 17 {
            let mut u = Vec::new();
            u.extend_from_slice(&sport.to_be_bytes());
            u.extend_from_slice(&dport.to_be_bytes());
            u.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.extend_from_slice(payload);
            u
        } else {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = 0x18;
            t.extend_from_slice(payload);
            t
        };
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        let total = u16::try_from(20 + l4.len()).unwrap();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&l4);
        f.resize(f.len().max(pad_to), 0);
        f
    }

    #[test]
    fn dns_names() {
        assert_eq!(dns_query_name(&dns_query(7, "www.Example.org")).as_deref(), Some("www.example.org"));
        assert_eq!(dns_query_name(&dns_query(7, "a")).as_deref(), Some("a"));
        let mut cut = dns_query(7, "www.example.org");
        cut.truncate(20);
        assert_eq!(dns_query_name(&cut), None, "cut inside the name");
        let mut pointer = dns_query(7, "x");
        pointer[12] = 0xc0;
        assert_eq!(dns_query_name(&pointer), None);
        assert_eq!(dns_query_name(&[0; 11]), None);
        let mut no_question = dns_query(7, "x");
        no_question[5] = 0;
        assert_eq!(dns_query_name(&no_question), None);
        let mut bad_chars = dns_query(7, "a b");
        bad_chars[13] = b'a';
        assert_eq!(dns_query_name(&bad_chars), None, "a space is no host name");
    }

    #[test]
    fn tls_sni() {
        assert_eq!(tls_server_name(&client_hello("shop.example.com")).as_deref(), Some("shop.example.com"));
        let hello = client_hello("shop.example.com");
        for cut in [0, 5, 9, 44, 60, hello.len() - 3] {
            assert_eq!(tls_server_name(&hello[..cut]), None, "cut at {cut}");
        }
        let mut not_hello = hello.clone();
        not_hello[5] = 2;
        assert_eq!(tls_server_name(&not_hello), None, "a ServerHello names nothing");
        assert_eq!(tls_server_name(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn http_hosts() {
        let req = b"GET /index.html HTTP/1.1\r\nUser-Agent: t\r\nhost:  Intranet.Example:8080 \r\n\r\n";
        assert_eq!(http_host(req).as_deref(), Some("intranet.example:8080"));
        assert_eq!(http_host(b"POST /x HTTP/1.0\r\nHost: a.b\r\n").as_deref(), Some("a.b"));
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost: a.b"), None, "a line cut by the capture");
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: x\r\n"), None, "body is not headers");
        assert_eq!(http_host(b"HELLO world\r\nHost: a\r\n"), None);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHost: <script>\r\n"), None);
    }

    #[test]
    fn frames_through_pnet() {
        let f = frame_v4(17, 40000, 53, &dns_query(1, "db.internal"), 0);
        let t = transport(&f).unwrap();
        assert_eq!((t.proto, t.sport, t.dport), (17, 40000, 53));
        assert_eq!(app_info(&t).dns_query.as_deref(), Some("db.internal"));

        let f = frame_v4(6, 40001, 443, &client_hello("api.example.net"), 0);
        assert_eq!(app_info(&transport(&f).unwrap()).tls_sni.as_deref(), Some("api.example.net"));

        let f = frame_v4(6, 40002, 80, b"GET / HTTP/1.1\r\nHost: web.lab\r\n\r\n", 0);
        let app = app_info(&transport(&f).unwrap());
        assert_eq!((app.http_host.as_deref(), app.tls_sni.as_deref()), (Some("web.lab"), None));

        // Ethernet padding after a bare ACK is not payload.
        let f = frame_v4(6, 40003, 80, b"", 60);
        assert_eq!(transport(&f).unwrap().payload, b"");
        // Cut inside the IP header.
        assert!(transport(&f[..20]).is_none());
        // Not IP.
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(transport(&arp).is_none());
    }

    #[test]
    fn records_decode_and_reject() {
        let payload = dns_query(1, "x.y");
        let f = frame_v4(17, 40000, 53, &payload, 0);
        let mut sample = PayloadSample {
            key: FlowKey { family: FAMILY_IPV4, proto: 17, ..FlowKey::default() },
            ts_ns: 5,
            ifindex: 3,
            frame_len: u32::try_from(f.len()).unwrap(),
            captured: u16::try_from(f.len()).unwrap(),
            direction: DIR_LO_TO_HI,
            index: 0,
            _pad: [0; 4],
            data: [0; SAMPLE_BYTES],
        };
        sample.data[..f.len()].copy_from_slice(&f);
        // SAFETY: PayloadSample is repr(C) plain data without implicit padding.
        let bytes = unsafe { std::slice::from_raw_parts(std::ptr::from_ref(&sample).cast::<u8>(), SAMPLE_RECORD_SIZE) }
            .to_vec();
        let parsed = parse_record(&bytes).unwrap();
        assert_eq!((parsed.ifindex, parsed.app.dns_query.as_deref()), (3, Some("x.y")));
        assert!(matches!(parse_record(&bytes[..100]), Err(DecodeError::WrongLength { .. })));
        let mut bad = bytes.clone();
        bad[std::mem::offset_of!(PayloadSample, captured)..][..2].copy_from_slice(&600u16.to_ne_bytes());
        assert!(parse_record(&bad).is_err(), "captured past the buffer");
        let mut bad = bytes;
        bad[std::mem::offset_of!(PayloadSample, direction)] = 9;
        assert!(matches!(parse_record(&bad), Err(DecodeError::BadDirection(9))));
    }
}
