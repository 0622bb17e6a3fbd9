//! `lessor bench-chart`: draws the throughput of several `lessor bench --json-out` runs as one SVG bar chart, so
//! docs/benchmarks.md shows a picture made from measured files rather than drawn by hand.

use std::fmt::Write as _;

use serde_json::Value;

/// One run to draw: its label and items/s per operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The label shown on the chart.
    pub label: String,
    /// (operation, items/s) in display order.
    pub rates: Vec<(String, f64)>,
}

/// Reads a `--json-out` document; the label is `label` or, if empty, built from the run's configuration.
pub fn load(path: &str, label: &str) -> Result<Run, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("bench-chart: cannot read '{path}': {e}"))?;
    let doc: Value =
        serde_json::from_str(&text).map_err(|e| format!("bench-chart: '{path}' is not JSON: {e}"))?;
    let results = doc
        .get("results")
        .and_then(Value::as_object)
        .ok_or(format!("bench-chart: '{path}' has no results"))?;
    let mut rates = Vec::new();
    for op in ["produce", "lease", "complete"] {
        if let Some(r) = results
            .get(op)
            .and_then(|r| r.get("items_per_s"))
            .and_then(Value::as_f64)
        {
            if r > 0.0 {
                rates.push((op.to_string(), r));
            }
        }
    }
    let label = if label.is_empty() {
        let c = doc.get("config").cloned().unwrap_or(Value::Null);
        let s = |k: &str| {
            c.get(k)
                .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
                .unwrap_or_default()
        };
        format!("{} {} batch {}", s("backend"), s("workload"), s("batch"))
            .trim()
            .to_string()
    } else {
        label.to_string()
    };
    Ok(Run { label, rates })
}

fn color(op: &str) -> &'static str {
    match op {
        "produce" => "#4e79a7",
        "lease" => "#f28e2b",
        _ => "#59a14f",
    }
}

/// Renders runs as horizontal grouped bars (one group per run, one bar per operation), items/s on the x axis.
pub fn svg(title: &str, runs: &[Run]) -> String {
    let max = runs
        .iter()
        .flat_map(|r| r.rates.iter().map(|x| x.1))
        .fold(1.0f64, f64::max);
    // Round the axis up to a tidy step.
    let step = 10f64.powf((max / 5.0).log10().floor());
    let axis = (max / step).ceil() * step;
    let (left, top, width, bar, gap) = (230.0, 50.0, 560.0, 16.0, 14.0);
    let group_h = |r: &Run| r.rates.len().max(1) as f64 * bar + gap;
    let height = top + runs.iter().map(group_h).sum::<f64>() + 60.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 120.0
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let mut y = top;
    for r in runs {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + bar * r.rates.len() as f64 / 2.0 + 4.0,
            esc(&r.label)
        );
        for (op, v) in &r.rates {
            let w = v / axis * width;
            let _ = write!(
                s,
                r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{h}" fill="{c}"/><text x="{tx:.1}" y="{ty}" font-size="11">{op} {v}</text>"#,
                h = bar - 2.0,
                c = color(op),
                tx = left + w + 4.0,
                ty = y + bar - 5.0,
                v = human(*v),
            );
            y += bar;
        }
        y += gap;
    }
    for i in 0..=5 {
        let v = axis * i as f64 / 5.0;
        let x = left + width * i as f64 / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{top0}" x2="{x:.1}" y2="{y}" stroke="#ccc"/><text x="{x:.1}" y="{ty}" text-anchor="middle" font-size="11">{}</text>"##,
            human(v),
            top0 = top - 6.0,
            ty = y + 14.0,
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">items/s</text></svg>"#,
        left + width / 2.0,
        y + 32.0
    );
    s.push('\n');
    s
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `lessor bench-chart` arguments.
#[derive(clap::Args, Debug)]
pub struct ChartArgs {
    /// Output SVG file.
    #[arg(long, short)]
    pub out: String,
    /// Chart title.
    #[arg(long, default_value = "lessor bench: items/s")]
    pub title: String,
    /// Runs as `FILE.json` or `LABEL=FILE.json`, in display order.
    #[arg(required = true)]
    pub runs: Vec<String>,
}

/// Writes the chart.
pub fn run(args: ChartArgs) -> Result<(), String> {
    let runs = args
        .runs
        .iter()
        .map(|r| match r.split_once('=') {
            Some((label, path)) => load(path, label),
            None => load(r, ""),
        })
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::write(&args.out, svg(&args.title, &runs))
        .map_err(|e| format!("bench-chart: cannot write '{}': {e}", args.out))?;
    println!("wrote {}", args.out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_rate() {
        let runs = vec![
            Run {
                label: "a".into(),
                rates: vec![("produce".into(), 1000.0), ("lease".into(), 500.0)],
            },
            Run {
                label: "b<c".into(),
                rates: vec![("complete".into(), 250.0)],
            },
        ];
        let s = svg("t", &runs);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(
            s.contains(r#"width="560.0""#),
            "the largest bar spans the axis: {s}"
        );
        assert!(s.contains(r#"width="280.0""#), "half the rate, half the width");
        assert!(s.contains("b&lt;c"), "labels are escaped");
    }
}
