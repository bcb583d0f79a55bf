//! Reading process and interface statistics from /proc.

use std::collections::BTreeMap;

use anyhow::Context as _;

/// Resident set size of `pid` in bytes (`VmRSS` of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

/// A `kB` field of /proc/PID/status.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) of `pid` and all its threads, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse::<u64>().ok()).context("utime")?
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).context("stime")?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u32::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(ticks as f64 / f64::from(hz))
}

/// Per-interface counters of the calling thread's network namespace
/// (/proc/thread-self/net/dev): name -> (rx packets, rx dropped, tx packets, tx dropped).
pub fn netdev_counters() -> anyhow::Result<BTreeMap<String, [u64; 4]>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").context("read /proc/thread-self/net/dev")?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() >= 12 {
            out.insert(name.trim().to_owned(), [v[1], v[3], v[9], v[11]]);
        }
    }
    Ok(out)
}

/// `Udp: RcvbufErrors` of the calling thread's namespace: datagrams dropped because a
/// socket's receive buffer was full.
pub fn udp_rcvbuf_errors() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").context("read /proc/thread-self/net/snmp")?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().context("Udp header")?, udp.next().context("Udp values")?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors").context("RcvbufErrors")?;
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).context("RcvbufErrors value")
}
