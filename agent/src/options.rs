//! Everything `backplane run` is told ([`RunOptions`]), checked once, before anything is
//! touched ([`RunOptions::validate`]), and the one place the data path's options are
//! made of them ([`RunOptions::datapath_options`]).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use crate::{
    cluster::etcd::Etcd,
    datapath::{
        DatapathError, DatapathOptions, IngressHook,
        kernel::{TcAttach, TcAttachChoice},
    },
    export::{flow_log::FlowLogOptions, ipfix::IpfixOptions},
    ports::PortSelector,
};

/// Everything `backplane run` is told.
#[derive(Clone, Debug)]
#[expect(clippy::struct_excessive_bools, reason = "each is an independent on/off option of `backplane run`")]
pub struct RunOptions {
    pub interfaces: Vec<String>,
    pub uplinks: Vec<String>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub node: String,
    pub flow_table_size: u32,
    pub ring_size: u32,
    pub idle_timeout: Duration,
    /// Where `from_port` runs on VM ports and on uplinks (`--ingress`, `--uplink-ingress`).
    pub ingress: IngressHook,
    pub uplink_ingress: IngressHook,
    /// How TC programs attach (`--tc-attach`): TCX links, legacy filters, or chosen by
    /// probing the kernel.
    pub tc_attach: TcAttachChoice,
    pub detach_on_exit: bool,
    /// The rule set (a directory of `*.yaml` files, or one file), followed for changes;
    /// `None`: observe only.
    pub rules: Option<PathBuf>,
    /// Lift the rules a previous agent left in force when no `rules` are given.
    pub observe_only: bool,
    /// Size in bytes of the payload sample ring buffer.
    pub payload_ring_size: u32,
    /// Where `/metrics` is served (`--metrics-addr`); `None`: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Whether the metrics address was asked for explicitly: then failing to bind it
    /// ends the start; the default address, when taken, only costs the metrics.
    pub metrics_required: bool,
    /// Whether to turn on the kernel's BPF run statistics while metrics are served.
    pub program_stats: bool,
    /// `--flow-log`: flow starts and ends as JSON lines.
    pub flow_log: Option<FlowLogOptions>,
    /// `--ipfix`: flow records to an IPFIX collector.
    pub ipfix: Option<IpfixOptions>,
    /// This node's labels (`--labels k=v,...`), for zone placement.
    pub labels: BTreeMap<String, String>,
    /// etcd client URLs (`--etcd`); empty: a single node.
    pub etcd: Vec<String>,
    /// Where endpoint state and the audit log live (`--state-dir`).
    pub state_dir: PathBuf,
    /// Install the established flows of arriving endpoints (off: `--no-flow-handover`).
    pub flow_handover: bool,
    /// Block uplinks that cannot be attached while rules are in force (`--guard-uplinks`).
    pub guard_uplinks: bool,
}

impl RunOptions {
    /// Checks every value that does not depend on the machine, before anything is
    /// touched; each error names its argument (the CLI exits 2 with it).
    pub fn validate(&self) -> Result<(), String> {
        validate_node(&self.node).map_err(|e| format!("--node: {e}"))?;
        if self.idle_timeout < Duration::from_secs(1) {
            return Err("--idle-timeout must be at least 1 second".into());
        }
        PortSelector::new(&self.interfaces, &[]).map_err(|e| format!("--interfaces: {e}"))?;
        PortSelector::new(&[], &self.uplinks).map_err(|e| format!("--uplink: {e}"))?;
        let dp = self.datapath_options(TcAttach::Tcx);
        dp.validate().map_err(|e| match e {
            DatapathError::InvalidOption(text) => text,
            other => other.to_string(),
        })?;
        if !self.etcd.is_empty() {
            Etcd::new(&self.etcd).map_err(|e| format!("--etcd: {e}"))?;
        }
        if self.flow_log.as_ref().is_some_and(|f| f.max_bytes == 0) {
            return Err("--flow-log-max-bytes must be at least 1 byte".into());
        }
        Ok(())
    }

    /// The data path's options, with how TC programs attach once that is decided.
    #[must_use]
    pub fn datapath_options(&self, tc_attach: TcAttach) -> DatapathOptions {
        DatapathOptions {
            pin_dir: self.pin_dir.clone(),
            flow_table_size: self.flow_table_size,
            ring_size: self.ring_size,
            payload_ring_size: self.payload_ring_size,
            ingress: self.ingress,
            uplink_ingress: self.uplink_ingress,
            tc_attach,
        }
    }
}

/// A node name names a directory under the pin root: one path component.
fn validate_node(node: &str) -> Result<(), String> {
    if node.is_empty() || node == "." || node == ".." || node.contains('/') || node.contains('\0') {
        return Err(format!("invalid node name {node:?}: it names a directory under the pin root"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_must_be_one_path_component() {
        assert!(validate_node("hv-01").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(validate_node(bad).is_err(), "{bad:?}");
        }
    }
}
