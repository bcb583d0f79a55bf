//! Errors of the data path: loading the object and driving its maps
//! ([`DatapathError`]), attaching it to a port and detaching it ([`PortError`]). Each
//! variant names what it was doing and keeps its source; a program that the verifier
//! rejects carries the verifier's log.

use std::{fmt::Write as _, io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};
use thiserror::Error;

use crate::datapath::{pins::Mismatch, rule_tables::TableError};

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
    RuleTables(#[source] TableError),

    #[error("cannot read the maps of the data path object: {0}")]
    ObjectMaps(String),

    #[error("cannot inspect the maps pinned in {path}: {reason}")]
    PinnedMaps { path: PathBuf, reason: String },

    /// A previous agent's maps have another layout than this data path's.
    #[error("{}", incompatible_pins(path, mismatches))]
    IncompatiblePins { path: PathBuf, mismatches: Vec<Mismatch> },
}

fn incompatible_pins(path: &std::path::Path, mismatches: &[Mismatch]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::report;

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
    }
}
