//! Nodes sharing their endpoints through etcd (`backplane run --etcd URL`).
//!
//! Keys, all under [`KEY_PREFIX`] (`/backplane/v1`):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `nodes/<node>` | `{node, labels, started_unix_ms}` | the node's |
//! | `endpoints/<mac>` | where the endpoint is: [`Location`] (node, port, labels, since, state; `port_gone_unix_ms` once its port there is gone) | the hosting node's |
//! | `flows/<mac>` | its established flows with counters: [`HandoverSet`], refreshed every second | the hosting node's |
//! | `runtime/<name>` | an endpoint added with `backplane endpoint add`: [`RuntimeEndpoint`] | none |
//! | `attest/<name>` | `YYYY-MM-DD` from `backplane endpoint attest` | none |
//!
//! Each node holds one lease (TTL [`LEASE_TTL_SECS`] s, renewed every second): when a
//! node dies its claims expire with it. etcd going away never stops enforcement: the
//! data path does not depend on it, the agent logs the outage once, works from its local
//! state, shows `etcd.connected: false` in `status`, and retries with backoff (0.25 s
//! doubling to 5 s). When etcd returns, the agent renews (or grants again) its lease and
//! writes its node, locations and flows again.
//!
//! The endpoints ask and tell the other nodes through [`Peers`], which [`Cluster`]
//! implements; they hold it from their creation, and the cluster's sync loop holds the
//! endpoints once [`Cluster::start`] starts it. Each points one way: no `Arc` cycle,
//! nothing set late. [`etcd`] is the small client it talks to etcd with.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use backplane_rules::{MacAddr, PatchDate};
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    endpoints::{
        Endpoints, Peers,
        model::{HandoverSet, Location, RuntimeEndpoint},
    },
};

pub mod etcd;

use etcd::{Etcd, EtcdError};

/// Prefix of every key the agents write.
pub const KEY_PREFIX: &str = "/backplane/v1";
/// TTL of a node's lease.
pub const LEASE_TTL_SECS: i64 = 10;
/// How often a node renews its lease, publishes its flows and reads the others'.
const PERIOD: Duration = Duration::from_secs(1);
/// Longest wait between two tries while etcd is away.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an arrival waits for etcd before using its last copy of the flows.
const FETCH_TIMEOUT: Duration = Duration::from_millis(400);

fn key(kind: &str, name: &str) -> String {
    format!("{KEY_PREFIX}/{kind}/{name}")
}

/// One node's link to etcd: the endpoints' [`Peers`], and the sync loop that shares this
/// node's endpoints and reads the others'.
pub struct Cluster {
    etcd: Etcd,
    node: String,
    labels: BTreeMap<String, String>,
    lease: Mutex<i64>,
    /// Wakes the loop early (a local change to share).
    wake: Notify,
    /// Whether the sync loop runs: until then the peers answer nothing and take nothing.
    joined: AtomicBool,
}

impl Cluster {
    /// The link of node `node` (with its `labels`) to etcd; [`Cluster::start`] starts it.
    #[must_use]
    pub fn new(etcd: Etcd, node: &str, labels: &BTreeMap<String, String>) -> Arc<Self> {
        Arc::new(Self {
            etcd,
            node: node.to_owned(),
            labels: labels.clone(),
            lease: Mutex::new(0),
            wake: Notify::new(),
            joined: AtomicBool::new(false),
        })
    }

    /// Starts sharing the endpoints of this node: from here on the cluster answers their
    /// questions, and its loop keeps the node's lease, publishes and polls until the task
    /// is dropped.
    pub fn start(self: &Arc<Self>, endpoints: Arc<Endpoints>) -> JoinHandle<()> {
        let urls = self.etcd.urls();
        endpoints.set_etcd_status(|s| {
            s.configured = true;
            s.urls = urls;
        });
        self.joined.store(true, Ordering::SeqCst);
        tokio::spawn(Arc::clone(self).run(endpoints))
    }

    /// The etcd URLs, for logs.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.etcd.urls()
    }

    fn joined(&self) -> bool {
        self.joined.load(Ordering::SeqCst)
    }

    fn lease(&self) -> i64 {
        *self.lease.lock().expect("lease lock")
    }

    /// Where etcd says an endpoint is (asked on an arrival, not to miss a move that the
    /// last poll has not seen yet).
    async fn fetch_location(&self, mac: MacAddr) -> Result<Option<Location>, String> {
        let key = key("endpoints", &mac.to_string());
        match tokio::time::timeout(FETCH_TIMEOUT, self.etcd.get(&key)).await {
            Err(_) => Err("etcd did not answer in time".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(None)) => Ok(None),
            Ok(Ok(Some(bytes))) => serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string()),
        }
    }

    /// Writes `value` under the node's lease, trying again a few times (0.2 s doubling to
    /// 3.2 s): another node may wait for this write to take a move.
    async fn put_retrying(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.etcd.put(key, value, self.lease()).await {
                Ok(()) => return Ok(()),
                Err(e) if pause > Duration::from_millis(3200) => return Err(e),
                Err(e) => log::debug!("etcd put of {key} failed ({e}); trying again"),
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// The flows another node published for an endpoint.
    async fn fetch_flows(&self, mac: MacAddr) -> Result<Option<HandoverSet>, String> {
        let key = key("flows", &mac.to_string());
        match tokio::time::timeout(FETCH_TIMEOUT, self.etcd.get(&key)).await {
            Err(_) => Err("etcd did not answer in time".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(None)) => Ok(None),
            Ok(Ok(Some(bytes))) => serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string()),
        }
    }
}

impl Peers for Cluster {
    fn location(&self, mac: MacAddr) -> BoxFuture<'_, Result<Option<Location>, String>> {
        Box::pin(async move { if self.joined() { self.fetch_location(mac).await } else { Ok(None) } })
    }

    fn flows(&self, mac: MacAddr) -> BoxFuture<'_, Result<Option<HandoverSet>, String>> {
        Box::pin(async move { if self.joined() { self.fetch_flows(mac).await } else { Ok(None) } })
    }

    /// Asks the loop to run now.
    fn kick(&self) {
        if self.joined() {
            self.wake.notify_one();
        }
    }

    /// Writes where an endpoint is now (in the background).
    fn publish_location(self: Arc<Self>, mac: MacAddr, location: Location) {
        if !self.joined() {
            return;
        }
        let me = self;
        tokio::spawn(async move {
            let value = serde_json::to_vec(&location).unwrap_or_default();
            if let Err(e) = me.put_retrying(&key("endpoints", &mac.to_string()), &value).await {
                log::warn!("cannot publish the location of {mac}: {e}");
            }
        });
    }

    /// Writes the flows of an endpoint that just left one of this node's ports, then its
    /// location saying the port is gone (in the background): a node that sees the port
    /// gone finds the final flows already there.
    fn publish_departure(self: Arc<Self>, mac: MacAddr, flows: Option<HandoverSet>, location: Location) {
        if !self.joined() {
            return;
        }
        let me = self;
        tokio::spawn(async move {
            if let Some(set) = flows {
                let value = serde_json::to_vec(&set).unwrap_or_default();
                match me.put_retrying(&key("flows", &mac.to_string()), &value).await {
                    Ok(()) => log::info!("published {} flow(s) of {mac} as it left port {}", set.flows.len(), set.port),
                    Err(e) => log::warn!("cannot publish the flows of {mac} as it left: {e}"),
                }
            }
            let value = serde_json::to_vec(&location).unwrap_or_default();
            if let Err(e) = me.put_retrying(&key("endpoints", &mac.to_string()), &value).await {
                log::warn!("cannot publish that {mac} left port {}: {e}", location.port);
            }
        });
    }
}

impl Cluster {
    /// Keeps the node's lease, publishes and polls, until the task is dropped.
    async fn run(self: Arc<Self>, endpoints: Arc<Endpoints>) {
        let mut backoff = Duration::from_millis(250);
        let mut connected: Option<bool> = None;
        loop {
            match self.round(&endpoints).await {
                Ok(()) => {
                    if connected != Some(true) {
                        let again = connected == Some(false);
                        if again {
                            log::info!(
                                "etcd is back ({}); node {} shares its endpoints again",
                                self.etcd.urls().join(","),
                                self.node
                            );
                        } else {
                            log::info!("connected to etcd at {} as node {}", self.etcd.urls().join(","), self.node);
                        }
                        let lease = self.lease();
                        endpoints.set_etcd_status(|s| {
                            s.connected = true;
                            s.lease_id = lease;
                            s.since = Some(rfc3339_ms(now_unix_ms()));
                            s.last_error = None;
                            if again {
                                s.reconnects += 1;
                            }
                        });
                        connected = Some(true);
                    }
                    backoff = Duration::from_millis(250);
                    tokio::select! {
                        () = tokio::time::sleep(PERIOD) => {}
                        () = self.wake.notified() => {}
                    }
                }
                Err(e) => {
                    if connected == Some(false) {
                        log::debug!("etcd still unreachable: {e}");
                    } else {
                        log::error!(
                            "etcd unreachable ({e}); enforcement goes on from local state, retrying with backoff up to {}s",
                            MAX_BACKOFF.as_secs()
                        );
                        endpoints.set_etcd_status(|s| {
                            s.connected = false;
                            s.since = Some(rfc3339_ms(now_unix_ms()));
                        });
                        connected = Some(false);
                    }
                    let text = e.to_string();
                    endpoints.set_etcd_status(|s| s.last_error = Some(text));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One round: lease, node, shared definitions, locations, flows, then the others'.
    async fn round(&self, endpoints: &Endpoints) -> Result<(), EtcdError> {
        let mut fresh = false;
        let mut lease = self.lease();
        if lease != 0 && self.etcd.keep_alive(lease).await? == 0 {
            log::warn!("etcd lease {lease:x} of node {} expired; granting a new one", self.node);
            lease = 0;
        }
        if lease == 0 {
            lease = self.etcd.grant(LEASE_TTL_SECS).await?;
            *self.lease.lock().expect("lease lock") = lease;
            fresh = true;
            let node = json!({ "node": self.node, "labels": self.labels, "started_unix_ms": now_unix_ms() });
            self.etcd.put(&key("nodes", &self.node), node.to_string().as_bytes(), lease).await?;
            endpoints.set_etcd_status(|s| s.lease_id = lease);
        }
        if let Some((runtime, attested)) = endpoints.take_dirty_shared() {
            self.write_shared(&runtime, &attested).await?;
            endpoints.shared_written();
        }
        if fresh {
            for (mac, location) in endpoints.local_locations() {
                let value = serde_json::to_vec(&location).unwrap_or_default();
                self.etcd.put(&key("endpoints", &mac.to_string()), &value, lease).await?;
            }
        }
        for (mac, set) in endpoints.local_handover_sets() {
            let value = serde_json::to_vec(&set).unwrap_or_default();
            self.etcd.put(&key("flows", &mac.to_string()), &value, lease).await?;
        }
        self.poll(endpoints).await
    }

    /// Writes the runtime endpoints and attestations of this node, removing the ones
    /// deleted here.
    async fn write_shared(
        &self,
        runtime: &[RuntimeEndpoint],
        attested: &BTreeMap<String, PatchDate>,
    ) -> Result<(), EtcdError> {
        for old in self.etcd.get_prefix(&format!("{KEY_PREFIX}/runtime/")).await? {
            let name = old.key.rsplit('/').next().unwrap_or("");
            if !runtime.iter().any(|r| r.name == name) {
                self.etcd.delete(&old.key).await?;
            }
        }
        for r in runtime {
            self.etcd.put(&key("runtime", &r.name), &serde_json::to_vec(r).unwrap_or_default(), 0).await?;
        }
        for old in self.etcd.get_prefix(&format!("{KEY_PREFIX}/attest/")).await? {
            let name = old.key.rsplit('/').next().unwrap_or("");
            if !attested.contains_key(name) {
                self.etcd.delete(&old.key).await?;
            }
        }
        for (name, date) in attested {
            self.etcd.put(&key("attest", name), date.to_string().as_bytes(), 0).await?;
        }
        Ok(())
    }

    /// Reads where the endpoints are, their flows, and the shared definitions.
    async fn poll(&self, endpoints: &Endpoints) -> Result<(), EtcdError> {
        let locations: Vec<(MacAddr, Location)> = self.get_by_mac("endpoints").await?;
        let flows: Vec<(MacAddr, HandoverSet)> = self.get_by_mac("flows").await?;
        endpoints.merge_remote(locations, flows);
        let runtime: Vec<RuntimeEndpoint> = self
            .etcd
            .get_prefix(&format!("{KEY_PREFIX}/runtime/"))
            .await?
            .into_iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        let attested: BTreeMap<String, PatchDate> = self
            .etcd
            .get_prefix(&format!("{KEY_PREFIX}/attest/"))
            .await?
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.rsplit('/').next()?.to_owned();
                Some((name, String::from_utf8_lossy(&kv.value).parse().ok()?))
            })
            .collect();
        endpoints.merge_shared(runtime, attested);
        Ok(())
    }

    /// The JSON values under `<prefix>/<dir>/<mac>`, by MAC. An entry whose key is not a
    /// MAC or whose value does not decode is logged and left out, never taken as empty.
    async fn get_by_mac<T: serde::de::DeserializeOwned>(&self, dir: &str) -> Result<Vec<(MacAddr, T)>, EtcdError> {
        let entries = self.etcd.get_prefix(&format!("{KEY_PREFIX}/{dir}/")).await?;
        Ok(entries
            .into_iter()
            .filter_map(|kv| {
                let decoded = kv
                    .key
                    .rsplit('/')
                    .next()
                    .and_then(|mac| mac.parse().ok())
                    .zip(serde_json::from_slice(&kv.value).ok());
                if decoded.is_none() {
                    log::warn!("etcd key {} does not hold a MAC's {dir} entry this agent can read; ignored", kv.key);
                }
                decoded
            })
            .collect())
    }
}

/// The nodes etcd knows (for tests and tools).
#[must_use]
pub fn node_key(node: &str) -> String {
    key("nodes", node)
}
