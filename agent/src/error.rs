//! Error types, one enum per subsystem. Each variant names what it was doing and keeps
//! its source; a program that the verifier rejects carries the verifier's log.

use std::{io, path::PathBuf};

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
    use crate::datapath::PortError;

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
