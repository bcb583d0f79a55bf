//! `backplane libvirt-hook`: libvirt's qemu hook (`deploy/libvirt/qemu` runs it).
//!
//! libvirt runs `/etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA` with the
//! domain XML on stdin. When a guest starts, each `<interface>` that has a `<mac>` and a
//! `<target dev>` (its tap) is bound in the agent: the host's word on which endpoint is
//! behind the port (architecture.md, section 2). When the guest stops, its ports are
//! unbound. [`action`] is the table of what each operation does.
//!
//! - A start that cannot be bound (the agent unreachable, or refusing) fails **closed**:
//!   exit 1, and libvirt does not start the guest. [`OnFailure::StartQuarantined`] lets it
//!   start with its ports unbound instead (the rule set's `unbound_ports:` decides what
//!   they get; quarantine by default).
//! - A guest that already runs (`reconnect`, `attach`) is never failed: libvirt kills the
//!   QEMU process of a `reconnect` hook that fails.
//! - stdout stays empty: at `migrate begin`, `restore begin` and in `qemu.d/` libvirt reads
//!   a hook's stdout as the new domain XML. Everything this prints goes to stderr, which
//!   libvirt puts in its error when the hook fails.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Args;
use thiserror::Error;

use crate::{
    control::{Client, ControlError, Request},
    error::report,
    paths::DEFAULT_SOCKET,
};

/// The hook's settings file: `KEY=VALUE` lines. libvirt runs hooks with a cleaned
/// environment, so this file, not libvirtd's environment, is where they are set.
pub const CONFIG_FILE: &str = "/etc/default/backplane-libvirt-hook";

/// The setting (environment, or [`CONFIG_FILE`]) for [`OnFailure`].
pub const ON_FAILURE_KEY: &str = "BACKPLANE_HOOK_ON_FAILURE";

/// The setting (environment, or [`CONFIG_FILE`]) for the agent's control socket.
pub const SOCKET_KEY: &str = "BACKPLANE_SOCKET";

/// How long one request to the agent may take. libvirt waits for its hooks without a
/// limit, and a guest's start waits with it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of stdin read: libvirt's domain XML is kilobytes.
const MAX_DOMAIN_XML: u64 = 16 << 20;

/// Prefix of every line the hook prints (libvirt quotes it in its errors).
const PREFIX: &str = "backplane libvirt-hook";

/// Run by libvirt with the domain XML on stdin (see `deploy/libvirt/qemu`).
#[derive(Debug, Args)]
pub struct LibvirtHookArgs {
    /// The domain's name.
    #[arg(allow_hyphen_values = true)]
    pub domain: String,
    /// libvirt's operation: prepare, start, started, stopped, release, migrate, restore,
    /// reconnect or attach.
    pub operation: String,
    /// libvirt's sub-operation: begin, end or -.
    pub sub_operation: String,
    /// libvirt's extra argument: - or, at `release` (libvirt 10.5 and later), why the
    /// guest stopped.
    #[arg(allow_hyphen_values = true)]
    pub extra: Vec<String>,
    /// The agent's control socket [default: `$BACKPLANE_SOCKET`, else `BACKPLANE_SOCKET` in
    /// /etc/default/backplane-libvirt-hook, else /run/backplane/backplane.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// What an operation asks of the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// A guest starts with its taps made (also one that arrives by migration or is
    /// restored: both come through `start begin`): bind each interface. A failure fails
    /// the start unless [`OnFailure::StartQuarantined`].
    BindStarting,
    /// A guest that already runs (libvirtd restarted, or took over a QEMU it did not
    /// start): bind each interface; a failure is reported, never fatal.
    BindRunning,
    /// The guest stopped: unbind each interface's port.
    Unbind,
    /// Nothing to bind: no taps yet (`prepare`, `migrate` and `restore` come before the
    /// `start begin` that has them), or an operation this hook does not know.
    Nothing,
}

/// The table of libvirt's qemu hook operations (libvirt's docs/hooks.rst).
#[must_use]
pub fn action(operation: &str, sub_operation: &str) -> HookAction {
    match (operation, sub_operation) {
        // `started begin`: a second chance, once QEMU runs.
        ("start" | "started", "begin") => HookAction::BindStarting,
        ("reconnect" | "attach", "begin") => HookAction::BindRunning,
        ("stopped" | "release", "end") => HookAction::Unbind,
        // `restore begin` carries the saved image's XML: its taps are not made yet, and a
        // name it still holds may now be another guest's tap.
        _ => HookAction::Nothing,
    }
}

/// What the hook does when it cannot bind a starting guest's interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Fail the start (exit 1): an operator must choose to run a guest whose port
    /// nobody bound.
    #[default]
    Closed,
    /// Let it start: its ports stay unbound, as the rule set's `unbound_ports:` treats
    /// them (quarantine by default).
    StartQuarantined,
}

impl OnFailure {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "closed" => Some(Self::Closed),
            "start-quarantined" => Some(Self::StartQuarantined),
            _ => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::StartQuarantined => "start-quarantined",
        }
    }
}

/// The hook's settings: `--socket`, else the environment, else [`CONFIG_FILE`], else
/// the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookConfig {
    pub socket: PathBuf,
    pub on_failure: OnFailure,
}

impl HookConfig {
    /// Resolves the settings; returns them with a warning for each value it could not use.
    pub fn resolve(
        socket_arg: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        file: &BTreeMap<String, String>,
    ) -> (Self, Vec<String>) {
        let setting = |key: &str| {
            env(key)
                .filter(|v| !v.is_empty())
                .map(|v| (v, "the environment"))
                .or_else(|| file.get(key).filter(|v| !v.is_empty()).map(|v| (v.clone(), CONFIG_FILE)))
        };
        let mut warnings = Vec::new();
        let socket = match socket_arg {
            Some(path) => path.to_owned(),
            None => setting(SOCKET_KEY).map_or_else(|| PathBuf::from(DEFAULT_SOCKET), |(v, _)| PathBuf::from(v)),
        };
        let on_failure = match setting(ON_FAILURE_KEY) {
            None => OnFailure::default(),
            Some((value, from)) => OnFailure::parse(&value).unwrap_or_else(|| {
                warnings.push(format!(
                    "{ON_FAILURE_KEY}={value} (from {from}) is neither `closed` nor `start-quarantined`; \
                     using closed"
                ));
                OnFailure::Closed
            }),
        };
        (Self { socket, on_failure }, warnings)
    }
}

/// Parses [`CONFIG_FILE`]: `KEY=VALUE` lines (an `export ` before the key and quotes
/// around the value are allowed), `#` comments, blank lines. Returns the settings and a
/// warning for each line it ignored.
#[must_use]
pub fn parse_config(text: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut settings = BTreeMap::new();
    let mut warnings = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let parsed = line.split_once('=').and_then(|(key, value)| {
            let key = key.trim();
            let valid =
                !key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            valid.then(|| (key.to_owned(), unquote(value.trim()).to_owned()))
        });
        match parsed {
            Some((key, value)) => {
                settings.insert(key, value);
            }
            None => warnings.push(format!("{CONFIG_FILE}:{}: not KEY=VALUE; ignored", index + 1)),
        }
    }
    (settings, warnings)
}

fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote).and_then(|v| v.strip_suffix(quote)) {
            return inner;
        }
    }
    value
}

/// One `<devices><interface>` of the domain XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Its `type` attribute (`bridge`, `network`, `ethernet`, `direct`, ...).
    pub kind: String,
    /// `<mac address=...>`.
    pub mac: Option<String>,
    /// `<target dev=...>`: the tap on the host, once libvirt made it.
    pub target: Option<String>,
}

impl Interface {
    /// How messages name it: its tap, else its MAC, else its place in the XML.
    fn describe(&self, index: usize) -> String {
        match (&self.target, &self.mac) {
            (Some(target), Some(mac)) => format!("interface {target} ({mac}, type {})", self.kind),
            (Some(target), None) => format!("interface {target} (type {})", self.kind),
            (None, Some(mac)) => format!("interface {mac} (type {})", self.kind),
            (None, None) => format!("interface #{} (type {})", index + 1, self.kind),
        }
    }
}

/// The domain XML could not be read.
#[derive(Debug, Error)]
pub enum DomainXmlError {
    #[error("reading the domain XML from stdin")]
    Stdin(#[source] std::io::Error),

    #[error("the domain XML on stdin is larger than {MAX_DOMAIN_XML} bytes")]
    TooLarge,

    #[error("the domain XML on stdin is not UTF-8 (byte {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },

    #[error("the domain XML on stdin is not valid XML (line {line}, column {column})")]
    Xml {
        line: u32,
        column: u32,
        #[source]
        source: roxmltree::Error,
    },

    #[error("stdin holds a <{0}>, not a libvirt <domain>")]
    NotADomain(String),
}

/// The interfaces of a libvirt domain XML, in written order.
pub fn parse_interfaces(xml: &str) -> Result<Vec<Interface>, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|source| {
        let pos = source.pos();
        DomainXmlError::Xml { line: pos.row, column: pos.col, source }
    })?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(DomainXmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let child = |node: roxmltree::Node<'_, '_>, name: &str, attribute: &str| {
        node.children()
            .find(|c| c.has_tag_name(name))
            .and_then(|c| c.attribute(attribute))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Ok(root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|devices| devices.children().filter(|n| n.has_tag_name("interface")))
        .map(|iface| Interface {
            kind: iface.attribute("type").unwrap_or("?").to_owned(),
            mac: child(iface, "mac", "address"),
            target: child(iface, "target", "dev"),
        })
        .collect())
}

/// Reads stdin whole (libvirt writes the domain XML there), at most [`MAX_DOMAIN_XML`].
fn read_stdin() -> Result<String, DomainXmlError> {
    let mut bytes = Vec::new();
    std::io::stdin().lock().take(MAX_DOMAIN_XML + 1).read_to_end(&mut bytes).map_err(DomainXmlError::Stdin)?;
    if bytes.len() as u64 > MAX_DOMAIN_XML {
        return Err(DomainXmlError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|e| DomainXmlError::NotUtf8 { valid_up_to: e.utf8_error().valid_up_to() })
}

/// A request to the agent that failed.
#[derive(Debug, Error)]
pub enum CallError {
    #[error(transparent)]
    Control(#[from] ControlError),

    #[error("the agent at {} did not answer within {} s", path.display(), CALL_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
}

/// The agent, as the hook talks to it (a fake one in the tests).
trait Bindings {
    async fn bind(&mut self, port: &str, mac: &str, domain: &str) -> Result<(), CallError>;
    async fn unbind(&mut self, port: &str) -> Result<(), CallError>;
}

/// The agent behind a control socket: one connection per request, as the agent serves.
struct SocketBindings {
    socket: PathBuf,
}

impl SocketBindings {
    async fn call(&self, request: Request) -> Result<(), CallError> {
        let call = async {
            let mut client = Client::connect(&self.socket).await?;
            client.call::<serde_json::Value>(request).await
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(reply) => reply.map(drop).map_err(CallError::from),
            Err(_) => Err(CallError::Timeout { path: self.socket.clone() }),
        }
    }
}

impl Bindings for SocketBindings {
    async fn bind(&mut self, port: &str, mac: &str, domain: &str) -> Result<(), CallError> {
        let request = Request::EndpointBind {
            port: port.to_owned(),
            mac: Some(mac.to_owned()),
            name: None,
            domain: Some(domain.to_owned()),
        };
        self.call(request).await
    }

    async fn unbind(&mut self, port: &str) -> Result<(), CallError> {
        self.call(Request::EndpointUnbind { port: port.to_owned() }).await
    }
}

/// One run of the hook: what it was given and where it reports.
struct Hook<'a> {
    domain: &'a str,
    config: &'a HookConfig,
    /// The lines it printed on stderr (kept for the tests).
    said: Vec<String>,
}

impl Hook<'_> {
    fn say(&mut self, message: impl Into<String>) {
        let message = message.into();
        eprintln!("{PREFIX}: {message}");
        self.said.push(message);
    }

    /// Does what `action` asks for the interfaces of the domain XML; returns the exit
    /// status for libvirt.
    async fn run(&mut self, action: HookAction, xml: Result<String, DomainXmlError>, agent: &mut impl Bindings) -> u8 {
        if action == HookAction::Nothing {
            return 0;
        }
        let interfaces = match xml.and_then(|xml| parse_interfaces(&xml)) {
            Ok(interfaces) => interfaces,
            Err(e) => {
                let fatal = action == HookAction::BindStarting;
                self.say(format!(
                    "domain '{}': {}{}",
                    self.domain,
                    report(&e),
                    if fatal { "; not starting it" } else { "" }
                ));
                return u8::from(fatal);
            }
        };
        let mut ports = Vec::new();
        for (index, iface) in interfaces.iter().enumerate() {
            match (&iface.target, &iface.mac) {
                (Some(target), Some(mac)) => ports.push((target.as_str(), mac.as_str())),
                // At `release end` libvirt may have forgotten a tap it named itself.
                (None, _) if action == HookAction::Unbind => {}
                (None, _) => self.say(format!(
                    "domain '{}': {} has no <target dev> (no tap on the host): not bound",
                    self.domain,
                    iface.describe(index)
                )),
                (Some(_), None) => {
                    self.say(format!(
                        "domain '{}': {} has no <mac address>: not bound",
                        self.domain,
                        iface.describe(index)
                    ));
                }
            }
        }
        match action {
            HookAction::BindStarting | HookAction::BindRunning => self.bind(action, &ports, agent).await,
            HookAction::Unbind => {
                self.unbind(&ports, agent).await;
                0
            }
            HookAction::Nothing => 0,
        }
    }

    async fn bind(&mut self, action: HookAction, ports: &[(&str, &str)], agent: &mut impl Bindings) -> u8 {
        let closed = action == HookAction::BindStarting && self.config.on_failure == OnFailure::Closed;
        let mut bound = Vec::new();
        let mut failed = 0;
        for &(port, mac) in ports {
            match agent.bind(port, mac, self.domain).await {
                Ok(()) => {
                    self.say(format!("domain '{}': {port} bound to {mac}", self.domain));
                    bound.push(port);
                }
                Err(e) => {
                    failed += 1;
                    self.say(format!("domain '{}': cannot bind {port} to {mac}: {}", self.domain, report(&e)));
                    if closed {
                        break;
                    }
                }
            }
        }
        if failed == 0 {
            return 0;
        }
        match action {
            _ if closed => {
                // libvirt stops a guest whose start failed, and calls `stopped` and
                // `release`; the ports bound so far are unbound here in case it does not.
                for port in bound {
                    if let Err(e) = agent.unbind(port).await {
                        self.say(format!("domain '{}': cannot unbind {port} again: {}", self.domain, report(&e)));
                    }
                }
                self.say(format!(
                    "domain '{}' not started (failure policy closed: no guest starts on a port nobody bound; \
                     {ON_FAILURE_KEY}=start-quarantined in {CONFIG_FILE} lets it start with the port \
                     unbound, quarantined)",
                    self.domain
                ));
                1
            }
            HookAction::BindStarting => {
                self.say(format!(
                    "domain '{}' starts with {failed} port(s) unbound ({ON_FAILURE_KEY}=start-quarantined): \
                     the rule set's unbound_ports decides what they reach (quarantine by default)",
                    self.domain
                ));
                0
            }
            _ => {
                self.say(format!(
                    "domain '{}' runs on with {failed} port(s) not bound again (a running guest is never \
                     stopped by this hook)",
                    self.domain
                ));
                0
            }
        }
    }

    /// Unbinds each port; a failure is reported only: the guest is gone either way, and
    /// the agent unbinds a port that goes away by itself.
    async fn unbind(&mut self, ports: &[(&str, &str)], agent: &mut impl Bindings) {
        for &(port, _) in ports {
            match agent.unbind(port).await {
                Ok(()) => self.say(format!("domain '{}': {port} unbound", self.domain)),
                // The agent refusing: the port was not bound (already unbound at `stopped`).
                Err(CallError::Control(ControlError::Agent(reason))) => {
                    self.say(format!("domain '{}': {port} not unbound: the agent says: {reason}", self.domain));
                }
                Err(e) => self.say(format!(
                    "domain '{}': cannot unbind {port}: {}; the agent unbinds a port when it goes away",
                    self.domain,
                    report(&e)
                )),
            }
        }
    }
}

/// `backplane libvirt-hook DOMAIN OPERATION SUB-OPERATION [EXTRA]`.
pub async fn run(args: &LibvirtHookArgs) -> ExitCode {
    // Read whole whatever the operation: libvirt writes the XML to every hook call.
    let xml = read_stdin();
    let (file, mut warnings) = match std::fs::read_to_string(CONFIG_FILE) {
        Ok(text) => parse_config(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (BTreeMap::new(), Vec::new()),
        Err(e) => (BTreeMap::new(), vec![format!("cannot read {CONFIG_FILE}: {e}; using the defaults")]),
    };
    let (config, more) = HookConfig::resolve(args.socket.as_deref(), |key| std::env::var(key).ok(), &file);
    warnings.extend(more);
    let mut hook = Hook { domain: &args.domain, config: &config, said: Vec::new() };
    for warning in warnings {
        hook.say(warning);
    }
    let action = action(&args.operation, &args.sub_operation);
    let mut agent = SocketBindings { socket: config.socket.clone() };
    ExitCode::from(hook.run(action, xml, &mut agent).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running guest as `virsh dumpxml` shows it and libvirt hands `start begin`: two
    /// interfaces with taps, a hostdev one without.
    const RUNNING: &str = r#"<domain type='kvm' id='12'>
  <name>web-1</name>
  <uuid>4f1c7c2e-8d7a-4b3e-9b1a-2c4d5e6f7a8b</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web-1.qcow2' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'>
      <alias name='pcie.0'/>
    </controller>
    <interface type='bridge'>
      <mac address='52:54:00:30:00:01'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:30:00:02'/>
      <source network='default' portid='b6f4c1d2-0a1b-4c2d-8e3f-9a0b1c2d3e4f' bridge='virbr0'/>
      <target dev='vnet7'/>
      <model type='virtio'/>
      <alias name='net1'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </interface>
    <interface type='hostdev' managed='yes'>
      <mac address='52:54:00:30:00:03'/>
      <source>
        <address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/>
      </source>
      <alias name='hostdev0'/>
    </interface>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-4f1c7c2e-8d7a-4b3e-9b1a-2c4d5e6f7a8b</label>
    <imagelabel>libvirt-4f1c7c2e-8d7a-4b3e-9b1a-2c4d5e6f7a8b</imagelabel>
  </seclabel>
</domain>
"#;

    /// What the destination's `migrate begin` gets: the migratable XML, no taps yet.
    const INCOMING: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<domain type='kvm'>
  <name>web-1</name>
  <uuid>4f1c7c2e-8d7a-4b3e-9b1a-2c4d5e6f7a8b</uuid>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='bridge'>
      <mac address='52:54:00:30:00:01'/>
      <source bridge='br0'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:30:00:02'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </interface>
  </devices>
</domain>
"#;

    /// An agent that answers from a script and remembers what it was asked.
    #[derive(Default)]
    struct FakeBindings {
        /// Ports whose bind fails (`None`: every port, as an agent that is not there).
        refuse: Option<Vec<&'static str>>,
        unreachable: bool,
        calls: Vec<String>,
    }

    impl FakeBindings {
        fn refusing(ports: &[&'static str]) -> Self {
            Self { refuse: Some(ports.to_vec()), ..Self::default() }
        }

        fn unreachable() -> Self {
            Self { unreachable: true, ..Self::default() }
        }

        fn fail(&self, port: &str) -> Option<CallError> {
            if self.unreachable {
                let source = std::io::Error::from_raw_os_error(libc::ENOENT);
                return Some(ControlError::Connect { path: "/run/test.sock".into(), source }.into());
            }
            self.refuse
                .as_ref()
                .filter(|ports| ports.contains(&port))
                .map(|_| ControlError::Agent(format!("no port {port}")).into())
        }
    }

    impl Bindings for FakeBindings {
        async fn bind(&mut self, port: &str, mac: &str, domain: &str) -> Result<(), CallError> {
            self.calls.push(format!("bind {port} {mac} {domain}"));
            self.fail(port).map_or(Ok(()), Err)
        }

        async fn unbind(&mut self, port: &str) -> Result<(), CallError> {
            self.calls.push(format!("unbind {port}"));
            if self.unreachable { Err(self.fail(port).unwrap()) } else { Ok(()) }
        }
    }

    fn config(on_failure: OnFailure) -> HookConfig {
        HookConfig { socket: "/run/test.sock".into(), on_failure }
    }

    /// Runs the hook on `xml` with `agent`; returns the exit status and what it said.
    fn hook(op: &str, sub: &str, xml: &str, on_failure: OnFailure, agent: &mut FakeBindings) -> (u8, Vec<String>) {
        let config = config(on_failure);
        let mut hook = Hook { domain: "web-1", config: &config, said: Vec::new() };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let code = rt.block_on(hook.run(action(op, sub), Ok(xml.to_owned()), agent));
        (code, hook.said)
    }

    #[test]
    fn interfaces_of_a_running_domain() {
        let ifaces = parse_interfaces(RUNNING).unwrap();
        let summary: Vec<_> = ifaces.iter().map(|i| (i.kind.as_str(), i.mac.as_deref(), i.target.as_deref())).collect();
        assert_eq!(
            summary,
            [
                ("bridge", Some("52:54:00:30:00:01"), Some("vnet3")),
                ("network", Some("52:54:00:30:00:02"), Some("vnet7")),
                ("hostdev", Some("52:54:00:30:00:03"), None),
            ]
        );
        // The disk's <target dev='vda'> is not an interface's.
        assert!(ifaces.iter().all(|i| i.target.as_deref() != Some("vda")));
    }

    #[test]
    fn incoming_migration_has_no_taps() {
        let ifaces = parse_interfaces(INCOMING).unwrap();
        assert_eq!(ifaces.len(), 2);
        assert!(ifaces.iter().all(|i| i.target.is_none() && i.mac.is_some()), "{ifaces:?}");
        let mut agent = FakeBindings::unreachable();
        assert_eq!(hook("migrate", "begin", INCOMING, OnFailure::Closed, &mut agent), (0, Vec::new()));
        assert!(agent.calls.is_empty(), "migrate begin asks nothing of the agent");
    }

    #[test]
    fn bad_xml_names_line_and_column() {
        let broken = "<domain type='kvm'>\n  <devices>\n    <interface type='bridge'>\n  </devices>\n</domain>\n";
        let e = parse_interfaces(broken).unwrap_err();
        assert!(matches!(e, DomainXmlError::Xml { line: 4, .. }), "{e:?}");
        let text = report(&e);
        assert!(text.starts_with("the domain XML on stdin is not valid XML (line 4, column "), "{text}");

        // Fatal at a start, whatever the failure policy; never after.
        for on_failure in [OnFailure::Closed, OnFailure::StartQuarantined] {
            let (code, said) = hook("start", "begin", broken, on_failure, &mut FakeBindings::default());
            assert_eq!(code, 1);
            assert!(said[0].contains("'web-1'") && said[0].contains("line 4") && said[0].contains("not starting"));
        }
        for (op, sub) in [("release", "end"), ("stopped", "end"), ("reconnect", "begin")] {
            assert_eq!(hook(op, sub, broken, OnFailure::Closed, &mut FakeBindings::default()).0, 0, "{op} {sub}");
        }
        assert!(matches!(parse_interfaces("<network/>"), Err(DomainXmlError::NotADomain(n)) if n == "network"));
        assert!(matches!(parse_interfaces(""), Err(DomainXmlError::Xml { line: 1, .. })));
    }

    #[test]
    fn operations_table() {
        use HookAction::{BindRunning, BindStarting, Nothing, Unbind};
        let table = [
            ("prepare", "begin", Nothing),
            ("start", "begin", BindStarting),
            ("started", "begin", BindStarting),
            ("stopped", "end", Unbind),
            ("release", "end", Unbind),
            ("migrate", "begin", Nothing),
            ("restore", "begin", Nothing),
            ("reconnect", "begin", BindRunning),
            ("attach", "begin", BindRunning),
            ("start", "end", Nothing),
            ("define", "begin", Nothing),
            ("", "", Nothing),
        ];
        for (op, sub, expected) in table {
            assert_eq!(action(op, sub), expected, "{op} {sub}");
        }
    }

    #[test]
    fn a_start_binds_each_tap_and_skips_an_interface_without_one() {
        let mut agent = FakeBindings::default();
        let (code, said) = hook("start", "begin", RUNNING, OnFailure::Closed, &mut agent);
        assert_eq!(code, 0, "{said:?}");
        assert_eq!(agent.calls, ["bind vnet3 52:54:00:30:00:01 web-1", "bind vnet7 52:54:00:30:00:02 web-1"]);
        assert!(
            said.iter().any(|l| l.contains("52:54:00:30:00:03") && l.contains("no <target dev>")),
            "the hostdev interface is named as skipped: {said:?}"
        );

        let mut agent = FakeBindings::default();
        assert_eq!(hook("release", "end", RUNNING, OnFailure::Closed, &mut agent).0, 0);
        assert_eq!(agent.calls, ["unbind vnet3", "unbind vnet7"]);
    }

    #[test]
    fn an_unreachable_agent_fails_a_start_closed() {
        let mut agent = FakeBindings::unreachable();
        let (code, said) = hook("start", "begin", RUNNING, OnFailure::Closed, &mut agent);
        assert_eq!(code, 1);
        assert_eq!(agent.calls, ["bind vnet3 52:54:00:30:00:01 web-1"], "stops at the first failure");
        let failure = said.iter().find(|l| l.contains("cannot bind")).expect("the failure is said");
        assert!(
            failure.contains("'web-1'") && failure.contains("vnet3") && failure.contains("/run/test.sock"),
            "names the domain, the interface and the socket: {failure}"
        );
        assert!(said.last().unwrap().contains("not started"), "{said:?}");

        // Quarantined: every port tried, the start goes on.
        let mut agent = FakeBindings::unreachable();
        let (code, said) = hook("start", "begin", RUNNING, OnFailure::StartQuarantined, &mut agent);
        assert_eq!(code, 0);
        assert_eq!(agent.calls.len(), 2);
        assert!(said.last().unwrap().contains("2 port(s) unbound"), "{said:?}");

        // A running guest is never killed for it.
        for op in ["reconnect", "attach"] {
            assert_eq!(hook(op, "begin", RUNNING, OnFailure::Closed, &mut FakeBindings::unreachable()).0, 0, "{op}");
        }
        // Nor is a stop failed.
        let (code, said) = hook("stopped", "end", RUNNING, OnFailure::Closed, &mut FakeBindings::unreachable());
        assert_eq!(code, 0);
        assert!(said.iter().all(|l| l.contains("cannot unbind")), "{said:?}");
    }

    #[test]
    fn a_refused_bind_undoes_the_ports_bound_before_it() {
        let mut agent = FakeBindings::refusing(&["vnet7"]);
        let (code, _) = hook("started", "begin", RUNNING, OnFailure::Closed, &mut agent);
        assert_eq!(code, 1);
        assert_eq!(
            agent.calls,
            ["bind vnet3 52:54:00:30:00:01 web-1", "bind vnet7 52:54:00:30:00:02 web-1", "unbind vnet3"]
        );
    }

    #[test]
    fn settings_from_argument_environment_and_file() {
        let (file, warnings) = parse_config(
            "# backplane's libvirt hook\n\nexport BACKPLANE_HOOK_ON_FAILURE=\"start-quarantined\"\n\
             BACKPLANE_SOCKET='/run/bp/other.sock'\nBACKPLANE_BIN=/opt/backplane/bin/backplane\nnonsense\n",
        );
        assert_eq!(warnings, [format!("{CONFIG_FILE}:6: not KEY=VALUE; ignored")]);
        assert_eq!(file.get(ON_FAILURE_KEY).map(String::as_str), Some("start-quarantined"));
        assert_eq!(file.get(SOCKET_KEY).map(String::as_str), Some("/run/bp/other.sock"));

        let no_env = |_: &str| None;
        let (c, w) = HookConfig::resolve(None, no_env, &BTreeMap::new());
        assert_eq!((c, w.len()), (config_at(DEFAULT_SOCKET, OnFailure::Closed), 0), "the defaults: closed");
        let (c, _) = HookConfig::resolve(None, no_env, &file);
        assert_eq!(c, config_at("/run/bp/other.sock", OnFailure::StartQuarantined), "the file");
        let env = |key: &str| match key {
            ON_FAILURE_KEY => Some("closed".to_owned()),
            SOCKET_KEY => Some("/run/env.sock".to_owned()),
            _ => None,
        };
        let (c, _) = HookConfig::resolve(None, env, &file);
        assert_eq!(c, config_at("/run/env.sock", OnFailure::Closed), "the environment over the file");
        let (c, _) = HookConfig::resolve(Some(Path::new("/run/arg.sock")), env, &file);
        assert_eq!(c.socket, Path::new("/run/arg.sock"), "--socket over everything");

        // A value it does not know fails safe.
        let typo = |key: &str| (key == ON_FAILURE_KEY).then(|| "start_quarantined".to_owned());
        let (c, w) = HookConfig::resolve(None, typo, &file);
        assert_eq!(c.on_failure, OnFailure::Closed);
        assert!(w[0].contains("start_quarantined") && w[0].contains("the environment"), "{w:?}");
    }

    #[test]
    fn libvirts_arguments() {
        use clap::Parser as _;

        use crate::cli::{Cli, Command};
        let parse = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::LibvirtHook(a)) => (a.domain, a.operation, a.sub_operation, a.extra, a.socket),
            other => panic!("{args:?}: {other:?}"),
        };
        let (domain, op, sub, extra, socket) = parse(&["backplane", "libvirt-hook", "web-1", "start", "begin", "-"]);
        assert_eq!(
            (domain.as_str(), op.as_str(), sub.as_str(), extra, socket),
            ("web-1", "start", "begin", vec!["-".to_owned()], None)
        );
        // As deploy/libvirt/qemu runs it: a domain named like an option is still a name.
        let (domain, _, _, extra, socket) = parse(&[
            "backplane",
            "libvirt-hook",
            "--socket",
            "/run/x.sock",
            "--",
            "--odd",
            "release",
            "end",
            "migrated",
        ]);
        assert_eq!(
            (domain.as_str(), extra, socket),
            ("--odd", vec!["migrated".to_owned()], Some("/run/x.sock".into()))
        );
    }

    fn config_at(socket: &str, on_failure: OnFailure) -> HookConfig {
        HookConfig { socket: socket.into(), on_failure }
    }
}
