//! The control socket: newline-delimited JSON over a Unix socket. This file holds the
//! protocol ([`Request`], the replies, [`ControlError`]); [`server`] is the agent's side,
//! [`client`] the CLI's.
//!
//! A client sends one request line, `{"cmd":"flows"}`, `{"cmd":"status"}`,
//! `{"cmd":"follow"}` or `{"cmd":"explain","from":"10.30.0.5","to":"10.40.0.9",
//! "proto":"tcp","port":5432}` (the fields of [`ExplainQuery`]). `flows`, `status` and
//! `explain` get one reply line (a JSON array of flow records; a status object; an
//! [`crate::rules::explain::ExplainReply`]); `follow` gets a stream of lines, one per flow event
//! or record update, until the client goes. Errors are `{"error":"..."}`. Only root
//! (peer uid 0) is served; the socket itself is mode 0600.

use std::{io, path::PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use crate::{endpoints::model::RuntimeEndpoint, rules::explain::ExplainQuery};

pub mod client;
pub mod server;

pub use client::Client;

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Flows,
    Status,
    Follow,
    /// The verdict the rules in force give a flow, and why.
    Explain(ExplainQuery),
    /// Adds an endpoint to the runtime inventory (`backplane endpoint add`).
    #[serde(rename = "endpoint_add")]
    EndpointAdd(RuntimeEndpoint),
    /// Removes a runtime endpoint.
    #[serde(rename = "endpoint_remove")]
    EndpointRemove {
        name: String,
    },
    /// Records that an endpoint was patched on a date (`YYYY-MM-DD`).
    #[serde(rename = "endpoint_attest")]
    EndpointAttest {
        name: String,
        patched_at: String,
    },
    /// Every endpoint with its standing and location.
    #[serde(rename = "endpoint_list")]
    EndpointList,
    /// The operator says an endpoint is on this node now (on `to_port`, or where it was
    /// last seen here).
    #[serde(rename = "endpoint_moved")]
    EndpointMoved {
        name: String,
        #[serde(default)]
        to_port: Option<String>,
    },
    /// The host says which endpoint is behind a VM port (`backplane endpoint bind`, the
    /// libvirt hook): the endpoint with `mac` (or named `name`) is bound to `port`; what
    /// the port sends is judged as that endpoint, and frames from any other MAC are
    /// dropped. `domain`: the orchestrator's name for the VM, for the audit log.
    #[serde(rename = "endpoint_bind")]
    EndpointBind {
        port: String,
        #[serde(default)]
        mac: Option<String>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        domain: Option<String>,
    },
    /// The host says the VM behind `port` is gone (or leaving): the port is unbound.
    #[serde(rename = "endpoint_unbind")]
    EndpointUnbind {
        port: String,
    },
    /// The records of the audit log.
    Audit,
}

/// An error reply line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
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

async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

async fn write_error<W: AsyncWrite + Unpin>(w: &mut W, error: impl Into<String>) -> io::Result<()> {
    write_line(w, &ErrorReply { error: error.into() }).await
}

/// Parses a reply line: an `{"error":...}` object becomes [`ControlError::Agent`].
pub fn parse_reply<T: DeserializeOwned>(line: &str) -> Result<T, ControlError> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).map_err(ControlError::BadReply)?;
    if let Some(error) =
        value.as_object().filter(|o| o.len() == 1).and_then(|o| o.get("error")).and_then(|e| e.as_str())
    {
        return Err(ControlError::Agent(error.to_owned()));
    }
    serde_json::from_value(value).map_err(ControlError::BadReply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(serde_json::to_string(&Request::Flows).unwrap(), r#"{"cmd":"flows"}"#);
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"cmd":"status"}"#);
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"follow"}"#).unwrap(), Request::Follow);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        let explain = Request::Explain(ExplainQuery {
            from: "10.30.0.5".into(),
            to: "10.40.0.9".into(),
            proto: "tcp".into(),
            port: Some(5432),
            ..ExplainQuery::default()
        });
        let line = serde_json::to_string(&explain).unwrap();
        assert!(
            line.starts_with(r#"{"cmd":"explain","from":"10.30.0.5","to":"10.40.0.9","proto":"tcp","port":5432"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), explain);
        // Optional fields may be left out.
        let short = r#"{"cmd":"explain","from":"10.30.0.5","to":"10.40.0.9","proto":"icmp"}"#;
        assert!(matches!(serde_json::from_str::<Request>(short).unwrap(), Request::Explain(q) if q.port.is_none()));
    }

    #[test]
    fn error_replies_become_errors() {
        let e = parse_reply::<Vec<u32>>(r#"{"error":"permission denied"}"#).unwrap_err();
        assert!(matches!(e, ControlError::Agent(m) if m == "permission denied"));
        assert_eq!(parse_reply::<Vec<u32>>("[1,2]\n").unwrap(), vec![1, 2]);
        assert!(matches!(parse_reply::<Vec<u32>>("{"), Err(ControlError::BadReply(_))));
    }

    #[test]
    fn report_of_a_connect_error_is_its_message() {
        let e = ControlError::Connect { path: "/x".into(), source: io::Error::from_raw_os_error(libc::ENOENT) };
        assert_eq!(crate::error::report(&e), e.to_string());
    }
}
