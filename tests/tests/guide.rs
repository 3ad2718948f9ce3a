//! The README's "A real two-host setup", followed as written: each site is a host of its
//! own, with its own network namespace *and* mount namespace (its own `/etc/ferry`,
//! `/var/lib/ferry` and `/usr/local/bin`), and runs the guide's commands in order:
//! install the binary, `ferry init`, `scripts/plugins`, `peer add`, the gateway, then, from
//! the client verbs, `workload run` and `migrate`.
//!
//! Two steps are not run here: `scripts/setup` (the test command has run it already) and
//! the release build (the debug build the tests use is installed instead). There is no
//! `sudo` in CI: the commands run as root, as the README says to.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_e2e::{ferry_bin, run, wait_for};

const SUBNET: &str = "10.214.0";

/// One host: a network namespace, and a process holding a mount namespace with the
/// host's own `/etc/ferry`, `/var/lib/ferry` and `/usr/local/bin`.
struct Host {
    name: &'static str,
    netns: String,
    addr: String,
    holder: Child,
    gateway: Option<Child>,
}

impl Host {
    fn start(name: &'static str, host: u8, netns: String) -> Result<Self> {
        for dir in ["/etc/ferry", "/var/lib/ferry", "/usr/local/bin"] {
            std::fs::create_dir_all(dir)?;
        }
        let mut holder = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs tmpfs /etc/ferry && mount -t tmpfs tmpfs /var/lib/ferry \
                 && mount -t tmpfs tmpfs /usr/local/bin && echo ready && exec sleep infinity",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the host's mount namespace")?;
        let mut ready = String::new();
        if let Some(out) = holder.stdout.as_mut() {
            use std::io::BufRead;
            std::io::BufReader::new(out).read_line(&mut ready)?;
        }
        if ready.trim() != "ready" {
            let _ = holder.kill();
            bail!("the {name} host's mounts failed");
        }
        Ok(Self {
            name,
            netns,
            addr: format!("{SUBNET}.{host}"),
            holder,
            gateway: None,
        })
    }

    /// A command run on this host: in its network and mount namespaces.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg(program);
        c
    }

    fn sh(&self, script: &str) -> Result<String> {
        // Entering the mount namespace leaves the working directory at its root.
        let in_repo = format!("cd {} && {script}", repo().display());
        run(self
            .command("sh")
            .args(["-c", &in_repo])
            .env("PATH", path()))
        .with_context(|| format!("on {}: {script}", self.name))
    }

    /// The gateway, as the guide starts it. Its standard streams are opened on the host
    /// (in its mount namespace), as a shell there would give them: a descriptor opened in
    /// the machine's namespace would reach its workloads, and CRIU could not place it.
    fn start_gateway(&mut self) -> Result<()> {
        let script = format!(
            "exec ferry gateway --config /etc/ferry/site.toml </dev/null >>{} 2>&1",
            self.log_path().display()
        );
        let child = self
            .command("sh")
            .args(["-c", &script])
            .env("FERRY_LOG", "info")
            .env("PATH", path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.gateway = Some(child);
        wait_for("the gateway's API", Duration::from_secs(30), || {
            self.sh("ferry --config /etc/ferry/site.toml site >/dev/null")
                .ok()
        })?;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("ferry-e2e-guide-{}.log", self.name))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.as_mut() {
            let _ = g.kill();
            let _ = g.wait();
        }
        // The workloads the gateways started, by their group.
        for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            ferry_e2e::kill_workload_groups(&Path::new(mount).join("ferry").join(self.name));
            let _ = std::fs::remove_dir(Path::new(mount).join("ferry"));
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn path() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    format!(
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{home}/.cargo/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The machine's own `/etc/ferry/site.toml`, if it has one: when it was last changed.
fn machine_config() -> Option<std::time::SystemTime> {
    std::fs::metadata("/etc/ferry/site.toml")
        .and_then(|m| m.modified())
        .ok()
}

/// The fingerprint `ferry init` printed.
fn fingerprint(init_output: &str) -> Result<String> {
    init_output
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint"))
        .map(|f| f.trim().to_string())
        .filter(|f| f.len() == 64)
        .with_context(|| format!("ferry init printed no fingerprint: {init_output}"))
}

#[test]
fn the_two_host_guide_works_as_written() -> Result<()> {
    let machine_before = machine_config();
    let (ns_edge, ns_cloud) = ("fy-guide-edge".to_string(), "fy-guide-cloud".to_string());
    for ns in [&ns_edge, &ns_cloud] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", ns]))?;
    }
    let mut edge = Host::start("edge", 1, ns_edge.clone())?;
    let mut cloud = Host::start("cloud", 2, ns_cloud.clone())?;
    run(Command::new("ip").args([
        "link", "add", "fyguidee", "type", "veth", "peer", "name", "fyguidec",
    ]))?;
    for (ns, dev, host) in [
        (&ns_edge, "fyguidee", &edge),
        (&ns_cloud, "fyguidec", &cloud),
    ] {
        run(Command::new("ip").args(["link", "set", dev, "netns", ns]))?;
        let addr = format!("{}/24", host.addr);
        run(Command::new("ip").args(["-n", ns, "addr", "add", &addr, "dev", dev]))?;
        run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
        run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
    }

    // On each host: the binary, `ferry init`, the adapters.
    let ferry = ferry_bin()?;
    let mut fingerprints = Vec::new();
    for host in [&edge, &cloud] {
        host.sh(&format!("install {} /usr/local/bin/", ferry.display()))?;
        let init = host.sh(&format!(
            "ferry init --name {} --dir /etc/ferry --api-listen 127.0.0.1:7443 \
             --peer-listen 0.0.0.0:7444 --allow-command redis-server",
            host.name
        ))?;
        fingerprints.push(fingerprint(&init)?);
        host.sh("scripts/plugins /etc/ferry/plugins process runc podman docker")?;
    }
    // Each host's files are its own.
    assert!(edge
        .sh("grep -q 'name = \"edge\"' /etc/ferry/site.toml")
        .is_ok());
    assert!(cloud
        .sh("grep -q 'name = \"cloud\"' /etc/ferry/site.toml")
        .is_ok());
    assert_ne!(fingerprints[0], fingerprints[1]);

    // Tell each site about the other, and start the gateways.
    edge.sh(&format!(
        "ferry --config /etc/ferry/site.toml peer add cloud {}:7444 {}",
        cloud.addr, fingerprints[1]
    ))?;
    cloud.sh(&format!(
        "ferry --config /etc/ferry/site.toml peer add edge {}:7444 {}",
        edge.addr, fingerprints[0]
    ))?;
    edge.start_gateway()?;
    cloud.start_gateway()?;
    let peers = edge.sh("ferry --config /etc/ferry/site.toml peer ls")?;
    assert!(peers.contains("cloud"), "{peers}");

    // The client verbs, from FERRY_CONFIG.
    let client = "export FERRY_CONFIG=/etc/ferry/site.toml;";
    edge.sh(&format!(
        "{client} ferry workload run redis --port 6379 --route 0.0.0.0:16379 -- \
         redis-server --port 6379 --save ''"
    ))?;
    edge.sh("redis-cli -p 6379 SET guide 'moved as written'")?;
    edge.sh(
        "seq 1 20000 | awk '{print \"SET key:\" $1 \" value-\" $1}' | redis-cli -p 6379 >/dev/null",
    )?;
    let keys = edge.sh("redis-cli -p 6379 DBSIZE")?;
    let moved = edge.sh(&format!("{client} ferry migrate redis --to cloud"));
    let moved = moved.with_context(|| format!("edge:\n{}\ncloud:\n{}", edge.log(), cloud.log()))?;
    assert!(moved.contains("completed"), "{moved}");

    // The workload runs at cloud, with its data, and edge's route leads there.
    let at_cloud = cloud.sh(&format!("{client} ferry workload ls"))?;
    assert!(at_cloud.contains("redis"), "{at_cloud}");
    assert_eq!(
        cloud.sh("redis-cli -p 6379 GET guide")?.trim(),
        "moved as written"
    );
    assert_eq!(cloud.sh("redis-cli -p 6379 DBSIZE")?.trim(), keys.trim());
    assert_eq!(
        edge.sh("redis-cli -p 16379 GET guide")?.trim(),
        "moved as written"
    );
    let at_edge = edge.sh(&format!("{client} ferry --output json workload ls"))?;
    assert_eq!(at_edge.trim(), "[]", "edge still lists a workload");
    // Nothing of either host's files reached the machine's own /etc/ferry.
    assert_eq!(
        machine_config(),
        machine_before,
        "the machine's /etc/ferry changed"
    );
    drop(edge);
    drop(cloud);
    Ok(())
}
