//! Judging a new flow: endpoint resolution (exact MAC, longest-prefix CIDR, port) and
//! the zone-pair policy lookup. All tables are read from the half named by the
//! configuration's `active_slot`, so a packet sees one whole rule set.

use aya_ebpf::maps::lpm_trie::Key;
use backplane_common::{
    DatapathConfig, Verdict,
    config::CONFIG_ENFORCE,
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, ENDPOINT_ISOLATED, ENDPOINT_QUARANTINED, EndpointKey, MODE_AUDIT, POLICY_ID_DEFAULT_INTER_ZONE,
        POLICY_ID_INTRA_ZONE, POLICY_ID_NONE, PAIR_MARKER_PROTO, POLICY_KEY_BITS, POLICY_KEY_PROTO_BITS, PolicyKey, ZONE_WORLD, ZoneKey,
    },
    reason::Reason,
};

use crate::maps::{ENDPOINTS, POLICIES, ZONE_CIDRS, ZONES};

/// One end of a flow, as the judge sees it.
pub struct End<'a> {
    pub mac: &'a [u8; 6],
    pub addr: &'a [u8; 16],
    /// Zone of the port this end is behind, when the packet is seen on that end's own
    /// port; 0 otherwise.
    pub port_zone: u16,
}

pub struct Judgement {
    pub verdict: Verdict,
    pub reason: Reason,
    pub policy_id: u32,
    pub src_zone: u16,
    pub dst_zone: u16,
}

/// Decides the verdict for a flow started by `src` towards `dst` on `proto`/`dport`.
#[inline(always)]
pub fn judge(cfg: &DatapathConfig, family: u8, proto: u8, dport: u16, src: &End, dst: &End) -> Judgement {
    if cfg.flags & CONFIG_ENFORCE == 0 {
        return Judgement {
            verdict: Verdict::Observed,
            reason: Reason::NoRules,
            policy_id: POLICY_ID_NONE,
            src_zone: ZONE_WORLD,
            dst_zone: ZONE_WORLD,
        };
    }
    let slot = cfg.active_slot & 1;
    let (src_zone, src_flags) = resolve_zone(slot, family, src);
    let (dst_zone, dst_flags) = resolve_zone(slot, family, dst);
    let mut j = Judgement { verdict: Verdict::Denied, reason: Reason::Isolated, policy_id: POLICY_ID_NONE, src_zone, dst_zone };
    if (src_flags | dst_flags) & ENDPOINT_ISOLATED != 0 {
        return j;
    }
    let _ = ENDPOINT_QUARANTINED;
    if src_zone == dst_zone {
        let intra = ZONES
            .get_ptr(ZoneKey { slot, _pad: 0, zone: src_zone })
            // SAFETY: a pointer returned by a map lookup is valid for this program run.
            .map_or(Verdict::Allowed as u8, |z| unsafe { (*z).intra_zone });
        j.verdict = if intra == Verdict::Denied as u8 { Verdict::Denied } else { Verdict::Allowed };
        j.reason = Reason::IntraZone;
        j.policy_id = POLICY_ID_INTRA_ZONE;
        return j;
    }
    let mut key = PolicyKey {
        slot,
        proto,
        src_zone: src_zone.to_be_bytes(),
        dst_zone: dst_zone.to_be_bytes(),
        port: dport.to_be_bytes(),
    };
    // The pair marker lives in the same trie: a packet of its (reserved) protocol must
    // not find it as an allow entry.
    if proto != PAIR_MARKER_PROTO {
        if let Some(allow) = POLICIES.get(Key::new(POLICY_KEY_BITS, key)) {
            j.verdict = Verdict::Allowed;
            j.reason = Reason::PolicyAllow;
            j.policy_id = allow.policy_id;
            return j;
        }
    }
    key.proto = PAIR_MARKER_PROTO;
    key.port = [0; 2];
    if let Some(pair) = POLICIES.get(Key::new(POLICY_KEY_PROTO_BITS, key)) {
        j.verdict = if pair.mode == MODE_AUDIT { Verdict::Audit } else { Verdict::Denied };
        j.reason = Reason::PolicyNoMatch;
        j.policy_id = pair.policy_id;
        return j;
    }
    j.verdict = if cfg.default_inter_zone == Verdict::Allowed as u8 { Verdict::Allowed } else { Verdict::Denied };
    j.reason = Reason::DefaultInterZone;
    j.policy_id = POLICY_ID_DEFAULT_INTER_ZONE;
    j
}

/// Zone of one end: its MAC's endpoint entry, else the longest CIDR prefix holding its
/// address, else the zone of the port it is behind, else `world`. Also returns the
/// endpoint's flags (quarantined, isolated) when found by MAC.
#[inline(always)]
fn resolve_zone(slot: u8, family: u8, end: &End) -> (u16, u16) {
    if let Some(ep) = ENDPOINTS.get_ptr(EndpointKey { slot, _pad: 0, mac: *end.mac }) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let ep = unsafe { *ep };
        return (ep.zone, ep.flags);
    }
    let bits = if family == backplane_common::flow::FAMILY_IPV4 { 32 } else { 128 };
    let key = AddrKey { slot, family, _pad: [0; 2], addr: *end.addr };
    if let Some(zone) = ZONE_CIDRS.get(Key::new(ADDR_KEY_HEADER_BITS + bits, key)) {
        return (*zone as u16, 0);
    }
    if end.port_zone != 0 {
        return (end.port_zone, 0);
    }
    (ZONE_WORLD, 0)
}
