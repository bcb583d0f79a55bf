//! The hostile corpus on the wire: a VM writes every frame of it to its port while the
//! agent enforces the three-zones rules. The agent survives and goes on judging; frames
//! that claim the MAC of an endpoint bound to another port are dropped before the
//! bridge (none reaches another VM) and counted as spoofed.

mod common;

use std::time::Duration;

use backplane_lab::{Capture, Lab};
use common::{
    agent::{Agent, copy_example_rules},
    frames::arp,
    hostile::{self, VICTIM_MAC},
};

/// Replaces every occurrence of `from` in `frame` by `to`.
fn replace_mac(frame: &mut [u8], from: [u8; 6], to: [u8; 6]) {
    let mut i = 0;
    while i + 6 <= frame.len() {
        if frame[i..i + 6] == from {
            frame[i..i + 6].copy_from_slice(&to);
            i += 6;
        } else {
            i += 1;
        }
    }
}

#[test]
fn the_agent_survives_the_corpus_and_drops_what_spoofs_a_bound_endpoint() {
    let lab = Lab::new("bp");
    let attacker = lab.add_tap_vm("att", "10.30.0.66/8", None, None);
    let victim = lab.add_veth_vm("victim", "10.30.0.2/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);

    // The victim is a known endpoint, bound to its port once it announces itself.
    let mac = victim.mac_string();
    let added = agent.cli(&["endpoint", "add", "victim", "--mac", &mac, "--ip", "10.30.0.2"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    victim.send_raw_frames(&[arp(0x0806, 1, victim.mac(), [10, 30, 0, 2], [10, 30, 0, 2])]);
    let port = victim.host_port().to_owned();
    agent.wait_for(Duration::from_secs(5), "the victim bound to its port", |a| {
        let list = a.cli_json(&["endpoint", "list", "--json"]);
        list.as_array()?.iter().find(|e| e["name"] == "victim" && e["port"] == port.as_str()).map(|_| ())
    });

    let corpus = hostile::corpus(0x1ab_5eed, 2000);
    let mut frames = Vec::new();
    let mut spoofs = 0u64;
    for seq in &corpus {
        for frame in &seq.frames {
            if frame.len() < 14 {
                continue; // a packet socket cannot send less than an Ethernet header
            }
            let mut frame = frame.clone();
            replace_mac(&mut frame, VICTIM_MAC, victim.mac());
            spoofs += u64::from(seq.spoofs_victim);
            frames.push(frame);
        }
    }
    let spoofed_before = agent.status()["counters"]["spoofed"].as_u64().unwrap();
    let filter = format!("ether src {mac}");
    let at_db = Capture::start_filtered(db.host_port(), &filter);
    let at_victim = Capture::start_filtered(victim.host_port(), &filter);
    attacker.send_raw_frames(&frames);
    std::thread::sleep(Duration::from_millis(500));
    let (at_db, at_victim) = (at_db.stop(), at_victim.stop());
    eprintln!("sent {} frames of {} sequences, {spoofs} claiming the victim's MAC", frames.len(), corpus.len());

    // The agent is alive and answers; it counted every spoofed frame and let none through.
    let status = agent.status();
    let spoofed = status["counters"]["spoofed"].as_u64().unwrap() - spoofed_before;
    assert_eq!(spoofed, spoofs, "every frame claiming the victim's MAC is counted as spoofed");
    assert!(at_db.is_empty(), "{} spoofed frame(s) reached db", at_db.len());
    // The victim itself is quiet meanwhile: anything with its MAC at its port was spoofed.
    assert!(at_victim.is_empty(), "{} spoofed frame(s) reached the victim's port", at_victim.len());
    assert!(status["counters"]["unjudged_dropped"].as_u64().unwrap() > 0, "malformed frames were dropped: {status:#}");
    assert_eq!(status["ports"].as_array().unwrap().len(), 3, "every port still attached");
    // And it goes on judging.
    assert!(victim.ping(db.ip(), 2), "web -> db icmp is allowed");
    assert!(!db.ping(victim.ip(), 1), "db -> web is denied");
    agent.stop();
}
