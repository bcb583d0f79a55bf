//! The readers of the data path's two ring buffers: `FLOW_EVENTS` (flow starts and ends,
//! and endpoint announcements) and `PAYLOAD_SAMPLES` (the first bytes of flows' first
//! payload packets). Each waits until the kernel signals data, decodes every record
//! ([`super::events`], [`super::payload`]) and hands the batch to the flow table.
//!
//! Announcements (RARP, gratuitous ARP, unsolicited NA) are not flows: the event reader
//! routes them to the endpoints through a channel before the table sees the batch (the
//! table skips them).

use std::{
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
};

use aya::maps::{MapData, RingBuf};
use backplane_common::{FlowEvent, FlowEventKind};
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc::{Sender, error::TrySendError},
};

use crate::flows::{
    SharedFlows,
    events::FlowEventDecode as _,
    payload::{SampleStats, parse_record},
};

/// Reads the flow event ring buffer whenever the kernel signals data, until the task is
/// dropped. Announcements also go to `announcements`.
pub async fn consume_events(
    ring: RingBuf<MapData>,
    flows: Arc<SharedFlows>,
    announcements: Sender<FlowEvent>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd and returns that same open fd for as long
    // as it lives, which is as long as the AsyncFd that owns it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    log::debug!("reading flow events from ring buffer fd {}", fd.get_ref().as_raw_fd());
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut decoded = Vec::new();
        while let Some(item) = ring.next() {
            decoded.push(FlowEvent::from_bytes(&item));
        }
        guard.clear_ready();
        if !decoded.is_empty() {
            for event in decoded.iter().flatten() {
                if event.kind == FlowEventKind::Announce as u8 {
                    queue_announcement(&announcements, &flows, *event);
                }
            }
            flows.apply_events(decoded);
        }
    }
}

/// Reads the sample ring buffer whenever the kernel signals data, until the task is
/// dropped; names found go into the flow table.
pub async fn consume_samples(
    ring: RingBuf<MapData>,
    flows: Arc<SharedFlows>,
    stats: Arc<SampleStats>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd and returns that same open fd for as long
    // as it lives, which is as long as the AsyncFd that owns it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    log::debug!("reading payload samples from ring buffer fd {}", fd.get_ref().as_raw_fd());
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut named = Vec::new();
        while let Some(item) = ring.next() {
            match parse_record(&item) {
                Ok(sample) => {
                    stats.count(&sample.app);
                    if !sample.app.is_empty() {
                        named.push(sample);
                    }
                }
                Err(e) => {
                    let n = stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                    if n <= 10 || n.is_power_of_two() {
                        log::warn!("dropping an undecodable payload sample ({n} so far): {e}");
                    }
                }
            }
        }
        guard.clear_ready();
        if !named.is_empty() {
            flows.apply_samples(named);
        }
    }
}

/// Hands an announcement to the endpoints, or drops and counts it when their queue is
/// full (a closed queue only means the endpoints stopped listening).
fn queue_announcement(announcements: &Sender<FlowEvent>, flows: &SharedFlows, event: FlowEvent) {
    if let Err(TrySendError::Full(_)) = announcements.try_send(event) {
        flows.announcement_dropped();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_beyond_the_queue_are_dropped_and_counted() {
        let table = crate::flows::table::FlowTable::new(
            crate::clock::Clock::with_offset_ns(0),
            1_000_000_000,
            std::sync::Arc::new(crate::ifnames::IfNames::new()),
            std::sync::Arc::new(crate::flows::names::RuleNames::new()),
        );
        let flows = SharedFlows::new(table, None);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let event = FlowEvent { kind: FlowEventKind::Announce as u8, ..FlowEvent::default() };
        for _ in 0..10 {
            queue_announcement(&tx, &flows, event);
        }
        assert_eq!(flows.stats().announcements_dropped, 6);
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 4, "the queue holds what it can, in order");
        queue_announcement(&tx, &flows, event);
        assert_eq!((flows.stats().announcements_dropped, rx.try_recv().is_ok()), (6, true), "room again");
    }
}
