//! Error types, one enum per subsystem. Each variant names what it was doing and keeps
//! its source; a program that the verifier rejects carries the verifier's log.

use std::{fmt::Write as _, io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};
use thiserror::Error;

/// An error with the causes its own message does not already state, joined by `: `.
#[must_use]
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Loading the data path and driving its maps.
#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("cannot read /proc/mounts to find bpffs: {0}")]
    Mounts(#[source] io::Error),

    #[error("cannot mount bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "another agent is running on the pin directory {path} (it holds its lock): stop it first, or give this \
         one its own --node, --pin-dir and --socket"
    )]
    PinDirInUse { path: PathBuf },

    #[error("pin directory {path} is not on bpffs (filesystem magic {magic:#x})")]
    NotBpffs { path: PathBuf, magic: i64 },

    #[error("cannot load the data path object: {0}")]
    Object(#[source] Box<EbpfError>),

    #[error("the data path object has no program `{0}`")]
    MissingProgram(&'static str),

    #[error("the data path object has no map `{0}`")]
    MissingMap(&'static str),

    /// The kernel's verifier (or the load syscall) rejected a program.
    #[error("the kernel rejected program `{program}`: {io_error}\nverifier log:\n{verifier_log}")]
    Verifier {
        program: &'static str,
        #[source]
        io_error: io::Error,
        verifier_log: String,
    },

    #[error("program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },

    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },

    #[error("invalid option: {0}")]
    InvalidOption(String),

    #[error("rule tables: {0}")]
    RuleTables(#[source] crate::rule_tables::TableError),

    #[error("cannot read the maps of the data path object: {0}")]
    ObjectMaps(String),

    #[error("cannot inspect the maps pinned in {path}: {reason}")]
    PinnedMaps { path: PathBuf, reason: String },

    /// A previous agent's maps have another layout than this data path's.
    #[error("{}", incompatible_pins(path, mismatches))]
    IncompatiblePins { path: PathBuf, mismatches: Vec<crate::pins::Mismatch> },
}

fn incompatible_pins(path: &std::path::Path, mismatches: &[crate::pins::Mismatch]) -> String {
    let mut text = format!(
        "the maps pinned in {} have another layout than this agent's data path, so it cannot adopt them:",
        path.display()
    );
    for m in mismatches {
        text.push_str("\n  ");
        text.push_str(&m.to_string());
    }
    let _ = write!(
        text,
        "\nNothing was changed: the data path that made them stays attached and in force. To replace it, remove \
         the pin directory (`rm -r {}`: its programs are detached, flows and counters start afresh), then start again.",
        path.display()
    );
    text
}

impl DatapathError {
    /// Wraps a program error, pulling the verifier log out of a load failure.
    pub(crate) fn program(program: &'static str, source: ProgramError) -> Self {
        match source {
            ProgramError::LoadError { io_error, verifier_log } => {
                Self::Verifier { program, io_error, verifier_log: verifier_log.to_string() }
            }
            source => Self::Program { program, source },
        }
    }

    pub(crate) fn map(map: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { map, source }
    }
}

/// Attaching the data path to a port, or detaching it.
#[derive(Debug, Error)]
pub enum PortError {
    #[error("interface {ifname} (ifindex {ifindex}): cannot attach {program}: {source}")]
    Attach {
        ifname: String,
        ifindex: u32,
        program: &'static str,
        #[source]
        source: ProgramError,
    },

    #[error("interface {ifname}: cannot pin link at {path}: {source}")]
    Pin {
        ifname: String,
        path: PathBuf,
        #[source]
        source: PinError,
    },

    #[error("interface {ifname}: link: {source}")]
    Link {
        ifname: String,
        #[source]
        source: LinkError,
    },

    #[error("interface {ifname}: cannot unpin {path}: {source}")]
    Unpin {
        ifname: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("interface {ifname} (ifindex {ifindex}): legacy TC attachment: {source}")]
    Legacy {
        ifname: String,
        ifindex: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "interface {ifname} (ifindex {ifindex}): its ingress hook is XDP, and this kernel refused the XDP program: {why}"
    )]
    XdpUnavailable { ifname: String, ifindex: u32, why: String },

    #[error("interface {ifname} (ifindex {ifindex}): PORTS map: {source}")]
    PortsMap {
        ifname: String,
        ifindex: u32,
        #[source]
        source: MapError,
    },

    #[error("interface {ifname} (ifindex {ifindex}) went away before it could be attached")]
    Vanished { ifname: String, ifindex: u32 },

    #[error("interface {ifname}: pin directory for links {path}: {source}")]
    LinksDir {
        ifname: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Following the host's interfaces through netlink.
#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot open a netlink socket for link events: {0}")]
    Socket(#[source] io::Error),

    #[error("cannot list the host's interfaces: {0}")]
    Dump(#[source] rtnetlink::Error),

    #[error("invalid interface pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
}

/// Loading a rule set and putting it in force.
#[derive(Debug, Error)]
pub enum RulesError {
    /// The rule files have errors; each prints as `file:line:column: message`.
    #[error("{}", invalid_rules(path, errors))]
    Invalid { path: PathBuf, errors: Vec<backplane_rules::RuleError> },

    #[error("rules {kind} {path} is gone", kind = if *was_dir { "directory" } else { "file" })]
    Gone { path: PathBuf, was_dir: bool },

    #[error("rules path {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },

    #[error("cannot write the rules of {path} into the data path: {source}")]
    Tables {
        path: PathBuf,
        #[source]
        source: crate::rule_tables::TableError,
    },
}

/// `N error(s) in PATH:` and then each error on its own line.
fn invalid_rules(path: &std::path::Path, errors: &[backplane_rules::RuleError]) -> String {
    let mut text = format!(
        "{} error{} in the rules at {}:",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        path.display()
    );
    for e in errors {
        text.push('\n');
        text.push_str(&e.to_string());
    }
    text
}

impl RulesError {
    /// Each problem as one line: `file:line:column: message` for rule file errors.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Invalid { errors, .. } => errors.iter().map(ToString::to_string).collect(),
            other => vec![report(other)],
        }
    }
}

/// Explaining a flow: arguments that do not describe one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExplainError {
    #[error("{arg}: {value:?} is not an IPv4 or IPv6 address")]
    BadAddress { arg: &'static str, value: String },

    #[error("--from {from} and --to {to} are of different address families; give two IPv4 or two IPv6 addresses")]
    MixedFamilies { from: String, to: String },

    #[error("--proto: {0}")]
    BadProto(String),

    #[error("--proto {proto} is {family} but the addresses are {other}; use --proto {instead}")]
    WrongIcmp { proto: &'static str, family: &'static str, other: &'static str, instead: &'static str },

    #[error("--port: {proto} has no ports; leave --port out")]
    PortWithoutPorts { proto: String },

    #[error("--port is required with --proto {proto}: the destination port, 1-65535")]
    PortRequired { proto: String },

    #[error("--port: 0 is not a destination port; expected 1-65535")]
    PortZero,

    #[error("{arg}: {reason}")]
    BadMac { arg: &'static str, reason: String },

    #[error("--from-interface: an interface name cannot be empty")]
    EmptyInterface,

    #[error("the agent has no rules in force (it runs without --rules); explain offline with --rules PATH")]
    NoRules,
}

/// A ring buffer record that is not a valid [`backplane_common::FlowEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("flow event of {got} bytes, expected {expected}")]
    WrongLength { expected: usize, got: usize },

    #[error("flow event of unknown kind {0}")]
    UnknownKind(u8),

    #[error("flow event with invalid direction {0}")]
    BadDirection(u8),

    #[error("flow event with unknown address family {0}")]
    BadFamily(u8),
}

/// What to do about a failed connection to the control socket.
fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "the control socket is for root only",
        _ => "is `backplane run` running?",
    }
}

/// The control socket, on the agent's side and on the CLI's.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot reach the agent at {path}: {source} ({hint})", hint = connect_hint(source))]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("another agent is already serving {0}; stop it first")]
    InUse(PathBuf),

    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),

    #[error("the agent sent an invalid reply: {0}")]
    BadReply(#[source] serde_json::Error),

    #[error("the agent closed the connection without a reply")]
    NoReply,

    #[error("the agent answered: {0}")]
    Agent(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_adds_only_unstated_causes() {
        let e = PortError::Attach {
            ifname: "tap0".into(),
            ifindex: 3,
            program: "from_port",
            source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: io::Error::from_raw_os_error(libc::EBUSY),
            }),
        };
        assert_eq!(
            report(&e),
            "interface tap0 (ifindex 3): cannot attach from_port: `bpf_link_create` failed: \
             Device or resource busy (os error 16)"
        );
        let e = ControlError::Connect { path: "/x".into(), source: io::Error::from_raw_os_error(libc::ENOENT) };
        assert_eq!(report(&e), e.to_string());
    }
}
