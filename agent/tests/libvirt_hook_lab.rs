//! The libvirt hook (`deploy/libvirt/qemu`, `backplane libvirt-hook`) against a real
//! agent in the lab, fed the domain XML libvirt would give it: `start begin` binds each
//! interface's MAC to its tap, `release end` unbinds, and with no agent a start fails
//! closed unless the failure policy lets it start quarantined.

mod common;

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use backplane_lab::{Lab, Vm};
use common::agent::{Agent, BACKPLANE, copy_example_rules};
use serde_json::Value;

/// web-1 of `rules/examples/inventory`.
const WEB_MAC: &str = "52:54:00:30:00:01";
/// A MAC outside the inventory.
const OTHER_MAC: &str = "52:54:00:30:00:42";
const DOMAIN: &str = "web-1";

/// The domain XML libvirt hands `start begin` for a guest with two interfaces whose taps
/// are the lab's ports `web` (bridge) and `other` (network), as `virsh dumpxml` shows it.
fn domain_xml(lab: &Lab, web: &Vm, other: &Vm) -> String {
    format!(
        r"<domain type='kvm' id='7'>
  <name>{DOMAIN}</name>
  <uuid>0c6a3c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{DOMAIN}.qcow2' index='1'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <interface type='bridge'>
      <mac address='{web_mac}'/>
      <source bridge='{bridge}'/>
      <target dev='{web_port}'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='network'>
      <mac address='{other_mac}'/>
      <source network='default' portid='7f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b' bridge='{bridge}'/>
      <target dev='{other_port}'/>
      <model type='virtio'/>
      <alias name='net1'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </interface>
  </devices>
</domain>
",
        bridge = lab.bridge_name(),
        web_mac = web.mac_string(),
        web_port = web.host_port(),
        other_mac = other.mac_string(),
        other_port = other.host_port(),
    )
}

/// A command whose hook settings come from the test alone, not the machine's environment.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_remove("BACKPLANE_SOCKET").env_remove("BACKPLANE_HOOK_ON_FAILURE").env_remove("BACKPLANE_BIN");
    command
}

/// Runs `command` with `xml` on stdin, as libvirt runs its hook.
fn run_with_stdin(command: &mut Command, xml: &str) -> Output {
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run the hook");
    child.stdin.take().expect("stdin").write_all(xml.as_bytes()).expect("write the domain XML");
    child.wait_with_output().expect("wait for the hook")
}

/// `backplane libvirt-hook --socket SOCKET DOMAIN OP SUB -` with `env`.
fn hook(socket: &Path, op: &str, sub: &str, xml: &str, env: &[(&str, &str)]) -> Output {
    let mut command = clean_command(BACKPLANE);
    command.arg("libvirt-hook").arg("--socket").arg(socket).args([DOMAIN, op, sub, "-"]);
    let out = run_with_stdin(command.envs(env.iter().copied()), xml);
    assert!(out.stdout.is_empty(), "the hook prints nothing on stdout (libvirt reads it as XML): {out:?}");
    out
}

/// `deploy/libvirt/qemu DOMAIN OP SUB -`, as libvirt runs it, with `backplane` as
/// `BACKPLANE_BIN` and the socket as `BACKPLANE_SOCKET`.
fn script(socket: &Path, op: &str, sub: &str, xml: &str) -> Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/libvirt/qemu");
    let mut command = clean_command("sh");
    command.arg(path).args([DOMAIN, op, sub, "-"]);
    let out = run_with_stdin(command.env("BACKPLANE_BIN", BACKPLANE).env("BACKPLANE_SOCKET", socket), xml);
    assert!(out.stdout.is_empty(), "the hook prints nothing on stdout (libvirt reads it as XML): {out:?}");
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The endpoint with `mac` in `backplane endpoint list --json`.
fn endpoint(agent: &Agent, mac: &str) -> Option<Value> {
    let list = agent.cli_json(&["endpoint", "list", "--json"]);
    list.as_array()?.iter().find(|e| e["mac"].as_str().is_some_and(|m| m.eq_ignore_ascii_case(mac))).cloned()
}

/// Whether the endpoint with `mac` is bound to `port` on this node.
fn bound_to(agent: &Agent, mac: &str, port: &str) -> bool {
    endpoint(agent, mac).is_some_and(|e| e["here"] == true && e["port"] == port)
}

/// The host bindings (port, MAC, domain) the agent keeps in its state directory: a MAC
/// outside the inventory is listed as an endpoint only once its port sent from an
/// address, but its binding is kept from the start.
fn host_bindings(lab: &Lab) -> Vec<(String, String, String)> {
    let path = lab.work_dir().join("state").join(backplane::endpoints::STATE_FILE);
    let state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_default()).unwrap_or_default();
    let text = |b: &Value, f: &str| b[f].as_str().unwrap_or_default().to_owned();
    let mut bindings: Vec<_> = state["host_bindings"]
        .as_array()
        .map(|list| list.iter().map(|b| (text(b, "port"), text(b, "mac"), text(b, "domain"))).collect())
        .unwrap_or_default();
    bindings.sort();
    bindings
}

#[test]
fn the_hook_binds_a_starting_guest_and_fails_closed_without_an_agent() {
    let lab = Lab::new("bp");
    let web = lab.add_tap_vm("web", "10.30.0.1/24", None, Some(WEB_MAC));
    let other = lab.add_veth_vm("other", "10.30.0.42/24", None, Some(OTHER_MAC));
    let rules = copy_example_rules(&lab, "inventory");
    let agent = Agent::start(
        &lab,
        &["--rules", rules.to_str().unwrap(), "--node", "n1", "--labels", "jurisdiction=eu", "--metrics-addr", "none"],
    );
    let socket = agent.socket.clone();
    agent.wait_for(Duration::from_secs(10), "both VM ports attached", |a| {
        let status = a.status();
        let names: Vec<&str> =
            status["ports"].as_array()?.iter().filter_map(|p| p["name"].as_str()).collect::<Vec<_>>();
        [web.host_port(), other.host_port()].iter().all(|p| names.contains(p)).then_some(())
    });
    let xml = domain_xml(&lab, &web, &other);

    // `migrate begin` and `prepare begin` come before the taps: nothing is bound.
    for (op, sub) in [("prepare", "begin"), ("migrate", "begin")] {
        let out = script(&socket, op, sub, &xml);
        assert!(out.status.success(), "{op} {sub}: {}", stderr(&out));
        assert!(!bound_to(&agent, WEB_MAC, web.host_port()), "{op} {sub} binds nothing");
    }

    // `start begin`, through the script libvirt runs: both interfaces bound to their taps.
    let out = script(&socket, "start", "begin", &xml);
    assert!(out.status.success(), "start begin failed: {}\nagent log:\n{}", stderr(&out), agent.child.output());
    let web_1 = endpoint(&agent, WEB_MAC).expect("web-1 is listed");
    assert_eq!(web_1["name"], "web-1", "the inventory's endpoint: {web_1:#}");
    assert!(bound_to(&agent, WEB_MAC, web.host_port()), "web-1 bound to {}: {web_1:#}", web.host_port());
    let mut expected = vec![
        (web.host_port().to_owned(), WEB_MAC.to_owned(), DOMAIN.to_owned()),
        (other.host_port().to_owned(), OTHER_MAC.to_owned(), DOMAIN.to_owned()),
    ];
    expected.sort();
    assert_eq!(host_bindings(&lab), expected, "both interfaces bound, the one outside the inventory too");
    // `started begin` binds again: the same bindings, no error.
    let out = hook(&socket, "started", "begin", &xml, &[]);
    assert!(out.status.success(), "started begin: {}", stderr(&out));
    assert!(bound_to(&agent, WEB_MAC, web.host_port()));

    // `stopped end` then `release end`: unbound; the second unbind is no error.
    for (op, sub) in [("stopped", "end"), ("release", "end")] {
        let out = hook(&socket, op, sub, &xml, &[]);
        assert!(out.status.success(), "{op} {sub}: {}", stderr(&out));
        assert!(!bound_to(&agent, WEB_MAC, web.host_port()), "web-1 unbound after {op} {sub}");
        assert_eq!(host_bindings(&lab), [], "no host binding left after {op} {sub}");
    }

    // No agent: a start fails closed, naming the domain, the interface and the socket.
    agent.stop();
    let socket_text = socket.to_string_lossy().into_owned();
    let out = hook(&socket, "start", "begin", &xml, &[("BACKPLANE_HOOK_ON_FAILURE", "closed")]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "closed: {text}");
    assert!(
        text.contains("'web-1'") && text.contains(web.host_port()) && text.contains(&socket_text),
        "the message names the domain, the interface and the socket: {text}"
    );
    // The default is closed too, and the socket may come from the environment.
    let out = script(&socket, "start", "begin", &xml);
    assert_eq!(out.status.code(), Some(1), "closed by default: {}", stderr(&out));
    assert!(stderr(&out).contains(&socket_text), "{}", stderr(&out));

    // start-quarantined: the guest starts, its ports unbound.
    let out = hook(&socket, "start", "begin", &xml, &[("BACKPLANE_HOOK_ON_FAILURE", "start-quarantined")]);
    let text = stderr(&out);
    assert!(out.status.success(), "start-quarantined lets it start: {text}");
    assert!(text.contains("'web-1'") && text.contains("unbound"), "and says so: {text}");

    // A stop, or a guest that already runs, is never failed.
    for (op, sub) in [("release", "end"), ("reconnect", "begin")] {
        let out = hook(&socket, op, sub, &xml, &[("BACKPLANE_HOOK_ON_FAILURE", "closed")]);
        assert!(out.status.success(), "{op} {sub} without an agent: {}", stderr(&out));
    }
}

#[test]
fn the_hook_without_its_binary_keeps_the_policy() {
    // The script alone (no agent, no binary): closed at a start, nothing else failed.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/libvirt/qemu");
    let run = |op: &str, sub: &str, on_failure: &str| {
        let mut command = clean_command("sh");
        command.arg(&path).args([DOMAIN, op, sub, "-"]);
        command.env("BACKPLANE_BIN", "/nonexistent/backplane");
        if !on_failure.is_empty() {
            command.env("BACKPLANE_HOOK_ON_FAILURE", on_failure);
        }
        run_with_stdin(&mut command, "<domain/>")
    };
    let out = run("start", "begin", "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/backplane"), "{out:?}");
    assert!(run("start", "begin", "start-quarantined").status.success());
    assert!(run("release", "end", "").status.success());
    assert!(run("reconnect", "begin", "").status.success());
}
