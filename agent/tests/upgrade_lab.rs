//! An upgrade from the previous release's pinned layout (layout 1: maps directly in the
//! pin directory, as every agent before layout versions pinned them) to this one's,
//! under traffic: the previous release's agent runs the lab, exits leaving its data path
//! attached, and this agent upgrades it in place. An allowed TCP stream goes on without a
//! lost segment, its flow's counters carry on, and a denied flow stays denied throughout
//! (tried again and again while the new agent starts and switches the ports).
//!
//! The previous release is built from git by `cargo xtask test` (the commit is in
//! `xtask/src/previous.rs`), which passes its binary in `BACKPLANE_PREVIOUS`.

mod common;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use backplane_lab::{Capture, Lab};
use common::{
    agent::{Agent, copy_example_rules, field},
    traffic::{Stream, connects},
};

fn previous_release() -> String {
    std::env::var("BACKPLANE_PREVIOUS").unwrap_or_else(|_| {
        panic!("BACKPLANE_PREVIOUS names no binary: run this test through `cargo xtask test`, which builds the previous release")
    })
}

/// (port, ingress link id, egress link id) of each port: what an upgrade must keep.
fn link_ids(agent: &Agent) -> Vec<(String, u64, u64)> {
    agent.port_links().into_iter().map(|(name, ingress, egress, _, _)| (name, ingress, egress)).collect()
}

#[test]
fn the_previous_release_is_upgraded_in_place_under_traffic_and_denied_stays_denied() {
    let previous = previous_release();
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let rules_arg = rules.to_str().unwrap();

    let old = Agent::start_binary(&previous, &lab, &["--rules", rules_arg], false);
    let pin_dir = lab.pin_dir();
    assert!(pin_dir.join("FLOWS").exists(), "the previous release pins its maps in the pin directory itself");
    let stream = Stream::start(&web, &db, 5432);
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows");
    assert!(!connects(&db, &web, 8080), "db -> web is denied");
    let before = old.wait_for(Duration::from_secs(3), "the stream's flow", |a| {
        a.flows().into_iter().find(|f| f["dst_port"] == 5432 && field(f, "rev_packets") > 10)
    });
    let links_before = link_ids(&old);
    assert_eq!(links_before.len(), 2, "{links_before:?}");
    let packets_before = old.status()["counters"]["packets"].as_u64().unwrap();
    old.stop();

    // While the new agent starts and switches the ports, db keeps trying web:8081.
    let capture = Capture::start_filtered(web.host_port(), "tcp port 8081");
    let done = AtomicBool::new(false);
    let retrans_before = stream.retransmits();
    stream.reset_pause();
    let (new, (got_through, attempts)) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut got_through, mut attempts) = (0u32, 0u32);
            while !done.load(Ordering::Relaxed) {
                attempts += 1;
                if connects(&db, &web, 8081) {
                    got_through += 1;
                }
            }
            (got_through, attempts)
        });
        // A failed start must stop the prober too, or the scope would wait for it forever.
        let new = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let new = Agent::start(&lab, &["--rules", rules_arg]);
            std::thread::sleep(Duration::from_secs(2));
            new
        }));
        done.store(true, Ordering::Relaxed);
        let tries = prober.join().expect("the prober");
        (new.unwrap_or_else(|e| std::panic::resume_unwind(e)), tries)
    });
    assert_eq!(got_through, 0, "a denied connection got through during the upgrade");
    assert!(attempts >= 2, "the denied flow was tried during the upgrade ({attempts} times)");
    assert!(capture.stop().is_empty(), "nothing of the denied connections reached web");

    // The same links, the new programs, this layout's maps; the old pins are gone.
    let status = new.status();
    assert_eq!(link_ids(&new), links_before, "the links were never detached: {status:#}");
    for p in status["ports"].as_array().unwrap() {
        assert_eq!(p["from_port_id"], status["program_ids"]["from_port_tc"], "{p:#}");
        assert_eq!(p["to_port_id"], status["program_ids"]["to_port"], "{p:#}");
    }
    let maps_dir = backplane::datapath::pin_layout::maps_dir(&pin_dir, backplane_common::maps::PIN_LAYOUT_VERSION);
    assert!(maps_dir.join("FLOWS").exists(), "this layout's maps in {}", maps_dir.display());
    assert!(!pin_dir.join("FLOWS").exists(), "the previous layout's pins are removed");
    assert!(status["counters"]["packets"].as_u64().unwrap() >= packets_before, "the counters carry on: {status:#}");

    // The stream never stopped, lost nothing, and its flow's counters carry on.
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows on");
    assert_eq!(stream.retransmits(), retrans_before, "no segment of the stream was lost across the upgrade");
    let pause = stream.longest_pause();
    assert!(pause < Duration::from_secs(1), "the stream never paused long: {pause:?}");
    let after = new.wait_for(Duration::from_secs(3), "the stream's flow", |a| {
        a.flows().into_iter().find(|f| f["dst_port"] == 5432 && f["src_ip"] == "10.30.0.1")
    });
    assert!(
        field(&after, "rev_packets") > field(&before, "rev_packets")
            && field(&after, "fwd_packets") >= field(&before, "fwd_packets"),
        "the flow's counters carry on:\nbefore {before:#}\nafter {after:#}"
    );
    assert_eq!(after["first_seen"], before["first_seen"], "the same flow, carried, not made again:\n{after:#}");
    assert_eq!(after["verdict"], "allowed", "{after:#}");
    assert!(!connects(&db, &web, 8082), "db -> web is still denied");
    drop(stream);
    new.stop();
    assert!(!pin_dir.exists(), "--detach-on-exit removes every pin");
}
