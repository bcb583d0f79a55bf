//! Medians and ranges of repeated measurements.

/// Median, minimum and maximum of a set of measurements.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    /// `median (min-max)` with `decimals` decimals; `-` when empty.
    #[must_use]
    pub fn cell(&self, decimals: usize) -> String {
        if self.count == 0 {
            return "-".into();
        }
        format!("{:.d$} ({:.d$}-{:.d$})", self.median, self.min, self.max, d = decimals)
    }
}

/// The median (the mean of the middle two for an even count), minimum and maximum.
pub fn summarize(values: impl IntoIterator<Item = f64>) -> Summary {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) };
    Summary { median, min: v[0], max: v[n - 1], count: n }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(summarize([3.0, 1.0, 2.0]).cell(1), "2.0 (1.0-3.0)");
        assert_eq!(summarize([4.0, 1.0, 2.0, 3.0]).cell(2), "2.50 (1.00-4.00)");
        assert_eq!(summarize([]).count, 0);
        assert_eq!(summarize([5.0, 1.0]).cell(1), "3.0 (1.0-5.0)");
    }
}
