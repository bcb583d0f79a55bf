//! What each fuzz target checks on one input. Shared by the fuzz targets and by the
//! agent's regression tests (`agent/tests/fuzz_regressions.rs`), which replay every
//! input the fuzzers ever found in `agent/fuzz/regressions/<target>/`.

use std::{net::IpAddr, path::Path};

use backplane::flows::{
    events::{FlowEventDecode as _, to_bytes},
    payload,
};
use backplane_common::FlowEvent;
use backplane_rules::{MacAddr, PacketView, ZoneIds, compile, evaluate, parse_rules};

/// A rule file of arbitrary bytes: parsing never panics; a rule set that parses
/// compiles, judges a packet, and its failure rule set compiles and judges too.
pub fn rules_input(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(rules) = parse_rules([(Path::new("fuzz.yaml"), text.as_ref())]) else { return };
    let compiled = compile(&rules, &ZoneIds::new());
    let again = compile(&rules, &compiled.zone_ids);
    assert_eq!(compiled.zone_ids, again.zone_ids, "zone ids are stable across a recompile");
    let packet = PacketView {
        src_mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        dst_mac: MacAddr([0x52, 0x54, 0, 0, 0, 2]),
        src_ip: IpAddr::from([10, 30, 0, 1]),
        dst_ip: IpAddr::from([10, 40, 0, 1]),
        proto: 6,
        dport: 5432,
        src_interface: Some("tap0".into()),
        dst_interface: None,
        src_port: None,
        dst_port: None,
    };
    let _ = evaluate(&rules, &packet);
    let failure = rules.failure_rules();
    let _ = compile(&failure, &compiled.zone_ids);
    let _ = evaluate(&failure, &packet);
}

/// A flow event record of arbitrary bytes: decoding never panics, and what decodes
/// encodes back to the same bytes.
pub fn flow_event_input(data: &[u8]) {
    if let Ok(event) = FlowEvent::from_bytes(data) {
        assert_eq!(to_bytes(&event), data, "a decoded event encodes back to its bytes");
    }
}

/// A payload sample record of arbitrary bytes: decoding and naming never panic, and a
/// name found is printable text of bounded length.
pub fn payload_sample_input(data: &[u8]) {
    if let Ok(sample) = payload::parse_record(data) {
        for name in [&sample.app.dns_query, &sample.app.tls_sni, &sample.app.http_host].into_iter().flatten() {
            assert!(name.len() <= 1024, "a name of {} bytes", name.len());
            assert!(!name.chars().any(char::is_control), "a name with control characters: {name:?}");
        }
    }
    // The parsers on their own, on any bytes.
    let _ = payload::transport(data).map(|t| payload::app_info(&t));
    let _ = payload::dns_query_name(data);
    let _ = payload::tls_server_name(data);
    let _ = payload::http_host(data);
}
