//! What the clients print: the tables of `flows`, `endpoint list` and `audit`, the lines
//! of `flows --follow`, and the human view of `status`.

use std::fmt::Write as _;

use backplane_common::Counter;

use crate::{
    cli::top::paint,
    clock::rfc3339_ms,
    endpoints::{arrival::ArrivalKind, audit::AuditRecord, model::EndpointInfo},
    flows::{FlowRecord, FollowEvent, FollowMessage},
    status::Status,
};

/// The table of `backplane endpoint list`.
#[must_use]
pub fn render_endpoints(list: &[EndpointInfo]) -> String {
    let mut rows: Vec<[String; 8]> =
        vec![["NAME", "MAC", "ZONE", "STATE", "NODE", "PORT", "PATCHED", "REASONS"].map(String::from)];
    for e in list {
        rows.push([
            e.name.clone(),
            e.mac.clone(),
            e.zone.clone().unwrap_or_else(|| "-".into()),
            e.state.to_string(),
            e.node.clone().unwrap_or_else(|| "-".into()),
            // A port it is not bound to now (another node's, or a port here it left) is
            // where it was last seen, not where it is.
            match (&e.port, e.here) {
                (Some(p), true) => p.clone(),
                (Some(p), false) => format!("{p} (last seen)"),
                (None, _) => "-".into(),
            },
            e.patched_at.clone().unwrap_or_else(|| "unknown".into()),
            if e.reasons.is_empty() { "-".into() } else { e.reasons.join("; ") },
        ]);
    }
    table(&rows, if list.is_empty() { "(no endpoints)\n" } else { "" })
}

/// The table of `backplane audit`.
#[must_use]
pub fn render_audit(records: &[AuditRecord]) -> String {
    let labels = |l: &std::collections::BTreeMap<String, String>| {
        if l.is_empty() {
            String::new()
        } else {
            format!(" [{}]", l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
        }
    };
    let mut out = String::new();
    for r in records {
        let from = r.from_node.as_ref().map(|n| {
            format!(
                " from {n}{}{}",
                r.from_port.as_ref().map(|p| format!(":{p}")).unwrap_or_default(),
                labels(&r.from_labels)
            )
        });
        let to = r.to_node.as_ref().map(|n| {
            format!(
                " to {n}{}{}",
                r.to_port.as_ref().map(|p| format!(":{p}")).unwrap_or_default(),
                labels(&r.to_labels)
            )
        });
        let _ = write!(
            out,
            "{}  {:<19} {}{}{}",
            r.time,
            r.kind,
            r.endpoint,
            from.unwrap_or_default(),
            to.unwrap_or_default()
        );
        if r.kind == ArrivalKind::Move.as_str() {
            let _ = write!(out, "  {} flow(s) carried", r.flows_carried);
            if let Some(ms) = r.handover_ms {
                let _ = write!(out, " in {ms:.2} ms");
            }
        }
        if !r.state.is_empty() {
            let _ = write!(out, "  {}", r.state);
        }
        if !r.detail.is_empty() {
            let _ = write!(out, "  ({})", r.detail);
        }
        out.push('\n');
    }
    if records.is_empty() {
        out.push_str("(no audit records)\n");
    }
    out
}

fn table<const N: usize>(rows: &[[String; N]], empty: &str) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(empty);
    out
}

fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

/// `web->db`, or `-` for a flow no rule set judged.
fn zones_text(r: &FlowRecord) -> String {
    match (&r.src_zone, &r.dst_zone) {
        (Some(src), Some(dst)) => format!("{src}->{dst}"),
        _ => "-".into(),
    }
}

/// The human table of `backplane flows`.
#[must_use]
pub fn render_flows(records: &[FlowRecord]) -> String {
    let header = [
        "PROTO",
        "SOURCE",
        "",
        "DESTINATION",
        "FWD PKTS/BYTES",
        "REV PKTS/BYTES",
        "VERDICT",
        "ZONES",
        "POLICY",
        "INTERFACES",
        "STATE",
    ];
    let mut rows: Vec<[String; 11]> = vec![header.map(String::from)];
    for r in records {
        rows.push([
            r.proto.clone(),
            endpoint(&r.src_ip, r.src_port),
            "->".into(),
            endpoint(&r.dst_ip, r.dst_port),
            format!("{}/{}", r.fwd_packets, r.fwd_bytes),
            format!("{}/{}", r.rev_packets, r.rev_bytes),
            r.verdict.clone(),
            zones_text(r),
            r.policy.clone().unwrap_or_else(|| "-".into()),
            if r.interfaces.is_empty() { "-".into() } else { r.interfaces.join(",") },
            r.state.clone(),
        ]);
    }
    table(&rows, if records.is_empty() { "(no flows)\n" } else { "" })
}

/// One line of `backplane flows --follow`; updates are not shown.
#[must_use]
pub fn render_follow(msg: &FollowMessage) -> Option<String> {
    render_follow_colored(msg, false)
}

/// [`render_follow`], with the event and the verdict in colour when `color`.
#[must_use]
pub fn render_follow_colored(msg: &FollowMessage, color: bool) -> Option<String> {
    if msg.event == FollowEvent::Lagged {
        return Some(format!("-- too slow: missed {} message(s)", msg.missed.unwrap_or(0)));
    }
    let what = msg.event.flow_event_name()?;
    let r = msg.flow.as_ref()?;
    let when = match msg.event {
        FollowEvent::Start => r.first_seen_unix_ms,
        _ => r.last_seen_unix_ms,
    };
    // A start is announced before the kernel table is read: its counters mean nothing yet.
    let counts = if msg.event == FollowEvent::Start {
        String::new()
    } else {
        format!("  fwd {}/{} rev {}/{}", r.fwd_packets, r.fwd_bytes, r.rev_packets, r.rev_bytes)
    };
    let decided = match &r.policy {
        Some(policy) => format!(" {} by {policy}", zones_text(r)),
        None => String::new(),
    };
    let verdict_color = match r.verdict.as_str() {
        "denied" => "31",
        "audit" => "33",
        "allowed" => "32",
        _ => "2",
    };
    let mut names = String::new();
    for (label, name) in [("dns", &r.dns_query), ("sni", &r.tls_sni), ("host", &r.http_host)] {
        if let Some(name) = name {
            let _ = write!(names, "  {label}={name}");
        }
    }
    Some(format!(
        "{}  {} {:<6} {} -> {}{counts}  {}{decided}  [{}]{}{names}",
        paint(&rfc3339_ms(when), "2", color),
        paint(&format!("{what:<7}"), "1", color),
        r.proto,
        endpoint(&r.src_ip, r.src_port),
        endpoint(&r.dst_ip, r.dst_port),
        paint(&r.verdict, verdict_color, color),
        r.interfaces.join(","),
        if r.tcp_flags.is_empty() { String::new() } else { format!("  {}", r.tcp_flags) },
    ))
}

/// The human view of `backplane status`.
#[must_use]
pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "node:          {}", s.node);
    let _ = writeln!(o, "pin dir:       {}", s.pin_dir);
    let _ = writeln!(o, "socket:        {}", s.socket);
    let _ = writeln!(
        o,
        "programs:      from_port_tc id {} (TC ingress), from_port id {} (XDP), to_port id {} (TC egress)",
        s.program_ids.from_port_tc, s.program_ids.from_port, s.program_ids.to_port
    );
    let _ = writeln!(o, "ingress hook:  {} on VM ports, {} on uplinks", s.ingress, s.uplink_ingress);
    let _ = writeln!(o, "tc attach:     {}", s.tc_attach);
    let mode = if s.config_flags & backplane_common::config::CONFIG_ENFORCE != 0 { "enforce" } else { "observe" };
    let _ = writeln!(o, "config:        generation {}, {mode}", s.config_generation);
    let _ =
        writeln!(o, "on exit:       {}", if s.detach_on_exit { "detach and unpin" } else { "stay attached (pinned)" });
    let _ = writeln!(o, "ports ({}):", s.ports.len());
    if s.ports.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for p in &s.ports {
        let _ = writeln!(
            o,
            "  {:<16} ifindex {:<5} {:<7} ingress {:<10} from_port {} to_port {}{}",
            p.name,
            p.ifindex,
            p.role,
            p.ingress,
            p.from_port_id,
            p.to_port_id,
            if p.pinned { "" } else { "  (not pinned)" }
        );
    }
    render_port_guard(&mut o, s);
    let f = &s.flows;
    #[expect(clippy::cast_precision_loss, reason = "a percentage for display")]
    let fill = if f.capacity == 0 { 0.0 } else { f.entries as f64 * 100.0 / f64::from(f.capacity) };
    let _ = writeln!(o, "flow table:    {} / {} entries ({fill:.1}%)", f.entries, f.capacity);
    let _ = writeln!(
        o,
        "flow records:  {} active, {} ended in history; expired {}, evicted {}, history dropped {}, without start event {}",
        f.stats.active_records,
        f.stats.ended_records,
        f.stats.expired,
        f.stats.evicted,
        f.stats.history_dropped,
        f.stats.without_start_event
    );
    let _ = writeln!(
        o,
        "events:        {} start, {} end, {} lost (ring buffer full), {} undecodable",
        f.stats.start_events, f.stats.end_events, s.events_lost, f.stats.decode_errors
    );
    let _ = writeln!(o, "counters:");
    for c in Counter::ALL.iter().filter(|c| !c.is_parse_failure()) {
        let _ = writeln!(o, "  {:<22} {}", c.as_str(), s.counters.get(c.as_str()).copied().unwrap_or(0));
    }
    let _ = writeln!(o, "parse failures:");
    for c in Counter::ALL.iter().filter(|c| c.is_parse_failure()) {
        let _ = writeln!(o, "  {:<22} {}", c.as_str(), s.counters.get(c.as_str()).copied().unwrap_or(0));
    }
    render_rules(&mut o, s);
    render_endpoint_status(&mut o, s);
    o
}

/// The ports that match but are not attached, and the port guard, in `backplane status`.
fn render_port_guard(o: &mut String, s: &Status) {
    let g = &s.port_guard;
    if !g.unattached.is_empty() {
        let _ = writeln!(o, "unattached ports ({}):", g.unattached.len());
    }
    for p in &g.unattached {
        let state = if p.state == "blocked" {
            "BLOCKED".to_owned()
        } else {
            format!("UNGUARDED ({})", p.reason.as_deref().unwrap_or("-"))
        };
        let _ = writeln!(o, "  {:<16} ifindex {:<5} {:<7} {state} since {}", p.name, p.ifindex, p.role, p.since);
        let _ = writeln!(o, "    failing since {}: {}", p.failing_since, p.error);
    }
    let (blocked, _) = g.counts();
    let table = if g.table.is_empty() { "-" } else { g.table.as_str() };
    let state = match (&g.error, g.in_place) {
        (Some(e), _) => format!("UNAVAILABLE since {}: {e}", g.error_since.as_deref().unwrap_or("-")),
        (None, true) => format!("nft table {table}, {blocked} port(s) blocked"),
        (None, false) => format!("nft table {table}, not made (no port needed blocking)"),
    };
    let _ = writeln!(o, "port guard:    {state}");
}

/// The `endpoints` part of `backplane status`.
fn render_endpoint_status(o: &mut String, s: &Status) {
    let e = &s.endpoints;
    let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "node labels:   {}", if labels.is_empty() { "(none)".into() } else { labels.join(",") });
    let _ = writeln!(
        o,
        "endpoints:     {} known, {} here; {} active, {} quarantined, {} isolated; {} move(s) arrived",
        e.total, e.here, e.active, e.quarantined, e.isolated, e.moves
    );
    let _ = writeln!(o, "flow handover: {}", if e.flow_handover { "on" } else { "off (--no-flow-handover)" });
    let _ = writeln!(o, "state dir:     {}", e.state_dir);
    let _ = writeln!(o, "audit log:     {} ({} records)", e.audit_log, e.audit_records);
    let etcd = &e.etcd;
    if etcd.configured {
        let state = if etcd.connected {
            format!("connected, lease {:x}", etcd.lease_id)
        } else {
            "DISCONNECTED (working from local state)".into()
        };
        let _ = writeln!(
            o,
            "etcd:          {} {state} since {}; {} reconnect(s){}",
            etcd.urls.join(","),
            etcd.since.as_deref().unwrap_or("-"),
            etcd.reconnects,
            etcd.last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
        );
    } else {
        let _ = writeln!(o, "etcd:          none (a single node)");
    }
    if !e.alerts.is_empty() {
        let _ = writeln!(o, "alerts:");
        for a in &e.alerts {
            let _ = writeln!(o, "  {a}");
        }
    }
}

/// The `rules` and `zone_pairs` parts of `backplane status`.
fn render_rules(o: &mut String, s: &Status) {
    let r = &s.rules;
    let Some(path) = &r.path else {
        let _ = writeln!(o, "rules:         none: observing only (start the agent with --rules PATH to enforce)");
        return;
    };
    let _ = writeln!(o, "rules:         {path}");
    let _ = writeln!(
        o,
        "  in force:    generation {}, since {}: {} files, {} zones, {} policies",
        r.generation,
        r.loaded_at.as_deref().unwrap_or("-"),
        r.files,
        r.zones,
        r.policies
    );
    match r.in_force_from.as_str() {
        "previous_agent" => {
            let _ = writeln!(
                o,
                "  KEPT:        the generation a previous agent left in force (the rules did not load at start)"
            );
        }
        "failure_mode" => {
            let _ = writeln!(
                o,
                "  FAILURE MODE: the rules did not load at start; the last good copy is in force with on_rules_failure: \
                 closed [{}], open [{}]",
                r.failure_closed.join(","),
                r.failure_open.join(",")
            );
        }
        _ => {}
    }
    if let Some(copy) = &r.last_good_copy {
        let _ = writeln!(o, "  last good:   {copy}");
    }
    let _ = writeln!(o, "  reloads:     {} put in force, {} rejected", r.reloads_ok, r.reloads_rejected);
    if !r.last_error.is_empty() {
        let _ = writeln!(
            o,
            "  last rejection at {} (generation {} stays in force):",
            r.last_error_at.as_deref().unwrap_or("-"),
            r.generation
        );
        for e in &r.last_error {
            let _ = writeln!(o, "    {e}");
        }
    }
    let _ = writeln!(o, "drops and audits by zone pair:");
    if s.zone_pairs.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    let width = s.zone_pairs.iter().map(|p| p.src_zone.len() + p.dst_zone.len() + 2).max().unwrap_or(0);
    for p in &s.zone_pairs {
        let pair = format!("{}->{}", p.src_zone, p.dst_zone);
        let _ =
            writeln!(o, "  {pair:<width$}  {:<7} {:<20} {} packets, {} bytes", p.verdict, p.reason, p.packets, p.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> FlowRecord {
        FlowRecord {
            src_ip: "10.0.0.1".into(),
            dst_ip: "10.0.0.2".into(),
            proto: "icmp".into(),
            src_port: 7,
            dst_port: 7,
            fwd_packets: 3,
            fwd_bytes: 294,
            rev_packets: 3,
            rev_bytes: 294,
            first_seen: rfc3339_ms(0),
            last_seen: rfc3339_ms(2000),
            first_seen_unix_ms: 0,
            last_seen_unix_ms: 2000,
            interfaces: vec!["tap0".into(), "tap1".into()],
            vlan: 0,
            tcp_flags: String::new(),
            state: "active".into(),
            verdict: "observed".into(),
            reason: "no_rules".into(),
            policy: None,
            src_zone: None,
            dst_zone: None,
            dns_query: None,
            tls_sni: None,
            http_host: None,
        }
    }

    #[test]
    fn flow_table_rendering() {
        let out = render_flows(&[record()]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("PROTO"));
        assert!(lines[1].contains("10.0.0.1:7") && lines[1].contains("-> ") && lines[1].contains("3/294"));
        assert!(lines[1].contains("tap0,tap1") && lines[1].ends_with("active"));
        assert!(lines[0].contains("ZONES") && lines[0].contains("POLICY"));
        assert!(render_flows(&[]).contains("(no flows)"));
        let judged = FlowRecord {
            verdict: "denied".into(),
            reason: "default_inter_zone".into(),
            policy: Some("default_inter_zone".into()),
            src_zone: Some("db".into()),
            dst_zone: Some("web".into()),
            ..record()
        };
        let out = render_flows(std::slice::from_ref(&judged));
        let row = out.lines().nth(1).unwrap();
        assert!(row.contains("denied") && row.contains("db->web") && row.contains("default_inter_zone"), "{row}");
        let msg = FollowMessage { event: FollowEvent::Start, flow: Some(judged), missed: None };
        assert!(render_follow(&msg).unwrap().contains("denied db->web by default_inter_zone"));
        let msg = FollowMessage { event: FollowEvent::Start, flow: Some(record()), missed: None };
        assert!(render_follow(&msg).unwrap().contains("start   icmp   10.0.0.1:7 -> 10.0.0.2:7"));
        let upd = FollowMessage { event: FollowEvent::Update, ..msg };
        assert!(render_follow(&upd).is_none());
        assert_eq!(endpoint("fd00::1", 80), "[fd00::1]:80");
    }

    #[test]
    fn status_shows_rules_and_zone_pairs() {
        let observe = render_status(&Status::default());
        assert!(observe.contains("rules:         none: observing only"), "{observe}");
        let status = Status {
            rules: crate::rules::RulesStatus {
                path: Some("/etc/backplane/rules".into()),
                generation: 2,
                loaded_at: Some(rfc3339_ms(0)),
                files: 3,
                zones: 3,
                policies: 6,
                reloads_ok: 1,
                reloads_rejected: 1,
                last_error: vec!["broken.yaml:4:9: unknown zone \"nowhere\" in to".into()],
                last_error_at: Some(rfc3339_ms(1000)),
                ..crate::rules::RulesStatus::default()
            },
            zone_pairs: vec![crate::status::ZonePairStatus {
                src_zone: "db".into(),
                dst_zone: "web".into(),
                verdict: "denied".into(),
                reason: "default_inter_zone".into(),
                packets: 3,
                bytes: 222,
            }],
            ..Status::default()
        };
        let out = render_status(&status);
        assert!(out.contains("generation 2, since 1970-01-01T00:00:00.000Z: 3 files, 3 zones, 6 policies"), "{out}");
        assert!(out.contains("1 put in force, 1 rejected"), "{out}");
        assert!(out.contains("    broken.yaml:4:9: unknown zone"), "{out}");
        assert!(out.contains("db->web  denied  default_inter_zone   3 packets, 222 bytes"), "{out}");
        assert!(!out.contains("FAILURE MODE") && !out.contains("KEPT"), "{out}");
        let mut failing = status.clone();
        failing.rules.in_force_from = "failure_mode".into();
        failing.rules.failure_closed = vec!["world".into(), "web".into()];
        failing.rules.failure_open = vec!["db".into()];
        failing.rules.last_good_copy = Some("/var/lib/backplane/hv1/rules.last-good".into());
        let out = render_status(&failing);
        assert!(out.contains("FAILURE MODE") && out.contains("closed [world,web], open [db]"), "{out}");
        assert!(out.contains("last good:   /var/lib/backplane/hv1/rules.last-good"), "{out}");
        failing.rules.in_force_from = "previous_agent".into();
        assert!(render_status(&failing).contains("KEPT:"), "{out}");
    }

    #[test]
    fn status_shows_unattached_ports_and_the_port_guard() {
        use crate::ports::guard::{PortGuardStatus, UnattachedPort};
        let out = render_status(&Status::default());
        assert!(!out.contains("unattached ports"), "{out}");
        assert!(out.contains("port guard:    nft table -, not made"), "{out}");
        let port = UnattachedPort {
            name: "vnet7".into(),
            ifindex: 12,
            role: "vm".into(),
            error: "interface vnet7 (ifindex 12): cannot attach from_port: busy".into(),
            failing_since: rfc3339_ms(0),
            state: "blocked".into(),
            since: rfc3339_ms(2000),
            reason: None,
        };
        let status = Status {
            port_guard: PortGuardStatus {
                table: "bridge backplane_hv1".into(),
                in_place: true,
                unattached: vec![
                    port.clone(),
                    UnattachedPort {
                        name: "vnet8".into(),
                        ifindex: 13,
                        state: "unguarded".into(),
                        reason: Some("observing only".into()),
                        ..port
                    },
                ],
                ..PortGuardStatus::default()
            },
            ..Status::default()
        };
        let out = render_status(&status);
        assert!(out.contains("unattached ports (2):"), "{out}");
        assert!(out.contains("vnet7            ifindex 12    vm      BLOCKED since 1970-01-01T00:00:02.000Z"), "{out}");
        assert!(
            out.contains("failing since 1970-01-01T00:00:00.000Z: interface vnet7 (ifindex 12): cannot attach"),
            "{out}"
        );
        assert!(out.contains("vnet8") && out.contains("UNGUARDED (observing only)"), "{out}");
        assert!(out.contains("port guard:    nft table bridge backplane_hv1, 1 port(s) blocked"), "{out}");
        let mut broken = status;
        broken.port_guard.error = Some("cannot run nft".into());
        assert!(render_status(&broken).contains("port guard:    UNAVAILABLE since -: cannot run nft"));
    }
}
