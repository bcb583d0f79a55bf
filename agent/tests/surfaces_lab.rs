//! The agent's own surfaces: the capabilities it keeps while it runs, a control socket
//! that serves root only, and metrics on loopback unless told otherwise.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::Duration,
};

use backplane_lab::{Lab, wait_for_socket};
use common::agent::{Agent, BACKPLANE, copy_example_rules};

/// `CAP_NET_ADMIN` (12), `CAP_SYS_ADMIN` (21), `CAP_PERFMON` (38), `CAP_BPF` (39).
const KEPT: u64 = (1 << 12) | (1 << 21) | (1 << 38) | (1 << 39);

/// A `Name:\tvalue` line of a `/proc/.../status` file.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_owned()
}

fn hex(value: &str) -> u64 {
    u64::from_str_radix(value, 16).unwrap_or_else(|e| panic!("{value}: {e}"))
}

#[test]
fn the_running_agent_keeps_only_the_capabilities_it_needs() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.30.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(hex(&status_field(&status, set)), KEPT, "{set}: {status}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(hex(&status_field(&status, set)), 0, "{set}: {status}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    // Every thread, not only the main one.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().collect();
    assert!(tasks.len() > 1, "the agent runs threads");
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        assert_eq!(hex(&status_field(&status, "CapEff")), KEPT, "thread {:?}", task.file_name());
        assert_eq!(hex(&status_field(&status, "CapPrm")), KEPT, "thread {:?}", task.file_name());
    }

    // With what it kept it still does its work: attach a port that arrives, judge its
    // traffic, put a reload in force.
    let b = lab.add_veth_vm("b", "10.40.0.1/8", None, None);
    let port = b.host_port().to_owned();
    agent.wait_for(Duration::from_secs(2), "the new port attached", |ag| {
        ag.status()["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == port.as_str())).then_some(())
    });
    assert!(a.ping(b.ip(), 2), "web -> db icmp is allowed");
    assert!(!b.ping(a.ip(), 1), "db -> web is denied");
    std::fs::write(
        rules.join("reload.yaml"),
        "policies:\n  - { name: db-to-web, from: db, to: web, allow: [ { proto: icmp } ] }\n",
    )
    .unwrap();
    agent
        .wait_for(Duration::from_secs(3), "generation 2", |ag| (ag.status()["rules"]["generation"] == 2).then_some(()));
    assert!(b.ping(a.ip(), 2), "db -> web icmp is allowed after the reload");
    agent.stop();
}

#[test]
fn the_control_socket_serves_root_only() {
    let lab = Lab::new("bp");
    let _a = lab.add_veth_vm("a", "10.77.0.1/24", None, None);
    let agent = Agent::start(&lab, &[]);
    let socket = agent.socket.clone();
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BACKPLANE, "status", "--socket"])
            .arg(&socket)
            .output()
            .expect("run setpriv")
    };
    // The socket file is root's (mode 0600): the kernel refuses the connection.
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let out = as_nobody();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("Permission denied") && text.contains("the control socket is for root only"), "{text}");
    // Even through a socket opened to everyone, the agent serves only peer uid 0.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("permission denied: uid 65534 is not root (uid 0)"), "{text}");
    assert!(out.stdout.is_empty(), "no status leaked: {}", String::from_utf8_lossy(&out.stdout));
    assert!(agent.child.output().contains("refused a control client with uid 65534"), "the refusal is logged");
    assert!(agent.cli(&["status", "--json"]).status.success(), "root is served");
    agent.stop();
}

/// Listening TCP sockets in a VM's namespace on `port`, as `ss` prints their address.
fn listeners(vm: &backplane_lab::Vm, port: u16) -> Vec<String> {
    let out = vm.run(&["ss", "-ltnH"]);
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|a| a.ends_with(&format!(":{port}")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn metrics_listen_on_loopback_unless_told_otherwise() {
    let lab = Lab::new("bp");
    // The agent runs in a namespace of its own, where the default port is free.
    let node = lab.add_veth_vm("node", "10.78.0.1/24", None, None);
    let socket = lab.work_dir().join("node.sock");
    let pin_dir = lab.pin_dir();
    let state = lab.work_dir().join("state");
    let command_line = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [BACKPLANE, "run", "--interfaces", "nothing*", "--detach-on-exit"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for (flag, path) in [("--socket", &socket), ("--pin-dir", &pin_dir), ("--state-dir", &state)] {
            v.push(flag.to_owned());
            v.push(path.to_string_lossy().into_owned());
        }
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    for (extra, wanted) in [(&[][..], "127.0.0.1:9469"), (&["--metrics-addr", "0.0.0.0:9469"][..], "0.0.0.0:9469")] {
        let words = command_line(extra);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let mut agent = node.spawn(&words);
        assert!(wait_for_socket(&mut agent, &socket, Duration::from_secs(30)), "{}", agent.output());
        assert_eq!(listeners(&node, 9469), [wanted], "{extra:?}: {}", agent.output());
        if wanted.starts_with("127.") {
            let body = node.in_netns(|| {
                let mut s = TcpStream::connect("127.0.0.1:9469").expect("connect to the metrics");
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                body
            });
            assert!(body.starts_with("HTTP/1.1 200") && body.contains("backplane_packets_total"), "{body}");
        }
        let status = agent.stop();
        assert!(status.success(), "{}", agent.output());
    }
}
