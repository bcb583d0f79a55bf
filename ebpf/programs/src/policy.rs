//! Judging a new flow: the zone-pair policy lookup between two identities, and the
//! identity of an end that no port vouches for (exact MAC, longest-prefix CIDR). The
//! identity of a VM port's end comes from its binding (`identity`). All tables are read
//! from the half named by the configuration's `active_slot`, so a packet sees one whole
//! rule set.

use aya_ebpf::maps::lpm_trie::Key;
use backplane_common::{
    DatapathConfig, Verdict,
    config::CONFIG_ENFORCE,
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, ENDPOINT_ISOLATED, ENDPOINT_PATCHED, ENDPOINT_QUARANTINED, EndpointKey,
        MODE_AUDIT, OWNER_INFRA, PAIR_MARKER_PROTO, POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE, POLICY_ID_NONE,
        POLICY_KEY_BITS, POLICY_KEY_PROTO_BITS, PolicyKey, VPATCH_KEY_BITS, VpatchKey, ZONE_REMEDIATION, ZONE_WORLD,
        ZoneKey,
    },
    reason::Reason,
};

use crate::maps::{ENDPOINTS, POLICIES, VPATCHES, ZONE_CIDRS, ZONES};
use crate::parse::Packet;

/// One end of a flow as the judge sees it: its zone, its standing (`ENDPOINT_*` flags,
/// and [`IDENT_UNBOUND`]) and its endpoint id (for virtual patches). Eight bytes, so that
/// the functions returning it return it in a register, not through the stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ident {
    pub zone: u16,
    pub flags: u16,
    pub endpoint_id: u32,
}

/// [`Ident::flags`]: no binding vouches for this end (an unbound port, or an end known by
/// address): a quarantine of it is `unbound_port`.
pub const IDENT_UNBOUND: u16 = 1 << 15;

impl Ident {
    #[inline(always)]
    pub fn unbound(&self) -> bool {
        self.flags & IDENT_UNBOUND != 0
    }
}

pub struct Judgement {
    pub verdict: Verdict,
    pub reason: Reason,
    pub policy_id: u32,
    pub src_zone: u16,
    pub dst_zone: u16,
}

/// `proto` and `dport` of a flow as [`judge`] takes them (one register).
#[inline(always)]
pub fn service(proto: u8, dport: u16) -> u32 {
    (u32::from(proto) << 16) | u32::from(dport)
}

/// Decides the verdict for a flow started by `src` towards `dst` on [`service`]. Not
/// inlined: its keys would take stack slots in every caller (the BPF stack is 512 bytes
/// for the whole call chain); its arguments travel in registers.
#[inline(never)]
pub fn judge(cfg: &DatapathConfig, service: u32, src: Ident, dst: Ident) -> Judgement {
    let (proto, dport, src, dst) = ((service >> 16) as u8, service as u16, &src, &dst);
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
        } else if (src.unbound() && src.flags & ENDPOINT_QUARANTINED != 0)
            || (dst.unbound() && dst.flags & ENDPOINT_QUARANTINED != 0)
        {
            j.reason = Reason::UnboundPort;
        } else {
            j.reason = Reason::Quarantined;
        }
        return j;
    }
    for (end, patched) in [(src, src.flags & ENDPOINT_PATCHED != 0), (dst, dst.flags & ENDPOINT_PATCHED != 0)] {
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

/// The identity of the endpoint with MAC `mac` in the rule-table half `slot`, if the
/// inventory (or the agent) knows it.
#[inline(always)]
pub fn endpoint_ident(slot: u8, mac: &[u8; 6]) -> Option<Ident> {
    let ep = ENDPOINTS.get_ptr(EndpointKey { slot, _pad: 0, mac: *mac })?;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let ep = unsafe { &*ep };
    Some(Ident { zone: ep.zone, flags: ep.flags & !IDENT_UNBOUND, endpoint_id: ep.endpoint_id })
}

/// The identity of an end no port of this node vouches for (the far end of a flow, what
/// an uplink carries): its MAC's endpoint entry, else the longest CIDR prefix holding its
/// address, else `port_zone` (an `interface:` zone) when not 0, else `world`.
#[inline(never)]
pub fn resolve_addr(slot: u8, packet: &Packet, end: u8, port_zone: u16) -> Ident {
    let (family, mac, addr) = packet.end(end);
    if let Some(ident) = endpoint_ident(slot, mac) {
        return ident;
    }
    let bits = if family == backplane_common::flow::FAMILY_IPV4 { 32 } else { 128 };
    let key = AddrKey { slot, family, _pad: [0; 2], addr: *addr };
    let zone = match ZONE_CIDRS.get(Key::new(ADDR_KEY_HEADER_BITS + bits, key)) {
        Some(zone) => *zone as u16,
        None if port_zone != 0 => port_zone,
        None => ZONE_WORLD,
    };
    Ident { zone, flags: IDENT_UNBOUND, endpoint_id: 0 }
}

#[inline(always)]
pub fn zone_flags(slot: u8, zone: u16) -> u8 {
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
        // Infrastructure is spoofed from VM ports (checked where their frames enter); an
        // uplink carries it.
        Some(ep) => unsafe { (*ep).ifindex != 0 && (*ep).ifindex != ifindex && (*ep).ifindex != OWNER_INFRA },
        None => false,
    }
}
