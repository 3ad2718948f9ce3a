//! Site hooks: programs `site.toml`'s `[hooks]` runs around a workload's state: after a
//! checkpoint is taken (`post_checkpoint`: e.g. deregister from a load balancer once a
//! workload moved) and before a restore (`pre_restore`: e.g. warm a cache; a hook that
//! fails refuses the restore, so a migration rolls back). Each runs with the workload's
//! name, the site and the checkpoint or migration id in its arguments (`{workload}`,
//! `{site}`, `{id}`) and environment (`FERRY_HOOK`, `FERRY_WORKLOAD`, `FERRY_SITE`,
//! `FERRY_ID`), under a deadline (`timeout_ms`, at most 120 s); its output goes to the
//! gateway's log.
//!
//! Then the workload's adapter runs its own hook of the same name, if it exports
//! `ferry:hooks@0.1.0` (`wit/ferry-hooks@0.1.0`): inside its instance, with its grants and
//! under its call deadline. A failing pre-restore hook of either kind refuses the restore.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plugins::{AdapterCall, AdapterHandle};
pub use crate::spec::Hook;

/// `[hooks]` in `site.toml`: each a program and its arguments (empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    #[serde(default)]
    pub post_checkpoint: Vec<String>,
    #[serde(default)]
    pub pre_restore: Vec<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Longest any hook may run.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// What a hook is run about.
#[derive(Clone)]
pub struct About<'a> {
    pub workload: &'a str,
    pub site: &'a str,
    /// The checkpoint's or the migration's id.
    pub id: &'a str,
    /// The workload's adapter, and the call about the workload it is given.
    pub adapter: Option<(&'a AdapterHandle, &'a AdapterCall)>,
}

#[derive(Debug, Clone, Default)]
pub struct Hooks {
    cfg: HooksConfig,
}

impl Hooks {
    pub fn new(cfg: HooksConfig) -> Self {
        Self { cfg }
    }

    /// Runs the site's `hook`, then the adapter's (nothing for either that has none); an
    /// error says which failed and why.
    pub async fn run(&self, hook: Hook, about: &About<'_>) -> Result<(), String> {
        self.run_site(hook, about).await?;
        let Some((adapter, call)) = about.adapter else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let outcome = adapter
            .hook(call.clone(), hook, about.id)
            .await
            .map_err(|e| e.to_string());
        tracing::debug!(
            hook = hook.as_str(),
            workload = about.workload,
            id = about.id,
            adapter = adapter.name(),
            ms = started.elapsed().as_millis() as u64,
            ok = outcome.is_ok(),
            "adapter hook called"
        );
        outcome
    }

    async fn run_site(&self, hook: Hook, about: &About<'_>) -> Result<(), String> {
        let argv = match hook {
            Hook::PostCheckpoint => &self.cfg.post_checkpoint,
            Hook::PreRestore => &self.cfg.pre_restore,
        };
        let Some((program, args)) = argv.split_first() else {
            return Ok(());
        };
        let fill = |a: &String| {
            a.replace("{workload}", about.workload)
                .replace("{site}", about.site)
                .replace("{id}", about.id)
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args.iter().map(fill))
            .env("FERRY_HOOK", hook.as_str())
            .env("FERRY_WORKLOAD", about.workload)
            .env("FERRY_SITE", about.site)
            .env("FERRY_ID", about.id)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let limit = Duration::from_millis(self.cfg.timeout_ms).min(MAX_TIMEOUT);
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| {
                format!(
                    "hook {} ({program}) ran past its {} ms",
                    hook.as_str(),
                    limit.as_millis()
                )
            })?
            .map_err(|e| format!("hook {} cannot run {program}: {e}", hook.as_str()))?;
        let tail = |b: &[u8]| {
            let t = String::from_utf8_lossy(b);
            let t = t.trim();
            t[t.len().saturating_sub(1024)..].to_string()
        };
        tracing::info!(hook = hook.as_str(), workload = about.workload, id = about.id, status = %out.status, ms = started.elapsed().as_millis() as u64, stdout = %tail(&out.stdout), stderr = %tail(&out.stderr), "site hook ran");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "hook {} ({program}) failed ({}): {}",
                hook.as_str(),
                out.status,
                tail(&out.stderr)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hook_gets_its_arguments_and_a_failure_or_overrun_is_reported() {
        let dir = std::env::temp_dir().join(format!("ferry-hooks-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let out = dir.join("ran");
        let hooks = Hooks::new(HooksConfig {
            post_checkpoint: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "echo \"$FERRY_HOOK {{workload}} {{id}}\" > {}",
                    out.display()
                ),
            ],
            pre_restore: vec!["false".into()],
            timeout_ms: 5_000,
        });
        let about = About {
            workload: "redis",
            site: "a",
            id: "c1",
            adapter: None,
        };
        assert_eq!(hooks.run(Hook::PostCheckpoint, &about).await, Ok(()));
        let ran = std::fs::read_to_string(&out).unwrap_or_default();
        assert_eq!(ran.trim(), "post_checkpoint redis c1");
        assert!(hooks.run(Hook::PreRestore, &about).await.is_err());
        let slow = Hooks::new(HooksConfig {
            pre_restore: vec!["sleep".into(), "5".into()],
            timeout_ms: 100,
            ..HooksConfig::default()
        });
        let err = slow.run(Hook::PreRestore, &about).await.unwrap_err();
        assert!(err.contains("ran past"), "{err}");
        assert_eq!(Hooks::default().run(Hook::PreRestore, &about).await, Ok(()));
    }
}
