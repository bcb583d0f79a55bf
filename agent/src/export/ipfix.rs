//! `--ipfix HOST:PORT`: flow records as IPFIX (RFC 7011) over UDP.
//!
//! Two templates, one per address family (256: IPv4, 257: IPv6), are sent at start and
//! again every [`TEMPLATE_RESEND`] (UDP loses them; a collector that restarts needs them).
//! Each flow is exported as one record per direction that carried packets
//! (`biflowDirection` 1: from the initiator, 2: from the responder) with delta counts:
//! while the flow lives, every `--ipfix-active-timeout` if its counters moved (flow end
//! reason 2, active timeout), and once more when it ends (idle: 1; FIN/RST seen: 3;
//! gone from the kernel table: 5, lack of resources).
//!
//! Information elements: the standard ones (IANA) for addresses (8, 12, 27, 28), ports
//! (7, 11), protocol (4), `packetDeltaCount` (2), `octetDeltaCount` (1),
//! `flowStartMilliseconds` (152), `flowEndMilliseconds` (153), `vlanId` (58),
//! `flowEndReason` (136), `biflowDirection` (239); and enterprise-specific ones under
//! [`PEN`], all variable-length strings: 1 source zone, 2 destination zone, 3 verdict,
//! 4 policy, 5 DNS query name, 6 TLS server name, 7 HTTP host (empty when absent).
//!
//! Nothing is dropped silently: records that cannot be sent and records missed by a
//! slow reader are counted in `backplane_export_errors_total{exporter="ipfix"}`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::{net::UdpSocket, sync::broadcast::Receiver};

use crate::{
    export::metrics::Metrics,
    flows::{FlowRecord, FollowEvent, FollowMessage},
};

/// IPFIX version number in the message header.
pub const VERSION: u16 = 10;
/// Set id of a template set.
pub const TEMPLATE_SET_ID: u16 = 2;
/// Template (and data set) id of IPv4 flows.
pub const TEMPLATE_V4: u16 = 256;
/// Template (and data set) id of IPv6 flows.
pub const TEMPLATE_V6: u16 = 257;
/// Private Enterprise Number of backplane's own information elements. 32473 is the
/// number IANA reserves for documentation and examples (RFC 5612); it stands in until
/// the project registers its own, and collectors treat it as any other enterprise.
pub const PEN: u32 = 32473;
/// Field length meaning "variable length".
pub const VARLEN: u16 = 0xffff;
/// Largest message sent (fits a 1500-byte MTU with IP and UDP headers).
pub const MAX_MESSAGE: usize = 1400;
/// How often the templates are sent again.
pub const TEMPLATE_RESEND: Duration = Duration::from_secs(30);
/// Default `--ipfix-active-timeout`.
pub const DEFAULT_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Flows without news for this long are forgotten by the exporter (their end was lost).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// `flowEndReason` values (IANA).
pub mod end_reason {
    pub const IDLE_TIMEOUT: u8 = 1;
    pub const ACTIVE_TIMEOUT: u8 = 2;
    pub const END_OF_FLOW: u8 = 3;
    pub const LACK_OF_RESOURCES: u8 = 5;
}

/// One field specifier: element id, length, enterprise number (0: IANA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub id: u16,
    pub len: u16,
    pub enterprise: u32,
}

const fn iana(id: u16, len: u16) -> Field {
    Field { id, len, enterprise: 0 }
}

const fn ours(id: u16) -> Field {
    Field { id, len: VARLEN, enterprise: PEN }
}

/// The fields after the addresses, common to both templates.
const COMMON: [Field; 17] = [
    iana(7, 2),   // sourceTransportPort
    iana(11, 2),  // destinationTransportPort
    iana(4, 1),   // protocolIdentifier
    iana(2, 8),   // packetDeltaCount
    iana(1, 8),   // octetDeltaCount
    iana(152, 8), // flowStartMilliseconds
    iana(153, 8), // flowEndMilliseconds
    iana(58, 2),  // vlanId
    iana(136, 1), // flowEndReason
    iana(239, 1), // biflowDirection
    ours(1),      // source zone
    ours(2),      // destination zone
    ours(3),      // verdict
    ours(4),      // policy
    ours(5),      // DNS query name
    ours(6),      // TLS server name
    ours(7),      // HTTP host
];

/// The fields of a template.
#[must_use]
pub fn template_fields(v6: bool) -> Vec<Field> {
    let addrs = if v6 { [iana(27, 16), iana(28, 16)] } else { [iana(8, 4), iana(12, 4)] };
    addrs.into_iter().chain(COMMON).collect()
}

/// One data record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowExport {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub packets: u64,
    pub octets: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub vlan: u16,
    pub end_reason: u8,
    /// 1: from the initiator; 2: from the responder.
    pub biflow_direction: u8,
    pub src_zone: String,
    pub dst_zone: String,
    pub verdict: String,
    pub policy: String,
    pub dns_query: String,
    pub tls_sni: String,
    pub http_host: String,
}

impl FlowExport {
    fn is_v6(&self) -> bool {
        matches!(self.src, Some(IpAddr::V6(_)))
    }
}

/// The message header (16 bytes) before `body`.
pub fn put_message(out: &mut BytesMut, export_time: u32, sequence: u32, domain: u32, body: &[u8]) {
    let len = u16::try_from(16 + body.len()).expect("messages are kept under 64 KiB");
    out.put_u16(VERSION);
    out.put_u16(len);
    out.put_u32(export_time);
    out.put_u32(sequence);
    out.put_u32(domain);
    out.put_slice(body);
}

/// The template set holding both templates.
#[must_use]
pub fn template_set() -> BytesMut {
    let mut records = BytesMut::new();
    for (id, v6) in [(TEMPLATE_V4, false), (TEMPLATE_V6, true)] {
        let fields = template_fields(v6);
        records.put_u16(id);
        records.put_u16(u16::try_from(fields.len()).expect("few fields"));
        for f in fields {
            if f.enterprise == 0 {
                records.put_u16(f.id);
                records.put_u16(f.len);
            } else {
                records.put_u16(f.id | 0x8000);
                records.put_u16(f.len);
                records.put_u32(f.enterprise);
            }
        }
    }
    let mut set = BytesMut::with_capacity(4 + records.len());
    set.put_u16(TEMPLATE_SET_ID);
    set.put_u16(u16::try_from(4 + records.len()).expect("small set"));
    set.put_slice(&records);
    set
}

/// A variable-length string: one length byte, or 255 and two length bytes (RFC 7011
/// 7); cut at 65535 bytes.
pub fn put_varlen(out: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    if b.len() < 255 {
        out.put_u8(u8::try_from(b.len()).expect("checked"));
    } else {
        out.put_u8(255);
        out.put_u16(u16::try_from(b.len()).expect("checked"));
    }
    out.put_slice(b);
}

/// One data record in the layout of its template.
pub fn put_record(out: &mut BytesMut, r: &FlowExport) {
    match (r.src, r.dst) {
        (Some(IpAddr::V4(s)), Some(IpAddr::V4(d))) => {
            out.put_slice(&s.octets());
            out.put_slice(&d.octets());
        }
        (Some(IpAddr::V6(s)), Some(IpAddr::V6(d))) => {
            out.put_slice(&s.octets());
            out.put_slice(&d.octets());
        }
        _ => {
            out.put_slice(&[0; 8]);
        }
    }
    out.put_u16(r.sport);
    out.put_u16(r.dport);
    out.put_u8(r.proto);
    out.put_u64(r.packets);
    out.put_u64(r.octets);
    out.put_u64(r.start_ms);
    out.put_u64(r.end_ms);
    out.put_u16(r.vlan);
    out.put_u8(r.end_reason);
    out.put_u8(r.biflow_direction);
    for s in [&r.src_zone, &r.dst_zone, &r.verdict, &r.policy, &r.dns_query, &r.tls_sni, &r.http_host] {
        put_varlen(out, s);
    }
}

/// Builds messages of data records, each at most [`MAX_MESSAGE`] bytes.
pub struct Encoder {
    pub domain: u32,
    /// Data records sent before the next message (the header's sequence number).
    pub sequence: u32,
}

impl Encoder {
    /// The template message.
    #[must_use]
    pub fn templates(&self, export_time: u32) -> Bytes {
        let set = template_set();
        let mut out = BytesMut::with_capacity(16 + set.len());
        put_message(&mut out, export_time, self.sequence, self.domain, &set);
        out.freeze()
    }

    /// Data messages for `records`, with the number of records in each.
    pub fn data(&mut self, export_time: u32, records: &[FlowExport]) -> Vec<(Bytes, u32)> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let id = if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 };
            let mut set = BytesMut::new();
            let mut count = 0u32;
            for r in records.iter().filter(|r| r.is_v6() == v6) {
                let mut rec = BytesMut::new();
                put_record(&mut rec, r);
                if count > 0 && 16 + 4 + set.len() + rec.len() > MAX_MESSAGE {
                    out.push((self.finish(export_time, id, &set, count), count));
                    set.clear();
                    count = 0;
                }
                set.put_slice(&rec);
                count += 1;
            }
            if count > 0 {
                out.push((self.finish(export_time, id, &set, count), count));
            }
        }
        out
    }

    fn finish(&mut self, export_time: u32, set_id: u16, records: &[u8], count: u32) -> Bytes {
        let mut set = BytesMut::with_capacity(4 + records.len());
        set.put_u16(set_id);
        set.put_u16(u16::try_from(4 + records.len()).expect("kept under MAX_MESSAGE"));
        set.put_slice(records);
        let mut msg = BytesMut::with_capacity(16 + set.len());
        put_message(&mut msg, export_time, self.sequence, self.domain, &set);
        self.sequence = self.sequence.wrapping_add(count);
        msg.freeze()
    }
}

/// What the exporter has sent of one flow.
struct Sent {
    fwd: (u64, u64),
    rev: (u64, u64),
    last_export: Instant,
    last_news: Instant,
}

type FlowId = (String, u16, String, u16, String, u16);

fn flow_id(r: &FlowRecord) -> FlowId {
    (r.src_ip.clone(), r.src_port, r.dst_ip.clone(), r.dst_port, r.proto.clone(), r.vlan)
}

fn proto_number(name: &str) -> u8 {
    match name {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        "sctp" => 132,
        n => n.parse().unwrap_or(0),
    }
}

/// The records (one per direction that carried packets since the last export) of a flow.
#[must_use]
pub fn records_of(r: &FlowRecord, sent_fwd: (u64, u64), sent_rev: (u64, u64), end_reason: u8) -> Vec<FlowExport> {
    let (src, dst) = (r.src_ip.parse().ok(), r.dst_ip.parse().ok());
    let opt = |s: &Option<String>| s.clone().unwrap_or_default();
    let base = FlowExport {
        proto: proto_number(&r.proto),
        start_ms: u64::try_from(r.first_seen_unix_ms).unwrap_or(0),
        end_ms: u64::try_from(r.last_seen_unix_ms).unwrap_or(0),
        vlan: r.vlan,
        end_reason,
        verdict: r.verdict.clone(),
        policy: opt(&r.policy),
        dns_query: opt(&r.dns_query),
        tls_sni: opt(&r.tls_sni),
        http_host: opt(&r.http_host),
        ..FlowExport::default()
    };
    let mut out = Vec::new();
    let fwd = (r.fwd_packets.saturating_sub(sent_fwd.0), r.fwd_bytes.saturating_sub(sent_fwd.1));
    let rev = (r.rev_packets.saturating_sub(sent_rev.0), r.rev_bytes.saturating_sub(sent_rev.1));
    if fwd.0 > 0 {
        out.push(FlowExport {
            src,
            dst,
            sport: r.src_port,
            dport: r.dst_port,
            packets: fwd.0,
            octets: fwd.1,
            biflow_direction: 1,
            src_zone: opt(&r.src_zone),
            dst_zone: opt(&r.dst_zone),
            ..base.clone()
        });
    }
    if rev.0 > 0 {
        out.push(FlowExport {
            src: dst,
            dst: src,
            sport: r.dst_port,
            dport: r.src_port,
            packets: rev.0,
            octets: rev.1,
            biflow_direction: 2,
            src_zone: opt(&r.dst_zone),
            dst_zone: opt(&r.src_zone),
            ..base
        });
    }
    out
}

/// `--ipfix*` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpfixOptions {
    pub collector: SocketAddr,
    pub active_timeout: Duration,
    pub domain: u32,
}

/// The exporter: follows the flow stream and sends records to the collector.
pub struct Exporter {
    opts: IpfixOptions,
    socket: UdpSocket,
    encoder: Encoder,
    sent: HashMap<FlowId, Sent>,
    metrics: Arc<Metrics>,
}

fn unix_secs() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

impl Exporter {
    /// A socket connected to the collector (from an address of the collector's family).
    pub async fn connect(opts: IpfixOptions, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let local: SocketAddr = if opts.collector.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid");
        let socket = UdpSocket::bind(local).await?;
        socket.connect(opts.collector).await?;
        let encoder = Encoder { domain: opts.domain, sequence: 0 };
        Ok(Self { opts, socket, encoder, sent: HashMap::new(), metrics })
    }

    async fn send(&self, msg: &[u8], records: u32) {
        match self.socket.send(msg).await {
            Ok(_) => {
                if records > 0 {
                    self.metrics.exported("ipfix", u64::from(records));
                }
            }
            Err(e) => {
                // A template message lost counts as one error; data messages by record.
                self.metrics.export_error("ipfix", "send", u64::from(records.max(1)));
                log::debug!("ipfix: send to {}: {e}", self.opts.collector);
            }
        }
    }

    async fn send_templates(&self) {
        let msg = self.encoder.templates(unix_secs());
        self.send(&msg, 0).await;
    }

    /// What one follow message means for the collector.
    fn records_for(&mut self, msg: &FollowMessage, now: Instant) -> Vec<FlowExport> {
        let Some(r) = &msg.flow else {
            return Vec::new();
        };
        let id = flow_id(r);
        match msg.event {
            FollowEvent::Start | FollowEvent::End => {
                let s =
                    self.sent.entry(id).or_insert(Sent { fwd: (0, 0), rev: (0, 0), last_export: now, last_news: now });
                s.last_news = now;
                Vec::new()
            }
            FollowEvent::Update => {
                let s =
                    self.sent.entry(id).or_insert(Sent { fwd: (0, 0), rev: (0, 0), last_export: now, last_news: now });
                s.last_news = now;
                if now.duration_since(s.last_export) < self.opts.active_timeout {
                    return Vec::new();
                }
                let out = records_of(r, s.fwd, s.rev, end_reason::ACTIVE_TIMEOUT);
                s.fwd = (r.fwd_packets, r.fwd_bytes);
                s.rev = (r.rev_packets, r.rev_bytes);
                s.last_export = now;
                out
            }
            FollowEvent::Expired | FollowEvent::Evicted => {
                let (fwd, rev) = self.sent.remove(&id).map_or(((0, 0), (0, 0)), |s| (s.fwd, s.rev));
                let reason = if msg.event == FollowEvent::Evicted {
                    end_reason::LACK_OF_RESOURCES
                } else if r.tcp_flags.contains("FIN") || r.tcp_flags.contains("RST") {
                    end_reason::END_OF_FLOW
                } else {
                    end_reason::IDLE_TIMEOUT
                };
                records_of(r, fwd, rev, reason)
            }
            FollowEvent::Lagged => Vec::new(),
        }
    }

    /// Follows the flow stream until it closes or the task is dropped.
    pub async fn run(mut self, mut rx: Receiver<FollowMessage>) {
        use tokio::sync::broadcast::error::RecvError;
        self.send_templates().await;
        let mut templates = tokio::time::interval_at(tokio::time::Instant::now() + TEMPLATE_RESEND, TEMPLATE_RESEND);
        loop {
            let msg = tokio::select! {
                _ = templates.tick() => {
                    self.send_templates().await;
                    let now = Instant::now();
                    self.sent.retain(|_, s| now.duration_since(s.last_news) < FORGET_AFTER);
                    continue;
                }
                msg = rx.recv() => msg,
            };
            let mut batch = Vec::new();
            let mut handle = |this: &mut Self, msg: Result<FollowMessage, RecvError>| match msg {
                Ok(msg) => {
                    batch.extend(this.records_for(&msg, Instant::now()));
                    true
                }
                Err(RecvError::Lagged(n)) => {
                    this.metrics.export_error("ipfix", "lagged", n);
                    true
                }
                Err(RecvError::Closed) => false,
            };
            if !handle(&mut self, msg) {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                handle(&mut self, Ok(more));
            }
            if batch.is_empty() {
                continue;
            }
            for (msg, n) in self.encoder.data(unix_secs(), &batch) {
                self.send(&msg, n).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn sample() -> FlowExport {
        FlowExport {
            src: Some(IpAddr::V4(Ipv4Addr::new(10, 30, 0, 1))),
            dst: Some(IpAddr::V4(Ipv4Addr::new(10, 40, 0, 1))),
            sport: 40000,
            dport: 5432,
            proto: 6,
            packets: 3,
            octets: 222,
            start_ms: 0x0102_0304_0506,
            end_ms: 0x0102_0304_0607,
            vlan: 0,
            end_reason: 1,
            biflow_direction: 1,
            src_zone: "web".into(),
            dst_zone: "db".into(),
            verdict: "allowed".into(),
            policy: "web-to-db".into(),
            dns_query: String::new(),
            tls_sni: "db.lab".into(),
            http_host: String::new(),
        }
    }

    #[test]
    fn template_set_bytes() {
        let set = template_set();
        // Set header (length 220: two templates of 108 bytes), then template 256 with 19 fields.
        assert_eq!(&set[..8], &[0x00, 0x02, 0x00, 0xdc, 0x01, 0x00, 0x00, 0x13]);
        // First fields: sourceIPv4Address/4, destinationIPv4Address/4, ports, protocol.
        assert_eq!(&set[8..28], &[0, 8, 0, 4, 0, 12, 0, 4, 0, 7, 0, 2, 0, 11, 0, 2, 0, 4, 0, 1]);
        // packetDeltaCount/8, octetDeltaCount/8, flowStart/EndMilliseconds/8, vlanId/2,
        // flowEndReason/1, biflowDirection/1.
        assert_eq!(
            &set[28..56],
            &[0, 2, 0, 8, 0, 1, 0, 8, 0, 152, 0, 8, 0, 153, 0, 8, 0, 58, 0, 2, 0, 136, 0, 1, 0, 239, 0, 1]
        );
        // Enterprise element 1, variable length, PEN 32473 (0x00007ed9).
        assert_eq!(&set[56..64], &[0x80, 0x01, 0xff, 0xff, 0x00, 0x00, 0x7e, 0xd9]);
        // 12 IANA fields * 4 + 7 enterprise fields * 8 = 104 bytes of template 256.
        let t6 = 8 + 104;
        assert_eq!(&set[t6..t6 + 12], &[0x01, 0x01, 0x00, 0x13, 0, 27, 0, 16, 0, 28, 0, 16]);
        assert_eq!(set.len(), 4 + 2 * (4 + 104));
        assert_eq!(u16::from_be_bytes([set[2], set[3]]) as usize, set.len());
    }

    #[test]
    fn data_message_bytes() {
        let mut enc = Encoder { domain: 7, sequence: 5 };
        let msgs = enc.data(0x6000_0000, &[sample()]);
        assert_eq!(msgs.len(), 1);
        let (msg, n) = &msgs[0];
        assert_eq!(*n, 1);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // Message header: version 10, length, export time, sequence 5, domain 7.
            &[0x00, 0x0a][..], &[0x00, 0x67], &[0x60, 0, 0, 0], &[0, 0, 0, 5], &[0, 0, 0, 7],
            // Data set 256, length 87 (4 + one record of 83).
            &[0x01, 0x00, 0x00, 0x57],
            // 10.30.0.1 -> 10.40.0.1, 40000 -> 5432, TCP.
            &[10, 30, 0, 1], &[10, 40, 0, 1], &[0x9c, 0x40], &[0x15, 0x38], &[6],
            // 3 packets, 222 octets.
            &[0, 0, 0, 0, 0, 0, 0, 3], &[0, 0, 0, 0, 0, 0, 0, 222],
            // Start and end in ms.
            &[0, 0, 1, 2, 3, 4, 5, 6], &[0, 0, 1, 2, 3, 4, 6, 7],
            // vlan 0, end reason 1 (idle), biflowDirection 1 (initiator).
            &[0, 0], &[1], &[1],
            // "web", "db", "allowed", "web-to-db", "", "db.lab", "".
            &[3, b'w', b'e', b'b'], &[2, b'd', b'b'], &[7], b"allowed", &[9], b"web-to-db", &[0], &[6], b"db.lab", &[0],
        ].concat();
        assert_eq!(msg.as_ref(), expected.as_slice());
        assert_eq!(enc.sequence, 6, "the sequence counts data records");
    }

    #[test]
    fn long_strings_use_three_length_bytes_and_messages_stay_small() {
        let mut out = BytesMut::new();
        put_varlen(&mut out, &"x".repeat(300));
        assert_eq!(&out[..3], &[255, 0x01, 0x2c]);
        assert_eq!(out.len(), 303);
        let mut enc = Encoder { domain: 1, sequence: 0 };
        let many: Vec<FlowExport> = (0..100).map(|_| sample()).collect();
        let msgs = enc.data(0, &many);
        assert!(msgs.len() > 1);
        assert_eq!(msgs.iter().map(|(_, n)| *n).sum::<u32>(), 100);
        for (m, _) in &msgs {
            assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
            assert_eq!(u16::from_be_bytes([m[2], m[3]]) as usize, m.len());
        }
        assert_eq!(enc.sequence, 100);
    }

    #[test]
    fn both_directions_with_deltas() {
        let r = FlowRecord {
            src_ip: "10.0.0.1".into(),
            dst_ip: "10.0.0.2".into(),
            proto: "udp".into(),
            src_port: 1000,
            dst_port: 53,
            fwd_packets: 10,
            fwd_bytes: 1000,
            rev_packets: 4,
            rev_bytes: 400,
            first_seen: String::new(),
            last_seen: String::new(),
            first_seen_unix_ms: 1,
            last_seen_unix_ms: 2,
            interfaces: vec![],
            vlan: 0,
            tcp_flags: String::new(),
            state: "ended".into(),
            verdict: "observed".into(),
            reason: "no_rules".into(),
            policy: None,
            src_zone: None,
            dst_zone: None,
            dns_query: Some("a.b".into()),
            tls_sni: None,
            http_host: None,
        };
        let recs = records_of(&r, (6, 600), (4, 400), end_reason::IDLE_TIMEOUT);
        assert_eq!(recs.len(), 1, "nothing new from the responder");
        assert_eq!((recs[0].packets, recs[0].octets, recs[0].proto), (4, 400, 17));
        assert_eq!(recs[0].dns_query, "a.b");
        let recs = records_of(&r, (0, 0), (0, 0), end_reason::IDLE_TIMEOUT);
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[1].sport, recs[1].dport, recs[1].biflow_direction), (53, 1000, 2));
        assert_eq!(recs[1].src, Some("10.0.0.2".parse().unwrap()));
    }
}
