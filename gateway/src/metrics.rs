//! What a gateway knows, in the Prometheus text format (`GET /metrics`): workloads by
//! state, migrations by role and phase, downtime and bytes of the completed ones, and
//! each route's target and connections.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::migration::{Migration, Phase, Role};
use crate::proxy::RouteStats;
use crate::spec::Workload;

/// The exposition, rendered from snapshots.
pub fn render(workloads: &[Workload], migrations: &[Migration], routes: &[RouteStats]) -> String {
    let mut out = String::new();
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for w in workloads {
        *by_state.entry(w.state.to_string()).or_default() += 1;
    }
    family(
        &mut out,
        "ferry_workloads",
        "gauge",
        "Workloads at this site, by state.",
    );
    for (state, n) in &by_state {
        sample(&mut out, "ferry_workloads", &[("state", state)], *n);
    }

    let mut by_phase: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for m in migrations {
        *by_phase
            .entry((m.role.as_str(), m.phase.as_str()))
            .or_default() += 1;
    }
    family(
        &mut out,
        "ferry_migrations",
        "gauge",
        "Migration records at this site, by role and phase.",
    );
    for ((role, phase), n) in &by_phase {
        sample(
            &mut out,
            "ferry_migrations",
            &[("role", role), ("phase", phase)],
            *n,
        );
    }

    // Sources frozen past the site's bound, waiting for a silent destination.
    let stalled = migrations
        .iter()
        .filter(|m| m.stalled_since_ms.is_some() && !m.phase.is_terminal())
        .count() as u64;
    family(
        &mut out,
        "ferry_migrations_stalled",
        "gauge",
        "Outgoing migrations whose source has waited past migration.stall_after_secs for a silent destination (frozen, with its image).",
    );
    sample(&mut out, "ferry_migrations_stalled", &[], stalled);

    // What clients felt and what the links carried, over the completed outgoing moves.
    let done: Vec<&Migration> = migrations
        .iter()
        .filter(|m| m.role == Role::Source && m.phase == Phase::Completed)
        .collect();
    let freezes: Vec<u64> = done.iter().filter_map(|m| m.timings.freeze_ms).collect();
    family(
        &mut out,
        "ferry_migration_freeze_milliseconds",
        "summary",
        "Downtime of completed outgoing migrations (checkpoint start to confirmed restore).",
    );
    sample(
        &mut out,
        "ferry_migration_freeze_milliseconds_sum",
        &[],
        freezes.iter().sum::<u64>(),
    );
    sample(
        &mut out,
        "ferry_migration_freeze_milliseconds_count",
        &[],
        freezes.len() as u64,
    );
    family(
        &mut out,
        "ferry_migration_freeze_milliseconds_max",
        "gauge",
        "Longest downtime of a completed outgoing migration.",
    );
    sample(
        &mut out,
        "ferry_migration_freeze_milliseconds_max",
        &[],
        freezes.iter().copied().max().unwrap_or(0),
    );
    family(
        &mut out,
        "ferry_migration_bytes_total",
        "counter",
        "Image bytes of completed outgoing migrations, and what they took on the wire.",
    );
    sample(
        &mut out,
        "ferry_migration_bytes_total",
        &[("kind", "image")],
        done.iter().map(|m| m.bytes_moved).sum(),
    );
    sample(
        &mut out,
        "ferry_migration_bytes_total",
        &[("kind", "wire")],
        done.iter().map(|m| m.bytes_on_wire).sum(),
    );

    family(
        &mut out,
        "ferry_ingress_connections",
        "gauge",
        "Client connections on a workload's routes: bound to a backend, or held.",
    );
    for r in routes {
        for (state, n) in [("bound", r.bound), ("held", r.held)] {
            sample(
                &mut out,
                "ferry_ingress_connections",
                &[("workload", &r.workload), ("state", state)],
                n as u64,
            );
        }
    }
    family(
        &mut out,
        "ferry_ingress_target",
        "gauge",
        "Where a workload's routes lead now (1 for the current target).",
    );
    for r in routes {
        let target = r.target.to_string();
        sample(
            &mut out,
            "ferry_ingress_target",
            &[("workload", &r.workload), ("target", &target)],
            1,
        );
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Target;

    #[test]
    fn routes_and_labels_render_in_the_text_format() {
        let routes = [RouteStats {
            workload: "web\"1".into(),
            routes: Vec::new(),
            target: Target::Remote("b".into()),
            bound: 3,
            held: 0,
        }];
        let text = render(&[], &[], &routes);
        assert!(text.contains("# TYPE ferry_ingress_connections gauge\n"));
        assert!(
            text.contains("ferry_ingress_connections{workload=\"web\\\"1\",state=\"bound\"} 3\n")
        );
        assert!(text.contains("ferry_ingress_target{workload=\"web\\\"1\",target=\"peer:b\"} 1\n"));
        assert!(text.contains("ferry_migration_freeze_milliseconds_count 0\n"));
        assert!(text.contains("ferry_migrations_stalled 0\n"));
        // Every sample line is NAME[{LABELS}] VALUE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
