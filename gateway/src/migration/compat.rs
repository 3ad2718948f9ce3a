//! Compatibility before any freeze (UMS refuses an incompatible destination before it
//! stops anything): the source measures what restoring its checkpoint needs (kernel and
//! CRIU versions, CPU features, the files the tree maps, memory and disk), the
//! destination compares that with what it has, and every mismatch is a reason the
//! checkpoint approach is not feasible, so the migration is refused (409) with the source
//! still running.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::Engine;
use crate::peer::wire::{CheckpointNeeds, PlanInfo, Response};
use crate::plugins::AdapterCall;
use crate::spec::WorkloadSpec;
use crate::sys::{memory, process};

/// Most files one `CheckpointNeeds` lists (a tree maps a few dozen).
const MAX_FILES: usize = 512;
/// Disk kept free at the destination beyond the image.
const DISK_MARGIN: u64 = 64 << 20;

/// The kernel release here (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// This CPU's feature flags.
fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    flags.unwrap_or_default()
}

/// The CRIU version `bin` reports (`Version: 4.2.1`), asked once per gateway.
pub async fn criu_version(bin: &Path) -> Option<String> {
    static VERSION: tokio::sync::OnceCell<Option<String>> = tokio::sync::OnceCell::const_new();
    VERSION
        .get_or_init(|| async {
            let out = tokio::process::Command::new(bin)
                .arg("--version")
                .output()
                .await
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Version:"))
                .map(|v| v.trim().to_string())
        })
        .await
        .clone()
}

/// Does `pid` see the host's root (not a container's)?
fn sees_host_root(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let root = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    matches!(
        (root(&format!("/proc/{pid}/root/")), root("/proc/self/root/")),
        (Ok(a), Ok(b)) if a == b
    )
}

/// The executables and libraries `pids` map, with their sizes.
fn mapped_files(pids: &[i32]) -> Vec<(String, u64)> {
    let mut paths = BTreeSet::new();
    for pid in pids {
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            paths.insert(exe.display().to_string());
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        for line in maps.lines() {
            // address perms offset dev inode path
            let Some(path) = line.split_whitespace().nth(5) else {
                continue;
            };
            let deleted = line.ends_with("(deleted)");
            let special = ["/dev/", "/proc/", "/sys/", "/memfd:", "/SYSV"]
                .iter()
                .any(|p| path.starts_with(p));
            if path.starts_with('/') && !deleted && !special {
                paths.insert(path.to_string());
            }
        }
    }
    paths
        .into_iter()
        .take(MAX_FILES)
        .filter_map(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.len())))
        .collect()
}

/// The capabilities (but `log`) and programs `granted` allows, as the needs carry them.
fn grant_lists(granted: &crate::plugins::Granted) -> (Vec<String>, Vec<String>) {
    let caps = granted
        .capabilities
        .iter()
        .map(|c| c.as_str().to_string())
        .filter(|c| c != "log")
        .collect();
    (caps, granted.exec.clone())
}

/// What restoring a checkpoint of the tree rooted at `pid` needs of a destination, whose
/// adapter is granted as the source's (`granted`).
pub(super) async fn measure(
    pid: i32,
    criu_bin: &Path,
    granted: Option<&crate::plugins::Granted>,
) -> CheckpointNeeds {
    let (adapter_capabilities, adapter_exec) = granted.map(grant_lists).unwrap_or_default();
    let criu = criu_version(criu_bin).await;
    tokio::task::spawn_blocking(move || {
        let pids = process::tree_pids(pid);
        let files = if sees_host_root(pid) {
            mapped_files(&pids)
        } else {
            Vec::new()
        };
        let memory_bytes = process::tree_rss_bytes(pid).unwrap_or(0);
        CheckpointNeeds {
            kernel: kernel_release(),
            criu,
            cpu_flags: cpu_flags(),
            files,
            memory_bytes,
            image_bytes: memory_bytes,
            adapter_capabilities,
            adapter_exec,
        }
    })
    .await
    .unwrap_or_else(|_| CheckpointNeeds {
        kernel: kernel_release(),
        criu: None,
        cpu_flags: Vec::new(),
        files: Vec::new(),
        memory_bytes: 0,
        image_bytes: 0,
        adapter_capabilities: Vec::new(),
        adapter_exec: Vec::new(),
    })
}

/// What this site has, as the check compares it.
#[derive(Debug, Clone)]
pub(super) struct Here {
    pub kernel: String,
    pub criu: Option<String>,
    pub cpu_flags: Vec<String>,
    /// Size of each needed file here (absent: missing).
    pub files: BTreeMap<String, u64>,
    pub free_disk: Option<u64>,
    pub free_memory: Option<u64>,
    /// The adapter here for the workload's runtime: its name and what it is granted
    /// (capabilities but `log`, `exec` programs).
    pub adapter: Option<(String, Vec<String>, Vec<String>)>,
}

impl Here {
    /// This site, for `needs`, with images going to `incoming`.
    pub(super) async fn measure(
        needs: &CheckpointNeeds,
        incoming: &Path,
        criu_bin: &Path,
        adapter: Option<(String, &crate::plugins::Granted)>,
    ) -> Self {
        let adapter = adapter.map(|(name, g)| {
            let (caps, exec) = grant_lists(g);
            (name, caps, exec)
        });
        let criu = criu_version(criu_bin).await;
        let (paths, incoming) = (
            needs
                .files
                .iter()
                .map(|(p, _)| p.clone())
                .collect::<Vec<_>>(),
            incoming.to_path_buf(),
        );
        let measured = tokio::task::spawn_blocking(move || {
            let files = paths
                .into_iter()
                .filter_map(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.len())))
                .collect();
            (files, process::free_bytes(&incoming).ok())
        })
        .await
        .unwrap_or_default();
        Self {
            kernel: kernel_release(),
            criu,
            cpu_flags: cpu_flags(),
            files: measured.0,
            free_disk: measured.1,
            free_memory: memory::available_bytes(),
            adapter,
        }
    }
}

impl Engine {
    /// Could this site run `spec` (and, with `service`, could that adapter sync it here)?
    pub(super) async fn probe_here(
        &self,
        peer: &str,
        spec: &WorkloadSpec,
        service: Option<&str>,
        needs: Option<&CheckpointNeeds>,
    ) -> Response {
        let adapter = self.plugins.adapter(&spec.runtime);
        let runtime_error = match &adapter {
            Err(e) => Some(e.to_string()),
            Ok(_) => self.workloads.check_free(spec).err().map(|e| e.to_string()),
        };
        let mut incompatible = Vec::new();
        if let Some(needs) = needs {
            if let Err(e) = &adapter {
                incompatible.push(e.to_string());
            }
            let granted = adapter
                .as_ref()
                .ok()
                .and_then(|a| Some((a.name().to_string(), self.plugins.granted_to(a.name())?)));
            let here = Here::measure(
                needs,
                &self.incoming_dir,
                self.criu.bin(),
                granted.as_ref().map(|(n, g)| (n.clone(), g)),
            )
            .await;
            incompatible.extend(problems(needs, &here));
            if !incompatible.is_empty() {
                tracing::info!(peer, workload = %spec.name, problems = ?incompatible, "this site cannot restore the workload's checkpoint");
            }
        }
        let service = match service {
            None => None,
            Some(name) => Some(match self.plugins.service(name) {
                Err(e) => PlanInfo {
                    feasible: false,
                    reason: e.to_string(),
                    expected_downtime_ms: None,
                },
                Ok(adapter) => {
                    let placement = self.workloads.placement_of(&spec.name);
                    let about =
                        AdapterCall::new(spec.clone(), placement, &self.site).with_peer(peer);
                    match adapter.probe(about).await {
                        Ok(p) => PlanInfo {
                            feasible: p.feasible,
                            reason: p.reason,
                            expected_downtime_ms: p.expected_downtime_ms,
                        },
                        Err(e) => PlanInfo {
                            feasible: false,
                            reason: e.to_string(),
                            expected_downtime_ms: None,
                        },
                    }
                }
            }),
        };
        Response::Probed {
            runtime_error,
            incompatible,
            service,
        }
    }
}

/// `major.minor.patch` as numbers, for ordering versions ("6.18.0-1-amd64" → [6, 18, 0]).
fn version_numbers(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .take(3)
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Every reason `here` cannot restore what `needs` describes, in words an operator can
/// act on; empty when it can.
pub(super) fn problems(needs: &CheckpointNeeds, here: &Here) -> Vec<String> {
    let mut out = Vec::new();
    if version_numbers(&here.kernel) < version_numbers(&needs.kernel) {
        out.push(format!(
            "kernel {} here is older than the source's {}",
            here.kernel, needs.kernel
        ));
    }
    match (&needs.criu, &here.criu) {
        (Some(there), Some(mine)) if version_numbers(mine) < version_numbers(there) => {
            out.push(format!(
                "CRIU {mine} here is older than the source's {there}: upgrade it (scripts/setup)"
            ));
        }
        (Some(_), None) => out.push("CRIU does not run here (criu --version failed)".into()),
        _ => {}
    }
    let mine: BTreeSet<&str> = here.cpu_flags.iter().map(String::as_str).collect();
    let missing: Vec<&str> = needs
        .cpu_flags
        .iter()
        .map(String::as_str)
        .filter(|f| !mine.contains(f))
        .collect();
    if !missing.is_empty() && !mine.is_empty() {
        out.push(format!(
            "this CPU lacks features the source's has: {}",
            missing.join(" ")
        ));
    }
    for (path, size) in &needs.files {
        match here.files.get(path) {
            None => out.push(format!("{path} is missing here")),
            Some(s) if s != size => out.push(format!(
                "{path} differs here ({s} bytes, {size} at the source)"
            )),
            Some(_) => {}
        }
    }
    if let Some(free) = here.free_disk {
        let need = needs.image_bytes.saturating_add(DISK_MARGIN);
        if free < need {
            out.push(format!(
                "not enough free disk for the image: {} MB free, {} MB needed",
                free >> 20,
                need >> 20
            ));
        }
    }
    if let Some((name, caps, exec)) = &here.adapter {
        let lacking: Vec<&str> = needs
            .adapter_capabilities
            .iter()
            .filter(|c| !caps.contains(c))
            .map(String::as_str)
            .chain(
                needs
                    .adapter_exec
                    .iter()
                    .filter(|p| !exec.contains(p))
                    .map(String::as_str),
            )
            .collect();
        if !lacking.is_empty() {
            out.push(format!(
                "adapter {name} here is not granted what it is at the source: {}; add it to [plugins.grants.{name}]",
                lacking.join(", ")
            ));
        }
    }
    if let Some(free) = here.free_memory {
        if free < needs.memory_bytes {
            out.push(format!(
                "not enough free memory: {} MB available, the workload holds {} MB",
                free >> 20,
                needs.memory_bytes >> 20
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs() -> CheckpointNeeds {
        CheckpointNeeds {
            kernel: "6.18.0-1-amd64".into(),
            criu: Some("4.2.1".into()),
            cpu_flags: vec!["sse2".into(), "avx2".into()],
            files: vec![("/usr/bin/redis-server".into(), 1000)],
            memory_bytes: 100 << 20,
            image_bytes: 100 << 20,
            adapter_capabilities: vec!["criu".into(), "process".into()],
            adapter_exec: Vec::new(),
        }
    }

    fn here() -> Here {
        Here {
            kernel: "6.18.0-1-amd64".into(),
            criu: Some("4.2.1".into()),
            cpu_flags: vec!["sse2".into(), "avx2".into(), "avx512f".into()],
            files: [("/usr/bin/redis-server".to_string(), 1000)].into(),
            free_disk: Some(10 << 30),
            free_memory: Some(10 << 30),
            adapter: Some((
                "process".into(),
                vec!["criu".into(), "process".into(), "exec".into()],
                vec!["/usr/bin/true".into()],
            )),
        }
    }

    #[test]
    fn the_same_machine_is_compatible() {
        assert_eq!(problems(&needs(), &here()), Vec::<String>::new());
    }

    #[test]
    fn each_mismatch_is_a_reason() {
        let mut h = here();
        h.kernel = "6.1.0-28-amd64".into();
        h.criu = Some("3.17".into());
        h.cpu_flags = vec!["sse2".into()];
        h.files.clear();
        h.free_disk = Some(10 << 20);
        h.free_memory = Some(1 << 20);
        let p = problems(&needs(), &h);
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(
            p[0].contains("kernel 6.1.0-28-amd64 here is older"),
            "{p:?}"
        );
        assert!(p[1].contains("CRIU 3.17 here is older"), "{p:?}");
        assert!(p[2].ends_with("avx2"), "{p:?}");
        assert!(p[3].contains("/usr/bin/redis-server is missing"), "{p:?}");
        assert!(p[4].contains("free disk"), "{p:?}");
        assert!(p[5].contains("free memory"), "{p:?}");
        // A file of another size is a different binary.
        let mut h = here();
        h.files.insert("/usr/bin/redis-server".into(), 999);
        let p = problems(&needs(), &h);
        assert_eq!(
            p,
            ["/usr/bin/redis-server differs here (999 bytes, 1000 at the source)"]
        );
    }

    #[test]
    fn an_adapter_granted_less_than_at_the_source_is_a_reason() {
        let mut n = needs();
        n.adapter_exec = vec!["runc".into()];
        let mut h = here();
        h.adapter = Some(("process".into(), vec!["process".into()], Vec::new()));
        assert_eq!(
            problems(&n, &h),
            ["adapter process here is not granted what it is at the source: criu, runc; add it to [plugins.grants.process]"]
        );
    }

    #[test]
    fn a_newer_destination_is_fine_and_versions_compare_as_numbers() {
        let mut h = here();
        h.kernel = "6.20.1".into();
        h.criu = Some("4.10".into());
        assert!(problems(&needs(), &h).is_empty());
        assert_eq!(version_numbers("6.18.0-1-amd64"), [6, 18, 0]);
        assert!(version_numbers("4.10") > version_numbers("4.2.1"));
    }
}
