//! What a constant-rate client saw over time, one panel per way of moving the service,
//! drawn as SVG (by hand: lines, rectangles and text): the slowest answer in each 50 ms
//! of due time on a logarithmic latency axis, failed requests as red ticks. Written by
//! `ferry-bench --svg FILE` from the client's trace (`ferry-load`'s FERRY_LOAD_TRACE).

use std::fmt::Write as _;

/// One request as the client traced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When it was due, in ms since the client started.
    pub due_ms: f64,
    /// How late its answer came after it was due (none: it failed).
    pub latency_ms: Option<f64>,
}

/// One way's run.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub samples: Vec<Sample>,
}

/// Reads a trace `ferry-load` wrote: `DUE_MS LATENCY_MS` or `DUE_MS failed` per line.
pub fn parse_trace(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|l| {
            let (due, v) = l.split_once(' ')?;
            Some(Sample {
                due_ms: due.parse().ok()?,
                latency_ms: v.parse().ok(),
            })
        })
        .collect()
}

const WIDTH: f64 = 900.0;
const PANEL: f64 = 150.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 45.0;
const BUCKET_MS: f64 = 50.0;
/// The latency axis: 0.1 ms to 10 s.
const LOG_MIN: f64 = -1.0;
const LOG_MAX: f64 = 4.0;

/// The picture: `title` above one panel per series, on a shared time axis.
pub fn render(title: &str, series: &[Series]) -> String {
    let span_ms = series
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.due_ms))
        .fold(1000.0_f64, f64::max);
    let height = TOP + series.len() as f64 * (PANEL + GAP) + 20.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |ms: f64| LEFT + ms / span_ms * plot_w;
    let y = |top: f64, ms: f64| {
        let l = ms.max(10f64.powf(LOG_MIN)).log10().clamp(LOG_MIN, LOG_MAX);
        top + PANEL - (l - LOG_MIN) / (LOG_MAX - LOG_MIN) * PANEL
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (k, s) in series.iter().enumerate() {
        let top = TOP + k as f64 * (PANEL + GAP);
        let _ = writeln!(out, r#"<g class="way" data-way="{}">"#, escape(&s.name));
        let failed = s.samples.iter().filter(|x| x.latency_ms.is_none()).count();
        let worst = s
            .samples
            .iter()
            .filter_map(|x| x.latency_ms)
            .fold(0.0_f64, f64::max);
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{}: {} requests, {failed} failed, slowest answer {worst:.0} ms</text>"#,
            top - 6.0,
            escape(&s.name),
            s.samples.len()
        );
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="#fafafa" stroke="#999"/>"##
        );
        // Latency grid: 1 ms, 10 ms, 100 ms, 1 s, 10 s.
        for (ms, label) in [
            (1.0, "1 ms"),
            (10.0, "10 ms"),
            (100.0, "100 ms"),
            (1e3, "1 s"),
            (1e4, "10 s"),
        ] {
            let gy = y(top, ms);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" x2="{}" y1="{gy:.1}" y2="{gy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                gy + 4.0
            );
        }
        // The slowest answer of each bucket of due time, as one line.
        let buckets = (span_ms / BUCKET_MS).ceil() as usize + 1;
        let mut worst_in = vec![None::<f64>; buckets];
        let mut failed_in = vec![0usize; buckets];
        for sample in &s.samples {
            let b = ((sample.due_ms / BUCKET_MS) as usize).min(buckets - 1);
            match sample.latency_ms {
                Some(ms) => worst_in[b] = Some(worst_in[b].map_or(ms, |w: f64| w.max(ms))),
                None => failed_in[b] += 1,
            }
        }
        // A bucket without an answer (all failed, or none due) breaks the line.
        let mut d = String::new();
        let mut drawing = false;
        for (b, w) in worst_in.iter().enumerate() {
            match w {
                Some(ms) => {
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1} ",
                        if drawing { "L" } else { "M" },
                        x(b as f64 * BUCKET_MS),
                        y(top, *ms)
                    );
                    drawing = true;
                }
                None => drawing = false,
            }
        }
        let _ = writeln!(
            out,
            r##"<path class="latency" fill="none" stroke="#1f77b4" stroke-width="1.2" d="{}"/>"##,
            d.trim_end()
        );
        for (b, n) in failed_in.iter().enumerate().filter(|(_, n)| **n > 0) {
            let fx = x(b as f64 * BUCKET_MS);
            let _ = writeln!(
                out,
                r##"<line class="failed" x1="{fx:.1}" x2="{fx:.1}" y1="{top}" y2="{:.1}" stroke="#d62728" stroke-width="2"><title>{n} failed</title></line>"##,
                top + 12.0
            );
        }
        let _ = writeln!(out, "</g>");
    }
    // The time axis under the last panel.
    let axis = TOP + series.len() as f64 * (PANEL + GAP) - GAP + 14.0;
    let step_s = ((span_ms / 1e3) / 10.0).ceil().max(1.0);
    let mut t = 0.0;
    while t * 1e3 <= span_ms {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{axis:.1}" text-anchor="middle">{t:.0} s</text>"#,
            x(t * 1e3)
        );
        t += step_s;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{:.1}" text-anchor="end">request due time; each line point: the slowest answer of 50 ms of requests; red: failed</text>"#,
        LEFT + plot_w,
        axis + 14.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_is_a_panel_with_its_latency_line_and_its_failures() {
        // A request every 10 ms for 2 s; those due in [1000, 1100) failed, the one due at
        // 1100 waited 3 s.
        let trace: String = (0..200)
            .map(|i| match i * 10 {
                t @ 1000..=1090 => format!("{t}.0 failed\n"),
                1100 => "1100.0 3000.0\n".to_string(),
                t => format!("{t}.0 1.5\n"),
            })
            .collect();
        let samples = parse_trace(&trace);
        assert_eq!(samples.len(), 200);
        assert_eq!(samples[100].latency_ms, None);
        let series = [
            Series {
                name: "plain <criu>".into(),
                samples: samples.clone(),
            },
            Series {
                name: "postcopy".into(),
                samples: vec![Sample {
                    due_ms: 0.0,
                    latency_ms: Some(1.0),
                }],
            },
        ];
        let svg = render("Redis 256 MiB & load", &series);
        let doc = roxmltree::Document::parse(&svg).expect("the SVG parses");
        let ways: Vec<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("way"))
            .filter_map(|n| n.attribute("data-way"))
            .collect();
        assert_eq!(ways, ["plain <criu>", "postcopy"]);
        let failed = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("failed"))
            .count();
        assert_eq!(failed, 2, "two 50 ms buckets hold failures");
        let lines: Vec<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("latency"))
            .filter_map(|n| n.attribute("d"))
            .collect();
        assert_eq!(lines.len(), 2);
        // The buckets from 1000 ms have no answer: the line breaks there and starts again.
        assert_eq!(lines[0].matches('M').count(), 2, "{}", lines[0]);
        assert!(svg.contains("slowest answer 3000 ms"), "{svg}");
    }
}
