//! The agent's side of the control socket: binding it (root only, mode 0600; a stale
//! socket is replaced, a live agent's is not) and serving each client's request.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast::error::RecvError,
};

use crate::{
    agent::Agent,
    control::{ControlError, Request, write_error, write_line},
    flows::{FollowEvent, FollowMessage},
};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
        Request::EndpointBind { port, mac, name, domain } => {
            match agent.endpoints().bind(&port, mac.as_deref(), name.as_deref(), domain.as_deref()).await {
                Ok(info) => write_line(&mut write, &info).await,
                Err(e) => write_error(&mut write, e).await,
            }
        }
        Request::EndpointUnbind { port } => match agent.endpoints().unbind(&port) {
            Ok(()) => write_line(&mut write, &serde_json::json!({"unbound": port})).await,
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

#[cfg(test)]
mod tests {
    use super::*;

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
