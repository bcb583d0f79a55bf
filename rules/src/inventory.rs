//! The endpoint inventory and what zones say about their endpoints: patch dates and
//! their maximum age, remediation zones, placement on nodes, zones that must not share a
//! node, and virtual patches.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use crate::types::{MacAddr, PortRange, Proto, SourcePos};

/// An endpoint of the inventory (`endpoints:`): a VM known by its MAC.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: String,
    /// The endpoint's identity: it follows the MAC wherever it is seen.
    pub mac: MacAddr,
    pub ips: Vec<IpAddr>,
    /// The zone written in the inventory; without it the zone comes from the MAC and
    /// CIDR members (see [`crate::RuleSet::endpoint_zone`]).
    pub zone: Option<String>,
    pub tags: Vec<String>,
    /// When the endpoint was last patched; `None`: unknown.
    pub patched_at: Option<PatchDate>,
    /// MACs its port may send from besides `mac` (a VRRP virtual MAC): frames with them
    /// are the endpoint's.
    pub allowed_macs: Vec<MacAddr>,
    /// Addresses it may send from besides `ips` (a virtual IP it shares with a peer, as
    /// Neutron's allowed address pairs): still inside its zone's networks, and nobody's
    /// `ips`.
    pub allowed_addresses: Vec<IpAddr>,
    pub location: SourcePos,
}

/// What a zone does when one of its endpoints runs on a node its `placement` forbids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnViolation {
    /// Record and report it (audit log, agent log, status).
    #[default]
    Alert,
    /// Also isolate the endpoint: all its traffic is denied while it stays there.
    Isolate,
}

impl OnViolation {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Isolate => "isolate",
        }
    }
}

/// What a zone does with a MAC that is not in the inventory when it appears on a port
/// of the zone (an `interface` member).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownMacs {
    /// Quarantine it (the default for zones that have inventory endpoints).
    #[default]
    Quarantine,
    /// Let it be judged as any other address.
    Allow,
}

/// The endpoint settings of a zone.
#[derive(Clone, Debug, Default)]
pub struct ZoneEndpoints {
    /// Endpoints patched longer ago than this (or never, as far as the inventory
    /// knows) are quarantined.
    pub max_patch_age: Option<PatchAge>,
    /// Quarantined endpoints may reach this zone (and be reached from it).
    pub remediation: bool,
    /// Node labels the zone's endpoints may run on: label → allowed values.
    pub placement: BTreeMap<String, Vec<String>>,
    pub on_violation: OnViolation,
    /// Zones whose endpoints must not run on a node with this zone's.
    pub must_not_share_node_with: Vec<String>,
    /// `unknown_macs`, if written; see [`crate::RuleSet::unknown_macs`].
    pub unknown_macs: Option<UnknownMacs>,
}

impl ZoneEndpoints {
    /// Whether a node with these labels may host the zone's endpoints; the labels that
    /// break the rule otherwise (`jurisdiction=us (allowed: eu)`).
    #[must_use]
    pub fn placement_violations(&self, labels: &BTreeMap<String, String>) -> Vec<String> {
        self.placement
            .iter()
            .filter_map(|(label, allowed)| match labels.get(label) {
                Some(v) if allowed.contains(v) => None,
                Some(v) => Some(format!("{label}={v} (allowed: {})", allowed.join(", "))),
                None => Some(format!("{label} unset (allowed: {})", allowed.join(", "))),
            })
            .collect()
    }
}

/// A duration in whole days, written `30d`, `4w` or `720h` (a multiple of 24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PatchAge {
    pub days: u32,
}

impl FromStr for PatchAge {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a duration; write a number of days, weeks or hours: 30d, 4w, 720h");
        let unit = s.chars().last().ok_or_else(bad)?;
        let number: u32 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
        let days = match unit {
            'd' => Some(number),
            'w' => number.checked_mul(7),
            'h' if number.is_multiple_of(24) => Some(number / 24),
            'h' => return Err(format!("\"{s}\" is not a whole number of days; patch ages count days")),
            _ => return Err(bad()),
        };
        days.map(|days| Self { days }).ok_or_else(|| format!("\"{s}\" is too long"))
    }
}

impl fmt::Display for PatchAge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}d", self.days)
    }
}

/// A calendar date, `YYYY-MM-DD` (proleptic Gregorian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PatchDate {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

impl PatchDate {
    /// Days since 1970-01-01.
    #[must_use]
    pub fn days_since_epoch(self) -> i64 {
        // Howard Hinnant's days_from_civil.
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date of a number of days since 1970-01-01.
    #[must_use]
    pub fn from_days_since_epoch(days: i64) -> Self {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = u8::try_from(doy - (153 * mp + 2) / 5 + 1).expect("1-31");
        let month = u8::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("1-12");
        let year = i32::try_from(yoe + era * 400 + i64::from(month <= 2)).unwrap_or(i32::MAX);
        Self { year, month, day }
    }

    /// How many days old a patch of this date is on `today` (negative: in the future).
    #[must_use]
    pub fn age_days(self, today: Self) -> i64 {
        today.days_since_epoch() - self.days_since_epoch()
    }
}

impl FromStr for PatchDate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a date; expected YYYY-MM-DD, like 2024-05-01");
        let parts: Vec<&str> = s.split('-').collect();
        if parts.len() != 3 || parts[0].len() != 4 || parts[1].len() != 2 || parts[2].len() != 2 {
            return Err(bad());
        }
        if !parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad());
        }
        let year: i32 = parts[0].parse().map_err(|_| bad())?;
        let month: u8 = parts[1].parse().map_err(|_| bad())?;
        let day: u8 = parts[2].parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) {
            return Err(format!("\"{s}\" has no month {month}; expected YYYY-MM-DD"));
        }
        let date = Self { year, month, day };
        if day == 0 || Self::from_days_since_epoch(date.days_since_epoch()) != date {
            return Err(format!("\"{s}\" is not a day of the calendar"));
        }
        Ok(date)
    }
}

impl fmt::Display for PatchDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// A virtual patch (`virtual_patches:`): traffic denied to and from every endpoint that
/// carries its tag, before zone policy.
#[derive(Clone, Debug)]
pub struct VirtualPatch {
    pub name: String,
    pub tag: String,
    pub deny: Vec<DenyEntry>,
    pub location: SourcePos,
}

/// One `deny` entry of a virtual patch: a protocol and, for tcp/udp/sctp, ports.
#[derive(Clone, Debug)]
pub struct DenyEntry {
    pub proto: Proto,
    /// Empty: every port of the protocol.
    pub ports: Vec<PortRange>,
    pub location: SourcePos,
}

/// Checks an endpoint name as the inventory does (for endpoints added at run time).
pub fn check_endpoint_name(name: &str) -> Result<(), String> {
    check_name("endpoint name", name)
}

/// Endpoint, tag and label names: 1-63 of `[A-Za-z0-9._-]`, starting alphanumeric.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a valid {what}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let d: PatchDate = "2024-02-29".parse().unwrap();
        assert_eq!(d.to_string(), "2024-02-29");
        assert_eq!(PatchDate::from_days_since_epoch(0).to_string(), "1970-01-01");
        assert_eq!("2024-03-01".parse::<PatchDate>().unwrap().age_days(d), -1);
        assert_eq!(d.age_days("2024-03-30".parse().unwrap()), 30);
        for bad in ["2023-02-29", "2024-13-01", "2024-1-01", "2024-01-00", "24-01-01", "yesterday", "2024-01-32"] {
            assert!(bad.parse::<PatchDate>().is_err(), "{bad}");
        }
        for days in [-1000i64, 0, 59, 60, 365, 11_016, 20_000, 100_000] {
            assert_eq!(PatchDate::from_days_since_epoch(days).days_since_epoch(), days);
        }
    }

    #[test]
    fn ages() {
        assert_eq!("30d".parse::<PatchAge>().unwrap().days, 30);
        assert_eq!("4w".parse::<PatchAge>().unwrap().days, 28);
        assert_eq!("48h".parse::<PatchAge>().unwrap().days, 2);
        assert!("36h".parse::<PatchAge>().unwrap_err().contains("whole number of days"));
        for bad in ["30", "d", "30m", "-1d", "3.5d", ""] {
            assert!(bad.parse::<PatchAge>().is_err(), "{bad}");
        }
    }

    #[test]
    fn placement() {
        let z = ZoneEndpoints {
            placement: [("jurisdiction".to_owned(), vec!["eu".to_owned()])].into_iter().collect(),
            ..ZoneEndpoints::default()
        };
        let labels = |v: &str| [("jurisdiction".to_owned(), v.to_owned())].into_iter().collect();
        assert!(z.placement_violations(&labels("eu")).is_empty());
        assert_eq!(z.placement_violations(&labels("us")), vec!["jurisdiction=us (allowed: eu)"]);
        assert_eq!(z.placement_violations(&BTreeMap::new()), vec!["jurisdiction unset (allowed: eu)"]);
    }
}
