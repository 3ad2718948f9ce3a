//! Programs adapters run through `exec` that are still running, recorded on disk (one file
//! per program: its pid and start time) while the call waits for them. Each runs as the
//! leader of its own process group. A gateway that died mid-call leaves its programs
//! running with nobody to read their answer: a `podman container restore` of a move the
//! restarted gateway has already rolled back would still start the container, a second
//! copy. So at start, before any recovery, every recorded program still alive is killed
//! with its group and waited for.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::process;

/// How long a killed group may take to go.
const REAP_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Inflight {
    dir: PathBuf,
}

/// One recorded program; the record goes when this is dropped.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Inflight {
    /// The registry at `dir` (created owner-only).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Records program `pid`, just started; `None` if it cannot be (then it is only
    /// bounded by its call, as before).
    pub fn record(&self, pid: i32) -> Option<Record> {
        let started = process::start_time(pid)?;
        let path = self.dir.join(pid.to_string());
        match std::fs::write(&path, started.to_string()) {
            Ok(()) => Some(Record { path }),
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot record a running adapter program");
                None
            }
        }
    }

    /// Kills every recorded program a previous gateway left running, with its process
    /// group, and waits (bounded) until each is gone; returns how many there were.
    pub fn reap_orphans(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut killed = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let pid = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok());
            let started = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            if let (Some(pid), Some(started)) = (pid, started) {
                if process::alive(pid, started) {
                    tracing::warn!(pid, "an adapter program of the previous gateway still runs; killing it with its process group");
                    process::kill_group_now(pid);
                    killed.push((pid, started));
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        let deadline = Instant::now() + REAP_WAIT;
        while killed.iter().any(|(p, s)| process::alive(*p, *s)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        killed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_program_left_running_is_killed_with_its_group() {
        let dir = std::env::temp_dir().join(format!("ferry-inflight-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let inflight = Inflight::open(&dir).expect("registry");
        // A group leader with a child in its group, as `podman` with its `runc`.
        let mut leader = std::process::Command::new("sh");
        leader.args(["-c", "sleep 60 & sleep 60"]);
        std::os::unix::process::CommandExt::process_group(&mut leader, 0);
        let mut leader = leader.spawn().expect("sh starts");
        let pid = leader.id() as i32;
        std::thread::sleep(Duration::from_millis(100));
        let record = inflight.record(pid).expect("recorded");
        // The gateway dies: the record stays.
        std::mem::forget(record);
        let started = process::start_time(pid).expect("alive");
        assert_eq!(Inflight::open(&dir).expect("reopened").reap_orphans(), 1);
        let _ = leader.wait();
        assert!(!process::alive(pid, started));
        // Its child went with it: nothing of the group is left.
        let deadline = Instant::now() + Duration::from_secs(5);
        while process::group_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!process::group_alive(pid));
        assert_eq!(std::fs::read_dir(&dir).map_or(1, Iterator::count), 0);
        // A finished program's record goes with its guard.
        let mut done = std::process::Command::new("sleep")
            .arg("0.1")
            .spawn()
            .expect("sleep");
        let record = inflight.record(done.id() as i32);
        let _ = done.wait();
        drop(record);
        assert_eq!(inflight.reap_orphans(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
