//! The userspace flow table and what feeds it.
//!
//! The kernel's `FLOWS` map is the source of truth for counters: every second (and
//! whenever a client asks for flows) the agent reads the whole map and refreshes its
//! records. Start/end events from the ring buffer only make the table react sooner;
//! a flow whose start event was lost is still recorded from the map. Idle flows are
//! deleted from the kernel map and moved into a bounded history of ended flows.
//!
//! - this file: [`SharedFlows`], the table shared by the ring readers, the periodic
//!   refresh, the control socket and the endpoints, with the kernel map it mirrors, and
//!   the broadcast of [`FollowMessage`]s that `follow` clients and the exporters read;
//! - [`table`]: the table itself, pure; [`record`]: the exported record and the follow
//!   messages; [`names`]: names of the zone and policy ids the data path records (here,
//!   below the rules that publish them, because every record needs them);
//! - [`events`]: decoding the `FLOW_EVENTS` ring buffer's records; [`payload`]: the names
//!   (DNS, TLS SNI, HTTP Host) in the first payload bytes of flows, pure parsers;
//!   [`rings`]: the readers of both ring buffers, which also hand endpoint announcements
//!   to the endpoints.

use std::{
    os::fd::AsFd as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData, MapError};
use backplane_common::{FlowEvent, FlowKey, FlowValue};
use tokio::sync::broadcast;

use crate::{
    clock::monotonic_now_ns,
    datapath::map_batch::{self, BatchError},
};

pub mod events;
pub mod names;
pub mod payload;
pub mod record;
pub mod rings;
pub mod table;

use events::DecodeError;
use payload::Sample;
pub use record::{FlowRecord, FollowEvent, FollowMessage};
pub use table::{FlowStats, FlowTable, Merge, ZoneTraffic};

/// Capacity of the channel that feeds `follow` clients.
const FOLLOW_CHANNEL: usize = 8192;

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
        Self { table: Mutex::new(table), kernel: Mutex::new(kernel), follow, batch: AtomicBool::new(true) }
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

    /// Applies decoded ring buffer records.
    pub fn apply_events(&self, events: Vec<Result<FlowEvent, DecodeError>>) {
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
    /// The records are merged in parts of `MERGE_PART` (4,096) entries, the table unlocked
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
            table.set_last_refresh_ms(monotonic_now_ns().saturating_sub(started) / 1_000_000);
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
        self.table().entries()
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
        self.table().installed(entries);
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

    /// An announcement the endpoints' queue had no room for.
    pub fn announcement_dropped(&self) {
        let mut table = self.table();
        table.count_announcement_dropped();
        if table.stats().announcements_dropped.is_power_of_two() {
            log::warn!(
                "{} announcement(s) dropped so far: they come faster than the endpoints take them",
                table.stats().announcements_dropped
            );
        }
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<FollowMessage> {
        self.follow.subscribe()
    }
}
