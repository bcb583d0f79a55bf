//! The CLI's side of the control socket: a connection to the agent, one request and its
//! reply, or the stream of a `follow`.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    net::UnixStream,
};

use crate::{
    control::{ControlError, Request, parse_reply, write_line},
    flows::FollowMessage,
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
