//! Docker for the end-to-end tests: one `dockerd` per site, started inside the site's
//! network namespace (so `--network host` containers serve on the site's network), each
//! with its own data root, exec root, socket, managed containerd and cgroup parent, in
//! experimental mode (checkpoints), with CRIU >= 4.2 first in its PATH and
//! `CRIU_CONFIG_FILE` naming `tcp-close` for the CRIU that runc runs under it. Dropping
//! [`Docker`] removes every container, stops both daemons (and the containerd and shims
//! under them), unmounts what they mounted, removes their files, cgroups and any firewall
//! chain a checkpoint left, even when the test failed.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{redis_container_args, redis_rootfs, run, TwoSites};

/// The image the tests run Redis from in Docker, imported at both sites.
pub const DOCKER_REDIS: &str = "ferry-e2e-redis:latest";

/// The PATH the daemons run with: the CRIU scripts/setup builds comes first.
const DAEMON_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CRIU's options for the daemons' checkpoints and restores: open TCP connections are
/// closed (their clients reconnect through the ingress), not moved.
const CRIU_OPTIONS: &str = "tcp-close\nskip-in-flight\n";

/// One site's daemon.
struct Daemon {
    site: String,
    netns: String,
    /// Exec root, socket, pid file, CRIU options and log.
    run_dir: PathBuf,
    data_root: PathBuf,
    cgroup_parent: String,
    child: Option<Child>,
}

impl Daemon {
    fn socket(&self) -> String {
        format!("unix://{}/docker.sock", self.run_dir.display())
    }

    /// `docker -H SOCKET ARGS…` against this daemon.
    fn docker(&self, args: &[&str]) -> Result<String> {
        run(Command::new("docker")
            .arg("-H")
            .arg(self.socket())
            .args(args))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.run_dir.join("dockerd.log")).unwrap_or_default()
    }

    fn start(&mut self) -> Result<()> {
        self.clean();
        fs::create_dir_all(&self.run_dir)?;
        fs::create_dir_all(&self.data_root)?;
        let conf = self.run_dir.join("criu.conf");
        fs::write(&conf, CRIU_OPTIONS)?;
        // Its own (empty) configuration: never /etc/docker/daemon.json.
        let config = self.run_dir.join("daemon.json");
        fs::write(&config, "{}\n")?;
        let log = fs::File::create(self.run_dir.join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg("--experimental")
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(&self.data_root)
            .arg("--exec-root")
            .arg(self.run_dir.join("exec"))
            .arg("-H")
            .arg(self.socket())
            .arg("--pidfile")
            .arg(self.run_dir.join("docker.pid"))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .env_clear()
            .env("PATH", DAEMON_PATH)
            .env("CRIU_CONFIG_FILE", &conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("cannot start dockerd (scripts/setup installs docker.io)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "dockerd of site {} exited ({status}): {}",
                    self.site,
                    self.log()
                );
            }
            if self
                .docker(&["version", "--format", "{{.Server.Experimental}}"])
                .is_ok_and(|v| v.trim() == "true")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd of site {} not ready within 60 s: {}",
                    self.site,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the daemon and removes everything it made (also what an interrupted earlier
    /// run left).
    fn clean(&mut self) {
        if self.run_dir.join("docker.pid").is_file() || self.child.is_some() {
            if let Ok(ids) = self.docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.docker(&args);
                }
            }
        }
        let pid = self.child.as_ref().map(Child::id).or_else(|| {
            fs::read_to_string(self.run_dir.join("docker.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
        });
        if let Some(pid) = pid {
            signal(pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            signal(pid, "KILL");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its containerd and the shims under it, should they outlive it: the processes
        // whose command line names this daemon's directories.
        for pid in processes_naming(&[&self.run_dir, &self.data_root]) {
            signal(pid, "KILL");
        }
        unmount_below(&[&self.run_dir, &self.data_root]);
        let _ = fs::remove_dir_all(&self.data_root);
        let _ = fs::remove_dir_all(&self.run_dir);
        remove_cgroups(&self.cgroup_parent);
        self.remove_criu_firewall();
    }

    /// The `CRIU` chain a checkpoint can leave in the site's namespace (CRIU's network
    /// lock), if any.
    fn remove_criu_firewall(&self) {
        let ns = format!("--net=/run/netns/{}", self.netns);
        if !Path::new(&format!("/run/netns/{}", self.netns)).exists() {
            return;
        }
        let iptables = |args: &[&str]| {
            Command::new("nsenter")
                .arg(&ns)
                .arg("iptables")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if iptables(&["-n", "-L", "CRIU"]) {
            for chain in ["INPUT", "OUTPUT"] {
                while iptables(&["-D", chain, "-j", "CRIU"]) {}
            }
            iptables(&["-F", "CRIU"]);
            iptables(&["-X", "CRIU"]);
        }
    }
}

/// Both sites' Docker daemons, the Redis image imported at each, and this test's hold on
/// Docker (one Docker test at a time: their sites share names, so their containers would).
pub struct Docker {
    daemons: Vec<Daemon>,
    /// `docker-host` setting for the workloads: `{site}` is the site's name.
    pub host_setting: String,
    _lock: fs::File,
}

impl Docker {
    /// Starts a daemon in each of `sites`' namespaces and imports [`DOCKER_REDIS`] into
    /// both (built from this machine's `redis-server`: no registry is reachable).
    pub fn start(sites: &TwoSites) -> Result<Self> {
        let lock = lock()?;
        let tag = sites
            .a
            .netns
            .strip_prefix("fy-")
            .and_then(|n| n.strip_suffix("-a"))
            .context("site a's namespace is not fy-TAG-a")?
            .to_string();
        let daemon = |site: &crate::Site| Daemon {
            site: site.name.clone(),
            netns: site.netns.clone(),
            run_dir: PathBuf::from(format!("/run/ferry-docker/{tag}-{}", site.name)),
            data_root: PathBuf::from(format!("/var/lib/ferry-docker/{tag}-{}", site.name)),
            cgroup_parent: format!("ferry-docker-{tag}-{}", site.name),
            child: None,
        };
        let mut docker = Self {
            daemons: vec![daemon(&sites.a), daemon(&sites.b)],
            host_setting: format!(
                "docker-host=unix:///run/ferry-docker/{tag}-{{site}}/docker.sock"
            ),
            _lock: lock,
        };
        for d in &mut docker.daemons {
            d.start()?;
        }
        let dir = sites.root.join("docker-image");
        let rootfs = dir.join("rootfs");
        redis_rootfs(&rootfs)?;
        let tar = dir.join("rootfs.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))?;
        let tar = tar.display().to_string();
        for d in &docker.daemons {
            d.docker(&["import", &tar, DOCKER_REDIS])?;
        }
        Ok(docker)
    }

    fn daemon(&self, site: &str) -> Result<&Daemon> {
        self.daemons
            .iter()
            .find(|d| d.site == site)
            .with_context(|| format!("no Docker daemon at site {site}"))
    }

    /// `docker ARGS…` against `site`'s daemon.
    pub fn docker(&self, site: &str, args: &[&str]) -> Result<String> {
        self.daemon(site)?.docker(args)
    }

    /// The names of the containers `site`'s daemon has, running or not.
    pub fn containers(&self, site: &str) -> Result<Vec<String>> {
        Ok(self
            .docker(site, &["ps", "-a", "--format", "{{.Names}}"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Starts Redis on `port` at site A as workload `name` in a Docker container of
    /// [`DOCKER_REDIS`], with more `workload run` flags (`--route`).
    pub fn run_redis_at_a(
        &self,
        sites: &TwoSites,
        name: &str,
        port: u16,
        flags: &[&str],
    ) -> Result<()> {
        let image = format!("image={DOCKER_REDIS}");
        let p = port.to_string();
        let mut args: Vec<String> = [
            "workload",
            "run",
            name,
            "--runtime",
            "docker",
            "--setting",
            &image,
            "--setting",
            &self.host_setting,
            "--port",
            &p,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(flags.iter().map(ToString::to_string));
        args.push("--".into());
        args.extend(redis_container_args(port));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        sites.a.ferry(&refs)?;
        Ok(())
    }

    /// Both daemons' logs (printed when a test fails).
    pub fn logs(&self) -> String {
        self.daemons
            .iter()
            .map(|d| format!("--- dockerd {} ---\n{}", d.site, tail(&d.log(), 60)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for d in &mut self.daemons {
            d.clean();
        }
        // The parents, once no test uses them.
        let _ = fs::remove_dir("/run/ferry-docker");
        let _ = fs::remove_dir("/var/lib/ferry-docker");
    }
}

/// The Docker tests' lock (as `runtime_locks` in the harness for runc and podman).
fn lock() -> Result<fs::File> {
    let path = std::env::temp_dir().join("ferry-e2e-docker.lock");
    let file = fs::File::create(&path)
        .with_context(|| format!("cannot open the lock {}", path.display()))?;
    file.lock()
        .with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Processes whose command line names one of `dirs`.
fn processes_naming(dirs: &[&Path]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                dirs.iter().any(|d| cmd.contains(&d.display().to_string()))
            })
        })
        .collect()
}

/// Unmounts every mount at or below `dirs` (overlays, shm, netns files), deepest first.
fn unmount_below(dirs: &[&Path]) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| dirs.iter().any(|d| Path::new(p).starts_with(d)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount")
            .args(["-l", p])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes the cgroup `name` (relative to this process's cgroup, as Docker placed its
/// containers) and the containers' cgroups in it, in every hierarchy.
fn remove_cgroups(name: &str) {
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let mount = match controllers {
            "" => "unified".to_string(),
            c => c.trim_start_matches("name=").to_string(),
        };
        for root in [
            Path::new("/sys/fs/cgroup").join(&mount),
            PathBuf::from("/sys/fs/cgroup"),
        ] {
            let parent = root.join(path.trim_start_matches('/')).join(name);
            if !parent.is_dir() {
                continue;
            }
            if let Ok(children) = fs::read_dir(&parent) {
                for child in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = fs::write(child.path().join("cgroup.kill"), "1");
                    let _ = fs::remove_dir(child.path());
                }
            }
            let _ = fs::remove_dir(&parent);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
