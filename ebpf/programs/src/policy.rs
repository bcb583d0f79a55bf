//! Judging a new flow: endpoint resolution (exact MAC, longest-prefix CIDR, port) and
//! the zone-pair policy lookup. All tables are read from the half named by the
//! configuration's `active_slot`, so a packet sees one whole rule set.

use aya_ebpf::maps::lpm_trie::Key;
use backplane_common::{
    DatapathConfig, Verdict,
    config::CONFIG_ENFORCE,
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, ENDPOINT_ISOLATED, ENDPOINT_PATCHED, ENDPOINT_QUARANTINED, EndpointKey,
        MODE_AUDIT, OWNER_ELSEWHERE, OwnerKey, PAIR_MARKER_PROTO, POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE,
        POLICY_ID_NONE, POLICY_KEY_BITS, POLICY_KEY_PROTO_BITS, PolicyKey, VPATCH_KEY_BITS, VpatchKey,
        ZONE_REMEDIATION, ZONE_WORLD, ZoneKey,
    },
    reason::Reason,
};

use crate::maps::{ADDR_OWNERS, ENDPOINTS, POLICIES, VPATCHES, ZONE_CIDRS, ZONES};

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
    let src = resolve(slot, family, src);
    let dst = resolve(slot, family, dst);
    let (src_zone, dst_zone) = (src.zone, dst.zone);
    let mut j =
        Judgement { verdict: Verdict::Denied, reason: Reason::Isolated, policy_id: POLICY_ID_NONE, src_zone, dst_zone };
    if (src.flags | dst.flags) & ENDPOINT_ISOLATED != 0 {
        return j;
    }
    if (src.flags | dst.flags) & ENDPOINT_QUARANTINED != 0 {
        // A quarantined endpoint reaches only remediation zones, and only they reach it.
        let src_ok = src.flags & ENDPOINT_QUARANTINED == 0 || zone_flags(slot, dst_zone) & ZONE_REMEDIATION != 0;
        let dst_ok = dst.flags & ENDPOINT_QUARANTINED == 0 || zone_flags(slot, src_zone) & ZONE_REMEDIATION != 0;
        if src_ok && dst_ok {
            j.verdict = Verdict::Allowed;
            j.reason = Reason::Remediation;
        } else {
            j.reason = Reason::Quarantined;
        }
        return j;
    }
    for (end, patched) in [(&src, src.flags & ENDPOINT_PATCHED != 0), (&dst, dst.flags & ENDPOINT_PATCHED != 0)] {
        if !patched {
            continue;
        }
        let key = VpatchKey {
            slot,
            proto,
            _pad: [0; 2],
            endpoint_id: end.endpoint_id.to_be_bytes(),
            port: dport.to_be_bytes(),
        };
        if let Some(patch) = VPATCHES.get(Key::new(VPATCH_KEY_BITS, key)) {
            j.reason = Reason::VirtualPatch;
            j.policy_id = patch.patch_id;
            return j;
        }
    }
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

/// An end once resolved: its zone, and the endpoint's flags and id when its MAC is a
/// known endpoint.
struct Resolved {
    zone: u16,
    flags: u16,
    endpoint_id: u32,
}

/// Zone of one end: its MAC's endpoint entry, else the longest CIDR prefix holding its
/// address, else the zone of the port it is behind, else `world`.
#[inline(always)]
fn resolve(slot: u8, family: u8, end: &End) -> Resolved {
    if let Some(ep) = ENDPOINTS.get_ptr(EndpointKey { slot, _pad: 0, mac: *end.mac }) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let ep = unsafe { *ep };
        return Resolved { zone: ep.zone, flags: ep.flags, endpoint_id: ep.endpoint_id };
    }
    let bits = if family == backplane_common::flow::FAMILY_IPV4 { 32 } else { 128 };
    let key = AddrKey { slot, family, _pad: [0; 2], addr: *end.addr };
    let zone = match ZONE_CIDRS.get(Key::new(ADDR_KEY_HEADER_BITS + bits, key)) {
        Some(zone) => *zone as u16,
        None if end.port_zone != 0 => end.port_zone,
        None => ZONE_WORLD,
    };
    Resolved { zone, flags: 0, endpoint_id: 0 }
}

#[inline(always)]
fn zone_flags(slot: u8, zone: u16) -> u8 {
    match ZONES.get_ptr(ZoneKey { slot, _pad: 0, zone }) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(z) => unsafe { (*z).flags },
        None => 0,
    }
}

/// Whether a frame with source MAC `mac` entering through VM port `ifindex` is spoofed:
/// the MAC is a known endpoint bound to another port.
#[inline(always)]
pub fn is_spoofed(cfg: &DatapathConfig, mac: &[u8; 6], ifindex: u32) -> bool {
    match ENDPOINTS.get_ptr(EndpointKey { slot: cfg.active_slot & 1, _pad: 0, mac: *mac }) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(ep) => unsafe { (*ep).ifindex != 0 && (*ep).ifindex != ifindex },
        None => false,
    }
}

/// Whether a frame entering through port `ifindex` that sends from (or claims) the
/// IP address `addr` spoofs it: while a rule set is in force, the address belongs to an
/// endpoint bound to another port. Callers ask only for VM ports: an uplink carries
/// routed and hairpinned frames with any source address. Addresses nobody owns are anyone's (DHCP, link-local,
/// endpoints outside the inventory).
/// An address whose owner is bound on another node is spoofed by any other MAC: the
/// owner itself may show up here (it migrates) before the agent binds it.
#[inline(always)]
pub fn is_spoofed_addr(cfg: &DatapathConfig, family: u8, addr: &[u8; 16], ifindex: u32, mac: &[u8; 6]) -> bool {
    if cfg.flags & CONFIG_ENFORCE == 0 {
        return false;
    }
    match ADDR_OWNERS.get_ptr(&OwnerKey { family, _pad: [0; 3], addr: *addr }) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(owner) => unsafe {
            let owner = &*owner;
            owner.ifindex != 0 && owner.ifindex != ifindex && !(owner.ifindex == OWNER_ELSEWHERE && owner.mac == *mac)
        },
        None => false,
    }
}
