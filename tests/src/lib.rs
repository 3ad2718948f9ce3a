//! Harness for Ferry's end-to-end tests and demo: two sites as network namespaces joined
//! by a veth pair, one real `ferry gateway` process in each, driven through the real CLI.
//! Everything it creates (namespaces, cgroups, processes, files) is removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod docker;
pub mod latency_svg;

/// Where the `ferry` binary is: `FERRY_BIN`, else next to this executable's target dir.
pub fn ferry_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/test-binary or target/<profile>/binary
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("ferry");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "ferry binary not found next to {}; build it first (cargo build -p ferry) or set FERRY_BIN",
        exe.display()
    )
}

/// How long any one command the harness runs may take before it is killed and the test
/// fails: a hung step must fail its test, never hold the whole run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Runs a command to its end (at most [`COMMAND_LIMIT`]) and returns its output; a command
/// still running then is killed and reported.
pub fn output(cmd: &mut Command) -> Result<Output> {
    output_from(cmd, Stdio::null())
}

/// [`output`], with `stdin` as the command's standard input.
pub fn output_from(cmd: &mut Command, stdin: Stdio) -> Result<Output> {
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still ran after {COMMAND_LIMIT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs a command, returning its output; fails with stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

pub fn require_root() {
    assert!(
        ferry::sys::process::is_root(),
        "end-to-end tests need root (namespaces, CRIU); run them with sudo, as CI does"
    );
}

/// How the pair of sites is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Short unique tag (≤ 6 chars): names namespaces, links and cgroups.
    pub tag: String,
    /// Does B list A as a peer? (false: B refuses A's certificate.)
    pub b_knows_a: bool,
    /// Shell snippet run inside a private mount namespace before B's gateway starts
    /// (to give site B a different filesystem, as a real second host would have).
    pub b_mount_setup: Option<String>,
    /// Adapters installed at both sites (built from ../plugins by build.rs).
    pub adapters: Vec<String>,
    /// Extra grants: (adapter, capabilities, exec allow-list).
    pub grants: Vec<(String, Vec<String>, Vec<String>)>,
    pub call_timeout_ms: Option<u64>,
    pub memory_limit_mb: Option<u64>,
    /// `[ingress] max_hold_ms` at both sites.
    pub ingress_max_hold_ms: Option<u64>,
    /// The address A dials to reach B's gateway (a delay relay, for benchmarks).
    pub b_address_at_a: Option<String>,
    /// How image files travel from A to B (`ferry peer add --compression`).
    pub compression: String,
    /// `[migration] sync_timeout_secs` at both sites.
    pub sync_timeout_secs: Option<u64>,
    /// Extra tunnel grants: (adapter, ports), added to the adapter's grant.
    pub tunnel_ports: Vec<(String, Vec<u16>)>,
    /// Host paths an adapter's containers may bind-mount: (adapter, paths), added to its
    /// grant's `mounts`.
    pub mounts: Vec<(String, Vec<String>)>,
    /// `[migration] prepush` at both sites (post-copy's pages sent ahead).
    pub prepush: Option<bool>,
    /// `[migration] stall_after_secs` at both sites.
    pub stall_after_secs: Option<u64>,
    /// Both sites' files on a tmpfs of this many MiB of their own, so that a test with a
    /// large image does not depend on the free disk of the machine that runs it.
    pub disk_mb: Option<u64>,
}

impl Options {
    pub fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_string(),
            b_knows_a: true,
            b_mount_setup: None,
            adapters: vec!["process".into()],
            grants: Vec::new(),
            call_timeout_ms: None,
            memory_limit_mb: None,
            ingress_max_hold_ms: None,
            b_address_at_a: None,
            compression: "zstd".into(),
            sync_timeout_secs: None,
            tunnel_ports: Vec::new(),
            mounts: Vec::new(),
            prepush: None,
            stall_after_secs: None,
            disk_mb: None,
        }
    }
}

/// Where build.rs put the compiled adapters.
pub fn adapter_build_dir() -> PathBuf {
    PathBuf::from(env!("FERRY_PLUGIN_BUILD_DIR"))
}

/// Copies adapter `name` (component + manifest) into a plugin folder.
pub fn install_adapter(name: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let wasm = adapter_build_dir().join(format!("ferry_adapter_{}.wasm", name.replace('-', "_")));
    fs::copy(&wasm, dir.join(format!("{name}.wasm")))
        .with_context(|| format!("no adapter at {}", wasm.display()))?;
    let manifest = PathBuf::from(env!("FERRY_PLUGIN_SRC_DIR"))
        .join(name)
        .join("ferry-plugin.toml");
    fs::copy(&manifest, dir.join(format!("{name}.toml")))?;
    Ok(())
}

/// Installs restart decider `name` (built from ../plugins/NAME) into `plugins_dir/deciders`.
pub fn install_decider(name: &str, plugins_dir: &Path) -> Result<()> {
    let dir = plugins_dir.join("deciders");
    fs::create_dir_all(&dir)?;
    let wasm = adapter_build_dir().join(format!("ferry_adapter_{}.wasm", name.replace('-', "_")));
    fs::copy(&wasm, dir.join(format!("{name}.wasm")))
        .with_context(|| format!("no decider at {}", wasm.display()))?;
    Ok(())
}

pub struct Site {
    pub name: String,
    pub netns: String,
    /// The site's end of the veth pair.
    pub dev: String,
    pub addr: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub fingerprint: String,
    gateway: Option<Child>,
    log: PathBuf,
}

impl Site {
    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns));
        c
    }

    /// `ferry --config SITE ARGS…` inside the site's network namespace.
    pub fn ferry_cmd(&self, args: &[&str]) -> Result<Command> {
        let mut c = self.nsenter();
        c.arg(ferry_bin()?)
            .arg("--config")
            .arg(&self.config)
            .args(args);
        Ok(c)
    }

    /// The phase of migration `id` as this site records it.
    pub fn migration_phase(&self, id: &str) -> Option<String> {
        let m = self.ferry_json(&["migration", "show", id]).ok()?;
        m["phase"].as_str().map(str::to_string)
    }

    /// This site lists no workload.
    pub fn has_no_workloads(&self) -> Result<bool> {
        Ok(self
            .ferry_json(&["workload", "ls"])?
            .as_array()
            .is_some_and(Vec::is_empty))
    }

    /// Runs a CLI verb and returns stdout; fails on a non-zero exit.
    pub fn ferry(&self, args: &[&str]) -> Result<String> {
        run(&mut self.ferry_cmd(args)?)
    }

    /// Runs a CLI verb that is expected to fail; returns its output.
    pub fn ferry_output(&self, args: &[&str]) -> Result<Output> {
        output(&mut self.ferry_cmd(args)?)
    }

    /// Runs a read verb with `--output json`.
    pub fn ferry_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let text = self.ferry(&all)?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }

    /// `program` to run inside the site's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.nsenter();
        c.arg(program);
        c
    }

    /// The size of the file at `path` as this site's gateway sees it (its own mount
    /// namespace, when the test gave it one); None if it has no such file.
    pub fn file_size_here(&self, path: &str) -> Result<Option<u64>> {
        let Some(gateway) = self.gateway.as_ref() else {
            bail!("site {} has no gateway running", self.name);
        };
        let out = output_from(
            Command::new("nsenter")
                .arg("-t")
                .arg(gateway.id().to_string())
                .args(["-m", "stat", "-c", "%s", path]),
            Stdio::null(),
        )?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .flatten())
    }

    /// Any command inside the site's network namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }

    /// The Redis dataset on `port` at this site, as (`DBSIZE`, `DEBUG DIGEST`): equal
    /// pairs are equal datasets.
    pub fn redis_dataset(&self, port: u16) -> Result<(String, String)> {
        Ok((
            self.redis(port, &["DBSIZE"])?,
            self.redis(port, &["DEBUG", "DIGEST"])?,
        ))
    }

    /// Runs Redis here as workload `name` on `port`, keeping its AOF (`appendfsync
    /// everysec`) in `dir`, with more `workload run` flags (`--volume`, `--route`).
    pub fn run_redis_with_aof(
        &self,
        name: &str,
        port: u16,
        dir: &str,
        flags: &[&str],
    ) -> Result<()> {
        let p = port.to_string();
        let mut args = vec!["workload", "run", name, "--port", &p];
        args.extend_from_slice(flags);
        args.push("--");
        let server = redis_process_args(port);
        args.extend(server.iter().map(String::as_str));
        args.extend_from_slice(&[
            "--daemonize",
            "no",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            dir,
        ]);
        self.ferry(&args)?;
        Ok(())
    }

    /// `redis-cli -p PORT ARGS…` at this site; the reply, trimmed.
    pub fn redis(&self, port: u16, args: &[&str]) -> Result<String> {
        let p = port.to_string();
        let mut all = vec!["redis-cli", "-p", p.as_str()];
        all.extend_from_slice(args);
        Ok(self.exec(all[0], &all[1..])?.trim().to_string())
    }

    /// Limits what the site sends over its link (a token bucket: `rate` like "20mbit").
    pub fn limit_egress(&self, rate: &str) -> Result<()> {
        self.exec(
            "tc",
            &[
                "qdisc", "replace", "dev", &self.dev, "root", "tbf", "rate", rate, "burst", "64kb",
                "latency", "200ms",
            ],
        )?;
        Ok(())
    }

    /// Process state letter (R, S, T = stopped, …) of `pid`.
    pub fn process_state(pid: i64) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].chars().next()
    }

    /// Calls the site's REST API with curl (from inside its namespace): `method path`,
    /// with the bearer `token` and a JSON `body` if given; returns the status and the body.
    /// Event streams are read until the gateway ends them (at most 120 s).
    pub fn curl(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        let url = format!("https://127.0.0.1:7443{path}");
        let auth;
        let mut args = vec![
            "-sk",
            "-N",
            "--max-time",
            "120",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            &url,
        ];
        if let Some(t) = token {
            auth = format!("Authorization: Bearer {t}");
            args.extend_from_slice(&["-H", &auth]);
        }
        if let Some(b) = body {
            args.extend_from_slice(&["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = self.exec("curl", &args)?;
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// The API token from the site's config.
    pub fn token(&self) -> Result<String> {
        fs::read_to_string(&self.config)?
            .lines()
            .find_map(|l| l.strip_prefix("token = "))
            .map(|t| t.trim_matches('"').to_string())
            .context("no token in site.toml")
    }

    /// The gateway's `GET /metrics` (Prometheus text), with the site's token.
    pub fn metrics(&self) -> Result<String> {
        let token = self.token()?;
        self.exec(
            "curl",
            &[
                "-sfk",
                "-H",
                &format!("Authorization: Bearer {token}"),
                "https://127.0.0.1:7443/metrics",
            ],
        )
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.gateway.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("gateway {} exited ({status}): {}", self.name, self.log());
                }
            }
            if self.ferry(&["site"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway {} not ready within 30 s: {}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running gateway's process id (nsenter execs it, so it is the gateway's own).
    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }

    /// Stops the gateway (SIGTERM, then SIGKILL) and waits for it.
    pub fn stop_gateway(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the gateway abruptly, as a crash would.
    pub fn crash_gateway(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two sites, `a` and `b`, joined by a veth pair.
pub struct TwoSites {
    pub a: Site,
    pub b: Site,
    pub root: PathBuf,
    pub work_root: PathBuf,
    cgroup_parent: String,
    opts: Options,
    /// Held while the test lives: see [`runtime_locks`].
    _runtimes: Vec<fs::File>,
}

const SUBNET: &str = "10.213.0";

impl TwoSites {
    pub fn start(opts: Options) -> Result<Self> {
        require_root();
        assert!(opts.tag.len() <= 6, "tag must be at most 6 characters");
        let runtimes = runtime_locks(&opts.adapters)?;
        let root = std::env::temp_dir().join(format!("ferry-e2e-{}", opts.tag));
        // A tmpfs an interrupted earlier run left mounted.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&root)
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        if let Some(mb) = opts.disk_mb {
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
                .arg(&root))?;
        }
        let work_root = root.join("work");
        let cgroup_parent = format!("ferry-e2e-{}", opts.tag);
        let ns_a = format!("fy-{}-a", opts.tag);
        let ns_b = format!("fy-{}-b", opts.tag);
        // Leftovers of an interrupted earlier run.
        let _ = ip(&["netns", "del", &ns_a]);
        let _ = ip(&["netns", "del", &ns_b]);
        ip(&["netns", "add", &ns_a])?;
        ip(&["netns", "add", &ns_b])?;
        let (va, vb) = (format!("fy{}a", opts.tag), format!("fy{}b", opts.tag));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &ns_a])?;
        ip(&["link", "set", &vb, "netns", &ns_b])?;
        for (ns, dev, host) in [(&ns_a, &va, 1), (&ns_b, &vb, 2)] {
            let addr = format!("{SUBNET}.{host}/24");
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let mut a = init_site(
            "a",
            &ns_a,
            &format!("{SUBNET}.1"),
            &root,
            &work_root,
            &cgroup_parent,
            &opts,
        )?;
        let mut b = init_site(
            "b",
            &ns_b,
            &format!("{SUBNET}.2"),
            &root,
            &work_root,
            &cgroup_parent,
            &opts,
        )?;
        a.dev = va;
        b.dev = vb;
        let b_at_a = opts
            .b_address_at_a
            .clone()
            .unwrap_or_else(|| format!("{}:7444", b.addr));
        add_peer_at(&a, &b, &b_at_a, &opts.compression)?;
        if opts.b_knows_a {
            add_peer_at(&b, &a, &format!("{}:7444", a.addr), &opts.compression)?;
        }
        let mut sites = Self {
            a,
            b,
            root,
            work_root,
            cgroup_parent,
            opts,
            _runtimes: runtimes,
        };
        sites.start_gateway_a()?;
        sites.start_gateway_b()?;
        Ok(sites)
    }

    pub fn start_gateway_a(&mut self) -> Result<()> {
        let child = spawn_gateway(&self.a, None)?;
        self.a.gateway = Some(child);
        self.a.wait_ready()
    }

    pub fn start_gateway_b(&mut self) -> Result<()> {
        let child = spawn_gateway(&self.b, self.opts.b_mount_setup.as_deref())?;
        self.b.gateway = Some(child);
        self.b.wait_ready()
    }

    /// Starts `redis-server` on `port` at site A through the API, with DEBUG enabled
    /// (for DEBUG DIGEST / POPULATE) and persistence off.
    pub fn run_redis_at_a(&self, name: &str, port: u16) -> Result<()> {
        self.run_redis_at_a_with(name, port, &[])
    }

    /// As [`Self::run_redis_at_a`], with extra `workload run` flags (`--runtime`, `--setting`).
    pub fn run_redis_at_a_with(&self, name: &str, port: u16, flags: &[&str]) -> Result<()> {
        self.run_redis_at_a_full(name, port, flags, &[])
    }

    /// Builds the Redis image podman runs ([`PODMAN_REDIS`]); the returned guard removes
    /// both sites' `NAME` containers (`a-NAME`, `b-NAME`) however the test ends.
    pub fn podman_redis(&self, name: &str) -> Result<Cleanup> {
        let cleanup = Cleanup(
            ["a", "b"]
                .iter()
                .map(|s| {
                    ["podman", "rm", "-f", "-t", "0", &format!("{s}-{name}")]
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                })
                .collect(),
        );
        redis_podman_image(&self.root.join("image"), PODMAN_REDIS)?;
        Ok(cleanup)
    }

    /// Starts Redis on `port` at site A in a podman container of `image` (built with
    /// [`redis_podman_image`]).
    pub fn run_redis_in_podman_at_a(&self, name: &str, port: u16, image: &str) -> Result<()> {
        let setting = format!("image={image}");
        let p = port.to_string();
        let mut args: Vec<String> = [
            "workload",
            "run",
            name,
            "--runtime",
            "podman",
            "--setting",
            &setting,
            "--port",
            &p,
            "--",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(redis_container_args(port));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.a.ferry(&refs)?;
        Ok(())
    }

    /// Starts Redis at A in a runc container (`redis_oci_bundle`) through the API; the
    /// returned guard deletes both sites' `NAME` containers (`a-NAME`, `b-NAME`) however the
    /// test ends.
    pub fn run_redis_in_runc_at_a(&self, name: &str, port: u16) -> Result<Cleanup> {
        let bundle = redis_oci_bundle(&self.root.join("bundle"), port)?;
        self.run_in_runc_bundle_at_a(name, port, &bundle, &[])
    }

    /// As [`Self::run_redis_in_runc_at_a`], from the OCI bundle `bundle`, with `flags`
    /// for `workload run`.
    pub fn run_in_runc_bundle_at_a(
        &self,
        name: &str,
        port: u16,
        bundle: &Path,
        flags: &[&str],
    ) -> Result<Cleanup> {
        let cleanup = Cleanup(
            ["a", "b"]
                .iter()
                .map(|s| {
                    [
                        "runc",
                        "--root",
                        &format!("/run/ferry-runc/{s}"),
                        "delete",
                        "-f",
                        &format!("{s}-{name}"),
                    ]
                    .iter()
                    .map(ToString::to_string)
                    .collect()
                })
                .collect(),
        );
        let (setting, p) = (format!("bundle={}", bundle.display()), port.to_string());
        let mut args = vec![
            "workload",
            "run",
            name,
            "--runtime",
            "runc",
            "--setting",
            &setting,
            "--port",
            &p,
        ];
        args.extend_from_slice(flags);
        args.extend(["--", "redis-server"]);
        self.a.ferry(&args)?;
        Ok(cleanup)
    }

    /// As [`Self::run_redis_at_a`], with its `CONFIG` command disabled (a hardened
    /// server: no adapter can change its settings).
    pub fn run_redis_at_a_without_config(&self, name: &str, port: u16) -> Result<()> {
        self.run_redis_at_a_full(name, port, &[], &["--rename-command", "CONFIG", ""])
    }

    fn run_redis_at_a_full(
        &self,
        name: &str,
        port: u16,
        flags: &[&str],
        redis_args: &[&str],
    ) -> Result<()> {
        let p = port.to_string();
        let server = redis_process_args(port);
        let mut args = vec!["workload", "run", name, "--port", &p];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend(server.iter().map(String::as_str));
        args.extend_from_slice(&["--daemonize", "no"]);
        args.extend_from_slice(redis_args);
        self.a.ferry(&args)?;
        Ok(())
    }

    /// Starts `ferry migrate WORKLOAD --to TO FLAGS… --no-wait` at A; returns its id.
    pub fn start_migration(&self, workload: &str, to: &str, flags: &[&str]) -> Result<String> {
        let mut args = vec!["migrate", workload, "--to", to];
        args.extend_from_slice(flags);
        args.push("--no-wait");
        let m = self.a.ferry_json(&args)?;
        m["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("ferry migrate --no-wait printed no id: {m}"))
    }

    /// Follows a migration through `ferry migrate` and returns the final record (JSON).
    pub fn migrate(&self, workload: &str, to: &str) -> Result<(bool, Value)> {
        self.migrate_with(workload, to, &[])
    }

    /// As [`Self::migrate`], with extra `ferry migrate` flags (`--approach`, `--runtime`).
    pub fn migrate_with(&self, workload: &str, to: &str, flags: &[&str]) -> Result<(bool, Value)> {
        let mut args = vec!["--output", "json", "migrate", workload, "--to", to];
        args.extend_from_slice(flags);
        let out = self.a.ferry_output(&args)?;
        let value = migrate_record(&out.stdout).with_context(|| {
            format!(
                "migrate printed no final record: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.success(), value))
    }

    /// Makes B warm: `workload` (Redis on `port`, filled with keys `bulk:0…keys`) moves to
    /// B (cold), back to A once B has kept its pages, and, once A has kept the pages it
    /// received, has every 100th key rewritten with a `value`-byte value; each move with
    /// `flags`. The next move to B is warm.
    /// Returns the cold move's record.
    pub fn warm_up(
        &self,
        workload: &str,
        port: u16,
        keys: u64,
        value: usize,
        flags: &[&str],
    ) -> Result<Value> {
        let (ok, cold) = self.migrate_with(workload, "b", flags)?;
        if !ok {
            bail!("the cold move failed: {cold}\n{}", self.logs());
        }
        wait_for(
            "B to keep the received pages",
            Duration::from_secs(600),
            || {
                self.b
                    .log()
                    .contains("received pages kept for the next move here")
                    .then_some(())
            },
        )?;
        let mut back = vec!["--output", "json", "migrate", workload, "--to", "a"];
        back.extend_from_slice(flags);
        let out = self.b.ferry_output(&back)?;
        if !out.status.success() {
            bail!(
                "the move back to A failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                self.logs()
            );
        }
        // A keeps what it received too, in the background: done before the next move,
        // which it would otherwise compete with for the CPUs and the disk.
        wait_for(
            "A to keep the received pages",
            Duration::from_secs(600),
            || {
                self.a
                    .log()
                    .contains("received pages kept for the next move here")
                    .then_some(())
            },
        )?;
        let changed: Vec<u64> = (0..keys).step_by(100).collect();
        for batch in changed.chunks(500) {
            let pairs: Vec<String> = batch
                .iter()
                .flat_map(|k| [format!("bulk:{k}"), format!("{k:0>value$}")])
                .collect();
            let mut mset = vec!["MSET"];
            mset.extend(pairs.iter().map(String::as_str));
            self.a.redis(port, &mset)?;
        }
        Ok(cold)
    }

    /// A warm destination's round on Redis at A (port `port`, 40,000 random values of
    /// 1,000 bytes, which do not compress): [`Self::warm_up`], then the warm move to B,
    /// both with `flags`. Checks that it went warm ([`assert_warm`]) and that B holds every
    /// key, the rewritten ones included. Returns the cold and the warm move's records.
    pub fn warm_redis_round(&self, port: u16, flags: &[&str]) -> Result<(Value, Value)> {
        let (keys, value) = (40_000, 1000);
        self.run_redis_at_a("redis", port)?;
        redis_fill_random(&self.a, &self.root, port, keys, value)?;
        let cold = self.warm_up("redis", port, keys, value, flags)?;
        let (ok, warm) = self.migrate_with("redis", "b", flags)?;
        assert!(ok, "the warm move failed: {warm}\n{}", self.logs());
        assert_warm(&cold, &warm);
        assert_eq!(self.b.redis(port, &["DBSIZE"])?, keys.to_string());
        let last = (keys - 1) / 100 * 100;
        assert_eq!(
            self.b.redis(port, &["GET", &format!("bulk:{last}")])?,
            format!("{last:0>value$}")
        );
        Ok((cold, warm))
    }

    /// Gateway logs of both sites (printed when a test fails).
    pub fn logs(&self) -> String {
        format!(
            "--- gateway a ---\n{}\n--- gateway b ---\n{}",
            self.a.log(),
            self.b.log()
        )
    }
}

fn init_site(
    name: &str,
    netns: &str,
    addr: &str,
    root: &Path,
    work_root: &Path,
    cgroup_parent: &str,
    opts: &Options,
) -> Result<Site> {
    let dir = root.join(name);
    let out = run(Command::new(ferry_bin()?)
        .args(["init", "--name", name, "--dir"])
        .arg(&dir)
        .args([
            "--api-listen",
            "127.0.0.1:7443",
            "--peer-listen",
            &format!("{addr}:7444"),
        ]))?;
    let fingerprint = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .map(|f| f.trim().to_string())
        .context("ferry init printed no fingerprint")?;
    let config = dir.join("site.toml");
    let mut cfg: toml::Table = toml::from_str(&fs::read_to_string(&config)?)?;
    // Per-test work root and cgroup, so parallel tests never share them.
    let table = |cfg: &mut toml::Table, key: &str| -> Result<toml::Table> {
        Ok(cfg
            .get(key)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default())
    };
    // The tests start many programs through the API: any (`ferry init` lists none).
    let mut api = table(&mut cfg, "api")?;
    api.remove("allowed_commands");
    cfg.insert("api".into(), api.into());
    let mut workloads = table(&mut cfg, "workloads")?;
    workloads.insert("work_root".into(), work_root.display().to_string().into());
    workloads.insert("cgroup_parent".into(), cgroup_parent.into());
    cfg.insert("workloads".into(), workloads.into());
    let mut plugins = table(&mut cfg, "plugins")?;
    if let Some(ms) = opts.call_timeout_ms {
        plugins.insert("call_timeout_ms".into(), (ms as i64).into());
    }
    if let Some(mb) = opts.memory_limit_mb {
        plugins.insert("memory_limit_mb".into(), (mb as i64).into());
    }
    let mut grants = plugins
        .get("grants")
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default();
    for (adapter, caps, exec) in &opts.grants {
        let mut g = toml::Table::new();
        g.insert("capabilities".into(), caps.clone().into());
        g.insert("exec".into(), exec.clone().into());
        grants.insert(adapter.clone(), g.into());
    }
    for (adapter, ports) in &opts.tunnel_ports {
        let ports = ports.iter().map(|p| toml::Value::from(i64::from(*p)));
        extend_grant(&mut grants, adapter, "tunnel_ports", ports);
    }
    for (adapter, paths) in &opts.mounts {
        let paths = paths.iter().map(|p| toml::Value::from(p.as_str()));
        extend_grant(&mut grants, adapter, "mounts", paths);
    }
    plugins.insert("grants".into(), grants.into());
    if let Some(ms) = opts.ingress_max_hold_ms {
        let mut ingress = table(&mut cfg, "ingress")?;
        ingress.insert("max_hold_ms".into(), (ms as i64).into());
        cfg.insert("ingress".into(), ingress.into());
    }
    cfg.insert("plugins".into(), plugins.into());
    if let Some(secs) = opts.sync_timeout_secs {
        let mut migration = table(&mut cfg, "migration")?;
        migration.insert("sync_timeout_secs".into(), (secs as i64).into());
        cfg.insert("migration".into(), migration.into());
    }
    if let Some(on) = opts.prepush {
        let mut migration = table(&mut cfg, "migration")?;
        migration.insert("prepush".into(), on.into());
        cfg.insert("migration".into(), migration.into());
    }
    if let Some(secs) = opts.stall_after_secs {
        let mut migration = table(&mut cfg, "migration")?;
        migration.insert("stall_after_secs".into(), (secs as i64).into());
        cfg.insert("migration".into(), migration.into());
    }
    fs::write(&config, toml::to_string(&cfg)?)?;
    for adapter in &opts.adapters {
        install_adapter(adapter, &dir.join("plugins"))?;
    }
    Ok(Site {
        name: name.to_string(),
        netns: netns.to_string(),
        dev: String::new(),
        addr: addr.to_string(),
        log: root.join(format!("gateway-{name}.log")),
        dir,
        config,
        fingerprint,
        gateway: None,
    })
}

fn add_peer_at(at: &Site, peer: &Site, address: &str, compression: &str) -> Result<()> {
    run(Command::new(ferry_bin()?)
        .arg("--config")
        .arg(&at.config)
        .args(["peer", "add", &peer.name, address, &peer.fingerprint])
        .args(["--compression", compression]))?;
    Ok(())
}

fn spawn_gateway(site: &Site, mount_setup: Option<&str>) -> Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&site.log)?;
    let bin = ferry_bin()?;
    let netns = format!("/run/netns/{}", site.netns);
    let mut cmd = match mount_setup {
        None => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={netns}")).arg(&bin);
            c
        }
        Some(setup) => {
            // A private mount namespace: the site sees its own filesystem changes.
            let script = format!(
                "set -e; {setup}; exec nsenter --net={netns} {} \"$@\"",
                bin.display()
            );
            let mut c = Command::new("unshare");
            c.args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
                "sh",
            ]);
            c
        }
    };
    cmd.arg("gateway")
        .arg("--config")
        .arg(&site.config)
        .env("FERRY_LOG", "info,ferry=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd.spawn()?)
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.a.stop_gateway();
        self.b.stop_gateway();
        // Kill every workload the test started or restored, via their cgroups.
        for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let parent = Path::new(mount).join(&self.cgroup_parent);
            if !parent.is_dir() {
                continue;
            }
            for site in ["a", "b"] {
                kill_workload_groups(&parent.join(site));
            }
            let _ = fs::remove_dir(&parent);
        }
        let _ = ip(&["netns", "del", &self.a.netns]);
        let _ = ip(&["netns", "del", &self.b.netns]);
        // FERRY_E2E_KEEP=1 keeps the sites' files (configs, journals, logs) for a look.
        if !std::thread::panicking() && std::env::var_os("FERRY_E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
        // A tmpfs of the sites' own is unmounted even after a failure (its logs were
        // printed above): it holds memory.
        if self.opts.disk_mb.is_some() && std::env::var_os("FERRY_E2E_KEEP").is_none() {
            let _ = Command::new("umount").arg("-l").arg(&self.root).status();
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Kills every workload a site's gateway started, by the groups under `base` (its
/// `cgroup_parent/SITE`), and removes them and `base`.
pub fn kill_workload_groups(base: &Path) {
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            let _ = fs::write(e.path().join("cgroup.kill"), "1");
            for _ in 0..50 {
                if fs::remove_dir(e.path()).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = fs::remove_dir(base);
}

/// One test at a time per container runtime: every test's sites are named `a` and `b`, so
/// their containers share names (`a-redis`), runc's state directory and runc's default
/// cgroup path; tests run side by side would start, checkpoint and delete each other's
/// containers. Locks are always taken in the same order (runc, then podman).
fn runtime_locks(adapters: &[String]) -> Result<Vec<fs::File>> {
    let mut held = Vec::new();
    for runtime in ["runc", "podman"] {
        if adapters.iter().any(|a| a == runtime) {
            let path = std::env::temp_dir().join(format!("ferry-e2e-{runtime}.lock"));
            let file = fs::File::create(&path)
                .with_context(|| format!("cannot open the lock {}", path.display()))?;
            file.lock()
                .with_context(|| format!("cannot lock {}", path.display()))?;
            held.push(file);
        }
    }
    Ok(held)
}

/// The final record in what `ferry --output json migrate` printed: one JSON event per
/// line, the last (`"event":"end"`) holding it.
pub fn migrate_record(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("nothing printed")?;
    let event: Value = serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))?;
    if event["event"] != "end" {
        bail!("the last line is not the end event: {last}");
    }
    Ok(event["data"].clone())
}

/// Where the tests' CRIU is (scripts/setup builds it there).
pub const CRIU: &str = "/usr/local/sbin/criu";

/// A `b_mount_setup` that makes site B's restores start 4 s late: `program` (CRIU for the
/// process adapter; runc for runc and podman, which run CRIU through its RPC) is replaced,
/// in B's mount namespace only, by a script that sleeps when its arguments hold `restore`.
pub fn slow_restore(tag: &str, program: &str) -> String {
    slow_when(tag, program, "restore", 4)
}

/// A `b_mount_setup` that makes `program` sleep `secs` s first when its arguments hold
/// `word`, in B's mount namespace only.
pub fn slow_when(tag: &str, program: &str, word: &str, secs: u32) -> String {
    wrap_when(tag, program, word, &format!("sleep {secs}"))
}

/// A `b_mount_setup` that makes `program` fail (exit 1, saying so) when its arguments
/// hold `word`, in B's mount namespace only: the same executable, so the destination
/// looks compatible, but that step fails there.
pub fn fail_when(tag: &str, program: &str, word: &str) -> String {
    wrap_when(tag, program, word, "echo injected failure >&2; exit 1")
}

/// `program` replaced in B's mount namespace by a script that runs `action` first when
/// its arguments hold `word`, then the real program. Safe to run again while a wrapped
/// run still executes (a gateway restarted mid-restore): the copy is renamed into place,
/// never written over a running executable.
fn wrap_when(tag: &str, program: &str, word: &str, action: &str) -> String {
    format!(
        r#"d=/tmp/ferry-e2e-{tag}-wrap; mkdir -p $d; cp {program} $d/real.new; mv -f $d/real.new $d/real; printf '#!/bin/sh\ncase " $* " in *" {word} "*) {action};; esac\nexec /tmp/ferry-e2e-{tag}-wrap/real "$@"\n' > $d/wrapper; chmod +x $d/wrapper; mount --bind $d/wrapper {program}"#
    )
}

/// Fills the Redis on `port` at `site` with `keys` keys (`bulk:N`) of `value` random bytes
/// each (incompressible), through one `redis-cli --pipe`; `scratch` holds the command file
/// meanwhile.
pub fn redis_fill_random(
    site: &Site,
    scratch: &Path,
    port: u16,
    keys: u64,
    value: usize,
) -> Result<()> {
    use std::io::Write;
    let path = scratch.join(format!("fill-{port}.resp"));
    let mut out = std::io::BufWriter::new(fs::File::create(&path)?);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = vec![0u8; value];
    for k in 0..keys {
        for b in &mut bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let key = format!("bulk:{k}");
        write!(
            out,
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${value}\r\n",
            key.len()
        )?;
        out.write_all(&bytes)?;
        out.write_all(b"\r\n")?;
    }
    out.flush()?;
    drop(out);
    let out = output_from(
        site.command("redis-cli")
            .args(["-p", &port.to_string(), "--pipe"]),
        Stdio::from(fs::File::open(&path)?),
    )?;
    if !out.status.success() {
        bail!(
            "redis-cli --pipe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::remove_file(&path)?;
    Ok(())
}

/// A benchmark's arguments: the sizes in MiB (default 256) and FERRY_BENCH_VALUE, the
/// bytes of each Redis value (default 1024).
pub fn bench_sizes_and_value() -> Result<(Vec<u64>, u64)> {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("sizes are MiB"))
        .collect::<Result<_>>()?;
    let sizes = if sizes.is_empty() { vec![256] } else { sizes };
    let value = std::env::var("FERRY_BENCH_VALUE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    Ok((sizes, value))
}

/// A log without its terminal colours.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A root filesystem holding `redis-server` and the libraries it links, copied from this
/// machine (no image registry is reachable).
pub fn redis_rootfs(rootfs: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(rootfs);
    for d in ["bin", "tmp", "data", "proc", "dev", "sys", "etc"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    let server = Path::new("/usr/bin/redis-server");
    fs::copy(server, rootfs.join("bin/redis-server"))?;
    let ldd = run(Command::new("ldd").arg(server))?;
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let dest = rootfs.join(lib.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(lib, &dest).with_context(|| format!("copy {lib}"))?;
    }
    Ok(())
}

/// A `ferry-load` client (tests/src/bin/load.rs) running in a site's network.
pub struct Load(std::process::Child);

/// What a [`Load`] client saw.
pub struct LoadOutcome {
    /// It exited successfully.
    pub ok: bool,
    pub stderr: String,
    /// Its JSON summary: requests, ok, failed, unavailable, stalls, latencies.
    pub summary: Value,
}

impl Site {
    /// Starts `ferry-load KIND ADDR RATE SECONDS CONNECTIONS ACKED` in this site's network.
    pub fn start_load(
        &self,
        kind: &str,
        addr: &str,
        rate: &str,
        seconds: &str,
        connections: &str,
        acked: &Path,
    ) -> Result<Load> {
        let bin = ferry_bin()?.with_file_name("ferry-load");
        Ok(Load(
            self.command(bin)
                .args([kind, addr, rate, seconds, connections])
                .arg(acked)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        ))
    }
}

impl Load {
    /// Waits for the client to end and reads its summary.
    pub fn finish(self) -> Result<LoadOutcome> {
        let out = self.0.wait_with_output()?;
        let summary = serde_json::from_slice(&out.stdout).context("client summary")?;
        Ok(LoadOutcome {
            ok: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            summary,
        })
    }
}

/// `binary` serving Redis on `port`: no persistence, DEBUG on.
fn redis_args(binary: &str, port: u16) -> Vec<String> {
    let p = port.to_string();
    [
        binary,
        "--port",
        &p,
        "--save",
        "",
        "--appendonly",
        "no",
        "--enable-debug-command",
        "yes",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// The command that runs Redis as a plain process on `port`.
pub fn redis_process_args(port: u16) -> Vec<String> {
    redis_args("redis-server", port)
}

/// The arguments that run Redis inside a container on `port` (its files in /data).
pub fn redis_container_args(port: u16) -> Vec<String> {
    let mut args = redis_args("/bin/redis-server", port);
    args.extend(["--dir".to_string(), "/data".to_string()]);
    args
}

/// Builds an OCI bundle running `redis-server` on `port`. The container shares the
/// network namespace of whoever starts it, so it serves on its site's network.
pub fn redis_oci_bundle(dir: &Path, port: u16) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    redis_rootfs(&dir.join("rootfs"))?;
    run(Command::new("runc").args(["spec", "--bundle"]).arg(dir))?;
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = redis_container_args(port).into();
    cfg["root"]["readonly"] = false.into();
    if let Some(ns) = cfg["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(dir.to_path_buf())
}

/// The image the tests run Redis from in podman.
pub const PODMAN_REDIS: &str = "localhost/ferry-e2e-redis:latest";

/// Imports a Redis root filesystem into Podman's local storage as `reference`.
pub fn redis_podman_image(dir: &Path, reference: &str) -> Result<()> {
    let rootfs = dir.join("rootfs");
    redis_rootfs(&rootfs)?;
    let tar = dir.join("rootfs.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    run(Command::new("podman")
        .args(["import", "-q"])
        .arg(&tar)
        .arg(reference))?;
    Ok(())
}

/// Adds `values` to the list `key` of `adapter`'s grant in `grants`.
fn extend_grant(
    grants: &mut toml::Table,
    adapter: &str,
    key: &str,
    values: impl Iterator<Item = toml::Value>,
) {
    let mut g = grants
        .get(adapter)
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default();
    let mut list: Vec<toml::Value> = g
        .get(key)
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    list.extend(values);
    g.insert(key.into(), list.into());
    grants.insert(adapter.to_string(), g.into());
}

/// A warm move (after [`TwoSites::warm_up`]) sent most of its image as digests, and less
/// than half the bytes the cold one put on the wire.
pub fn assert_warm(cold: &Value, warm: &Value) {
    let n = |m: &Value, k: &str| m[k].as_u64().unwrap_or(0);
    eprintln!(
        "cold: {} bytes, {} on the wire; warm: {} bytes, {} on the wire, {} as digests",
        n(cold, "bytes_moved"),
        n(cold, "bytes_on_wire"),
        n(warm, "bytes_moved"),
        n(warm, "bytes_on_wire"),
        n(warm, "bytes_deduped")
    );
    assert_eq!(
        n(cold, "bytes_deduped"),
        0,
        "the cold move had pages as digests: {cold}"
    );
    assert!(
        n(warm, "bytes_deduped") > n(warm, "bytes_moved") / 2,
        "the warm move sent too few pages as digests: {warm}"
    );
    assert!(
        n(warm, "bytes_on_wire") < n(cold, "bytes_on_wire") / 2,
        "the warm move sent {} bytes, the cold one {}",
        n(warm, "bytes_on_wire"),
        n(cold, "bytes_on_wire")
    );
}

/// Checks, every 50 ms on its own thread, that the Redis on `port` never answers at both
/// sites at once (a frozen source answers nothing; a restored copy answers once it runs):
/// the migration invariant watched *during* a fault, not only at its end.
pub struct OneCopy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::result::Result<u32, String>>>,
}

impl OneCopy {
    pub fn watch(sites: &TwoSites, port: u16) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let netns = [sites.a.netns.clone(), sites.b.netns.clone()];
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let answers = |ns: &str| {
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args([
                        "timeout",
                        "0.3",
                        "redis-cli",
                        "-p",
                        &port.to_string(),
                        "PING",
                    ])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            };
            let started = Instant::now();
            let mut answered = 0u32;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let (a, b) = (answers(&netns[0]), answers(&netns[1]));
                if a && b {
                    return Err(format!(
                        "both sites answered on port {port} {} ms into the watch",
                        started.elapsed().as_millis()
                    ));
                }
                answered += u32::from(a || b);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(answered)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; fails if both sites ever answered. Returns in how many checks one
    /// site answered (the watch sees a serving copy at all).
    pub fn finish(mut self) -> Result<u32> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(n))) => Ok(n),
            Some(Ok(Err(e))) => bail!("two copies: {e}"),
            _ => bail!("the one-copy watch did not finish"),
        }
    }
}

impl Drop for OneCopy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Drops every packet between `site` and `peer` (an address, both ways) while it lives.
pub struct Outage<'a> {
    site: &'a Site,
    peer: String,
}

impl<'a> Outage<'a> {
    pub fn start(site: &'a Site, peer: &str) -> Result<Self> {
        site.exec("iptables", &["-I", "INPUT", "-s", peer, "-j", "DROP"])?;
        site.exec("iptables", &["-I", "OUTPUT", "-d", peer, "-j", "DROP"])?;
        Ok(Self {
            site,
            peer: peer.to_string(),
        })
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        let _ = self
            .site
            .exec("iptables", &["-D", "INPUT", "-s", &self.peer, "-j", "DROP"]);
        let _ = self.site.exec(
            "iptables",
            &["-D", "OUTPUT", "-d", &self.peer, "-j", "DROP"],
        );
    }
}

/// Runs cleanup commands when dropped (containers a failed test would leave behind).
pub struct Cleanup(pub Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in &self.0 {
            if let Some((program, args)) = cmd.split_first() {
                let _ = Command::new(program)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
