//! Choosing how a workload moves (UMS's authority levels, plus cost): every adapter that
//! can serve the workload is asked, at both sites; runtime adapters offer the
//! orchestrator or container level (a checkpoint), service adapters the service level (a
//! live replica). The feasible approach with the lowest predicted client stall wins,
//! among those the site and the workload allow; the plan records every candidate and why.

use serde::{Deserialize, Serialize};

use super::{Engine, MigrationError};
use crate::peer::wire::{CheckpointNeeds, PlanInfo, Request, Response};
use crate::plugins::{approach_name, AdapterCall, Approach};
use crate::spec::{Workload, WorkloadSpec};
use crate::sys::process;

/// What a caller asks of a migration beyond "move it there".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveOptions {
    /// Run this approach, or fail saying why it cannot run.
    #[serde(default)]
    pub approach: Option<String>,
    /// Run the workload under this runtime at the destination (only the service level
    /// can change a workload's runtime).
    #[serde(default)]
    pub runtime: Option<String>,
    /// Runtime settings at the destination (with `runtime`), replacing the source's.
    #[serde(default)]
    pub settings: Option<std::collections::BTreeMap<String, String>>,
    /// How a checkpoint moves memory: "stop-and-copy" (default) or "postcopy" (the
    /// destination runs at once and faults pages in from the frozen source).
    #[serde(default)]
    pub mode: Option<String>,
    /// The command at the destination, when its runtime needs another one (a path inside
    /// a container image is not a path on a host).
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

/// One way the workload could move, as the plan shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Candidate {
    /// "orchestrator", "container" or "service".
    pub approach: String,
    /// The adapter that would run it.
    pub adapter: String,
    pub feasible: bool,
    /// Allowed by the site's `[migration] approaches` and the workload's `approaches`.
    pub allowed: bool,
    /// How long clients would wait at the switch, as predicted.
    pub predicted_stall_ms: Option<u64>,
    /// Why it is (in)feasible or not allowed, in words an operator can act on.
    pub reason: String,
    /// A checkpoint's mode, as chosen ("stop-and-copy" or "postcopy").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Why the destination cannot restore this checkpoint (its answer to the source's
    /// measured needs: versions, CPU, files, disk, memory); empty when it can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incompatible: Vec<String>,
}

/// The candidates and the choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MovePlan {
    pub candidates: Vec<Candidate>,
    /// Index into `candidates` of the approach that runs, if any can.
    pub chosen: Option<usize>,
    /// Why that one (or why none).
    pub why: String,
    /// The workload as it will run at the destination.
    pub destination: WorkloadSpec,
}

impl MovePlan {
    pub fn chosen(&self) -> Option<&Candidate> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }
}

/// Round trips on the link during a service-level switch, beyond the adapter's estimate:
/// the promotion request and its answer, then a held client's first request to the
/// destination through the tunnel.
const SWITCH_ROUND_TRIPS: u64 = 2;

/// Throughput assumed for a stop-and-copy prediction when nothing better is known:
/// checkpoint, transfer and restore of each byte of the tree's memory.
const STOP_AND_COPY_BYTES_PER_MS: u64 = 100_000;
/// Fixed cost of a checkpoint and restore (CRIU, the health check).
const STOP_AND_COPY_FIXED_MS: u64 = 300;

/// Predicted stall of a checkpoint of a tree of `rss` bytes: proportional to its memory.
fn stop_and_copy_ms(rss: u64) -> u64 {
    STOP_AND_COPY_FIXED_MS + rss / STOP_AND_COPY_BYTES_PER_MS
}

/// Post-copy with the pages sent ahead, as measured here (2 cores, 1 Gbit/s, +10 ms RTT):
/// a freeze of ~130 ms at 64 MiB and ~410 ms at 1 GiB (the lazy dump, the small images,
/// the lazy restore; the frozen tree's pages re-read for the written ones overlap the
/// restore), then the faults on the pages written last.
const POSTCOPY_FIXED_MS: u64 = 150;
const POSTCOPY_BYTES_PER_MS: u64 = 3_500_000;
/// Round trips after the switch: the held clients' tunnels and the first faults.
const POSTCOPY_ROUND_TRIPS: u64 = 4;

/// Below this much memory auto keeps stop-and-copy: its freeze is short already, and it
/// has no window in which a destination crash loses writes.
const POSTCOPY_MIN_BYTES: u64 = 64 << 20;

/// Predicted stall of a post-copy move of a tree of `rss` bytes over a link of `rtt_ms`.
fn postcopy_ms(rss: u64, rtt_ms: u64) -> u64 {
    POSTCOPY_FIXED_MS + rss / POSTCOPY_BYTES_PER_MS + POSTCOPY_ROUND_TRIPS * rtt_ms
}

/// The checkpoint mode for `asked` ("auto", none, or one named): post-copy when asked,
/// or under auto when it is possible and predicted to stall clients less. Returns the
/// mode, its predicted stall (if known) and why.
fn checkpoint_mode(
    asked: Option<&str>,
    postcopy: Result<(), String>,
    stop_and_copy: Option<u64>,
    postcopy_predicted: Option<u64>,
) -> (String, Option<u64>, String) {
    match asked {
        Some("stop-and-copy") => (
            "stop-and-copy".into(),
            stop_and_copy,
            "stop-and-copy, as asked".into(),
        ),
        Some("postcopy") => (
            "postcopy".into(),
            postcopy_predicted,
            "post-copy, as asked".into(),
        ),
        _ => match (postcopy, stop_and_copy, postcopy_predicted) {
            (Err(why), _, _) => (
                "stop-and-copy".into(),
                stop_and_copy,
                format!("stop-and-copy (auto: no post-copy: {why})"),
            ),
            (Ok(()), Some(sc), Some(pc)) if pc < sc => (
                "postcopy".into(),
                Some(pc),
                format!("post-copy (auto: predicted stall {pc} ms, stop-and-copy {sc} ms)"),
            ),
            (Ok(()), Some(sc), Some(pc)) => (
                "stop-and-copy".into(),
                Some(sc),
                format!("stop-and-copy (auto: predicted stall {sc} ms, post-copy {pc} ms)"),
            ),
            (Ok(()), sc, _) => (
                "stop-and-copy".into(),
                sc,
                "stop-and-copy (auto: the workload's memory is unknown)".into(),
            ),
        },
    }
}

/// The approaches a workload allows (its `approaches` setting, comma-separated), if it
/// limits them.
fn workload_allows(spec: &WorkloadSpec) -> Option<Vec<String>> {
    spec.settings.get("approaches").map(|v| {
        v.split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect()
    })
}

impl Engine {
    /// Asks every adapter that could move `w` to `to`, at both sites, and chooses.
    pub async fn plan(
        &self,
        w: &Workload,
        to: &str,
        options: &MoveOptions,
    ) -> Result<MovePlan, MigrationError> {
        let mut destination = w.spec.clone();
        if let Some(rt) = &options.runtime {
            destination.runtime.clone_from(rt);
        }
        if let Some(settings) = &options.settings {
            destination.settings.clone_from(settings);
        }
        if let Some(command) = &options.command {
            destination.command.clone_from(command);
        }
        destination
            .validate()
            .map_err(crate::workload::WorkloadError::from)?;
        let runtime_changes = destination.runtime != w.spec.runtime
            || destination.command != w.spec.command
            || destination.settings != w.spec.settings;
        let about = AdapterCall::for_workload(w).with_peer(to);
        let mut candidates = Vec::new();

        // Checkpoint approaches: the runtime adapter serving the workload here.
        match self.plugins.adapter(&w.spec.runtime) {
            Ok(adapter) => {
                let plan = adapter.probe(about.clone()).await;
                let (feasible, approach, reason, expected) = match plan {
                    Ok(p) => (
                        p.feasible,
                        p.approach.map_or("container", approach_name),
                        p.reason,
                        p.expected_downtime_ms,
                    ),
                    Err(e) => (false, "container", e.to_string(), None),
                };
                let (feasible, reason) = if runtime_changes && feasible {
                    (
                        false,
                        format!(
                            "a checkpoint restores only under the runtime, command and settings that made it ({} here, {} asked at {to})",
                            w.spec.runtime, destination.runtime
                        ),
                    )
                } else {
                    (feasible, reason)
                };
                // Read once: it scans every process of the tree.
                let rss = w.pid.and_then(process::tree_rss_bytes);
                let stop_and_copy = expected.or_else(|| rss.map(stop_and_copy_ms));
                let rtt_ms = self
                    .peers
                    .rtt(to)
                    .map_or(0, |r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX));
                let postcopy_predicted = rss.map(|rss| postcopy_ms(rss, rtt_ms));
                let postcopy = if !self.prepush {
                    Err("the pages are not sent ahead ([migration] prepush = false)".into())
                } else if rss.is_some_and(|r| r < POSTCOPY_MIN_BYTES) {
                    Err(format!(
                        "the tree holds less than {} MiB",
                        POSTCOPY_MIN_BYTES >> 20
                    ))
                } else {
                    self.postcopy_capable(&w.spec.runtime)
                };
                let (mode, stall, how) = checkpoint_mode(
                    options.mode.as_deref(),
                    postcopy,
                    stop_and_copy,
                    postcopy_predicted,
                );
                // Before any freeze: can the destination restore it at all?
                let incompatible = match (feasible, w.pid) {
                    (true, Some(pid)) => {
                        let granted = self.plugins.granted_to(adapter.name());
                        let needs =
                            super::compat::measure(pid, self.criu.bin(), granted.as_ref()).await;
                        self.probe_peer(to, &destination, None, Some(needs))
                            .await
                            .err()
                            .unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                let (feasible, reason) = if incompatible.is_empty() {
                    (feasible, format!("{reason}; {how}"))
                } else {
                    (
                        false,
                        format!("{to} cannot restore it: {}", incompatible.join("; ")),
                    )
                };
                candidates.push(Candidate {
                    approach: approach.to_string(),
                    adapter: adapter.name().to_string(),
                    feasible,
                    allowed: true,
                    predicted_stall_ms: stall,
                    reason,
                    mode: Some(mode),
                    incompatible,
                });
            }
            Err(e) => candidates.push(Candidate {
                approach: "container".into(),
                adapter: "(none)".into(),
                feasible: false,
                allowed: true,
                predicted_stall_ms: None,
                reason: e.to_string(),
                mode: None,
                incompatible: Vec::new(),
            }),
        }

        // The service level: every service adapter that knows the workload's service.
        for service in self.plugins.services() {
            let plan = match service.probe(about.clone()).await {
                Ok(p) => p,
                Err(e) => {
                    candidates.push(Candidate {
                        approach: "service".into(),
                        adapter: service.name().to_string(),
                        feasible: false,
                        allowed: true,
                        predicted_stall_ms: None,
                        reason: e.to_string(),
                        mode: None,
                        incompatible: Vec::new(),
                    });
                    continue;
                }
            };
            let mut candidate = Candidate {
                approach: "service".into(),
                adapter: service.name().to_string(),
                feasible: plan.feasible && plan.approach == Some(Approach::Service),
                allowed: true,
                predicted_stall_ms: plan.expected_downtime_ms,
                reason: plan.reason,
                mode: None,
                incompatible: Vec::new(),
            };
            if candidate.feasible {
                // The destination must be able to run the service too.
                match self
                    .probe_peer(to, &destination, Some(service.name()), None)
                    .await
                {
                    Ok(()) => {
                        // The switch costs round trips the adapter cannot know (the
                        // fence and the catch-up are local to each site).
                        if let (Some(ms), Some(rtt)) =
                            (candidate.predicted_stall_ms, self.peers.rtt(to))
                        {
                            let rtt_ms = u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX);
                            candidate.predicted_stall_ms =
                                Some(ms.saturating_add(SWITCH_ROUND_TRIPS * rtt_ms));
                        }
                    }
                    Err(why) => {
                        candidate.feasible = false;
                        candidate.reason =
                            format!("{}; but at {to}: {}", candidate.reason, why.join("; "));
                    }
                }
            }
            candidates.push(candidate);
        }

        // What the site and the workload allow.
        let per_workload = workload_allows(&w.spec);
        for c in &mut candidates {
            let site_ok = self.approaches.contains(&c.approach);
            let workload_ok = per_workload
                .as_ref()
                .is_none_or(|list| list.contains(&c.approach));
            c.allowed = site_ok && workload_ok;
            if !site_ok {
                c.reason = format!(
                    "{}; not allowed by this site ([migration] approaches = {:?})",
                    c.reason, self.approaches
                );
            } else if !workload_ok {
                c.reason = format!(
                    "{}; not allowed by the workload (approaches = {:?})",
                    c.reason,
                    per_workload.clone().unwrap_or_default()
                );
            }
        }

        let (chosen, why) = choose(&candidates, options.approach.as_deref());
        Ok(MovePlan {
            candidates,
            chosen,
            why,
            destination,
        })
    }

    /// Asks `peer` whether it could run `spec`: with service adapter `service`, or
    /// restore a checkpoint that `needs` what the source measured. `Err` holds why not.
    async fn probe_peer(
        &self,
        peer: &str,
        spec: &WorkloadSpec,
        service: Option<&str>,
        needs: Option<CheckpointNeeds>,
    ) -> Result<(), Vec<String>> {
        let checkpoint = needs.is_some();
        let answer = self
            .peers
            .request(
                peer,
                &Request::Probe {
                    workload: spec.clone(),
                    service: service.map(str::to_string),
                    needs,
                },
            )
            .await;
        let answer = match answer {
            Ok(a) => a,
            // A checkpoint's move finds an unreachable peer out at its prepare, as before.
            Err(_) if checkpoint => return Ok(()),
            Err(e) => return Err(vec![e.to_string()]),
        };
        match answer {
            Response::Probed { incompatible, .. } if checkpoint => {
                if incompatible.is_empty() {
                    Ok(())
                } else {
                    Err(incompatible)
                }
            }
            Response::Probed {
                runtime_error: Some(e),
                ..
            } => Err(vec![e]),
            Response::Probed {
                service:
                    Some(PlanInfo {
                        feasible: false,
                        reason,
                        ..
                    }),
                ..
            } => Err(vec![reason]),
            Response::Probed { service: None, .. } => Err(vec![format!(
                "no service adapter {} there",
                service.unwrap_or("?")
            )]),
            Response::Probed { .. } => Ok(()),
            Response::Error { message, .. } if !checkpoint => Err(vec![message]),
            _ if checkpoint => Ok(()),
            other => Err(vec![format!("unexpected answer {other:?}")]),
        }
    }
}

/// The feasible, allowed candidate with the lowest predicted stall (unknown counts as
/// worst), or the one `forced` names.
fn choose(candidates: &[Candidate], forced: Option<&str>) -> (Option<usize>, String) {
    if let Some(forced) = forced {
        return match candidates.iter().position(|c| c.approach == forced) {
            Some(i) if candidates[i].feasible => (
                Some(i),
                format!("{forced} as asked ({})", candidates[i].reason),
            ),
            Some(i) => (
                None,
                format!(
                    "{forced} was asked but cannot run: {}",
                    candidates[i].reason
                ),
            ),
            None => (
                None,
                format!("{forced} was asked but no adapter offers it for this workload"),
            ),
        };
    }
    let best = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.feasible && c.allowed)
        .min_by_key(|(_, c)| c.predicted_stall_ms.unwrap_or(u64::MAX));
    match best {
        Some((i, c)) => {
            let others = candidates
                .iter()
                .filter(|o| o.feasible && o.allowed)
                .count()
                - 1;
            let why = match (others, c.predicted_stall_ms) {
                (0, _) => format!("{} is the only feasible approach", c.approach),
                (_, Some(ms)) => format!(
                    "{} has the lowest predicted stall ({ms} ms) of {} feasible approaches",
                    c.approach,
                    others + 1
                ),
                (_, None) => format!("{} (no stall predictions)", c.approach),
            };
            (Some(i), why)
        }
        None => (
            None,
            "no feasible approach: ".to_string()
                + &candidates
                    .iter()
                    .map(|c| format!("{} ({}): {}", c.approach, c.adapter, c.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(approach: &str, feasible: bool, allowed: bool, stall: Option<u64>) -> Candidate {
        Candidate {
            approach: approach.into(),
            adapter: "x".into(),
            feasible,
            allowed,
            predicted_stall_ms: stall,
            reason: format!("{approach} reason"),
            mode: None,
            incompatible: Vec::new(),
        }
    }

    #[test]
    fn the_lowest_predicted_stall_wins_among_feasible_allowed() {
        let cs = [
            c("container", true, true, Some(900)),
            c("service", true, true, Some(20)),
        ];
        let (i, why) = choose(&cs, None);
        assert_eq!(i, Some(1));
        assert!(why.contains("lowest predicted stall (20 ms) of 2"), "{why}");
        let cs = [
            c("container", true, true, Some(900)),
            c("service", true, false, Some(20)),
        ];
        assert_eq!(choose(&cs, None).0, Some(0));
        let cs = [
            c("container", false, true, Some(1)),
            c("service", true, true, None),
        ];
        let (i, why) = choose(&cs, None);
        assert_eq!(i, Some(1));
        assert!(why.contains("only feasible"), "{why}");
    }

    #[test]
    fn auto_picks_post_copy_only_where_possible_and_predicted_shorter() {
        let (mode, stall, why) = checkpoint_mode(None, Ok(()), Some(900), Some(200));
        assert_eq!((mode.as_str(), stall), ("postcopy", Some(200)));
        assert!(why.contains("auto") && why.contains("900"), "{why}");
        let (mode, _, _) = checkpoint_mode(Some("auto"), Ok(()), Some(150), Some(200));
        assert_eq!(mode, "stop-and-copy");
        let (mode, stall, why) = checkpoint_mode(None, Err("no criu".into()), Some(900), Some(200));
        assert_eq!((mode.as_str(), stall), ("stop-and-copy", Some(900)));
        assert!(why.contains("no criu"), "{why}");
        // Asked for, a mode runs as asked.
        let (mode, _, _) = checkpoint_mode(Some("postcopy"), Ok(()), Some(100), Some(900));
        assert_eq!(mode, "postcopy");
        let (mode, _, _) = checkpoint_mode(Some("stop-and-copy"), Ok(()), Some(900), Some(100));
        assert_eq!(mode, "stop-and-copy");
        // Memory-independent: 16x the memory costs far less than 16x the stall.
        assert!(postcopy_ms(1 << 30, 10) < 3 * postcopy_ms(64 << 20, 10));
    }

    #[test]
    fn a_forced_approach_runs_only_if_feasible() {
        let cs = [
            c("container", true, true, Some(900)),
            c("service", false, true, Some(20)),
        ];
        assert_eq!(choose(&cs, Some("container")).0, Some(0));
        let (i, why) = choose(&cs, Some("service"));
        assert_eq!(i, None);
        assert!(why.contains("cannot run: service reason"), "{why}");
        assert!(choose(&cs, Some("orchestrator"))
            .1
            .contains("no adapter offers"));
    }

    #[test]
    fn nothing_feasible_says_why_for_each() {
        let cs = [c("container", false, true, None)];
        let (i, why) = choose(&cs, None);
        assert_eq!(i, None);
        assert!(why.contains("container (x): container reason"), "{why}");
    }
}
