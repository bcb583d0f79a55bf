//! TC programs attached the way kernels before TCX (Linux 6.6) allow: a `clsact` qdisc on
//! the port and a `cls_bpf` filter in direct-action mode per direction.
//!
//! The filters give the guarantees the TCX links give (see [`crate::datapath`]):
//! - **First.** backplane's filters sit at preference [`PRIORITY`] (1, the lowest there
//!   is; 0 would mean "pick one"), ahead of every filter an operator or another product
//!   adds with the usual preferences, and pass what they let through with
//!   `TC_ACT_UNSPEC`, which `cls_bpf` reads as "go on with the next filter".
//! - **Outlive the agent.** A filter holds its program: it stays in the qdisc when the
//!   agent exits or is killed, so the rules in force stay enforced. aya's handle of a
//!   netlink attachment detaches on drop, so the agent forgets the handle instead.
//! - **Adopted and upgraded in place.** Filters have no pins. A new agent finds its
//!   predecessor's by preference and [`HANDLE`] on each port and asks the kernel which
//!   maps their programs use ([`filter_uses_map`]): a filter is this data path's when its
//!   program reads the pinned `CONFIG` map the new agent reuses. Replacing the program of
//!   an existing filter (same preference, handle and protocol) is one `RTM_NEWTFILTER`
//!   that `cls_bpf` performs with an RCU list replacement: every packet meets the old
//!   program or the new one, never none.
//!
//! A port that already has an `ingress` qdisc (tc rate limiting, as libvirt's
//! `<bandwidth>` or Proxmox's rate limits set it up) cannot get a `clsact` qdisc: both
//! take the handle `ffff:`. That port is refused with an error that says so.
//!
//! The kernel is asked through rtnetlink with netlink-packet-route's message types on a
//! plain synchronous netlink socket: these calls run where the port watcher attaches a
//! port, outside any async context.

use std::{fmt, io};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Preference of backplane's filters: the first a packet meets.
pub const PRIORITY: u16 = 1;
/// Handle of backplane's filters (any fixed non-zero value; it names them).
pub const HANDLE: u32 = 0x0000_0b9a;
/// The `clsact` (and `ingress`) qdisc's handle, `ffff:0`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and `..._EGRESS`.
const PARENT_INGRESS: u32 = 0xffff_fff2;
const PARENT_EGRESS: u32 = 0xffff_fff3;

/// Which of the port's two hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn parent(self) -> u32 {
        match self {
            Self::Ingress => PARENT_INGRESS,
            Self::Egress => PARENT_EGRESS,
        }
    }
}

/// The qdisc at `ffff:` of a port, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngressQdisc {
    None,
    Clsact,
    /// Another kind (`ingress`): `clsact` cannot be added beside it.
    Other(String),
}

/// What went wrong with a legacy attachment.
#[derive(Debug, thiserror::Error)]
pub enum LegacyTcError {
    #[error("asking the kernel for the qdiscs and filters of ifindex {ifindex}: {source}")]
    Netlink { ifindex: u32, source: io::Error },
    #[error(
        "the port has an `{kind}` qdisc (tc rate limiting, as libvirt's <bandwidth> or a Proxmox rate limit sets up), \
         which cannot coexist with the clsact qdisc legacy TC attachment needs; remove the rate limit, or run on a kernel \
         with TCX (Linux 6.6+) with --tc-attach tcx"
    )]
    IngressQdisc { kind: String },
    #[error(
        "a filter that is not backplane's holds backplane's preference and handle on the {direction:?} hook ({filter}); \
         remove it (`tc filter del dev <port> {direction_lower} pref 1 handle 0xb9a bpf`) if it is a leftover",
        direction_lower = format!("{direction:?}").to_lowercase()
    )]
    Foreign { filter: Filter, direction: Direction },
}

/// A `cls_bpf` filter at backplane's preference and handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub prog_id: u32,
    pub prog_name: String,
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cls_bpf pref {PRIORITY} handle {HANDLE:#x}: program {} (id {})", self.prog_name, self.prog_id)
    }
}

/// Sends one rtnetlink dump request and collects the messages of the reply.
fn dump(ifindex: u32, request: RouteNetlinkMessage) -> Result<Vec<TcMessage>, LegacyTcError> {
    let err = |source: io::Error| LegacyTcError::Netlink { ifindex, source };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
    socket.bind_auto().map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0).map_err(err)?;
    let mut out = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full().map_err(err)?;
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(err(io::Error::from_raw_os_error(-e.raw_code())));
                }
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewQueueDiscipline(tc) | RouteNetlinkMessage::NewTrafficFilter(tc),
                ) => out.push(tc),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

fn kind(tc: &TcMessage) -> Option<&str> {
    tc.attributes.iter().find_map(|a| if let TcAttribute::Kind(k) = a { Some(k.as_str()) } else { None })
}

fn handle_u32(h: TcHandle) -> u32 {
    (u32::from(h.major) << 16) | u32::from(h.minor)
}

/// The qdisc at `ffff:` of `ifindex`.
pub fn ingress_qdisc(ifindex: u32) -> Result<IngressQdisc, LegacyTcError> {
    let request = RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(ifindex.cast_signed()));
    for tc in dump(ifindex, request)? {
        if tc.header.index != ifindex.cast_signed() || handle_u32(tc.header.handle) != CLSACT_HANDLE {
            continue;
        }
        return Ok(match kind(&tc) {
            Some("clsact") => IngressQdisc::Clsact,
            Some(other) => IngressQdisc::Other(other.to_owned()),
            None => IngressQdisc::Other("unknown".into()),
        });
    }
    Ok(IngressQdisc::None)
}

/// Makes sure the port has a `clsact` qdisc: adds one when it has none, refuses a port
/// whose `ffff:` qdisc is of another kind.
pub fn ensure_clsact(ifindex: u32, ifname: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match ingress_qdisc(ifindex)? {
        IngressQdisc::Clsact => Ok(()),
        IngressQdisc::Other(kind) => Err(Box::new(LegacyTcError::IngressQdisc { kind })),
        IngressQdisc::None => match aya::programs::tc::qdisc_add_clsact(ifname) {
            Ok(()) => Ok(()),
            // Another process added one meanwhile: fine if it is a clsact.
            Err(e) => match ingress_qdisc(ifindex)? {
                IngressQdisc::Clsact => Ok(()),
                IngressQdisc::Other(kind) => Err(Box::new(LegacyTcError::IngressQdisc { kind })),
                IngressQdisc::None => Err(Box::new(e)),
            },
        },
    }
}

/// Whether the first filter a packet meets on the `direction` hook of `ifindex` is
/// backplane's, running `prog_id`: false when it was removed (`tc filter del`, the
/// `clsact` qdisc deleted) or another filter now comes first (one added at preference 1
/// joins the head of the list `cls_bpf` walks).
pub fn first_is_ours(ifindex: u32, direction: Direction, prog_id: u32) -> Result<bool, LegacyTcError> {
    let filters = match hook_filters(ifindex, direction) {
        Ok(filters) => filters,
        Err(LegacyTcError::Netlink { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::EOPNOTSUPP)) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    // The dump lists a hook's filters in the order they run: by preference, then in
    // each classifier's own order. Entries without options (a classifier's header) are
    // skipped.
    let first = filters.iter().find(|tc| tc.attributes.iter().any(|a| matches!(a, TcAttribute::Options(_))));
    Ok(first.is_some_and(|tc| {
        (tc.header.info >> 16) as u16 == PRIORITY
            && handle_u32(tc.header.handle) == HANDLE
            && kind(tc) == Some("bpf")
            && bpf_filter(tc).prog_id == prog_id
    }))
}

fn hook_filters(ifindex: u32, direction: Direction) -> Result<Vec<TcMessage>, LegacyTcError> {
    let mut request = TcMessage::with_index(ifindex.cast_signed());
    let parent = direction.parent();
    request.header.parent = TcHandle { major: (parent >> 16) as u16, minor: (parent & 0xffff) as u16 };
    dump(ifindex, RouteNetlinkMessage::GetTrafficFilter(request))
}

fn bpf_filter(tc: &TcMessage) -> Filter {
    let mut filter = Filter { prog_id: 0, prog_name: String::new() };
    for attr in &tc.attributes {
        let TcAttribute::Options(options) = attr else { continue };
        for option in options {
            match option {
                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = *id,
                TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => filter.prog_name.clone_from(name),
                _ => {}
            }
        }
    }
    filter
}

/// backplane's filter on the `direction` hook of `ifindex`, if there is one.
pub fn find_filter(ifindex: u32, direction: Direction) -> Result<Option<Filter>, LegacyTcError> {
    let filters = match hook_filters(ifindex, direction) {
        Ok(filters) => filters,
        // No clsact qdisc on the port: no filter either.
        Err(LegacyTcError::Netlink { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::EOPNOTSUPP)) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(filters
        .iter()
        .find(|tc| {
            (tc.header.info >> 16) as u16 == PRIORITY
                && handle_u32(tc.header.handle) == HANDLE
                && kind(tc) == Some("bpf")
        })
        .map(bpf_filter))
}

/// Whether the program of `prog_id` reads the map of `map_id`: how a new agent tells
/// its data path's filters (their programs read the pinned maps it adopts) from the
/// filters of another agent's data path on the same machine.
#[must_use]
pub fn filter_uses_map(prog_id: u32, map_id: u32) -> bool {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog_id)
        .and_then(|p| p.map_ids().ok().flatten())
        .is_some_and(|ids| ids.contains(&map_id))
}

/// Every interface of the host: (ifindex, name).
#[must_use]
pub fn host_interfaces() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ifindex = std::fs::read_to_string(e.path().join("ifindex")).ok()?.trim().parse().ok()?;
            Some((ifindex, name))
        })
        .collect()
}
