//! Kernel timestamps to wall-clock time.
//!
//! The data path stamps flows with `bpf_ktime_get_coarse_ns()` (`CLOCK_MONOTONIC_COARSE`:
//! the monotonic clock at tick resolution, a few ms behind at most). The agent measures `CLOCK_REALTIME - CLOCK_MONOTONIC` once at start and adds it to
//! every kernel stamp; a later step of the wall clock (NTP) does not move recorded flows.

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

/// RFC 3339, UTC, millisecond precision: `2024-05-01T12:34:56.789Z`.
const RFC3339_MS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; both clocks always exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `CLOCK_MONOTONIC` now, in the scale of the kernel's flow stamps.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// Converts kernel monotonic stamps to wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, in ns.
    offset_ns: i128,
}

impl Clock {
    /// Measures the offset between the two clocks now.
    #[must_use]
    pub fn measure() -> Self {
        // Read monotonic on both sides of realtime and take the midpoint.
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        Self { offset_ns: real - i128::midpoint(before, after) }
    }

    /// A clock with a given offset (tests).
    #[must_use]
    pub const fn with_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// The kernel monotonic stamp of a Unix time in ms (0 if before boot).
    #[must_use]
    pub fn ktime_ns(&self, unix_ms: i64) -> u64 {
        u64::try_from(i128::from(unix_ms) * 1_000_000 - self.offset_ns).unwrap_or(0)
    }

    /// Unix time in ms of a kernel monotonic stamp.
    #[must_use]
    pub fn unix_ms(&self, ktime_ns: u64) -> i64 {
        let ns = i128::from(ktime_ns) + self.offset_ns;
        i64::try_from(ns.div_euclid(1_000_000)).unwrap_or(i64::MAX)
    }
}

/// The wall clock now, as Unix time in ms (0 before 1970; `i64::MAX` past its range).
#[must_use]
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 UTC text with milliseconds for a Unix time in ms.
#[must_use]
pub fn rfc3339_ms(unix_ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(RFC3339_MS).ok())
        .unwrap_or_else(|| format!("@{unix_ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_stamp_to_wall_clock() {
        // Booted at 2024-01-01T00:00:00Z: monotonic 0 is that instant.
        let clock = Clock::with_offset_ns(1_704_067_200_000_000_000);
        assert_eq!(clock.unix_ms(0), 1_704_067_200_000);
        assert_eq!(clock.unix_ms(1_234_567_891), 1_704_067_201_234);
        assert_eq!(rfc3339_ms(clock.unix_ms(1_234_567_891)), "2024-01-01T00:00:01.234Z");
    }

    #[test]
    fn rfc3339_pads_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(5), "1970-01-01T00:00:00.005Z");
        assert_eq!(rfc3339_ms(1_700_000_000_120), "2023-11-14T22:13:20.120Z");
    }

    #[test]
    fn measured_clock_is_close_to_now() {
        let clock = Clock::measure();
        let now_ms =
            i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
                .unwrap();
        let from_kernel = clock.unix_ms(monotonic_now_ns());
        assert!((from_kernel - now_ms).abs() < 1000, "{from_kernel} vs {now_ms}");
    }
}
