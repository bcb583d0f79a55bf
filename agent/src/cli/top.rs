//! `backplane top`: traffic and drops as a zone-by-zone matrix, refreshed every second.
//!
//! Rows are the zone that started a flow, columns the zone it went to. A cell shows
//! the packets that passed (allowed, observed or audited) and, after a slash, the
//! packets dropped by verdict. The live view shows packets per second between two
//! reads of the agent's status; `--once` shows the totals since the agent started.
//! Colour (ANSI) only when stdout is a terminal and `NO_COLOR` is not set.

use std::{collections::BTreeMap, fmt::Write as _, io::IsTerminal as _, time::Duration};

use crate::{
    cli::TopArgs,
    control::{Client, ControlError, Request},
    status::Status,
};

/// Whether to colour output written to stdout.
#[must_use]
pub fn stdout_wants_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// `text` in an ANSI colour (`code`: 31 red, 32 green, 33 yellow, 2 dim, 1 bold) when `on`.
#[must_use]
pub fn paint(text: &str, code: &str, on: bool) -> String {
    if on { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() }
}

/// Passed and dropped packets by (source zone, destination zone).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matrix {
    pub zones: Vec<String>,
    /// (passed, dropped) packets.
    pub cells: BTreeMap<(String, String), (f64, f64)>,
    /// Dropped packets by reason.
    pub drops_by_reason: BTreeMap<String, f64>,
}

/// Totals since start of one status.
fn totals(s: &Status) -> Matrix {
    let mut m = Matrix::default();
    #[expect(clippy::cast_precision_loss, reason = "packet counts shown to a person")]
    let f = |n: u64| n as f64;
    for t in &s.zone_traffic {
        if t.verdict != "denied" {
            m.cells.entry((t.src_zone.clone(), t.dst_zone.clone())).or_default().0 += f(t.packets);
        }
    }
    for p in s.zone_pairs.iter().filter(|p| p.verdict == "denied") {
        m.cells.entry((p.src_zone.clone(), p.dst_zone.clone())).or_default().1 += f(p.packets);
        *m.drops_by_reason.entry(p.reason.clone()).or_default() += f(p.packets);
    }
    for reason in ["spoofed", "tagged_from_vm_port", "unjudged_dropped", "router_advert_from_vm"] {
        let n = s.counters.get(reason).copied().unwrap_or(0);
        if n > 0 {
            *m.drops_by_reason.entry(reason.to_owned()).or_default() += f(n);
        }
    }
    let mut zones: Vec<String> = m.cells.keys().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    // Zones of the rules in force appear even without traffic.
    zones.sort();
    zones.dedup();
    // `world` (outside every zone) goes last.
    if let Some(i) = zones.iter().position(|z| z == "world") {
        let w = zones.remove(i);
        zones.push(w);
    }
    m.zones = zones;
    m
}

/// The matrix of `now`: totals, or per-second rates since `prev` taken `secs` earlier.
#[must_use]
pub fn matrix(now: &Status, prev: Option<(&Status, f64)>) -> Matrix {
    let mut m = totals(now);
    if let Some((prev, secs)) = prev {
        let before = totals(prev);
        let secs = secs.max(0.001);
        for (k, v) in &mut m.cells {
            let b = before.cells.get(k).copied().unwrap_or_default();
            *v = (((v.0 - b.0).max(0.0)) / secs, ((v.1 - b.1).max(0.0)) / secs);
        }
        for (k, v) in &mut m.drops_by_reason {
            let b = before.drops_by_reason.get(k).copied().unwrap_or_default();
            *v = (*v - b).max(0.0) / secs;
        }
    }
    m
}

/// A count or rate in a few characters: `0`, `12`, `3.4k`, `1.2M`.
#[must_use]
pub fn human(n: f64) -> String {
    if n < 0.05 {
        "0".into()
    } else if n < 10.0 && n.fract() > 0.05 {
        format!("{n:.1}")
    } else if n < 1000.0 {
        format!("{n:.0}")
    } else if n < 1e6 {
        format!("{:.1}k", n / 1e3)
    } else if n < 1e9 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.1}G", n / 1e9)
    }
}

/// The whole screen (or `--once` snapshot).
#[must_use]
pub fn render(now: &Status, prev: Option<(&Status, f64)>, color: bool) -> String {
    let m = matrix(now, prev);
    let mut o = String::new();
    let what = if prev.is_some() { "packets per second" } else { "packets since the agent started" };
    let mode = if now.rules.path.is_some() {
        format!("rules generation {}", now.config_generation)
    } else {
        "observing only (no rules)".into()
    };
    let _ = writeln!(
        o,
        "{}  node {}  {mode}  flows active {}",
        paint("backplane top", "1", color),
        now.node,
        now.flows.stats.active_records
    );
    let _ = writeln!(o, "{what}: passed / {} (rows: from zone, columns: to zone)", paint("dropped", "31", color));
    let _ = writeln!(o);
    if m.zones.is_empty() {
        let _ = writeln!(o, "(no traffic yet)");
        return o;
    }
    let cell = |src: &str, dst: &str| m.cells.get(&(src.to_owned(), dst.to_owned())).copied();
    let width = m
        .zones
        .iter()
        .flat_map(|s| m.zones.iter().map(move |d| (s, d)))
        .filter_map(|(s, d)| cell(s, d).map(|(p, x)| human(p).len() + human(x).len() + 3))
        .chain(m.zones.iter().map(String::len))
        .max()
        .unwrap_or(1)
        .max(5);
    let label = m.zones.iter().map(String::len).max().unwrap_or(4).max("FROM \\ TO".len());
    let mut header = format!("{:<label$}", "FROM \\ TO");
    for z in &m.zones {
        let _ = write!(header, "  {z:>width$}");
    }
    let _ = writeln!(o, "{}", paint(&header, "1", color));
    for src in &m.zones {
        let _ = write!(o, "{src:<label$}");
        for dst in &m.zones {
            let text = match cell(src, dst) {
                None => format!("{:>width$}", "."),
                Some((passed, dropped)) => {
                    let (p, x) = (human(passed), human(dropped));
                    let pad = width.saturating_sub(p.len() + x.len() + 3);
                    let x = if dropped > 0.0 { paint(&x, "31", color) } else { x };
                    format!("{}{p} / {x}", " ".repeat(pad))
                }
            };
            let _ = write!(o, "  {text}");
        }
        let _ = writeln!(o);
    }
    if !m.drops_by_reason.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "dropped by reason:");
        for (reason, n) in &m.drops_by_reason {
            let _ = writeln!(o, "  {reason:<24} {}", human(*n));
        }
    }
    o
}

/// `backplane top`: the zone matrix every second, or once.
pub async fn run(args: &TopArgs) -> Result<(), ControlError> {
    let mut client = Client::connect(&args.socket).await?;
    let first: Status = client.call(Request::Status).await?;
    if args.once {
        print!("{}", render(&first, None, false));
        return Ok(());
    }
    let color = stdout_wants_color();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (mut prev, mut at) = (first, std::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now: Status = Client::connect(&args.socket).await?.call(Request::Status).await?;
        let secs = at.elapsed().as_secs_f64();
        let screen = render(&now, Some((&prev, secs)), color);
        if tty {
            // Home, clear the screen, draw.
            print!("\x1b[H\x1b[2J{screen}");
        } else {
            println!("{screen}");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        (prev, at) = (now, std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ZonePairStatus, ZoneTrafficStatus};

    fn traffic(src: &str, dst: &str, verdict: &str, packets: u64) -> ZoneTrafficStatus {
        ZoneTrafficStatus { src_zone: src.into(), dst_zone: dst.into(), verdict: verdict.into(), packets, bytes: 0 }
    }

    fn status(web_db: u64, db_web_denied: u64) -> Status {
        Status {
            node: "hv1".into(),
            zone_traffic: vec![traffic("web", "db", "allowed", web_db), traffic("db", "web", "denied", db_web_denied)],
            zone_pairs: vec![ZonePairStatus {
                src_zone: "db".into(),
                dst_zone: "web".into(),
                verdict: "denied".into(),
                reason: "default_inter_zone".into(),
                packets: db_web_denied,
                bytes: 0,
            }],
            ..Status::default()
        }
    }

    #[test]
    fn totals_and_rates() {
        let out = render(&status(1200, 3), None, false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("packets since the agent started"), "{out}");
        let header = lines.iter().find(|l| l.starts_with("FROM")).unwrap();
        assert!(header.contains("db") && header.contains("web"), "{out}");
        let db_row = lines.iter().find(|l| l.starts_with("db ")).unwrap();
        // db -> web: nothing passed, 3 dropped; db -> db: no traffic.
        assert!(db_row.contains("0 / 3") && db_row.contains('.'), "{db_row}");
        let web_row = lines.iter().find(|l| l.starts_with("web")).unwrap();
        assert!(web_row.contains("1.2k / 0"), "{web_row}");
        assert!(out.contains("default_inter_zone"), "{out}");
        assert!(!out.contains('\x1b'), "no colour unless asked");

        let rates = render(&status(1400, 13), Some((&status(1200, 3), 2.0)), true);
        assert!(rates.contains("packets per second"), "{rates}");
        assert!(rates.contains("100 / 0"), "{rates}");
        assert!(rates.contains("0 / \x1b[31m5\x1b[0m"), "{rates}");
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(2.5), "2.5");
        assert_eq!(human(12.0), "12");
        assert_eq!(human(12_345.0), "12.3k");
        assert_eq!(human(2_500_000.0), "2.5M");
    }
}
