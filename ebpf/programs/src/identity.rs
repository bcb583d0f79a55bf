//! Who sends and who receives, from the port and never from the frame.
//!
//! A guest is root in its VM and writes any frame. The one thing it cannot choose is
//! the port its frame arrives on, and the host side (the orchestrator, the operator)
//! says which endpoint sits behind that port: the port's binding in `PORTS`. So:
//! - every frame from a bound VM port must carry the binding's MAC (one compare, on
//!   every frame: the bridge learns where a MAC lives from every frame);
//! - the sender of a new flow is the bound endpoint (its zone and standing); the frame's
//!   source address is *checked against* it (the endpoint's addresses, or its zone's
//!   networks), never used to choose it;
//! - an unbound port in a `binding: learn` zone locks itself to its first MAC and the
//!   zone of its first address (`LEARNED`, trust on first use) and the agent confirms
//!   it; any other unbound port gets the rules' `unbound_ports` (quarantine by default);
//! - a frame delivered to a VM port is for that port's endpoint: where the flow was
//!   judged for another receiver, the copy is judged again (see `pipeline::egress`).

use aya_ebpf::maps::lpm_trie::Key;
use backplane_common::{
    DatapathConfig, PortInfo, PortRole,
    config::{
        ALLOWED_MAC, BINDING_NONE, CONFIG_LEARN, CONFIG_LEARN_WORLD, LEARNED_ADDR_IDLE_NS, LEARNED_ADDRS_PER_PORT,
        LEARNED_ENDPOINT, LEARNED_HELD, LEARNED_MAC_ONLY, LEARNED_ZONE, LearnedAddr, LearnedValue, MacKey,
        PORT_ADDRS_FIXED, UNBOUND_DENY, UNBOUND_OBSERVE,
    },
    flow::FAMILY_IPV4,
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, ENDPOINT_ADDRS_FIXED, ENDPOINT_ELSEWHERE, ENDPOINT_QUARANTINED, EndpointKey,
        OWNER_ELSEWHERE, OWNER_SHARED, OwnerKey, ZONE_HAS_CIDRS, ZONE_LEARN, ZONE_WORLD,
    },
    reason::Counter,
};

use crate::{
    maps::{
        ADDR_OWNERS, ENDPOINTS, LEARNED, LEARNED_ADDR_COUNT, LEARNED_ADDRS, PORT_ALLOWED, PORT_MACS, PORTS, SCRATCH,
        ZONE_CIDRS,
    },
    parse::{END_SENDS, END_SPOKE, Packet},
    policy::{self, IDENT_UNBOUND, Ident},
};

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

/// The `PORTS` entry of `ifindex`, if the port is attached (read in place: a copy would
/// cost the stack).
#[inline(always)]
pub fn port(ifindex: u32) -> Option<&'static PortInfo> {
    // SAFETY: a pointer returned by a map lookup is valid for this program run, which is
    // all the `'static` here is used for.
    PORTS.get_ptr(ifindex).map(|p| unsafe { &*p })
}

/// [`port`] through this CPU's copy of the entry it looked up last, while the agent's
/// `ports_epoch` says `PORTS` did not change since: one lookup saved on nearly every
/// frame (a port's frames come in bursts on a CPU).
#[inline(always)]
pub fn cached_port(cache: *mut crate::parse::PortCache, ifindex: u32, epoch: u32) -> Option<&'static PortInfo> {
    // SAFETY: `cache` is this CPU's slot of the per-CPU SCRATCH map, valid for this run.
    let c = unsafe { &mut *cache };
    if epoch != 0 && c.epoch == epoch && c.ifindex == ifindex {
        // SAFETY: as above; the copy is not written again during this run.
        return if c.present { Some(unsafe { &(*cache).info }) } else { None };
    }
    let found = port(ifindex);
    c.ifindex = ifindex;
    c.epoch = epoch;
    c.present = found.is_some();
    if let Some(info) = found {
        c.info = *info;
    }
    found
}

#[inline(always)]
pub fn is_vm(port: Option<&PortInfo>) -> bool {
    matches!(port, Some(p) if p.role == PortRole::Vm as u8)
}

/// What the first check of a frame from a VM port found.
pub enum Sender {
    /// The frame carries the port's MAC (bound, or learned on first use).
    Bound,
    /// This frame locked the unbound port to its MAC (trust on first use): the agent is
    /// told, and confirms the binding.
    Learned,
    /// Nobody bound the port and it did not learn (yet): `unbound_ports` applies.
    Unbound,
}

/// Checks the source MAC of a frame entering the switch from VM port `ifindex` against
/// the port's binding, and locks an unbound port in a learning zone to its first MAC.
/// `Err` names the counter of a frame to drop.
// Not inlined, as the other checks of this module: each inlined copy would take stack
// slots of its own in the caller's 512 bytes; called, they share one frame.
#[inline(never)]
pub fn check_mac(cfg: &DatapathConfig, ifindex: u32, port: &PortInfo, src_mac: &[u8; 6]) -> Result<Sender, Counter> {
    if port.binding != BINDING_NONE {
        if *src_mac == port.mac || allowed_mac(ifindex, src_mac) {
            return Ok(Sender::Bound);
        }
        return Err(wrong_mac(cfg, src_mac, ifindex));
    }
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    if let Some(learned) = LEARNED.get_ptr(ifindex).map(|l| unsafe { *l }) {
        if learned.mac == *src_mac {
            if learned.flags & LEARNED_HELD != 0 {
                // A claim of an endpoint another node has: its frames would move the
                // endpoint's MAC in every switch's forwarding table.
                return Err(Counter::ClaimHeld);
            }
            if learned.flags & LEARNED_MAC_ONLY != 0 {
                // Held to its MAC, no identity. (When a rule set that lets it learn goes in
                // force, the agent removes such locks: the next frame locks for real.)
                return Ok(Sender::Unbound);
            }
            return Ok(Sender::Bound);
        }
        return Err(wrong_mac(cfg, src_mac, ifindex));
    }
    if src_mac[0] & 1 != 0 || *src_mac == [0; 6] {
        // A group or zero source MAC is no endpoint's.
        return Err(Counter::SpoofedMac);
    }
    let slot = cfg.active_slot & 1;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let endpoint = ENDPOINTS.get_ptr(EndpointKey { slot, _pad: 0, mac: *src_mac }).map(|e| unsafe { *e });
    let learnable = match endpoint {
        Some(ep) if ep.ifindex != 0 && ep.ifindex != ifindex => return Err(Counter::Spoofed),
        // An inventory endpoint's MAC: only where its zone learns (else the host binds it).
        Some(ep) => policy::zone_flags(slot, ep.zone) & ZONE_LEARN != 0,
        // Another MAC: locked here when learning is on (the zone comes with its address)
        // or when `interface:` members give the port its zone.
        None => cfg.flags & CONFIG_LEARN != 0 || port.zone_in(slot) != 0,
    };
    if !learnable && cfg.unbound_ports == UNBOUND_DENY {
        return Err(Counter::UnboundPort);
    }
    // A MAC another port of this node is locked to is that port's (a clone here is a
    // spoof; a VM that moved between two ports here is locked again once its old port
    // is gone).
    let other = local_receiver_of(src_mac);
    if other != 0 && other != ifindex {
        return Err(Counter::Spoofed);
    }
    // A port that cannot learn is held to its first MAC all the same, with no identity.
    let flags = match endpoint {
        _ if !learnable => LEARNED_MAC_ONLY,
        Some(_) => LEARNED_ENDPOINT,
        None => 0,
    };
    let value = LearnedValue { mac: *src_mac, zone: 0, slot, flags, _pad: [0; 6] };
    if LEARNED.insert(ifindex, &value, BPF_NOEXIST).is_ok() {
        let _ = PORT_MACS.insert(&MacKey { mac: *src_mac, _pad: [0; 2] }, &ifindex, 0);
        if !learnable {
            return Ok(Sender::Unbound);
        }
        crate::counters::inc(Counter::PortsLearned);
        return Ok(Sender::Learned);
    }
    // Another CPU locked it first: this frame must carry what it locked.
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    match LEARNED.get_ptr(ifindex).map(|l| unsafe { *l }) {
        Some(l) if l.mac == *src_mac && !learnable => Ok(Sender::Unbound),
        Some(l) if l.mac == *src_mac => Ok(Sender::Bound),
        _ => Err(Counter::SpoofedMac),
    }
}

/// Whether an unbound port would lock itself to `mac` on its next frame (see
/// [`check_mac`]).
#[inline(always)]
fn learnable(cfg: &DatapathConfig, ifindex: u32, port: &PortInfo, mac: &[u8; 6]) -> bool {
    let slot = cfg.active_slot & 1;
    match ENDPOINTS.get_ptr(EndpointKey { slot, _pad: 0, mac: *mac }) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(ep) => unsafe {
            ((*ep).ifindex == 0 || (*ep).ifindex == ifindex) && policy::zone_flags(slot, (*ep).zone) & ZONE_LEARN != 0
        },
        None => cfg.flags & CONFIG_LEARN != 0 || port.zone_in(slot) != 0,
    }
}

/// A frame from a VM port with a MAC that is not the port's: `spoofed` when the MAC is
/// an endpoint bound to another port (what that counter always counted), else
/// `spoofed_mac`.
#[inline(always)]
fn wrong_mac(cfg: &DatapathConfig, mac: &[u8; 6], ifindex: u32) -> Counter {
    let slot = cfg.active_slot & 1;
    match ENDPOINTS.get_ptr(EndpointKey { slot, _pad: 0, mac: *mac }) {
        // Another port's endpoint, or infrastructure.
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(ep) if unsafe { (*ep).ifindex != 0 && (*ep).ifindex != ifindex } => Counter::Spoofed,
        _ => Counter::SpoofedMac,
    }
}

/// [`learned_zone`] for the frame in hand of a locked port whose zone is still unknown,
/// also on an established flow (a port that spoke to an earlier data path locks on its
/// next frame, which belongs to a flow it already has).
#[inline(never)]
pub fn learn_from(cfg: &DatapathConfig, ifindex: u32, packet: &Packet) {
    let _ = learned_zone(cfg, ifindex, packet.family, &packet.src);
}

/// Whether a frame from VM port `ifindex` locked (`LEARNED`) but not yet confirmed may
/// take the zone of `addr`: the first address from a learning zone's networks sets the
/// zone; later ones must be in the same zone.
#[inline(always)]
fn learned_zone(cfg: &DatapathConfig, ifindex: u32, family: u8, addr: &[u8; 16]) -> Option<u16> {
    let slot = cfg.active_slot & 1;
    let learned = LEARNED.get_ptr_mut(ifindex)?;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let learned = unsafe { &mut *learned };
    if learned.flags & LEARNED_ZONE != 0 {
        return (learned.slot == slot).then_some(learned.zone);
    }
    if learned.flags & (LEARNED_ENDPOINT | LEARNED_MAC_ONLY) != 0 || is_unspecified(family, addr) {
        return None;
    }
    // Another port's address picks nothing (and is dropped as spoofed by the caller).
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    if let Some(owner) = ADDR_OWNERS.get_ptr(&OwnerKey { family, _pad: [0; 3], addr: *addr }).map(|o| unsafe { &*o })
        && owner.ifindex != 0
        && owner.ifindex != ifindex
        && !(owner.ifindex == OWNER_ELSEWHERE && owner.mac == learned.mac)
    {
        return None;
    }
    let zone = match cidr_zone(slot, family, addr) {
        Some(zone) if policy::zone_flags(slot, zone) & ZONE_LEARN != 0 => zone,
        Some(_) => return None,
        None if cfg.flags & CONFIG_LEARN_WORLD != 0 && !is_link_local_v6(family, addr) => ZONE_WORLD,
        None => return None,
    };
    learned.zone = zone;
    learned.slot = slot;
    learned.flags |= LEARNED_ZONE;
    Some(zone)
}

/// The identity of the endpoint behind VM port `ifindex`, for judging a flow: the bound
/// (or learned) endpoint's, else the zone `interface:` members give the port (its MAC
/// locked on first use), else the zone a learning port's first address chose. `mac` and
/// `addr` are the frame's fields of this end; when it `sends` the frame, `addr` may set a
/// learning port's zone, never a bound port's. With `unbound_ports: observe`, an unbound
/// port is judged by the frame's fields as before bindings.
#[inline(never)]
pub fn port_ident(cfg: &DatapathConfig, port: &PortInfo, packet: &Packet, ifindex: u32, end: u8) -> Ident {
    let (family, _, addr) = packet.end(end);
    let sends = end & END_SENDS != 0;
    let slot = cfg.active_slot & 1;
    if port.binding != BINDING_NONE {
        return policy::endpoint_ident(slot, &port.mac).unwrap_or(Ident {
            zone: port.zone_in(slot),
            flags: port.standing_in(slot),
            endpoint_id: 0,
        });
    }
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    if let Some(learned) = LEARNED.get_ptr(ifindex).map(|l| unsafe { &*l }).filter(|l| l.flags & LEARNED_MAC_ONLY == 0)
    {
        if let Some(ident) = policy::endpoint_ident(slot, &learned.mac) {
            // Held while the node it is bound on keeps it: a claim, not a move.
            if ident.flags & ENDPOINT_ELSEWHERE != 0 || learned.flags & LEARNED_HELD != 0 {
                return unbound_ident(slot, port);
            }
            return ident;
        }
        if port.zone_in(slot) != 0 {
            return Ident { zone: port.zone_in(slot), flags: 0, endpoint_id: 0 };
        }
        let zone = if sends {
            learned_zone(cfg, ifindex, family, addr)
        } else {
            (learned.flags & LEARNED_ZONE != 0 && learned.slot == slot).then_some(learned.zone)
        };
        if let Some(zone) = zone {
            return Ident { zone, flags: 0, endpoint_id: 0 };
        }
    }
    // Under `observe`, and, where ports learn, for a port that has not sent yet (a VM
    // that is silent since the agent started: it cannot be locked before it speaks),
    // the frame's fields say who the end is.
    // A port that has not locked yet: one that never sent, or (a stored end) one whose MAC
    // would lock it when it next sends (it spoke to an earlier data path: an upgrade).
    let silent = end & END_SENDS == 0
        && LEARNED.get_ptr(ifindex).is_none()
        && (end & END_SPOKE == 0 || learnable(cfg, ifindex, port, packet.end(end).1));
    if cfg.unbound_ports == UNBOUND_OBSERVE || (silent && cfg.flags & CONFIG_LEARN != 0) {
        // Placed by the frame, still unbound: no binding vouches for it.
        let ident = policy::resolve_addr(slot, packet, end, port.zone_in(slot));
        return Ident { flags: ident.flags | IDENT_UNBOUND, ..ident };
    }
    unbound_ident(slot, port)
}

/// An unbound port under `unbound_ports: quarantine` (or a learning port before its
/// zone is known): quarantined, in the zone `interface:` members give the port.
#[inline(always)]
pub fn unbound_ident(slot: u8, port: &PortInfo) -> Ident {
    let zone = port.zone_in(slot);
    Ident {
        zone: if zone != 0 { zone } else { ZONE_WORLD },
        flags: ENDPOINT_QUARANTINED | IDENT_UNBOUND,
        endpoint_id: 0,
    }
}

#[inline(always)]
fn is_unspecified(family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_IPV4 { addr[..4] == [0; 4] } else { *addr == [0; 16] }
}

#[inline(always)]
fn is_link_local_v6(family: u8, addr: &[u8; 16]) -> bool {
    family != FAMILY_IPV4 && addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

#[inline(always)]
fn cidr_zone(slot: u8, family: u8, addr: &[u8; 16]) -> Option<u16> {
    let bits = if family == FAMILY_IPV4 { 32 } else { 128 };
    let key = AddrKey { slot, family, _pad: [0; 2], addr: *addr };
    ZONE_CIDRS.get(Key::new(ADDR_KEY_HEADER_BITS + bits, key)).map(|z| *z as u16)
}

/// Whether VM port `ifindex` may send from (or claim) the frame's source address
/// (`packet.src`), for a sender in `zone` with `bits` (`SRC_*`, and the rule-table half
/// in force in the low byte):
/// - an address `ADDR_OWNERS` gives to a port: only that port (or, for an owner bound on
///   another node, its own MAC arriving here); a virtual IP it gives to no port
///   (`OWNER_SHARED`): only bound ports the rules allow it (`allowed_addresses`);
/// - the unspecified address (DHCP, duplicate address detection) and IPv6 link-local
///   addresses nobody owns: any port;
/// - any other address: not when the binding's addresses are fixed, unless the rules
///   allow the bound endpoint that address; and only one that the zones' networks give
///   the sender's zone (or no zone, for a sender whose zone has no networks), so that no
///   node judging it by address puts it in another zone; without fixed addresses, one
///   the port holds or takes (see [`source_ok`]).
///
/// Unbound ports (quarantined, or judged by address under `observe`) are held to the
/// owners and to addresses no other port holds.
// Few, plain arguments: fewer values to keep on the stack across the lookups.
#[inline(never)]
fn address_ok(bits: u32, zone: u16, packet: &Packet, ifindex: u32) -> Source {
    let (family, addr) = (packet.family, &packet.src);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return Source::Refused };
    let Some(key) = owner_key(family, addr) else { return Source::Refused };
    let mut shared = false;
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    if let Some(owner) = ADDR_OWNERS.get_ptr(&*key).map(|o| unsafe { &*o }) {
        if owner.ifindex != OWNER_SHARED {
            let ok = owner.ifindex == 0
                || owner.ifindex == ifindex
                || (owner.ifindex == OWNER_ELSEWHERE && same_mac(&owner.mac, &packet.src_mac));
            return if ok { Source::Ok } else { Source::Refused };
        }
        // A virtual IP the rules allow some endpoints: theirs alone, in their zone.
        if bits & SRC_BOUND == 0 || !allowed(ifindex, family, addr) {
            return Source::Refused;
        }
        shared = true;
    }
    if is_unspecified(family, addr) || is_link_local_v6(family, addr) {
        return Source::Ok;
    }
    if bits & SRC_UNBOUND != 0 {
        // Quarantined (or placed by the frame under `observe`): any address but one
        // another port holds.
        return Source::NotHeld;
    }
    // Fixed addresses: its own (owned above) or what the rules allow it besides
    // (`allowed_addresses`), which must still keep it in its zone's networks.
    let fixed = bits & SRC_FIXED != 0;
    if fixed && !shared && !(bits & SRC_BOUND != 0 && allowed(ifindex, family, addr)) {
        return Source::Refused;
    }
    // The address must not put the sender in another zone (another node judges what it
    // sends by address): inside its zone's networks, or in none when its zone has none.
    let slot = (bits & 1) as u8;
    // SAFETY: as above.
    let cidr = unsafe { &mut (*scratch).cidr };
    cidr.prefix_len = ADDR_KEY_HEADER_BITS + if family == FAMILY_IPV4 { 32 } else { 128 };
    cidr.data = AddrKey { slot, family, _pad: [0; 2], addr: *addr };
    let in_zone = match ZONE_CIDRS.get(&*cidr).map(|z| *z as u16) {
        Some(z) => z == zone,
        None => policy::zone_flags(slot, zone) & ZONE_HAS_CIDRS == 0,
    };
    if !in_zone {
        return Source::Refused;
    }
    if fixed || shared { Source::Ok } else { Source::ToTake }
}

/// [`address_ok`]'s `bits`: the port is bound (by the host, or confirmed).
const SRC_BOUND: u32 = 1 << 8;
/// The sender's addresses are fixed (inventory `ips`).
const SRC_FIXED: u32 = 1 << 9;
/// No binding vouches for the sender.
const SRC_UNBOUND: u32 = 1 << 10;

/// Whether VM port `ifindex`, whose sender is `ident`, may send from (or claim) the
/// frame's source address: [`address_ok`], and for an endpoint without fixed addresses,
/// an address it holds or takes now ([`take_address`]) (what the rules allow several
/// endpoints is reserved for them in `ADDR_OWNERS`, and passed there). Inlined into the entry point, so
/// that the two checks' frames are not stacked.
#[inline(always)]
pub fn source_ok(cfg: &DatapathConfig, port: &PortInfo, ident: Ident, packet: &Packet, ifindex: u32) -> bool {
    let mut bits = u32::from(cfg.active_slot & 1);
    if port.binding != BINDING_NONE {
        bits |= SRC_BOUND;
    }
    if port.flags & PORT_ADDRS_FIXED != 0 || ident.flags & ENDPOINT_ADDRS_FIXED != 0 {
        bits |= SRC_FIXED;
    }
    if ident.unbound() {
        bits |= SRC_UNBOUND;
    }
    match address_ok(bits, ident.zone, packet, ifindex) {
        Source::Ok => true,
        Source::Refused => false,
        Source::ToTake => take_address(ifindex, &packet.src_mac, packet.family, &packet.src),
        Source::NotHeld => !held_by_another(ifindex, packet.family, &packet.src),
    }
}

/// Whether two MACs are equal, in two word compares (a slice compare is a call to
/// `bcmp`: a frame of its own on the stack).
#[inline(always)]
fn same_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) == u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        && u16::from_ne_bytes([a[4], a[5]]) == u16::from_ne_bytes([b[4], b[5]])
}

/// What [`address_ok`] found of a frame's source address.
pub enum Source {
    Ok,
    Refused,
    /// In the sender's zone's networks, but its endpoint has no fixed addresses: it must
    /// hold the address.
    ToTake,
    /// An unbound port's: no other port may hold it.
    NotHeld,
}

/// Whether another port than `ifindex` holds the address (took it on first use and
/// uses it).
#[inline(never)]
fn held_by_another(ifindex: u32, family: u8, addr: &[u8; 16]) -> bool {
    let Some(key) = owner_key(family, addr) else { return true };
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let Some(held) = LEARNED_ADDRS.get_ptr(&*key).map(|h| unsafe { *h }) else { return false };
    // SAFETY: reading the kernel's coarse monotonic clock has no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    held.ifindex != ifindex && now.wrapping_sub(held.last_used_ns) < LEARNED_ADDR_IDLE_NS
}

/// Whether VM port `ifindex` (its frames from `mac`) holds the address, or takes it now:
/// an address nobody holds, or one another port left idle for
/// [`LEARNED_ADDR_IDLE_NS`], while the port holds fewer than [`LEARNED_ADDRS_PER_PORT`].
/// Every use refreshes it.
#[inline(never)]
fn take_address(ifindex: u32, mac: &[u8; 6], family: u8, addr: &[u8; 16]) -> bool {
    let Some(key) = owner_key(family, addr) else { return false };
    // SAFETY: reading the kernel's coarse monotonic clock has no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    if let Some(held) = LEARNED_ADDRS.get_ptr_mut(&*key) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let held = unsafe { &mut *held };
        if held.ifindex == ifindex && same_mac(&held.mac, mac) {
            held.last_used_ns = now;
            return true;
        }
        if now.wrapping_sub(held.last_used_ns) < LEARNED_ADDR_IDLE_NS || !count_add(ifindex, 1) {
            return false;
        }
        // Idle: the other port lets go of it.
        let _ = count_add(held.ifindex, u32::MAX);
        held.ifindex = ifindex;
        held.mac = *mac;
        held.last_used_ns = now;
        return true;
    }
    if !count_add(ifindex, 1) {
        return false;
    }
    let value = LearnedAddr { ifindex, mac: *mac, _pad: [0; 2], last_used_ns: now };
    if LEARNED_ADDRS.insert(key, &value, BPF_NOEXIST).is_ok() {
        return true;
    }
    // Another CPU took it first (or the table is full): not this port's.
    let _ = count_add(ifindex, u32::MAX);
    false
}

/// Adds `delta` (1, or `u32::MAX` for -1) to the number of addresses port `ifindex`
/// holds; an addition that would pass [`LEARNED_ADDRS_PER_PORT`] is refused (`false`,
/// counted as `addresses_full`).
#[inline(always)]
fn count_add(ifindex: u32, delta: u32) -> bool {
    let Some(count) = LEARNED_ADDR_COUNT.get_ptr_mut(&ifindex) else {
        if delta != 1 {
            return true;
        }
        // (Another CPU creating it at the same moment: this frame does not take the
        // address; the port's next one does.)
        return LEARNED_ADDR_COUNT.insert(&ifindex, &1, BPF_NOEXIST).is_ok();
    };
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let count = unsafe { &mut *count };
    if delta == 1 && *count >= LEARNED_ADDRS_PER_PORT {
        crate::counters::inc(Counter::AddressesFull);
        return false;
    }
    *count = count.wrapping_add(delta);
    true
}

/// Whether the rules allow the endpoint bound to VM port `ifindex` to send from `value`
/// (an address of family `kind`) besides its own: `allowed_addresses`.
#[inline(always)]
fn allowed(ifindex: u32, kind: u8, value: &[u8; 16]) -> bool {
    let Some(key) = allowed_key(ifindex, kind) else { return false };
    key.value = *value;
    PORT_ALLOWED.get_ptr(key).is_some()
}

/// [`allowed`] for a MAC: `allowed_macs`.
#[inline(never)]
fn allowed_mac(ifindex: u32, mac: &[u8; 6]) -> bool {
    let Some(key) = allowed_key(ifindex, ALLOWED_MAC) else { return false };
    key.value = [0; 16];
    key.value[..6].copy_from_slice(mac);
    PORT_ALLOWED.get_ptr(key).is_some()
}

/// An `ADDR_OWNERS` / `LEARNED_ADDRS` key of `addr`: built in this CPU's scratch memory,
/// not on the stack.
#[inline(always)]
fn owner_key(family: u8, addr: &[u8; 16]) -> Option<&'static mut OwnerKey> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of the per-CPU SCRATCH map, valid for this run (all the
    // `'static` is used for).
    let key = unsafe { &mut (*scratch).owner };
    key.family = family;
    key._pad = [0; 3];
    key.addr = *addr;
    Some(key)
}

/// A `PORT_ALLOWED` key for port `ifindex` and `kind`, its value to fill in: built in
/// this CPU's scratch memory, not on the stack.
#[inline(always)]
fn allowed_key(ifindex: u32, kind: u8) -> Option<&'static mut backplane_common::config::AllowedKey> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of the per-CPU SCRATCH map, valid for this run (all the
    // `'static` is used for).
    let key = unsafe { &mut (*scratch).allowed };
    key.ifindex = ifindex;
    key.kind = kind;
    key._pad = [0; 3];
    Some(key)
}

/// The VM port of this node a frame's destination MAC is locked to (on first use, maybe
/// before the agent confirmed it), for judging a new flow where it enters the switch; 0
/// when no port here is.
#[inline(never)]
pub fn local_receiver(packet: &Packet) -> u32 {
    local_receiver_of(&packet.dst_mac)
}

/// The VM port of this node locked or bound to `mac`, 0 when none.
#[inline(always)]
fn local_receiver_of(mac: &[u8; 6]) -> u32 {
    if mac[0] & 1 != 0 {
        return 0;
    }
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let Some(ifindex) = PORT_MACS.get_ptr(&MacKey { mac: *mac, _pad: [0; 2] }).map(|i| unsafe { *i }) else {
        return 0;
    };
    let Some(port) = port(ifindex) else { return 0 };
    let ours = if port.binding != BINDING_NONE {
        port.mac == *mac
    } else {
        match LEARNED.get_ptr(ifindex) {
            // A held claim is not the MAC's port: it neither receives for it nor keeps
            // the endpoint's real port from locking it.
            // SAFETY: a pointer returned by a map lookup is valid for this program run.
            Some(l) => unsafe { (*l).mac == *mac && (*l).flags & LEARNED_HELD == 0 },
            None => false,
        }
    };
    if ours { ifindex } else { 0 }
}
