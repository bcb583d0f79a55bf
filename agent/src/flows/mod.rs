//! The userspace flow table and the flow records it exports.
//!
//! The kernel's `FLOWS` map is the source of truth for counters: every second (and
//! whenever a client asks for flows) the agent reads the whole map and refreshes its
//! records. Start/end events from the ring buffer only make the table react sooner;
//! a flow whose start event was lost is still recorded from the map.
//!
//! Idle flows are deleted from the kernel map and moved into a bounded history of
//! ended flows. Nothing leaves the table without being counted: expired, evicted (gone
//! from the kernel map behind the agent's back, e.g. by LRU) and history overflow all
//! have counters.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData, MapError};
use backplane_common::{
    FlowEvent, FlowEventKind, FlowKey, FlowValue, Verdict,
    flow::{DIR_HI_TO_LO, DIR_LO_TO_HI, FAMILY_IPV4, STATE_ENDED},
    reason::Reason,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    clock::{Clock, monotonic_now_ns, rfc3339_ms},
    datapath::map_batch::{self, BatchError},
    error::DecodeError,
    ifnames::IfNames,
    inspect::{AppInfo, Sample},
    rule_names::{NameTable, RuleNames},
};

/// Idle time after which a flow that saw FIN/RST (`STATE_ENDED`) is expired.
pub const ENDED_IDLE_NS: u64 = 5_000_000_000;

/// How many ended flows the history keeps.
pub const HISTORY_CAPACITY: usize = 10_000;

/// A kernel entry must be missing from this many consecutive map reads before its
/// record is declared evicted (a map walk that races with inserts and deletes may skip
/// an entry once).
const MISSES_BEFORE_EVICTION: u8 = 2;

/// Capacity of the channel that feeds `follow` clients.
const FOLLOW_CHANNEL: usize = 8192;

/// One flow as the CLI and the control socket show it.
///
/// `src` is the side that sent the flow's first packet (the initiator); `fwd` counts
/// what it sent, `rev` what it received. `src_zone`, `dst_zone` and `policy` are those of
/// the rule set that judged the flow; all three are `None` when no rule set did
/// (verdict `observed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub src_ip: String,
    pub dst_ip: String,
    pub proto: String,
    pub src_port: u16,
    pub dst_port: u16,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub interfaces: Vec<String>,
    pub vlan: u16,
    pub tcp_flags: String,
    pub state: String,
    pub verdict: String,
    pub reason: String,
    pub policy: Option<String>,
    pub src_zone: Option<String>,
    pub dst_zone: Option<String>,
    /// The first DNS query name seen in the flow's first payload packets (see
    /// [`crate::inspect`]); `null` when none.
    #[serde(default)]
    pub dns_query: Option<String>,
    /// The server name (SNI) of the flow's TLS `ClientHello`; `null` when none.
    #[serde(default)]
    pub tls_sni: Option<String>,
    /// The `Host` of the flow's first HTTP request; `null` when none.
    #[serde(default)]
    pub http_host: Option<String>,
}

/// Whether a record is still live in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    Active,
    Ended,
}

impl RecordState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Ended => "ended",
        }
    }
}

/// Name of an IP protocol number in flow records.
#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// TCP flags as `SYN|ACK|FIN` (empty when none).
#[must_use]
pub fn tcp_flags_text(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}

/// An address of a [`FlowKey`] as text: IPv4 from the first four bytes for family 4.
#[must_use]
pub fn addr_text(addr: &[u8; 16], family: u8) -> String {
    if family == FAMILY_IPV4 {
        Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
    } else {
        Ipv6Addr::from(*addr).to_string()
    }
}

/// The initiator's direction, tolerating a corrupt byte (anything but 1 reads as 0).
fn initiator(value: &FlowValue) -> usize {
    usize::from(value.initiator == DIR_HI_TO_LO)
}

/// Builds the exported record of a flow from its key and kernel value; zone and policy
/// ids are named by `names`.
pub fn record_from_kernel(
    key: &FlowKey,
    value: &FlowValue,
    state: RecordState,
    clock: &Clock,
    ifname: &dyn Fn(u32) -> String,
    names: &NameTable,
) -> FlowRecord {
    let fwd = initiator(value);
    let rev = fwd ^ 1;
    #[expect(clippy::cast_possible_truncation, reason = "fwd is 0 or 1")]
    let (src, sport) = key.sender(fwd as u8);
    #[expect(clippy::cast_possible_truncation, reason = "fwd is 0 or 1")]
    let (dst, dport) = key.receiver(fwd as u8);
    let mut interfaces: Vec<String> = Vec::with_capacity(2);
    for idx in [value.ifindex[fwd], value.ifindex[rev]] {
        if idx != 0 {
            let name = ifname(idx);
            if !interfaces.contains(&name) {
                interfaces.push(name);
            }
        }
    }
    let first_ms = clock.unix_ms(value.first_seen_ns);
    let last_ms = clock.unix_ms(value.last_seen_ns);
    let state = if value.state & STATE_ENDED != 0 { RecordState::Ended } else { state };
    // Zones are stored per side of the key; the record's src is the initiator.
    let judged_by_rules = value.reason != Reason::NoRules as u8;
    let (src_zone, dst_zone, policy) = if judged_by_rules {
        (
            Some(names.zone(value.zone[fwd])),
            Some(names.zone(value.zone[rev])),
            names.policy(value.generation, value.policy_id),
        )
    } else {
        (None, None, None)
    };
    FlowRecord {
        src_ip: addr_text(src, key.family),
        dst_ip: addr_text(dst, key.family),
        proto: proto_name(key.proto),
        src_port: sport,
        dst_port: dport,
        fwd_packets: value.packets[fwd],
        fwd_bytes: value.bytes[fwd],
        rev_packets: value.packets[rev],
        rev_bytes: value.bytes[rev],
        first_seen: rfc3339_ms(first_ms),
        last_seen: rfc3339_ms(last_ms),
        first_seen_unix_ms: first_ms,
        last_seen_unix_ms: last_ms,
        interfaces,
        vlan: key.vlan,
        tcp_flags: tcp_flags_text(value.tcp_flags[0] | value.tcp_flags[1]),
        state: state.as_str().into(),
        verdict: Verdict::from_u8(value.verdict)
            .map_or_else(|| format!("unknown({})", value.verdict), |v| v.as_str().into()),
        reason: Reason::from_u8(value.reason)
            .map_or_else(|| format!("unknown({})", value.reason), |r| r.as_str().into()),
        policy,
        src_zone,
        dst_zone,
        dns_query: None,
        tls_sni: None,
        http_host: None,
    }
}

/// A kernel value made from an event, for a flow whose map entry was not read yet.
fn value_from_event(event: &FlowEvent) -> FlowValue {
    let dir = usize::from(event.direction == DIR_HI_TO_LO);
    let mut value = FlowValue {
        first_seen_ns: event.ts_ns,
        last_seen_ns: event.ts_ns,
        initiator: if dir == 1 { DIR_HI_TO_LO } else { DIR_LO_TO_HI },
        verdict: event.verdict,
        ..FlowValue::default()
    };
    value.ifindex[dir] = event.ifindex;
    value.tcp_flags[dir] = event.tcp_flags;
    value
}

/// What a `follow` client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FollowEvent {
    /// A start event: a new flow.
    Start,
    /// An end event: FIN or RST seen.
    End,
    /// The counters of a flow changed (periodic refresh).
    Update,
    /// The flow was idle and was removed from the kernel table.
    Expired,
    /// The flow's kernel entry disappeared (LRU eviction or outside deletion).
    Evicted,
    /// The client was too slow and missed `missed` messages.
    Lagged,
}

impl FollowEvent {
    /// The name of a flow's event, as the flow log and `flows --follow` print it; `None`
    /// for `Update` and `Lagged`, which are not events of one flow's life.
    #[must_use]
    pub fn flow_event_name(self) -> Option<&'static str> {
        match self {
            Self::Start => Some("start"),
            Self::End => Some("end"),
            Self::Expired => Some("expired"),
            Self::Evicted => Some("evicted"),
            Self::Update | Self::Lagged => None,
        }
    }
}

/// One line of a `follow` stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowMessage {
    pub event: FollowEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

impl FollowMessage {
    fn flow(event: FollowEvent, flow: FlowRecord) -> Self {
        Self { event, flow: Some(flow), missed: None }
    }
}

/// Counters of the flow table, reported by `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStats {
    /// Entries in the kernel `FLOWS` map at the last read.
    pub kernel_entries: u64,
    /// Records of live flows.
    pub active_records: u64,
    /// Records in the ended-flow history.
    pub ended_records: u64,
    pub start_events: u64,
    pub end_events: u64,
    /// Ring buffer records that did not decode.
    pub decode_errors: u64,
    /// Flows removed for idleness.
    pub expired: u64,
    /// Flows whose kernel entry vanished without the agent removing it.
    pub evicted: u64,
    /// Ended flows pushed out of the history by newer ones.
    pub history_dropped: u64,
    /// Flows known only from the kernel map: their start event never arrived.
    pub without_start_event: u64,
    /// Kernel map reads done.
    pub refreshes: u64,
    /// How long the last read and merge of the kernel map took, in milliseconds. The
    /// next one starts a second after, or as long after as it took when that is more.
    #[serde(default)]
    pub last_refresh_ms: u64,
    /// Entries that could not be read or deleted during map reads.
    pub map_errors: u64,
}

#[derive(Clone, Debug)]
struct FlowRecordState {
    value: FlowValue,
    /// Names found in the flow's payload samples.
    app: AppInfo,
    start_event_seen: bool,
    /// Consecutive map reads that did not find the entry.
    misses: u8,
    /// The last map read (`FlowStats::refreshes`) that found the entry.
    seen_in: u64,
}

/// Result of merging a map read into the table.
#[derive(Debug, Default)]
pub struct Merge {
    /// Keys to delete from the kernel map (idle flows).
    pub expired: Vec<FlowKey>,
    pub messages: Vec<FollowMessage>,
}

/// The agent's view of all flows.
#[derive(Debug)]
pub struct FlowTable {
    clock: Clock,
    idle_timeout_ns: u64,
    ifnames: Arc<IfNames>,
    rule_names: Arc<RuleNames>,
    records: HashMap<FlowKey, FlowRecordState, foldhash::fast::RandomState>,
    history: VecDeque<FlowRecord>,
    history_capacity: usize,
    stats: FlowStats,
    /// Packets and bytes of every flow since the agent started, by (initiator's zone,
    /// responder's zone, verdict): each growth of a flow's counters is added under the
    /// verdict the flow had when it was read, so the totals never go backwards when
    /// flows expire or are judged again.
    zone_traffic: HashMap<(u16, u16, u8), (u64, u64)>,
}

/// Packets and bytes of one (initiator's zone id, responder's zone id, verdict).
pub type ZoneTraffic = ((u16, u16, u8), (u64, u64));

/// Growth of a flow's (packets, bytes), both directions, from one read to the next. A
/// kernel entry that is smaller than before was made anew: all of it is new.
fn traffic_delta(old: &FlowValue, new: &FlowValue) -> (u64, u64) {
    let sum = |v: &FlowValue| (v.packets[0].wrapping_add(v.packets[1]), v.bytes[0].wrapping_add(v.bytes[1]));
    let (old, new) = (sum(old), sum(new));
    if new.0 < old.0 || new.1 < old.1 { new } else { (new.0 - old.0, new.1 - old.1) }
}

impl FlowTable {
    #[must_use]
    pub fn new(clock: Clock, idle_timeout_ns: u64, ifnames: Arc<IfNames>, rule_names: Arc<RuleNames>) -> Self {
        Self {
            clock,
            idle_timeout_ns,
            ifnames,
            rule_names,
            records: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            history: VecDeque::new(),
            history_capacity: HISTORY_CAPACITY,
            stats: FlowStats::default(),
            zone_traffic: HashMap::new(),
        }
    }

    fn render(&self, key: &FlowKey, value: &FlowValue, app: &AppInfo, state: RecordState) -> FlowRecord {
        let ifnames = &self.ifnames;
        let mut record =
            record_from_kernel(key, value, state, &self.clock, &|idx| ifnames.name(idx), &self.rule_names.read());
        record.dns_query.clone_from(&app.dns_query);
        record.tls_sni.clone_from(&app.tls_sni);
        record.http_host.clone_from(&app.http_host);
        record
    }

    fn push_history(&mut self, record: FlowRecord) {
        if self.history.len() >= self.history_capacity {
            self.history.pop_front();
            self.stats.history_dropped += 1;
        }
        self.history.push_back(record);
    }

    /// Removes a record into the history.
    fn retire(&mut self, key: &FlowKey, kind: FollowEvent) -> Option<FlowRecord> {
        let rec = self.records.remove(key)?;
        if !rec.start_event_seen {
            self.stats.without_start_event += 1;
        }
        match kind {
            FollowEvent::Expired => self.stats.expired += 1,
            FollowEvent::Evicted => self.stats.evicted += 1,
            _ => {}
        }
        let record = self.render(key, &rec.value, &rec.app, RecordState::Ended);
        self.push_history(record.clone());
        Some(record)
    }

    /// Applies decoded ring buffer records; returns what followers should see (nothing
    /// unless `want_messages`: rendering records costs time nobody needs).
    pub fn apply_events(
        &mut self,
        events: Vec<Result<FlowEvent, DecodeError>>,
        want_messages: bool,
    ) -> Vec<FollowMessage> {
        self.apply_events_judged(events, want_messages, &|_| None)
    }

    /// [`FlowTable::apply_events`], with `judged` giving the kernel's entry of a flow
    /// that starts, so that its start message has the verdict's reason, zones and
    /// policy (an event carries the verdict only). Its counters are not taken: they
    /// reach the record through the next map read.
    pub fn apply_events_judged(
        &mut self,
        events: Vec<Result<FlowEvent, DecodeError>>,
        want_messages: bool,
        judged: &dyn Fn(&FlowKey) -> Option<FlowValue>,
    ) -> Vec<FollowMessage> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    self.stats.decode_errors += 1;
                    let n = self.stats.decode_errors;
                    if n <= 10 || n.is_power_of_two() {
                        log::warn!("dropping an undecodable flow event ({n} so far): {e}");
                    }
                    continue;
                }
            };
            let kind = FlowEventKind::from_u8(event.kind);
            if kind == Some(FlowEventKind::Announce) {
                // An endpoint announcing itself (RARP, gratuitous ARP, unsolicited NA)
                // is not a flow; endpoints and migrations consume these.
                continue;
            }
            let dir = usize::from(event.direction == DIR_HI_TO_LO);
            let rec = self.records.entry(event.key).or_insert_with(|| FlowRecordState {
                value: value_from_event(&event),
                app: AppInfo::default(),
                start_event_seen: false,
                misses: 0,
                seen_in: 0,
            });
            rec.value.tcp_flags[dir] |= event.tcp_flags;
            if rec.value.ifindex[dir] == 0 {
                rec.value.ifindex[dir] = event.ifindex;
            }
            rec.value.last_seen_ns = rec.value.last_seen_ns.max(event.ts_ns);
            let follow = match kind {
                Some(FlowEventKind::Start) => {
                    rec.start_event_seen = true;
                    self.stats.start_events += 1;
                    FollowEvent::Start
                }
                Some(FlowEventKind::End) => {
                    rec.value.state |= STATE_ENDED;
                    self.stats.end_events += 1;
                    FollowEvent::End
                }
                // The decoder rejects unknown kinds; announcements were taken out above.
                None | Some(FlowEventKind::Announce) => continue,
            };
            if follow == FollowEvent::Start && rec.seen_in == 0 {
                // Not read from the kernel yet: the event's verdict, and the judgement in
                // the kernel's entry when there is one.
                rec.value.verdict = event.verdict;
                if want_messages && let Some(k) = judged(&event.key) {
                    let v = &mut rec.value;
                    (v.verdict, v.reason, v.policy_id, v.generation, v.zone) =
                        (k.verdict, k.reason, k.policy_id, k.generation, k.zone);
                    v.initiator = k.initiator;
                }
            }
            if want_messages {
                let (value, app) = (rec.value, rec.app.clone());
                out.push(FollowMessage::flow(follow, self.render(&event.key, &value, &app, RecordState::Active)));
            }
        }
        self.update_sizes();
        out
    }

    /// Merges one full read of the kernel map taken from `read_started_ns` on; decides
    /// which flows expire at `now_ns`.
    pub fn merge(
        &mut self,
        entries: Vec<(FlowKey, FlowValue)>,
        read_started_ns: u64,
        now_ns: u64,
        want_updates: bool,
    ) -> Merge {
        let mut merge = Merge::default();
        let read = self.begin_merge();
        let read_entries = entries.len() as u64;
        self.merge_part(read, entries, now_ns, want_updates, &mut merge);
        self.finish_merge(read, read_entries, read_started_ns, &mut merge);
        merge
    }

    /// Starts merging a read of the kernel map, which may come in parts
    /// ([`FlowTable::merge_part`], then [`FlowTable::finish_merge`]) so that events are
    /// applied between them. Returns the read's number.
    pub fn begin_merge(&mut self) -> u64 {
        self.stats.refreshes += 1;
        self.stats.refreshes
    }

    /// Merges part of read `read`.
    pub fn merge_part(
        &mut self,
        read: u64,
        entries: impl IntoIterator<Item = (FlowKey, FlowValue)>,
        now_ns: u64,
        want_updates: bool,
        merge: &mut Merge,
    ) {
        for (key, value) in entries {
            let rec = self.records.entry(key).or_insert_with(|| FlowRecordState {
                value: FlowValue::default(),
                app: AppInfo::default(),
                start_event_seen: false,
                misses: 0,
                seen_in: 0,
            });
            let changed = rec.value.packets != value.packets || rec.value.state != value.state;
            let grown = traffic_delta(&rec.value, &value);
            rec.value = value;
            // Cloned only for an update message: names are strings.
            let app = if changed && want_updates { rec.app.clone() } else { AppInfo::default() };
            if grown != (0, 0) {
                let fwd = initiator(&value);
                let pair = (value.zone[fwd], value.zone[fwd ^ 1], value.verdict);
                let total = self.zone_traffic.entry(pair).or_default();
                total.0 += grown.0;
                total.1 += grown.1;
            }
            rec.misses = 0;
            rec.seen_in = read;
            let timeout = if value.state & STATE_ENDED != 0 { ENDED_IDLE_NS } else { self.idle_timeout_ns };
            if now_ns.saturating_sub(value.last_seen_ns) > timeout {
                merge.expired.push(key);
                if let Some(record) = self.retire(&key, FollowEvent::Expired) {
                    merge.messages.push(FollowMessage::flow(FollowEvent::Expired, record));
                }
            } else if changed && want_updates {
                merge.messages.push(FollowMessage::flow(
                    FollowEvent::Update,
                    self.render(&key, &value, &app, RecordState::Active),
                ));
            }
        }
    }

    /// Ends read `read` of `read_entries` entries: records the read did not find (and
    /// that saw no packet since it started) count a miss, and are evicted after enough.
    pub fn finish_merge(&mut self, read: u64, read_entries: u64, read_started_ns: u64, merge: &mut Merge) {
        let missing: Vec<FlowKey> = self
            .records
            .iter_mut()
            .filter(|(_, rec)| rec.seen_in != read && rec.value.last_seen_ns < read_started_ns)
            .filter_map(|(key, rec)| {
                rec.misses = rec.misses.saturating_add(1);
                (rec.misses >= MISSES_BEFORE_EVICTION).then_some(*key)
            })
            .collect();
        for key in missing {
            if let Some(record) = self.retire(&key, FollowEvent::Evicted) {
                merge.messages.push(FollowMessage::flow(FollowEvent::Evicted, record));
            }
        }
        // What stays in the kernel map once the idle entries are deleted.
        self.stats.kernel_entries = read_entries.saturating_sub(merge.expired.len() as u64);
        self.update_sizes();
    }

    fn update_sizes(&mut self) {
        self.stats.active_records = self.records.len() as u64;
        self.stats.ended_records = self.history.len() as u64;
    }

    /// All records: live flows (newest first), then the ended history (newest first).
    #[must_use]
    pub fn snapshot(&self) -> Vec<FlowRecord> {
        let mut live: Vec<(u64, FlowRecord)> = self
            .records
            .iter()
            .map(|(key, rec)| (rec.value.first_seen_ns, self.render(key, &rec.value, &rec.app, RecordState::Active)))
            .collect();
        live.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        live.into_iter().map(|(_, r)| r).chain(self.history.iter().rev().cloned()).collect()
    }

    #[must_use]
    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    pub fn count_map_errors(&mut self, n: u64) {
        self.stats.map_errors += n;
    }

    /// Packets and bytes of all flows since start by (initiator's zone id, responder's
    /// zone id, verdict), in key order.
    #[must_use]
    pub fn zone_traffic(&self) -> Vec<ZoneTraffic> {
        let mut out: Vec<_> = self.zone_traffic.iter().map(|(k, v)| (*k, *v)).collect();
        out.sort_unstable();
        out
    }

    /// Adds the names found in payload samples to their flows. A flow not known yet
    /// (its start event is still on its way) gets a record from the sample.
    pub fn apply_samples(&mut self, samples: Vec<Sample>, want_messages: bool) -> Vec<FollowMessage> {
        let mut out = Vec::new();
        for sample in samples {
            let rec = self.records.entry(sample.key).or_insert_with(|| {
                let dir = usize::from(sample.direction == DIR_HI_TO_LO);
                let mut value = FlowValue {
                    first_seen_ns: sample.ts_ns,
                    last_seen_ns: sample.ts_ns,
                    initiator: if dir == 1 { DIR_HI_TO_LO } else { DIR_LO_TO_HI },
                    ..FlowValue::default()
                };
                value.ifindex[dir] = sample.ifindex;
                FlowRecordState { value, app: AppInfo::default(), start_event_seen: false, misses: 0, seen_in: 0 }
            });
            let before = rec.app.clone();
            rec.app.merge(sample.app);
            if want_messages && rec.app != before {
                let (value, app) = (rec.value, rec.app.clone());
                out.push(FollowMessage::flow(
                    FollowEvent::Update,
                    self.render(&sample.key, &value, &app, RecordState::Active),
                ));
            }
        }
        self.update_sizes();
        out
    }
}

/// Entries of a kernel map read merged under one hold of the table's lock.
const MERGE_PART: usize = 4096;

/// The flow table shared by the event reader, the periodic refresh and the control
/// socket, with the kernel map it mirrors.
pub struct SharedFlows {
    table: Mutex<FlowTable>,
    /// The `FLOWS` map; `None` when running without a kernel (tests).
    kernel: Mutex<Option<BpfHashMap<MapData, FlowKey, FlowValue>>>,
    follow: broadcast::Sender<FollowMessage>,
    /// Whether `BPF_MAP_LOOKUP_BATCH` works on the map (cleared at its first refusal).
    batch: AtomicBool,
    /// Where announcement events go (the endpoints); unset: they are dropped.
    announcements: OnceLock<tokio::sync::mpsc::UnboundedSender<FlowEvent>>,
}

/// Reads every entry of the kernel flow table; returns them and the count of entries
/// that could not be read.
fn read_kernel_flows(
    map: &BpfHashMap<MapData, FlowKey, FlowValue>,
    batch: &AtomicBool,
) -> (Vec<(FlowKey, FlowValue)>, u64) {
    if batch.load(Ordering::Relaxed) {
        match map_batch::lookup_all::<FlowKey, FlowValue>(map.map().fd().as_fd()) {
            Ok(entries) => return (entries, 0),
            Err(BatchError::Unsupported(e)) => {
                log::info!("batch lookup unavailable ({e}); reading FLOWS entry by entry");
                batch.store(false, Ordering::Relaxed);
            }
            Err(BatchError::Failed(e)) => log::warn!("batch lookup of FLOWS failed ({e}); reading entry by entry"),
        }
    }
    let mut entries = Vec::new();
    let mut errors = 0u64;
    for item in map {
        match item {
            Ok(kv) => entries.push(kv),
            // An entry deleted by the kernel (LRU) between two steps of the walk.
            Err(MapError::KeyNotFound) => {}
            Err(e) => {
                errors += 1;
                log::debug!("reading FLOWS: {e}");
            }
        }
    }
    (entries, errors)
}

impl SharedFlows {
    #[must_use]
    pub fn new(table: FlowTable, kernel: Option<BpfHashMap<MapData, FlowKey, FlowValue>>) -> Self {
        let (follow, _) = broadcast::channel(FOLLOW_CHANNEL);
        Self {
            table: Mutex::new(table),
            kernel: Mutex::new(kernel),
            follow,
            batch: AtomicBool::new(true),
            announcements: OnceLock::new(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, FlowTable> {
        self.table.lock().expect("flow table lock")
    }

    fn publish(&self, messages: Vec<FollowMessage>) {
        if self.follow.receiver_count() == 0 {
            return;
        }
        for m in messages {
            // An error only means every follower left meanwhile.
            let _ = self.follow.send(m);
        }
    }

    /// Sends announcement events (RARP, gratuitous ARP, unsolicited NA) to `sink`.
    pub fn route_announcements(&self, sink: tokio::sync::mpsc::UnboundedSender<FlowEvent>) {
        let _ = self.announcements.set(sink);
    }

    /// Applies decoded ring buffer records.
    pub fn apply_events(&self, events: Vec<Result<FlowEvent, DecodeError>>) {
        if let Some(sink) = self.announcements.get() {
            for event in events.iter().flatten() {
                if event.kind == FlowEventKind::Announce as u8 {
                    let _ = sink.send(*event);
                }
            }
        }
        let want_messages = self.follow.receiver_count() > 0;
        let messages = if want_messages {
            // Followers see a start with its reason, zones and policy: look it up.
            let kernel = self.kernel.lock().expect("kernel flows lock");
            let judged = |key: &FlowKey| kernel.as_ref().and_then(|m| m.get(key, 0).ok());
            self.table().apply_events_judged(events, true, &judged)
        } else {
            self.table().apply_events(events, false)
        };
        self.publish(messages);
    }

    /// Reads the kernel map, refreshes the records, expires idle flows. Blocking: a
    /// full map read is one or two syscalls per entry; run it off the async workers.
    /// The records are merged in parts of [`MERGE_PART`] entries, the table unlocked
    /// between them, so that flow events never wait for a whole big table.
    pub fn refresh(&self) {
        let mut kernel = self.kernel.lock().expect("kernel flows lock");
        let Some(map) = kernel.as_mut() else { return };
        let started = monotonic_now_ns();
        let (entries, errors) = read_kernel_flows(map, &self.batch);
        let want_updates = self.follow.receiver_count() > 0;
        let read_entries = entries.len() as u64;
        let mut merge = Merge::default();
        let read = {
            let mut table = self.table();
            table.count_map_errors(errors);
            table.begin_merge()
        };
        let now = monotonic_now_ns();
        let mut entries = entries.into_iter();
        loop {
            let part: Vec<(FlowKey, FlowValue)> = entries.by_ref().take(MERGE_PART).collect();
            if part.is_empty() {
                break;
            }
            self.table().merge_part(read, part, now, want_updates, &mut merge);
        }
        {
            let mut table = self.table();
            table.finish_merge(read, read_entries, started, &mut merge);
            table.stats.last_refresh_ms = monotonic_now_ns().saturating_sub(started) / 1_000_000;
        }
        let mut delete_errors = 0u64;
        for key in &merge.expired {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => {
                    delete_errors += 1;
                    log::warn!("cannot delete an idle flow from FLOWS: {}", crate::error::report(&e));
                }
            }
        }
        drop(kernel);
        if delete_errors > 0 {
            self.table().count_map_errors(delete_errors);
        }
        self.publish(merge.messages);
    }

    #[must_use]
    pub fn snapshot(&self) -> Vec<FlowRecord> {
        self.table().snapshot()
    }

    /// Adds names found in payload samples to their flows.
    pub fn apply_samples(&self, samples: Vec<Sample>) {
        let want_messages = self.follow.receiver_count() > 0;
        let messages = self.table().apply_samples(samples, want_messages);
        self.publish(messages);
    }

    /// See [`FlowTable::zone_traffic`].
    #[must_use]
    pub fn zone_traffic(&self) -> Vec<ZoneTraffic> {
        self.table().zone_traffic()
    }

    /// The kernel entries of the live flows as of the last map read.
    #[must_use]
    pub fn entries(&self) -> Vec<(FlowKey, FlowValue)> {
        self.table().records.iter().map(|(k, r)| (*k, r.value)).collect()
    }

    /// Reads the kernel entries now (blocking), keeping those `keep` accepts.
    #[must_use]
    pub fn kernel_entries(&self, keep: impl Fn(&FlowKey, &FlowValue) -> bool) -> Vec<(FlowKey, FlowValue)> {
        let kernel = self.kernel.lock().expect("kernel flows lock");
        let Some(map) = kernel.as_ref() else { return Vec::new() };
        read_kernel_flows(map, &self.batch).0.into_iter().filter(|(k, v)| keep(k, v)).collect()
    }

    /// Writes flow entries into the kernel table, replacing what is there (a flow
    /// handed over from another node or port); returns how many were written.
    pub fn install(&self, entries: &[(FlowKey, FlowValue)]) -> usize {
        let mut kernel = self.kernel.lock().expect("kernel flows lock");
        let Some(map) = kernel.as_mut() else { return 0 };
        let mut written = 0;
        for (key, value) in entries {
            match map.insert(key, value, 0) {
                Ok(()) => written += 1,
                Err(e) => log::warn!("cannot install a handed-over flow: {}", crate::error::report(&e)),
            }
        }
        drop(kernel);
        let mut table = self.table();
        for (key, value) in entries {
            let rec = table.records.entry(*key).or_insert_with(|| FlowRecordState {
                value: *value,
                start_event_seen: true,
                misses: 0,
                seen_in: 0,
                app: AppInfo::default(),
            });
            rec.value = *value;
        }
        table.update_sizes();
        written
    }

    /// Makes the data path judge these flows again on their next packet (their
    /// endpoint's standing changed: quarantined, isolated, released).
    pub fn rejudge(&self, keys: &[FlowKey]) {
        let mut kernel = self.kernel.lock().expect("kernel flows lock");
        let Some(map) = kernel.as_mut() else { return };
        for key in keys {
            if let Ok(mut value) = map.get(key, 0) {
                value.generation = 0;
                let _ = map.insert(key, value, 2 /* BPF_EXIST */);
            }
        }
    }

    /// Makes the data path forget the port each `(key, direction)` was seen on, so that
    /// the direction's next frame is checked as if it came from a new port. A packet
    /// counted between the read and the write of an entry can be lost from its counters
    /// (as with [`SharedFlows::rejudge`]); this runs only when address owners change.
    pub fn forget_ports(&self, directions: &[(FlowKey, u8)]) {
        let mut kernel = self.kernel.lock().expect("kernel flows lock");
        let Some(map) = kernel.as_mut() else { return };
        for (key, dir) in directions {
            if let Ok(mut value) = map.get(key, 0) {
                value.ifindex[usize::from(dir & 1)] = 0;
                let _ = map.insert(key, value, 2 /* BPF_EXIST */);
            }
        }
    }

    #[must_use]
    pub fn stats(&self) -> FlowStats {
        self.table().stats()
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<FollowMessage> {
        self.follow.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use backplane_common::flow::FAMILY_IPV6;

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    const BOOT: i128 = 1_704_067_200_000_000_000; // 2024-01-01T00:00:00Z

    fn names(idx: u32) -> String {
        format!("port{idx}")
    }

    #[test]
    fn fwd_and_rev_follow_the_initiator() {
        // 10.0.0.2:5555 -> 10.0.0.1:80: the client has the higher address, so the
        // canonical key puts it on the hi side and its packets go hi->lo.
        let client = v4([10, 0, 0, 2]);
        let server = v4([10, 0, 0, 1]);
        let (key, dir) = FlowKey::canonical(&client, 5555, &server, 80, 0, 6, FAMILY_IPV4);
        assert_eq!(dir, DIR_HI_TO_LO);
        let value = FlowValue {
            packets: [7, 3], // [lo->hi (server->client), hi->lo (client->server)]
            bytes: [7000, 300],
            first_seen_ns: 1_000_000_000,
            last_seen_ns: 2_500_000_000,
            ifindex: [11, 12],
            tcp_flags: [0x12, 0x11],
            initiator: dir,
            verdict: Verdict::Observed as u8,
            reason: Reason::NoRules as u8,
            ..FlowValue::default()
        };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(BOOT),
            &names,
            &NameTable::default(),
        );
        assert_eq!(r.src_ip, "10.0.0.2");
        assert_eq!(r.src_port, 5555);
        assert_eq!(r.dst_ip, "10.0.0.1");
        assert_eq!(r.dst_port, 80);
        assert_eq!((r.fwd_packets, r.fwd_bytes), (3, 300));
        assert_eq!((r.rev_packets, r.rev_bytes), (7, 7000));
        assert_eq!(r.interfaces, vec!["port12".to_string(), "port11".to_string()]);
        assert_eq!(r.proto, "tcp");
        assert_eq!(r.tcp_flags, "SYN|ACK|FIN");
        assert_eq!(r.first_seen, "2024-01-01T00:00:01.000Z");
        assert_eq!(r.last_seen, "2024-01-01T00:00:02.500Z");
        assert_eq!(r.last_seen_unix_ms, 1_704_067_202_500);
        assert_eq!(r.state, "active");
        assert_eq!(r.verdict, "observed");
        assert_eq!(r.reason, "no_rules");

        // The same flow started by the lo side swaps everything.
        let value = FlowValue { initiator: DIR_LO_TO_HI, ..value };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(BOOT),
            &names,
            &NameTable::default(),
        );
        assert_eq!((r.src_ip.as_str(), r.src_port), ("10.0.0.1", 80));
        assert_eq!((r.fwd_packets, r.rev_packets), (7, 3));
        assert_eq!(r.interfaces, vec!["port11".to_string(), "port12".to_string()]);
    }

    #[test]
    fn record_json_contract() {
        let (key, dir) = FlowKey::canonical(&v4([192, 168, 1, 1]), 7, &v4([192, 168, 1, 2]), 7, 10, 1, FAMILY_IPV4);
        let value = FlowValue {
            packets: [1, 1],
            bytes: [98, 98],
            ifindex: [5, 0],
            initiator: dir,
            state: STATE_ENDED,
            ..FlowValue::default()
        };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(0),
            &names,
            &NameTable::default(),
        );
        let json = serde_json::to_value(&r).unwrap();
        for field in [
            "src_ip",
            "dst_ip",
            "proto",
            "src_port",
            "dst_port",
            "fwd_packets",
            "fwd_bytes",
            "rev_packets",
            "rev_bytes",
            "first_seen",
            "last_seen",
            "first_seen_unix_ms",
            "last_seen_unix_ms",
            "interfaces",
            "vlan",
            "tcp_flags",
            "state",
            "verdict",
            "reason",
            "policy",
            "src_zone",
            "dst_zone",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        assert_eq!(json["proto"], "icmp");
        assert_eq!(json["vlan"], 10);
        assert_eq!(json["state"], "ended");
        assert_eq!(json["policy"], serde_json::Value::Null);
        assert_eq!(json["interfaces"], serde_json::json!(["port5"]));
        let back: FlowRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn zones_and_policy_are_named_from_the_initiator() {
        use backplane_common::policy::{POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_NONE};
        let text = "zones:\n  web: { members: [ { cidr: 10.30.0.0/24 } ] }\n  db: { members: [ { cidr: 10.40.0.0/24 } ] }\n\
                    policies:\n  - { name: web-to-db, from: web, to: db, allow: [ { proto: tcp, ports: [5432] } ] }\n";
        let rules = backplane_rules::parse_rules([(std::path::Path::new("r.yaml"), text)]).unwrap();
        let compiled = backplane_rules::compile(&rules, &backplane_rules::ZoneIds::new());
        let (web, db) = (compiled.zone_ids.id("web").unwrap(), compiled.zone_ids.id("db").unwrap());
        let mut names = NameTable::default();
        names.publish(3, &compiled);
        // db (10.40.0.9, the hi side) starts a flow to web (10.30.0.5): zone[] is per side.
        let (key, dir) = FlowKey::canonical(&v4([10, 40, 0, 9]), 40000, &v4([10, 30, 0, 5]), 8080, 0, 6, FAMILY_IPV4);
        assert_eq!(dir, DIR_HI_TO_LO);
        let value = FlowValue {
            initiator: dir,
            zone: [web, db], // [lo = web, hi = db]
            verdict: Verdict::Denied as u8,
            reason: Reason::DefaultInterZone as u8,
            policy_id: POLICY_ID_DEFAULT_INTER_ZONE,
            generation: 3,
            ..FlowValue::default()
        };
        let clock = Clock::with_offset_ns(0);
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!(
            (r.src_ip.as_str(), r.src_zone.as_deref(), r.dst_zone.as_deref()),
            ("10.40.0.9", Some("db"), Some("web"))
        );
        assert_eq!((r.verdict.as_str(), r.reason.as_str()), ("denied", "default_inter_zone"));
        assert_eq!(r.policy.as_deref(), Some("default_inter_zone"));

        // web starts it: the same key, the other initiator; policy 0 of generation 3.
        let value = FlowValue {
            initiator: DIR_LO_TO_HI,
            verdict: Verdict::Allowed as u8,
            reason: Reason::PolicyAllow as u8,
            policy_id: 0,
            ..value
        };
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!(
            (r.src_zone.as_deref(), r.dst_zone.as_deref(), r.policy.as_deref()),
            (Some("web"), Some("db"), Some("web-to-db"))
        );
        // A zone id no rule set named.
        let value = FlowValue { zone: [77, db], ..value };
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!(r.src_zone.as_deref(), Some("zone-77"));
        // Without rules: observed, nothing to name.
        let value = FlowValue { policy_id: POLICY_ID_NONE, ..FlowValue::default() };
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!((r.verdict.as_str(), r.src_zone, r.dst_zone, r.policy), ("observed", None, None, None));
    }

    fn names_of(idx: u32) -> String {
        format!("port{idx}")
    }

    #[test]
    fn ipv6_and_unknown_values() {
        let a: [u8; 16] = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        let b: [u8; 16] = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let (key, dir) = FlowKey::canonical(&a, 1, &b, 2, 0, 132, FAMILY_IPV6);
        let value = FlowValue { initiator: dir, verdict: 200, reason: 99, ..FlowValue::default() };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(0),
            &names,
            &NameTable::default(),
        );
        assert_eq!((r.src_ip.as_str(), r.dst_ip.as_str()), ("fd00::1", "fd00::2"));
        assert_eq!(r.proto, "132");
        assert_eq!(r.verdict, "unknown(200)");
        assert_eq!(r.reason, "unknown(99)");
        assert!(r.interfaces.is_empty());
        assert_eq!(proto_name(58), "icmpv6");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(tcp_flags_text(0), "");
    }

    fn table(idle_s: u64) -> FlowTable {
        FlowTable::new(
            Clock::with_offset_ns(BOOT),
            idle_s * 1_000_000_000,
            Arc::new(IfNames::new()),
            Arc::new(RuleNames::new()),
        )
    }

    fn flow(n: u8) -> (FlowKey, u8) {
        FlowKey::canonical(&v4([10, 0, 0, n]), 1000, &v4([10, 0, 1, n]), 53, 0, 17, FAMILY_IPV4)
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn kernel_entry_without_start_event_is_recorded() {
        let mut t = table(60);
        let (key, dir) = flow(1);
        let value = FlowValue { packets: [2, 0], last_seen_ns: 10 * S, initiator: dir, ..FlowValue::default() };
        let m = t.merge(vec![(key, value)], 10 * S, 11 * S, true);
        assert!(m.expired.is_empty());
        assert_eq!(m.messages.len(), 1);
        assert_eq!(m.messages[0].event, FollowEvent::Update);
        let snap = t.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].fwd_packets, 2);
        assert_eq!(t.stats().active_records, 1);
    }

    #[test]
    fn events_then_counters_then_idle_expiry() {
        let mut t = table(60);
        let (key, dir) = flow(2);
        let start = FlowEvent {
            key,
            ts_ns: 5 * S,
            ifindex: 9,
            kind: FlowEventKind::Start as u8,
            direction: dir,
            verdict: 0,
            tcp_flags: 0,
        };
        let msgs = t.apply_events(vec![Ok(start), Err(DecodeError::UnknownKind(9))], true);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].event, FollowEvent::Start);
        assert_eq!(t.stats().decode_errors, 1);
        assert_eq!(t.stats().start_events, 1);

        let value = FlowValue { packets: [4, 4], last_seen_ns: 6 * S, initiator: dir, ..FlowValue::default() };
        let m = t.merge(vec![(key, value)], 7 * S, 7 * S, false);
        assert!(m.messages.is_empty(), "no updates without followers");
        // 61 s idle > 60 s timeout: expired, deleted from the kernel, kept in history.
        let m = t.merge(vec![(key, value)], 67 * S + 1, 67 * S + 1, false);
        assert_eq!(m.expired, vec![key]);
        assert_eq!(m.messages[0].event, FollowEvent::Expired);
        let stats = t.stats();
        assert_eq!((stats.expired, stats.active_records, stats.ended_records), (1, 0, 1));
        assert_eq!(stats.without_start_event, 0);
        let snap = t.snapshot();
        assert_eq!(snap[0].state, "ended");
        assert_eq!(snap[0].fwd_packets, 4);
    }

    #[test]
    fn ended_flows_expire_after_five_seconds() {
        let mut t = table(60);
        let (key, dir) = flow(3);
        let value = FlowValue {
            packets: [1, 1],
            last_seen_ns: 10 * S,
            initiator: dir,
            state: STATE_ENDED,
            ..FlowValue::default()
        };
        assert!(t.merge(vec![(key, value)], 14 * S, 14 * S, false).expired.is_empty());
        assert_eq!(t.merge(vec![(key, value)], 15 * S + 1, 15 * S + 1, false).expired, vec![key]);
        assert_eq!(t.stats().without_start_event, 1);
    }

    #[test]
    fn vanished_kernel_entries_are_counted_as_evicted() {
        let mut t = table(60);
        let (key, dir) = flow(4);
        let value = FlowValue { packets: [1, 0], last_seen_ns: S, initiator: dir, ..FlowValue::default() };
        t.merge(vec![(key, value)], S, S, false);
        // One miss may be a racing walk; the second one evicts.
        t.merge(vec![], 2 * S, 2 * S, false);
        assert_eq!(t.stats().active_records, 1);
        let m = t.merge(vec![], 3 * S, 3 * S, false);
        assert_eq!(m.messages[0].event, FollowEvent::Evicted);
        assert!(m.expired.is_empty());
        assert_eq!((t.stats().evicted, t.stats().ended_records), (1, 1));
    }

    #[test]
    fn event_newer_than_the_map_read_is_not_evicted() {
        let mut t = table(60);
        let (key, dir) = flow(5);
        let start = FlowEvent { key, ts_ns: 10 * S, ifindex: 1, kind: 1, direction: dir, verdict: 0, tcp_flags: 0 };
        t.apply_events(vec![Ok(start)], true);
        for _ in 0..3 {
            t.merge(vec![], 9 * S, 10 * S, false);
        }
        assert_eq!(t.stats().evicted, 0);
    }

    #[test]
    fn history_is_bounded_and_overflow_counted() {
        let mut t = table(1);
        t.history_capacity = 3;
        for n in 0..5 {
            let (key, dir) = flow(n);
            let value = FlowValue { last_seen_ns: S, initiator: dir, ..FlowValue::default() };
            t.merge(vec![(key, value)], 10 * S, 10 * S, false);
        }
        let stats = t.stats();
        assert_eq!((stats.expired, stats.ended_records, stats.history_dropped), (5, 3, 2));
    }

    #[test]
    fn a_start_message_carries_the_kernel_judgement_but_not_its_counters() {
        let mut t = table(60);
        let (key, dir) = flow(7);
        let start = FlowEvent { key, ts_ns: S, ifindex: 3, kind: 1, direction: dir, verdict: 2, tcp_flags: 0 };
        let kernel = FlowValue {
            packets: [4, 0],
            bytes: [400, 0],
            verdict: Verdict::Denied as u8,
            reason: Reason::DefaultInterZone as u8,
            policy_id: backplane_common::policy::POLICY_ID_DEFAULT_INTER_ZONE,
            initiator: dir,
            ..FlowValue::default()
        };
        let msgs = t.apply_events_judged(vec![Ok(start)], true, &|k| (*k == key).then_some(kernel));
        let r = msgs[0].flow.as_ref().unwrap();
        assert_eq!((r.verdict.as_str(), r.reason.as_str()), ("denied", "default_inter_zone"));
        assert_eq!(r.policy.as_deref(), Some("default_inter_zone"));
        assert_eq!(r.fwd_packets + r.rev_packets, 0, "counters come with the map read");
        // The map read then adds all four packets to the zone pair's traffic.
        t.merge(vec![(key, kernel)], S, S, false);
        assert_eq!(t.zone_traffic(), vec![((0, 0, Verdict::Denied as u8), (4, 400))]);
    }

    #[test]
    fn zone_traffic_never_goes_backwards_when_flows_expire() {
        let mut t = table(1);
        let (key, dir) = flow(8);
        let mut value = FlowValue {
            packets: [3, 2],
            bytes: [300, 200],
            last_seen_ns: 10 * S,
            initiator: dir,
            ..FlowValue::default()
        };
        t.merge(vec![(key, value)], 10 * S, 10 * S, false);
        value.packets = [5, 2];
        value.bytes = [500, 200];
        t.merge(vec![(key, value)], 10 * S, 10 * S, false);
        // Idle: expired and gone from the table; its packets stay in the totals.
        t.merge(vec![(key, value)], 20 * S, 20 * S, false);
        assert_eq!(t.stats().expired, 1);
        assert_eq!(t.zone_traffic(), vec![((0, 0, 0), (7, 700))]);
    }

    #[test]
    fn end_event_marks_the_flow_ended() {
        let mut t = table(60);
        let (key, dir) = flow(6);
        let end = FlowEvent { key, ts_ns: S, ifindex: 3, kind: 2, direction: dir, verdict: 0, tcp_flags: 0x11 };
        let msgs = t.apply_events(vec![Ok(end)], true);
        assert_eq!(msgs[0].event, FollowEvent::End);
        let flow = msgs[0].flow.as_ref().unwrap();
        assert_eq!(flow.state, "ended");
        assert_eq!(flow.tcp_flags, "ACK|FIN");
        let json = serde_json::to_string(&msgs[0]).unwrap();
        assert!(json.starts_with(r#"{"event":"end","flow":{"#), "{json}");
    }
}
