//! The hostile corpus on the wire: a VM writes every frame of it to its port while the
//! agent enforces the three-zones rules. The agent survives and goes on judging; frames
//! that claim the MAC of an endpoint bound to another port are dropped before the
//! bridge (none reaches another VM) and counted as spoofed; so are frames that send
//! from or claim (ARP, neighbour discovery) its IP addresses with the sender's own MAC.

mod common;

use std::time::Duration;

use backplane_lab::{Capture, Lab};
use common::{
    agent::{Agent, copy_example_rules},
    frames::{TCP_ACK, TCP_SYN, arp, eth, icmp_echo, ipv4, ipv6, replace_mac, tcp},
    hostile::{self, VICTIM_MAC},
};

#[test]
fn the_agent_survives_the_corpus_and_drops_what_spoofs_a_bound_endpoint() {
    let lab = Lab::new("bp");
    let attacker = lab.add_tap_vm("att", "10.30.0.66/8", None, None);
    let victim = lab.add_veth_vm("victim", "10.30.0.2/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);

    // The attacker VM is an endpoint of the web zone (10.30.0.66), and the host binds its
    // port to it (as the libvirt hook does): whatever else it sends from is not its own.
    let att_mac = attacker.mac_string();
    let added = agent.cli(&["endpoint", "add", "att", "--mac", &att_mac, "--ip", "10.30.0.66", "--zone", "web"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let bound = agent.cli(&["endpoint", "bind", "att", "--port", attacker.host_port()]);
    assert!(bound.status.success(), "{}", String::from_utf8_lossy(&bound.stderr));
    // The victim is a known endpoint, bound to its port once it announces itself.
    let mac = victim.mac_string();
    let added = agent.cli(&["endpoint", "add", "victim", "--mac", &mac, "--ip", "10.30.0.2", "--ip", "fd00:30::2"]);
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
            // The corpus's own MAC is the attacker VM's: the one its port is bound to.
            replace_mac(&mut frame, common::frames::MAC_A, attacker.mac());
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

    // The attacker's own MAC with the victim's addresses: ARP poisoning, neighbour
    // advertisement, and traffic from the victim's address that the rules would allow
    // (web -> db icmp and tcp/5432). None reaches db; each is counted once.
    let (att, victim_ip, db_ip) = (attacker.mac(), [10, 30, 0, 2], db.ip().octets());
    let mut claim = arp(0x0806, 2, att, victim_ip, db_ip);
    claim[0..6].copy_from_slice(&db.mac());
    let victim6: [u8; 16] = "fd00:30::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut advert = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    advert.extend_from_slice(&victim6);
    let mut all_nodes = [0u8; 16];
    all_nodes[..2].copy_from_slice(&[0xff, 0x02]);
    all_nodes[15] = 1;
    let mut advert = eth([0x33, 0x33, 0, 0, 0, 1], att, &[], 0x86dd, &ipv6(victim6, all_nodes, 58, &advert));
    advert[21] = 255;
    let spoofing = vec![
        claim,
        arp(0x0806, 1, att, victim_ip, victim_ip),
        eth(db.mac(), att, &[], 0x0800, &ipv4(victim_ip, db_ip, 1, &icmp_echo(8, 0x77, 1))),
        eth(db.mac(), att, &[], 0x0800, &ipv4(victim_ip, db_ip, 6, &tcp(40000, 5432, TCP_SYN, &[]))),
        advert,
    ];
    // The attacker's own address (web zone) to db: allowed, shows the capture works.
    let honest = eth(db.mac(), att, &[], 0x0800, &ipv4(attacker.ip().octets(), db_ip, 1, &icmp_echo(8, 0x78, 1)));
    let before = agent.status()["counters"]["spoofed_address"].as_u64().unwrap();
    let filter = format!("ether src {} and (ip or arp or ip6)", attacker.mac_string());
    let at_db = Capture::start_filtered(db.host_port(), &filter);
    attacker.send_raw_frames(&spoofing);
    attacker.send_raw_frames(&[honest]);
    std::thread::sleep(Duration::from_millis(500));
    let at_db = at_db.stop();
    let counted = agent.status()["counters"]["spoofed_address"].as_u64().unwrap() - before;
    assert_eq!(counted, spoofing.len() as u64, "every frame with the victim's address is counted as spoofed_address");
    let from_victim_ip: Vec<_> = at_db
        .iter()
        .filter(|p| {
            let f = &p.data;
            let arp_claim = f.len() >= 32 && f[12..14] == [0x08, 0x06] && f[28..32] == victim_ip;
            let ip_from = f.len() >= 30 && f[12..14] == [0x08, 0x00] && f[26..30] == victim_ip;
            let nd_claim = f.len() >= 78 && f[12..14] == [0x86, 0xdd] && f[54] == 136 && f[62..78] == victim6;
            arp_claim || ip_from || nd_claim
        })
        .collect();
    assert!(from_victim_ip.is_empty(), "{} frame(s) with the victim's address reached db", from_victim_ip.len());
    let honest_seen = at_db.iter().filter(|p| p.data.len() >= 34 && p.data[26..30] == attacker.ip().octets()).count();
    assert_eq!(honest_seen, 1, "the attacker's frame from its own address reached db (the capture works)");
    agent.stop();
}

#[test]
fn a_flow_started_from_an_address_before_its_owner_bound_is_cut_once_it_binds() {
    let lab = Lab::new("bp");
    let attacker = lab.add_veth_vm("att", "10.30.0.66/8", None, None);
    let victim = lab.add_veth_vm("victim", "10.30.0.2/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    let added = agent.cli(&["endpoint", "add", "victim", "--mac", &victim.mac_string(), "--ip", "10.30.0.2"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));

    // Not bound yet (it has not announced itself): its address is nobody's, and the
    // attacker's connection from it to db:5432 (allowed for web) goes through.
    let (att, victim_ip, db_ip) = (attacker.mac(), [10, 30, 0, 2], db.ip().octets());
    let segment =
        |flags: u8| eth(db.mac(), att, &[], 0x0800, &ipv4(victim_ip, db_ip, 6, &tcp(40100, 5432, flags, b"x")));
    let capture = Capture::start_filtered(db.host_port(), "tcp src port 40100");
    attacker.send_raw_frames(&[segment(TCP_SYN)]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(capture.stop().len(), 1, "before the victim is bound, its address is anyone's");

    // The victim announces itself and is bound to its port: its address is its port's.
    victim.send_raw_frames(&[arp(0x0806, 1, victim.mac(), victim_ip, victim_ip)]);
    let port = victim.host_port().to_owned();
    agent.wait_for(Duration::from_secs(5), "the victim bound to its port", |a| {
        let list = a.cli_json(&["endpoint", "list", "--json"]);
        list.as_array()?.iter().find(|e| e["name"] == "victim" && e["port"] == port.as_str()).map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(200));

    // The attacker's flow does not go on from its port.
    let before = agent.status()["counters"]["spoofed_address"].as_u64().unwrap();
    let capture = Capture::start_filtered(db.host_port(), "tcp src port 40100");
    attacker.send_raw_frames(&[segment(TCP_ACK), segment(TCP_ACK)]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(capture.stop().is_empty(), "the flow started from the victim's address is cut once the victim is bound");
    let counted = agent.status()["counters"]["spoofed_address"].as_u64().unwrap() - before;
    assert_eq!(counted, 2, "both segments counted as spoofed_address");
    agent.stop();
}
