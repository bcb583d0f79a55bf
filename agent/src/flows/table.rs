//! The agent's view of all flows ([`FlowTable`]): records made from the kernel's `FLOWS`
//! map, the ring buffer's start and end events and the names of payload samples, the
//! history of ended flows, and the traffic totals by zone pair. Pure: it reads nothing
//! and writes nothing itself; [`super::SharedFlows`] feeds it and applies what it decides
//! (the idle flows to delete from the kernel map).
//!
//! Nothing leaves the table without being counted: expired, evicted (gone from the kernel
//! map behind the agent's back, e.g. by LRU) and history overflow all have counters.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use backplane_common::{
    FlowEvent, FlowEventKind, FlowKey, FlowValue,
    flow::{DIR_HI_TO_LO, DIR_LO_TO_HI, STATE_ENDED},
};
use serde::{Deserialize, Serialize};

use crate::{
    clock::Clock,
    flows::{
        events::DecodeError,
        names::RuleNames,
        payload::{AppInfo, Sample},
        record::{FlowRecord, FollowEvent, FollowMessage, RecordState, initiator, record_from_kernel},
    },
    ifnames::IfNames,
};

/// Idle time after which a flow that saw FIN/RST (`STATE_ENDED`) is expired.
pub const ENDED_IDLE_NS: u64 = 5_000_000_000;

/// How many ended flows the history keeps.
pub const HISTORY_CAPACITY: usize = 10_000;

/// A kernel entry must be missing from this many consecutive map reads before its
/// record is declared evicted (a map walk that races with inserts and deletes may skip
/// an entry once).
const MISSES_BEFORE_EVICTION: u8 = 2;

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
    /// Announcements (RARP, gratuitous ARP, unsolicited NA) the endpoints could not take
    /// as fast as they came: dropped, counted here.
    #[serde(default)]
    pub announcements_dropped: u64,
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

impl FlowRecordState {
    /// A record first known with `value`: no names yet, no start event seen, not read
    /// from the kernel yet.
    fn new(value: FlowValue) -> Self {
        Self { value, app: AppInfo::default(), start_event_seen: false, misses: 0, seen_in: 0 }
    }
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
            let rec = self.records.entry(event.key).or_insert_with(|| FlowRecordState::new(value_from_event(&event)));
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
            let rec = self.records.entry(key).or_insert_with(|| FlowRecordState::new(FlowValue::default()));
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

    pub fn count_announcement_dropped(&mut self) {
        self.stats.announcements_dropped += 1;
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

    /// Records how long the last read and merge of the kernel map took.
    pub fn set_last_refresh_ms(&mut self, ms: u64) {
        self.stats.last_refresh_ms = ms;
    }

    /// The kernel entries of the live flows as of the last map read.
    #[must_use]
    pub fn entries(&self) -> Vec<(FlowKey, FlowValue)> {
        self.records.iter().map(|(k, r)| (*k, r.value)).collect()
    }

    /// Takes flows written into the kernel table by the agent (handed over from another
    /// node or port): they count as started.
    pub fn installed(&mut self, entries: &[(FlowKey, FlowValue)]) {
        for (key, value) in entries {
            let rec = self.records.entry(*key).or_insert_with(|| {
                let mut rec = FlowRecordState::new(*value);
                rec.start_event_seen = true;
                rec
            });
            rec.value = *value;
        }
        self.update_sizes();
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
                FlowRecordState::new(value)
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

#[cfg(test)]
mod tests {
    use backplane_common::{Verdict, flow::FAMILY_IPV4, reason::Reason};

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    const BOOT: i128 = 1_704_067_200_000_000_000; // 2024-01-01T00:00:00Z

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
