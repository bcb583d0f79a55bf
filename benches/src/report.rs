//! Writing results: a Markdown table and an SVG bar chart per benchmark, under
//! `benches/results/`.

use std::{fmt::Write as _, path::PathBuf};

use plotters::prelude::*;

/// Directory of published results (`benches/results`).
#[must_use]
pub fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// Facts about the machine a result was measured on.
#[must_use]
pub fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

/// A Markdown table from a header and rows.
#[must_use]
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out
}

/// A horizontal-free, simple vertical bar chart of `(label, value)` as SVG.
pub fn bar_chart(path: &std::path::Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> anyhow::Result<()> {
    let width = 160 + 90 * u32::try_from(bars.len()).unwrap_or(1);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(120)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0..max)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels.get(*i).cloned().unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .x_label_style(("sans-serif", 11).into_font().transform(FontTransform::Rotate90))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let mut bar =
            Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), b.1)], BLUE.mix(0.6).filled());
        bar.set_margin(0, 0, 8, 8);
        bar
    }))?;
    // Each bar's value above it.
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let text = if b.1 >= 100.0 { format!("{:.0}", b.1) } else { format!("{:.2}", b.1) };
        Text::new(text, (SegmentValue::CenterOf(i), b.1 + max * 0.01), ("sans-serif", 11).into_font())
    }))?;
    root.present()?;
    Ok(())
}

/// Which source was measured: `git describe --always --dirty` of the workspace, or
/// `$BACKPLANE_SOURCE` when set.
#[must_use]
pub fn source_line() -> String {
    if let Ok(s) = std::env::var("BACKPLANE_SOURCE") {
        return s;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::process::Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown (not a git checkout)".into(),
            |o| format!("commit {}", String::from_utf8_lossy(&o.stdout).trim()),
        )
}
