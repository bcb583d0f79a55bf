//! The control socket: newline-delimited JSON over a Unix socket.
//!
//! A client sends one request line, `{"cmd":"flows"}`, `{"cmd":"status"}`,
//! `{"cmd":"follow"}` or `{"cmd":"explain","from":"10.30.0.5","to":"10.40.0.9",
//! "proto":"tcp","port":5432}` (the fields of [`ExplainQuery`]). `flows`, `status` and
//! `explain` get one reply line (a JSON array of flow records; a status object; an
//! [`crate::rules::explain::ExplainReply`]); `follow` gets a stream of lines, one per flow event
//! or record update, until the client goes. Errors are `{"error":"..."}`. Only root
//! (peer uid 0) is served; the socket itself is mode 0600.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast::error::RecvError,
};

use crate::{
    agent::Agent,
    endpoints::model::RuntimeEndpoint,
    error::ControlError,
    flows::{FollowEvent, FollowMessage},
    rules::explain::ExplainQuery,
};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The records of the audit log.
    Audit,
}

/// An error reply line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// Fails if a live agent already serves `path` (checked before anything is touched).
pub fn ensure_not_in_use(path: &Path) -> Result<(), ControlError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse(path.to_owned()));
    }
    Ok(())
}

/// Binds the control socket: creates its directory, refuses to take over the socket
/// of a live agent, removes a stale one, and restricts it to its owner (root).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Socket { path: path.to_owned(), source };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent).map_err(err)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; not removing it",
                )));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            log::info!("removing stale control socket {}", path.display());
            fs::remove_file(path).map_err(err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves clients until the task is dropped.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = Arc::clone(&agent);
                tokio::spawn(async move {
                    if let Err(e) = handle_client(stream, &agent).await {
                        log::debug!("control client: {e}");
                    }
                });
            }
            Err(e) => {
                log::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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

async fn handle_client(stream: UnixStream, agent: &Agent) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let mut limited = (&mut reader).take(MAX_REQUEST);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line)).await;
    match read {
        Err(_) => return write_error(&mut write, "no request received in time").await,
        Ok(Err(e)) => return write_error(&mut write, format!("bad request: {e}")).await,
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) => {}
    }
    // Refused only after its request is read, so that the client, still writing,
    // gets the reason rather than a broken pipe.
    if uid != 0 {
        log::warn!("refused a control client with uid {uid}");
        return write_error(&mut write, format!("permission denied: uid {uid} is not root (uid 0)")).await;
    }
    if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST {
        return write_error(&mut write, "request line too long").await;
    }
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            return write_error(
                &mut write,
                format!(
                    r#"bad request: {e} (expected {{"cmd":"flows"|"status"|"follow"|"explain"|"endpoint_add"|"endpoint_remove"|"endpoint_attest"|"endpoint_list"|"endpoint_moved"|"audit",...}})"#
                ),
            )
            .await;
        }
    };
    match request {
        Request::Flows => {
            let flows = agent.flows().await;
            write_line(&mut write, &flows).await
        }
        Request::Status => write_line(&mut write, &agent.status()).await,
        Request::Follow => follow(reader, write, agent).await,
        Request::Explain(query) => match agent.explain(&query) {
            Ok(reply) => write_line(&mut write, &reply).await,
            Err(e) => write_error(&mut write, e.to_string()).await,
        },
        Request::EndpointAdd(endpoint) => match agent.endpoints().add(endpoint) {
            Ok(info) => write_line(&mut write, &info).await,
            Err(e) => write_error(&mut write, e).await,
        },
        Request::EndpointRemove { name } => match agent.endpoints().remove(&name) {
            Ok(()) => write_line(&mut write, &serde_json::json!({ "removed": name })).await,
            Err(e) => write_error(&mut write, e).await,
        },
        Request::EndpointAttest { name, patched_at } => match agent.endpoints().attest(&name, &patched_at) {
            Ok(info) => write_line(&mut write, &info).await,
            Err(e) => write_error(&mut write, e).await,
        },
        Request::EndpointList => write_line(&mut write, &agent.endpoints().list()).await,
        Request::EndpointMoved { name, to_port } => match agent.endpoints().moved(&name, to_port.as_deref()).await {
            Ok(info) => write_line(&mut write, &info).await,
            Err(e) => write_error(&mut write, e).await,
        },
        Request::Audit => write_line(&mut write, &agent.endpoints().audit_records()).await,
    }
}

/// Streams flow messages until the client closes its end or goes away.
async fn follow<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut write: W,
    agent: &Agent,
) -> io::Result<()> {
    let mut rx = agent.subscribe();
    let mut sink = [0u8; 256];
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(msg) => write_line(&mut write, &msg).await?,
                Err(RecvError::Lagged(missed)) => {
                    write_line(&mut write, &FollowMessage { event: FollowEvent::Lagged, flow: None, missed: Some(missed) }).await?;
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            n = reader.read(&mut sink) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

/// A connection to the agent, on the CLI's side.
pub struct Client {
    path: PathBuf,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect { path: path.to_owned(), source })?;
        let (read, writer) = stream.into_split();
        Ok(Self { path: path.to_owned(), reader: BufReader::new(read), writer })
    }

    /// Sends a request. If the agent closed the connection meanwhile, its reason (an
    /// error line) is still read and returned.
    async fn send(&mut self, request: Request) -> Result<(), ControlError> {
        match write_line(&mut self.writer, &request).await {
            Ok(()) => Ok(()),
            Err(e) => match self.next_line::<serde_json::Value>().await {
                Err(agent @ ControlError::Agent(_)) => Err(agent),
                _ => Err(ControlError::Io(e)),
            },
        }
    }

    /// Reads one reply line; `None` at the end of the stream.
    async fn next_line<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ControlError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        parse_reply(&line).map(Some)
    }

    /// Sends a request that has one reply.
    pub async fn call<T: DeserializeOwned>(&mut self, request: Request) -> Result<T, ControlError> {
        self.send(request).await?;
        self.next_line().await?.ok_or(ControlError::NoReply)
    }

    /// Sends `follow` and hands each message to `on_message` until it returns false or
    /// the agent closes the stream.
    pub async fn follow(&mut self, mut on_message: impl FnMut(FollowMessage) -> bool) -> Result<(), ControlError> {
        self.send(Request::Follow).await?;
        while let Some(msg) = self.next_line::<FollowMessage>().await? {
            if !on_message(msg) {
                break;
            }
        }
        log::debug!("follow stream from {} ended", self.path.display());
        Ok(())
    }
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
    fn connect_error_says_what_to_do() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(Client::connect(Path::new("/nonexistent/backplane.sock"))).err().unwrap();
        assert_eq!(
            err.to_string(),
            "cannot reach the agent at /nonexistent/backplane.sock: No such file or directory (os error 2) \
             (is `backplane run` running?)"
        );
    }

    #[test]
    fn bind_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = std::env::temp_dir().join(format!("backplane-ctl-test-{}", std::process::id()));
        let path = dir.join("sub/agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let live = bind(&path).unwrap();
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
            drop(live); // the file stays behind: stale
            let again = bind(&path).unwrap();
            drop(again);
        });
        fs::remove_dir_all(&dir).unwrap();
    }
}
