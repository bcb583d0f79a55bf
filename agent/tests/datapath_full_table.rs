//! A full flow table: the LRU evicts, and every new flow still gets the right verdict
//! (a denied zone pair stays denied, an allowed one passes), however many flows churn
//! through a table sized far below them.

mod common;

use std::path::Path;

use aya::maps::{Array, MapData};
use backplane::datapath::rule_tables::{RuleTables, activate, next_slot};
use backplane_common::{DatapathConfig, maps::CONFIG, reason::Counter};
use backplane_rules::{ZoneIds, compile, parse_rules};
use common::{datapath::TestDatapath, frames::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TABLE: u32 = 64;

#[test]
fn verdicts_stay_right_while_the_lru_evicts() {
    let rules = parse_rules([(
        Path::new("full.yaml"),
        "zones:\n  a:\n    members: [ { cidr: 10.1.0.0/16 } ]\n  b:\n    members: [ { cidr: 10.2.0.0/16 } ]\n\
         policies:\n  - { name: a-to-b, from: a, to: b, allow: [ { proto: tcp, ports: [80] } ] }\n",
    )])
    .expect("rules");
    let compiled = compile(&rules, &ZoneIds::new());
    let mut dp = TestDatapath::load(TABLE);
    let mut tables = RuleTables::from_ebpf(&mut dp.ebpf).unwrap();
    let mut config: Array<MapData, DatapathConfig> = Array::try_from(dp.ebpf.take_map(CONFIG).unwrap()).unwrap();
    let slot = next_slot(&config.get(&0, 0).unwrap());
    tables.write_slot(slot, &compiled).unwrap();
    activate(&mut config, slot, &compiled).unwrap();

    let flows = 20 * TABLE;
    for i in 0..flows {
        let [_, _, hi, lo] = i.to_be_bytes();
        let a = [10, 1, hi, lo];
        let b = [10, 2, 0, 1];
        let sport = 1024 + u16::from_be_bytes([hi, lo]);
        // a -> b on 80 is allowed; b -> a is a new flow the policy denies.
        assert_eq!(dp.from_port(&tcp4(a, sport, b, 80, TCP_SYN)), XDP_PASS, "allowed flow {i}");
        let back = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(b, a, 6, &tcp(sport, 22, TCP_SYN, &[])));
        assert_eq!(dp.from_port(&back), XDP_DROP, "denied flow {i}");
    }
    let entries = dp.flows().len() as u64;
    let created = dp.counter(Counter::FlowsCreated);
    assert_eq!(created, u64::from(2 * flows), "every flow was created");
    assert!(entries <= u64::from(TABLE) + 2 * 64, "the table stays near its size: {entries}");
    let evicted = created - entries;
    assert!(evicted >= u64::from(2 * flows - TABLE - 128), "the LRU evicted {evicted} of {created}");
    assert_eq!(dp.counter(Counter::FlowInsertFailed), 0, "an LRU insert never fails");
}
