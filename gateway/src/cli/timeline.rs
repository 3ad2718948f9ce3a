//! A migration as a picture: its phases on a time axis (SVG), with the bytes each put on
//! the wire, from the record's timings (`ferry migration show ID --timeline FILE.svg`).

use std::fmt::Write;

use crate::migration::Migration;

const WIDTH: f64 = 960.0;
/// Room for the phase names (left) and each bar's time and bytes (right).
const LEFT: f64 = 170.0;
const RIGHT: f64 = 230.0;
const ROW: f64 = 34.0;
const TOP: f64 = 70.0;

/// One bar: a phase from `start` for `ms`, in a row of its own; `note` follows its time.
struct Bar {
    phase: &'static str,
    label: &'static str,
    note: String,
    start: u64,
    ms: u64,
    color: &'static str,
}

/// The phases the record holds, in the order they ran.
fn bars(m: &Migration) -> Vec<Bar> {
    let t = &m.timings;
    let mut bars = Vec::new();
    let mut bar = |phase, label, note: String, start, ms: Option<u64>, color| {
        if let Some(ms) = ms {
            bars.push(Bar {
                phase,
                label,
                note,
                start,
                ms,
                color,
            });
        }
    };
    let prepare = t.prepare_ms.unwrap_or(0);
    let ahead = m
        .pages
        .as_ref()
        .filter(|p| p.ahead_wire > 0)
        .map_or_else(String::new, |p| {
            format!(", {} on the wire", mb(p.ahead_wire))
        });
    bar(
        "prepare",
        "prepare",
        String::new(),
        0,
        t.prepare_ms,
        "#8fb8de",
    );
    bar(
        "sync",
        "replica sync",
        String::new(),
        0,
        t.sync_ms,
        "#9ccc9c",
    );
    bar(
        "prepush",
        "pages sent ahead",
        ahead,
        0,
        t.prepush_ms,
        "#b7d3ee",
    );
    bar(
        "freeze",
        "freeze (clients held)",
        String::new(),
        prepare,
        t.freeze_ms,
        "#e07b6a",
    );
    let dump = t.dump_ms.unwrap_or(0);
    bar(
        "dump",
        "checkpoint",
        String::new(),
        prepare,
        t.dump_ms,
        "#f0a35e",
    );
    // The image's files while frozen: what the pages sent ahead and after the switch took
    // is shown on their own bars.
    let (ahead_wire, after_wire) = m
        .pages
        .as_ref()
        .map_or((0, 0), |p| (p.ahead_wire, p.after_wire));
    let frozen_wire = m
        .bytes_on_wire
        .saturating_sub(ahead_wire)
        .saturating_sub(after_wire);
    let wire = if frozen_wire > 0 {
        format!(", {} on the wire", mb(frozen_wire))
    } else {
        String::new()
    };
    let after = if after_wire > 0 {
        format!(", {} on the wire", mb(after_wire))
    } else {
        String::new()
    };
    bar(
        "transfer",
        "transfer",
        wire,
        prepare + dump,
        t.transfer_ms,
        "#f2c14e",
    );
    bar(
        "volume_delta",
        "volume delta",
        String::new(),
        prepare + dump,
        t.volume_delta_ms,
        "#c9a0dc",
    );
    let restore_at = prepare + dump + t.transfer_ms.unwrap_or(0);
    bar(
        "restore",
        "restore",
        String::new(),
        restore_at,
        t.restore_ms,
        "#7bc67b",
    );
    let switched = prepare + t.freeze_ms.unwrap_or(0);
    bar(
        "postcopy",
        "post-copy window",
        after,
        switched,
        t.postcopy_ms,
        "#a3a3d9",
    );
    bar("total", "total", String::new(), 0, t.total_ms, "#c8c8c8");
    bars
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The migration's timeline as an SVG document.
pub fn svg(m: &Migration) -> String {
    let bars = bars(m);
    let end = bars
        .iter()
        .map(|b| b.start + b.ms)
        .max()
        .unwrap_or(1)
        .max(1);
    let scale = (WIDTH - LEFT - RIGHT) / end as f64;
    let height = TOP + ROW * bars.len() as f64 + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let title = format!(
        "migration {} of {}: {} → {}, {}{}",
        m.id,
        m.workload,
        m.source,
        m.target,
        m.phase,
        m.options
            .mode
            .as_deref()
            .map_or_else(String::new, |mode| format!(", {mode}"))
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="24" font-size="15" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    let moved = format!(
        "image {}, on the wire {}{}",
        mb(m.bytes_moved),
        mb(m.bytes_on_wire),
        if m.bytes_deduped > 0 {
            format!(", {} as digests (warm destination)", mb(m.bytes_deduped))
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, r#"<text x="10" y="44">{}</text>"#, escape(&moved));
    for (i, b) in bars.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let x = LEFT + b.start as f64 * scale;
        let w = (b.ms as f64 * scale).max(1.0);
        let _ = writeln!(
            s,
            r#"<g class="phase" data-phase="{}" data-start-ms="{}" data-ms="{}">"#,
            b.phase, b.start, b.ms
        );
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.1}">{}</text>"#,
            y + 17.0,
            escape(b.label)
        );
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}"/>"#,
            ROW - 10.0,
            b.color
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} ms{}</text>"#,
            x + w + 6.0,
            y + 17.0,
            b.ms,
            escape(&b.note)
        );
        let _ = writeln!(s, "</g>");
    }
    // The time axis, in ms from the move's start.
    let axis_y = TOP + ROW * bars.len() as f64 + 10.0;
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333"/>"##,
        WIDTH - RIGHT
    );
    for k in 0..=4u64 {
        let t = end * k / 4;
        let x = LEFT + t as f64 * scale;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{axis_y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{t} ms</text>"##,
            axis_y + 5.0,
            axis_y + 20.0
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(postcopy: bool) -> Migration {
        let mut m: Migration = serde_json::from_value(serde_json::json!({
            "id": "m-1", "workload": "redis", "role": "source", "source": "a", "target": "b",
            "phase": "completed", "created_at_ms": 0, "updated_at_ms": 0,
            "spec": {"name": "redis", "command": ["redis-server"]},
        }))
        .expect("a minimal record");
        m.timings.prepare_ms = Some(40);
        m.timings.freeze_ms = Some(200);
        m.timings.dump_ms = Some(60);
        m.timings.transfer_ms = Some(90);
        m.timings.restore_ms = Some(50);
        m.timings.total_ms = Some(if postcopy { 700 } else { 240 });
        if postcopy {
            m.timings.postcopy_ms = Some(460);
            m.timings.prepush_ms = Some(30);
        }
        m.bytes_moved = 300_000_000;
        m.bytes_on_wire = 12_000_000;
        m.bytes_deduped = 280_000_000;
        m
    }

    #[test]
    fn the_picture_parses_and_holds_every_phase_the_record_has() {
        for postcopy in [false, true] {
            let m = record(postcopy);
            let text = svg(&m);
            let doc = roxmltree::Document::parse(&text).expect("the SVG parses as XML");
            assert_eq!(doc.root_element().tag_name().name(), "svg");
            let phases: Vec<&str> = doc
                .descendants()
                .filter(|n| n.attribute("class") == Some("phase"))
                .filter_map(|n| n.attribute("data-phase"))
                .collect();
            let mut want = vec!["prepare", "freeze", "dump", "transfer", "restore", "total"];
            if postcopy {
                want.extend(["prepush", "postcopy"]);
            }
            for p in &want {
                assert!(phases.contains(p), "{p} missing from {phases:?}");
            }
            assert_eq!(phases.len(), want.len(), "{phases:?}");
            // The restore starts after the dump and the transfer, within the freeze.
            let restore = doc
                .descendants()
                .find(|n| n.attribute("data-phase") == Some("restore"))
                .and_then(|n| n.attribute("data-start-ms"));
            assert_eq!(restore, Some("190"));
            assert!(text.contains("12.0 MB on the wire"), "{text}");
            assert!(text.contains("as digests"));
        }
    }
}
