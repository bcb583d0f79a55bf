//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/put` and friends).
//!
//! Why the gateway and not gRPC: the gateway is plain HTTP/1.1 with JSON bodies, served
//! by every etcd 3.4+ on its client URLs, so the agent needs neither generated protobuf
//! code nor `protoc` at build time, and no long-lived channel whose state must be
//! repaired after etcd restarts: every call is one short request on its own connection
//! (`Connection: close`), tried against each URL in turn. A dead etcd costs a refused
//! connection, and the first call after it returns simply works. Watches are not used:
//! the agent polls the few keys it follows once a second.
//!
//! Only `http://host:port` URLs are supported (etcd on a management network or
//! loopback); keys and values are bytes, base64 in the JSON as the gateway wants.

use std::{fmt, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Time allowed for connecting to one URL.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Time allowed for one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response read.
const MAX_RESPONSE: usize = 64 << 20;

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("bad etcd URL {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    #[error("etcd at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("etcd at {url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("etcd at {url} sent a reply that is not what the v3 API sends: {reason}")]
    BadReply { url: String, reason: String },
}

/// One etcd member's client URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    host_port: String,
    url: String,
}

/// A client of one etcd cluster (its members' client URLs).
#[derive(Clone, Debug)]
pub struct Etcd {
    members: Vec<Member>,
}

/// A key and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
}

impl Etcd {
    /// A client of the cluster reached at these URLs (`http://127.0.0.1:2379`).
    pub fn new(urls: &[String]) -> Result<Self, EtcdError> {
        let mut members = Vec::new();
        for url in urls.iter().flat_map(|u| u.split(',')).map(str::trim).filter(|u| !u.is_empty()) {
            let rest = url.strip_prefix("http://").ok_or_else(|| EtcdError::BadUrl(url.into()))?;
            let host_port = rest.trim_end_matches('/');
            if host_port.is_empty() || host_port.contains('/') || !host_port.contains(':') {
                return Err(EtcdError::BadUrl(url.into()));
            }
            members.push(Member { host_port: host_port.into(), url: url.into() });
        }
        if members.is_empty() {
            return Err(EtcdError::BadUrl(urls.join(",")));
        }
        Ok(Self { members })
    }

    /// The URLs, for status and logs.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// Posts a JSON body to a gateway path on the first member that answers.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let mut last = None;
        for member in &self.members {
            match tokio::time::timeout(REQUEST_TIMEOUT, post(member, path, body)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e @ EtcdError::Status { .. })) => return Err(e),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(EtcdError::Unreachable { url: member.url.clone(), reason: "timed out".into() }),
            }
        }
        Err(last.expect("at least one member"))
    }

    /// Writes `key` (attached to `lease` unless 0).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        self.call("/v3/kv/put", &body).await.map(drop)
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let reply = self.call("/v3/kv/range", &json!({ "key": b64(key.as_bytes()) })).await?;
        Ok(kvs(&reply, &self.members[0].url)?.into_iter().next().map(|kv| kv.value))
    }

    /// Every key under `prefix`, in key order.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let body = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes())) });
        let reply = self.call("/v3/kv/range", &body).await?;
        kvs(&reply, &self.members[0].url)
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", &json!({ "key": b64(key.as_bytes()) })).await.map(drop)
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let reply = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() })).await?;
        int(&reply["ID"]).filter(|id| *id != 0).ok_or_else(|| self.bad(&reply, "no lease ID"))
    }

    /// Renews a lease; returns its remaining TTL in seconds, 0 when it is gone.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let reply = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() })).await?;
        // A stream of one message: {"result": {...}}; an expired lease has no TTL.
        Ok(int(&reply["result"]["TTL"]).unwrap_or(0))
    }

    /// Revokes a lease, deleting its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).await.map(drop)
    }

    fn bad(&self, reply: &Value, reason: &str) -> EtcdError {
        EtcdError::BadReply { url: self.members[0].url.clone(), reason: format!("{reason} in {reply}") }
    }
}

/// The gateway's int64: a JSON string (or a number).
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn kvs(reply: &Value, url: &str) -> Result<Vec<KeyValue>, EtcdError> {
    let bad = |reason: &str| EtcdError::BadReply { url: url.into(), reason: reason.into() };
    let Some(list) = reply.get("kvs") else { return Ok(Vec::new()) };
    let list = list.as_array().ok_or_else(|| bad("kvs is not a list"))?;
    list.iter()
        .map(|kv| {
            let key = unb64(kv["key"].as_str().unwrap_or("")).ok_or_else(|| bad("a key is not base64"))?;
            let value = unb64(kv["value"].as_str().unwrap_or("")).ok_or_else(|| bad("a value is not base64"))?;
            Ok(KeyValue { key: String::from_utf8_lossy(&key).into_owned(), value })
        })
        .collect()
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One HTTP/1.1 POST on its own connection; the JSON reply of a 200.
async fn post(member: &Member, path: &str, body: &Value) -> Result<Value, EtcdError> {
    let unreachable = |reason: String| EtcdError::Unreachable { url: member.url.clone(), reason };
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&member.host_port))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        member.host_port,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| unreachable(e.to_string()))?;
    let mut raw = Vec::new();
    (&mut stream).take(MAX_RESPONSE as u64).read_to_end(&mut raw).await.map_err(|e| unreachable(e.to_string()))?;
    let response = Response::parse(&raw).map_err(|reason| EtcdError::BadReply { url: member.url.clone(), reason })?;
    let text = String::from_utf8_lossy(&response.body);
    if response.status != 200 {
        return Err(EtcdError::Status {
            url: member.url.clone(),
            status: response.status,
            body: text.trim().to_owned(),
        });
    }
    // A streaming call (keepalive) answers with one JSON object per line: take the first.
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("{}");
    serde_json::from_str(first).map_err(|e| EtcdError::BadReply { url: member.url.clone(), reason: e.to_string() })
}

/// An HTTP/1.1 response read to the end of the connection.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Result<Self, String> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
        let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not text")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut chunked = false;
        let mut length = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if name == "content-length" {
                length = value.parse::<usize>().ok();
            }
        }
        let rest = &raw[split + 4..];
        let body = if chunked {
            dechunk(rest)?
        } else if let Some(n) = length {
            rest.get(..n).ok_or("body shorter than its Content-Length")?.to_vec()
        } else {
            rest.to_vec()
        };
        Ok(Self { status, body })
    }
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").ok_or("chunk size without end of line")?;
        let size_text = std::str::from_utf8(&data[..end]).map_err(|_| "chunk size is not text")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("chunk cut short")?);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
#[must_use]
pub fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on a bad character.
#[must_use]
pub fn unb64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = u32::try_from(B64.iter().position(|x| *x == c)?).ok()?;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}", self.key, String::from_utf8_lossy(&self.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, coded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("/backplane/v1/x", "L2JhY2twbGFuZS92MS94")]
        {
            assert_eq!(b64(plain.as_bytes()), coded);
            assert_eq!(unb64(coded).unwrap(), plain.as_bytes());
        }
        assert!(unb64("a$b").is_none());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn responses() {
        let r = Response::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"{}".as_slice()));
        let r = Response::parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
        let r = Response::parse(b"HTTP/1.1 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, b"nope".as_slice()));
        assert!(Response::parse(b"garbage").is_err());
    }

    #[test]
    fn urls() {
        let e = Etcd::new(&["http://127.0.0.1:2379,http://10.0.0.1:2379/".into()]).unwrap();
        assert_eq!(e.members.len(), 2);
        assert_eq!(e.members[1].host_port, "10.0.0.1:2379");
        assert!(Etcd::new(&["https://x:1".into()]).is_err());
        assert!(Etcd::new(&["http://x".into()]).is_err());
        assert!(Etcd::new(&[]).is_err());
    }
}
