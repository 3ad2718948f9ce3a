//! `ferry doctor`: checks a site the way its first migration would find it, one line per
//! check with what to do when it fails. Local checks need only the site config; the
//! peer checks ask the site's gateway (skipped, and said so, when it is not running).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::{Connect, Output};
use crate::api::types::PeerStatus;
use crate::config::SiteConfig;
use crate::peer::LinkMeasure;

/// Clocks further apart than this are worth fixing (records compare times across sites).
const MAX_SKEW_MS: u64 = 1000;

/// CRIU before this cannot dump TCP sockets on Linux 6.16 and later.
const CRIU_AT_LEAST: (u32, u32) = (4, 2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skipped,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it (failures and warnings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// `ferry doctor`: every check, printed; fails if any check failed.
pub async fn run(connect: &Connect, out: Output) -> anyhow::Result<()> {
    let path = connect.config.clone().context(
        "ferry doctor checks a site: pass --config /etc/ferry/site.toml (or set FERRY_CONFIG)",
    )?;
    let findings = check_site(&path, connect).await;
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
        Output::Text => {
            for f in &findings {
                let mark = match f.status {
                    Status::Ok => "ok  ",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                    Status::Skipped => "skip",
                };
                println!("{mark}  {:<14} {}", f.check, f.detail);
                if let Some(fix) = &f.fix {
                    println!("      {:<14} → {fix}", "");
                }
            }
        }
    }
    let failed = findings.iter().filter(|f| f.status == Status::Fail).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed; see the lines marked FAIL for what to do");
    }
    Ok(())
}

/// Every check of the site configured at `path`.
pub async fn check_site(path: &Path, connect: &Connect) -> Vec<Finding> {
    let mut findings = Vec::new();
    let cfg = match SiteConfig::load(path) {
        Ok(cfg) => {
            findings.push(Finding::ok(
                "config",
                format!("{} (site {})", path.display(), cfg.name),
            ));
            cfg
        }
        Err(e) => {
            findings.push(Finding::bad(
                "config",
                Status::Fail,
                e.to_string(),
                "fix the file (ferry init writes a valid one); nothing else can be checked",
            ));
            return findings;
        }
    };
    findings.extend(file_modes(path, &cfg));
    findings.extend(criu(&cfg.criu_path()).await);
    findings.push(userfaultfd());
    findings.push(pipe_max_size());
    findings.push(cgroups(&cfg.workloads.cgroup_parent));
    findings.push(plugins(&cfg));
    let gateway = gateway_answers(connect).await;
    findings.extend(ports(&cfg, gateway.is_some()));
    findings.extend(peers(&cfg, gateway).await);
    findings
}

/// The config (it holds the API token) and the private key: readable by their owner only.
fn file_modes(config: &Path, cfg: &SiteConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    for (check, path) in [
        ("config mode", config),
        ("key mode", cfg.identity.key.as_path()),
    ] {
        match std::fs::metadata(path) {
            Ok(m) if m.permissions().mode() & 0o077 == 0 => out.push(Finding::ok(
                check,
                format!(
                    "{} is {:o} (owner only)",
                    path.display(),
                    m.permissions().mode() & 0o777
                ),
            )),
            Ok(m) => out.push(Finding::bad(
                check,
                Status::Fail,
                format!(
                    "{} is {:o}: others can read it",
                    path.display(),
                    m.permissions().mode() & 0o777
                ),
                format!("chmod 600 {}", path.display()),
            )),
            Err(e) => out.push(Finding::bad(
                check,
                Status::Fail,
                format!("{}: {e}", path.display()),
                "run ferry init, or point [identity] at the site's key",
            )),
        }
    }
    match std::fs::metadata(&cfg.data_dir) {
        Ok(m) if m.permissions().mode() & 0o002 != 0 => out.push(Finding::bad(
            "data dir",
            Status::Fail,
            format!("{} is writable by anyone", cfg.data_dir.display()),
            format!("chmod o-w {}", cfg.data_dir.display()),
        )),
        Ok(_) => out.push(Finding::ok("data dir", cfg.data_dir.display().to_string())),
        Err(_) => out.push(Finding::ok(
            "data dir",
            format!("{} (made when the gateway starts)", cfg.data_dir.display()),
        )),
    }
    out
}

/// "Version: 4.2.1" → (4, 2).
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

async fn criu(bin: &Path) -> Vec<Finding> {
    let fix_build =
        "run scripts/setup (it builds CRIU 4.2.1 into /usr/local/sbin/criu), or set [criu] path";
    let version = crate::migration::criu_version(bin).await;
    let mut out = Vec::new();
    match version.as_deref().and_then(|v| Some((v, major_minor(v)?))) {
        Some((v, mm)) if mm >= CRIU_AT_LEAST => {
            out.push(Finding::ok("criu", format!("{} {v}", bin.display())));
            out.push(lazy_pages_in_tasks(bin).await);
        }
        Some((v, _)) => out.push(Finding::bad(
            "criu",
            Status::Fail,
            format!(
                "{} is {v}; {}.{} or later is needed (older ones cannot dump TCP sockets on this kernel)",
                bin.display(),
                CRIU_AT_LEAST.0,
                CRIU_AT_LEAST.1
            ),
            fix_build,
        )),
        None => out.push(Finding::bad(
            "criu",
            Status::Fail,
            format!("{} does not run or prints no version", bin.display()),
            fix_build,
        )),
    }
    let checked = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin).arg("check").output(),
    )
    .await;
    match checked {
        Ok(Ok(o)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if text.contains("Looks good") {
                out.push(Finding::ok("criu check", "Looks good"));
            } else {
                out.push(Finding::bad(
                    "criu check",
                    Status::Fail,
                    crate::criu::error_tail(&text),
                    "run `criu check --all` as root and fix what it names",
                ));
            }
        }
        Ok(Err(e)) => out.push(Finding::bad(
            "criu check",
            Status::Fail,
            e.to_string(),
            fix_build,
        )),
        Err(_) => out.push(Finding::bad(
            "criu check",
            Status::Fail,
            "did not finish within 60 s",
            "run `criu check` by hand",
        )),
    }
    out
}

/// Does this CRIU leave a lazy dump's pages in the frozen tasks, and only the stack
/// pointers' pages out of the lazy ones (Ferry's patch)?
async fn lazy_pages_in_tasks(bin: &Path) -> Finding {
    use crate::criu::FerryPatch;
    let bin = bin.to_path_buf();
    let patch = tokio::task::spawn_blocking(move || crate::criu::ferry_patch(&bin))
        .await
        .unwrap_or(FerryPatch::None);
    let fix = "run scripts/setup (it builds CRIU with Ferry's patch, scripts/criu-lazy-pages-in-tasks.patch)";
    match patch {
        FerryPatch::Current => Finding::ok(
            "lazy dump",
            "CRIU leaves a lazy dump's pages in the frozen tasks (Ferry's patch)",
        ),
        FerryPatch::LazyPagesInTasks => Finding::bad(
            "lazy dump",
            Status::Warn,
            "CRIU lacks the second change of Ferry's patch: a lazy dump leaves no page lazy whenever a thread's stack pointer is page-aligned (post-copy then copies every page in the freeze)",
            fix,
        ),
        FerryPatch::None => Finding::bad(
            "lazy dump",
            Status::Warn,
            "CRIU lacks --lazy-pages-in-tasks: a post-copy freeze splices every page into pipes, and grows with memory",
            fix,
        ),
    }
}

fn userfaultfd() -> Finding {
    match crate::sys::uffd::available() {
        Ok(()) => Finding::ok("userfaultfd", "available (post-copy restores can run)"),
        Err(e) => Finding::bad(
            "userfaultfd",
            Status::Warn,
            format!("cannot make one: {e}"),
            "post-copy is unavailable here; run the gateway as root, or set vm.unprivileged_userfaultfd=1",
        ),
    }
}

fn pipe_max_size() -> Finding {
    match crate::criu::lazy_dump_ready() {
        Ok(()) => Finding::ok("pipe size", "fs.pipe-max-size allows lazy dumps"),
        Err(why) => Finding::bad(
            "pipe size",
            Status::Warn,
            why,
            "sysctl -w fs.pipe-max-size=4194304 (scripts/setup does); without it this site cannot be a post-copy source",
        ),
    }
}

fn cgroups(parent: &str) -> Finding {
    let Some(root) = crate::sys::process::cgroup2_mount() else {
        return Finding::bad(
            "cgroups",
            Status::Fail,
            "no cgroup v2 hierarchy is mounted",
            "mount cgroup2 (unified or hybrid): Ferry puts each workload in a cgroup of its own to kill its whole tree",
        );
    };
    let layout = if root == Path::new("/sys/fs/cgroup") {
        "unified"
    } else {
        "hybrid"
    };
    let dir = root.join(parent.trim_start_matches('/'));
    // Made and removed again when it is not there yet: the gateway will make it so.
    let writable = dir.is_dir()
        || std::fs::create_dir(&dir)
            .and_then(|()| std::fs::remove_dir(&dir))
            .is_ok();
    if writable {
        Finding::ok(
            "cgroups",
            format!(
                "v2 at {} ({layout}); workloads under {}",
                root.display(),
                dir.display()
            ),
        )
    } else {
        Finding::bad(
            "cgroups",
            Status::Fail,
            format!("{} cannot be made", dir.display()),
            "run the gateway as root, or set [workloads] cgroup_parent to a delegated cgroup",
        )
    }
}

/// The adapters the site grants and what they ask for: an adapter asking for more than
/// its grant works only partly.
fn plugins(cfg: &SiteConfig) -> Finding {
    let dir = &cfg.plugins.dir;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Finding::bad(
            "plugins",
            Status::Warn,
            format!("{} cannot be read", dir.display()),
            "run scripts/plugins (it builds the adapters into the site's plugin directory)",
        );
    };
    let names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_suffix(".wasm").map(str::to_string)
        })
        .collect();
    if names.is_empty() {
        return Finding::bad(
            "plugins",
            Status::Warn,
            format!("no adapter in {}", dir.display()),
            "run scripts/plugins",
        );
    }
    let ungranted: Vec<&String> = names
        .iter()
        .filter(|n| !cfg.plugins.grants.contains_key(*n))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    if ungranted.is_empty() {
        Finding::ok(
            "plugins",
            format!(
                "{} adapters, each granted: {}",
                sorted.len(),
                sorted.join(", ")
            ),
        )
    } else {
        Finding::bad(
            "plugins",
            Status::Warn,
            format!(
                "{} adapters; without a grant (default grant only): {}",
                sorted.len(),
                ungranted
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "add [plugins.grants.NAME] for each, with what its manifest asks (ferry plugin ls shows both)",
        )
    }
}

/// The site's gateway, if it answers on its API.
async fn gateway_answers(connect: &Connect) -> Option<crate::api::client::ApiClient> {
    let client = connect.client().ok()?;
    let site: Result<serde_json::Value, _> = tokio::time::timeout(
        Duration::from_secs(3),
        client.get::<serde_json::Value>("/v1/site"),
    )
    .await
    .ok()?;
    site.ok().map(|_| client)
}

/// The API and peer ports: free (the gateway is not running), or the gateway's own.
fn ports(cfg: &SiteConfig, gateway_runs: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let tcp = std::net::TcpListener::bind(cfg.api.listen).is_ok();
    let udp = std::net::UdpSocket::bind(cfg.peer.listen).is_ok();
    for (check, addr, free, proto) in [
        ("api port", cfg.api.listen, tcp, "tcp"),
        ("peer port", cfg.peer.listen, udp, "udp"),
    ] {
        if gateway_runs {
            out.push(Finding::ok(
                check,
                format!("{addr}/{proto}: the gateway answers"),
            ));
        } else if free {
            out.push(Finding::ok(check, format!("{addr}/{proto} is free")));
        } else {
            out.push(Finding::bad(
                check,
                Status::Fail,
                format!("{addr}/{proto} is taken, and no gateway of this site answers on its API"),
                format!(
                    "stop what holds {addr} ({proto}), or change the listen address in the config"
                ),
            ));
        }
    }
    out
}

/// Each peer as the running gateway reaches it (QUIC, mutual TLS): RTT and errors.
async fn peers(cfg: &SiteConfig, gateway: Option<crate::api::client::ApiClient>) -> Vec<Finding> {
    if cfg.peers.is_empty() {
        return vec![Finding::bad(
            "peers",
            Status::Warn,
            "no peer configured",
            "ferry peer add NAME ADDRESS FINGERPRINT (the other site's `ferry site` prints its fingerprint)",
        )];
    }
    let Some(client) = gateway else {
        return vec![Finding {
            check: "peers",
            status: Status::Skipped,
            detail: format!(
                "{} configured; start the gateway to check them (ferry gateway --config …)",
                cfg.peers.len()
            ),
            fix: None,
        }];
    };
    let listed: Result<Vec<PeerStatus>, _> = client.get("/v1/peers").await;
    let Ok(listed) = listed else {
        return vec![Finding::bad(
            "peers",
            Status::Fail,
            "the gateway did not list its peers",
            "see the gateway's log",
        )];
    };
    let mut out = Vec::new();
    for p in listed {
        if !p.reachable {
            out.push(Finding::bad(
                "peer",
                Status::Fail,
                format!(
                    "{} at {}: not reachable ({})",
                    p.name,
                    p.address,
                    p.error.as_deref().unwrap_or("no answer")
                ),
                "check the address, the firewall (UDP), and that both sites list each other's fingerprint",
            ));
            continue;
        }
        let link: Result<LinkMeasure, _> = client.get(&format!("/v1/peers/{}/link", p.name)).await;
        match link {
            Ok(l) if l.skew_ms.unsigned_abs() > MAX_SKEW_MS => out.push(Finding::bad(
                "peer",
                Status::Warn,
                format!(
                    "{} at {}: round trip {:.1} ms, {:.0} Mbit/s, clock {:+} ms off",
                    p.name, p.address, l.rtt_ms, l.mbit_s, l.skew_ms
                ),
                "synchronize both sites' clocks (chrony or systemd-timesyncd): records and logs compare times across them",
            )),
            Ok(l) => out.push(Finding::ok(
                "peer",
                format!(
                    "{} at {}: round trip {:.1} ms, {:.0} Mbit/s, clock {:+} ms off",
                    p.name, p.address, l.rtt_ms, l.mbit_s, l.skew_ms
                ),
            )),
            Err(e) => out.push(Finding::bad(
                "peer",
                Status::Warn,
                format!("{} at {}: reachable, but the link check failed: {e}", p.name, p.address),
                "see both gateways' logs",
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_versions_compare_by_major_and_minor() {
        assert_eq!(major_minor("4.2.1"), Some((4, 2)));
        assert!(major_minor("4.2.1").unwrap() >= CRIU_AT_LEAST);
        assert!(major_minor("4.1.1").unwrap() < CRIU_AT_LEAST);
        assert!(major_minor("3.17").unwrap() < CRIU_AT_LEAST);
        assert_eq!(major_minor("x"), None);
    }
}
