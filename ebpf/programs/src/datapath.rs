//! What both programs do with a frame: parse, count, track, judge.

use backplane_common::{DatapathConfig, config::CONFIG_INDEX, reason::Counter};

use crate::{
    conntrack::{self, Action, Hook},
    counters,
    frame::Frame,
    maps::CONFIG,
    parse::{self, Packet, Parsed},
};

#[inline(always)]
pub fn handle<F: Frame>(frame: &F, ifindex: u32, hook: Hook) -> Action {
    let len = frame.frame_len();
    if hook == Hook::FromPort {
        counters::inc(Counter::Packets);
        counters::add(Counter::Bytes, u64::from(len));
    }
    let mut packet = Packet::new();
    match parse::parse(frame, &mut packet) {
        Parsed::Flow => {
            let cfg = match CONFIG.get(CONFIG_INDEX) {
                Some(cfg) => *cfg,
                None => DatapathConfig::default(),
            };
            let action = conntrack::track(&cfg, &packet, len, ifindex, hook);
            if action == Action::Drop {
                counters::inc(Counter::Dropped);
            }
            action
        }
        Parsed::Announce(announce) => {
            if hook == Hook::FromPort {
                counters::inc(if announce.rarp { Counter::Rarp } else { Counter::Arp });
            }
            Action::Pass
        }
        Parsed::Skip(reason) => {
            if hook == Hook::FromPort {
                counters::inc(reason);
            }
            Action::Pass
        }
    }
}
