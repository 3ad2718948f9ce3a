//! What an adapter may ask a container runtime to start: an `exec` grant of `podman` or
//! `runc` lets an adapter run that program, not start a privileged container or one that
//! sees the host's files. Checked by the host before the program runs, on the arguments
//! (podman) or on the bundle's `config.json` (runc):
//!
//! - **podman `run` / `create`**: options from a known list only; no `--privileged`,
//!   `--cap-add`, `--device`, `--security-opt`, host PID/IPC/user namespaces, and a
//!   host path in `--volume`/`--mount` only under one of the grant's `mounts`.
//! - **runc `run` / `create` / `restore`**: the bundle's root inside the bundle, bind
//!   mounts only from the bundle or the grant's `mounts`, capabilities within the default
//!   set containers get (Docker's), its own PID and mount namespaces, no devices, no hooks.
//! - Either runtime: no global option that names another program to run (`--criu`,
//!   `--runtime`, `--conmon`, `--hooks-dir`).
//! - **docker**: the daemon is root and the CLI reads and writes host files for some
//!   subcommands (`cp`, `save -o`, `--env-file`, `--cidfile`), so both lists are closed:
//!   global options `-H unix:///…` (no `ssh://`, which runs `ssh`), `--log-level`,
//!   `--debug`; subcommands that run, stop, inspect, checkpoint and restore containers. `run`
//!   / `create` take the podman rules' options (no `--env-file`, which the CLI reads from
//!   the host, no `--mount` with `volume-opt`, which binds a host path as a volume; no
//!   `--uts`/`--cgroupns host` either); `start` takes a checkpoint by name only;
//!   `checkpoint --checkpoint-dir` only the call's own image directory.
//! - **cp**: only a Docker checkpoint placed for `docker start --checkpoint` (Docker
//!   restores only from the container's own directory): `cp -a SRC DST` with SRC the
//!   call's image directory (a CRIU image: it holds `inventory.img`) and DST a new entry
//!   of a Docker container's `checkpoints` directory.
//!
//! Other podman and runc subcommands (checkpoint, restore of an exported podman container,
//! inspect, rm…) start nothing new from the adapter's arguments and pass.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// Capabilities a container may hold: the set Docker and Podman give by default.
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// Checks a program an adapter asked to run with `args`; `mounts` are the host paths
/// the site lets its containers bind, `images` the image directory of the call it runs
/// in (the only one a checkpoint may be written to or copied from). The error says what
/// was refused and why.
pub fn check(
    program: &str,
    args: &[String],
    mounts: &[PathBuf],
    images: Option<&Path>,
) -> Result<(), String> {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    match name {
        "podman" => podman(args, mounts),
        "runc" => runc(args, mounts),
        "docker" => docker(args, mounts, images),
        "cp" => cp(args, images),
        _ => Ok(()),
    }
}

/// The subcommand's position after the global options (`valued` take a value).
fn subcommand(args: &[String], valued: &[&str], refused: &[&str]) -> Result<Option<usize>, String> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if !a.starts_with('-') {
            return Ok(Some(i));
        }
        let flag = a.split('=').next().unwrap_or(a);
        if refused.contains(&flag) {
            return Err(format!(
                "{flag} names another program for the runtime to run; adapters may not set it"
            ));
        }
        i += if valued.contains(&flag) && !a.contains('=') {
            2
        } else {
            1
        };
    }
    Ok(None)
}

const PODMAN_GLOBAL_VALUED: [&str; 16] = [
    "--root",
    "--runroot",
    "--storage-driver",
    "--storage-opt",
    "--cgroup-manager",
    "--log-level",
    "--tmpdir",
    "--events-backend",
    "--network-backend",
    "--url",
    "--connection",
    "--identity",
    "--volumepath",
    "--imagestore",
    "--db-backend",
    "--ssh",
];
const PODMAN_GLOBAL_REFUSED: [&str; 6] = [
    "--runtime",
    "--runtime-flag",
    "--conmon",
    "--hooks-dir",
    "--module",
    "--network-cmd-path",
];

/// `podman run|create` options that take no value and change nothing about privilege.
const PODMAN_FLAGS: [&str; 13] = [
    "-d",
    "--detach",
    "--rm",
    "-i",
    "--interactive",
    "-t",
    "--tty",
    "--init",
    "--read-only",
    "--replace",
    "-q",
    "--quiet",
    "--no-healthcheck",
];
/// `podman run|create` options that take a value and change nothing about privilege.
const PODMAN_VALUED: [&str; 34] = [
    "--name",
    "--network",
    "--net",
    "--ulimit",
    "--annotation",
    "-e",
    "--env",
    "--env-file",
    "-l",
    "--label",
    "-h",
    "--hostname",
    "-p",
    "--publish",
    "-w",
    "--workdir",
    "--entrypoint",
    "-u",
    "--user",
    "-m",
    "--memory",
    "--cpus",
    "--restart",
    "--stop-signal",
    "--stop-timeout",
    "--log-driver",
    "--log-opt",
    "--pull",
    "--tmpfs",
    "--shm-size",
    "--cgroup-parent",
    "--cgroups",
    "--pod",
    "--health-cmd",
];
/// Options taking a namespace mode, where `host` shares the host's.
const PODMAN_NAMESPACES: [&str; 3] = ["--pid", "--ipc", "--userns"];

fn podman(args: &[String], mounts: &[PathBuf]) -> Result<(), String> {
    let Some(mut i) = subcommand(args, &PODMAN_GLOBAL_VALUED, &PODMAN_GLOBAL_REFUSED)? else {
        return Ok(());
    };
    if args[i] == "container" {
        i += 1;
    }
    if !matches!(args.get(i).map(String::as_str), Some("run" | "create")) {
        return Ok(());
    }
    run_options(&PODMAN_RUN, &args[i + 1..], mounts)
}

/// What a runtime's `run` / `create` may be given.
struct RunRules<'a> {
    runtime: &'a str,
    /// Options without a value.
    flags: &'a [&'a str],
    /// Options with a value that change nothing about privilege.
    valued: &'a [&'a str],
    /// Options taking a namespace mode, where `host` shares the host's.
    namespaces: &'a [&'a str],
}

const PODMAN_RUN: RunRules = RunRules {
    runtime: "podman",
    flags: &PODMAN_FLAGS,
    valued: &PODMAN_VALUED,
    namespaces: &PODMAN_NAMESPACES,
};

/// Checks the options of `run` / `create` (`args` after the subcommand) up to the image.
fn run_options(rules: &RunRules, args: &[String], mounts: &[PathBuf]) -> Result<(), String> {
    let runtime = rules.runtime;
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if a == "--" || !a.starts_with('-') {
            // The image; what follows is the container's own command.
            return Ok(());
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        if rules.flags.contains(&flag) {
            i += 1;
            continue;
        }
        let known = rules.valued.contains(&flag)
            || rules.namespaces.contains(&flag)
            || matches!(flag, "-v" | "--volume" | "--mount");
        if !known {
            return Err(format!(
                "{runtime} option {flag} is not one Ferry lets an adapter pass (privileged, \
                 capability, device and security options never are; other options can be \
                 added to plugins/containers.rs)"
            ));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or_else(|| format!("{runtime} option {flag} needs a value"))?
            }
        };
        if rules.namespaces.contains(&flag) && value == "host" {
            return Err(format!("{runtime} {flag}=host shares the host's namespace"));
        }
        match flag {
            "-v" | "--volume" => {
                let source = value.split(':').next().unwrap_or_default();
                if source.starts_with('/') {
                    granted_mount(Path::new(source), mounts)?;
                } else if !volume_name(source) {
                    // Newer CLIs bind a relative path (`./data`, `.`) from their working
                    // directory: a host path all the same.
                    return Err(format!(
                        "{runtime} -v {source}: a volume's name or a granted absolute host path"
                    ));
                }
            }
            "--mount" => mount_option(runtime, &value, mounts)?,
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A named volume's name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), as opposed to a host path.
fn volume_name(source: &str) -> bool {
    let mut chars = source.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A `--mount` value: a bind only from a granted host path; a volume without driver
/// options (the local driver's `device=` binds any host path); or a tmpfs. Later keys win,
/// as in the runtimes' own parsers, and quoted fields are refused rather than parsed.
fn mount_option(runtime: &str, value: &str, mounts: &[PathBuf]) -> Result<(), String> {
    if value.contains('"') || value.contains('\'') {
        return Err(format!(
            "{runtime} --mount with quoted fields is not allowed"
        ));
    }
    let fields: Vec<(String, &str)> = value
        .split(',')
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v))
        .collect();
    let last = |keys: &[&str]| {
        fields
            .iter()
            .rev()
            .find(|(k, _)| keys.contains(&k.as_str()))
            .map(|(_, v)| *v)
    };
    if let Some((key, _)) = fields
        .iter()
        .find(|(k, _)| k.starts_with("volume-opt") || k == "volume-driver")
    {
        return Err(format!(
            "{runtime} --mount {key}= is not allowed (a volume driver's options can bind a host path)"
        ));
    }
    match last(&["type"]).unwrap_or("volume") {
        "bind" => {
            let source = last(&["source", "src"])
                .ok_or_else(|| format!("{runtime} --mount type=bind needs a source"))?;
            granted_mount(Path::new(source), mounts)
        }
        "volume" | "tmpfs" => Ok(()),
        kind => Err(format!("{runtime} --mount type={kind} is not allowed")),
    }
}

/// `docker` global options with a value that change nothing about what runs (`-H` is
/// checked further: a local socket only).
const DOCKER_GLOBAL_VALUED: [&str; 4] = ["-H", "--host", "-l", "--log-level"];
const DOCKER_GLOBAL_FLAGS: [&str; 2] = ["-D", "--debug"];
/// `docker` subcommands (after an optional `container`) an adapter may run: `run`,
/// `create`, `start` and `checkpoint` are checked further; the others act on containers
/// that exist and start nothing. What is missing reaches the host (`cp`, `exec`, `build`,
/// `volume create`, `plugin`, `save`, `load`, `import`, `swarm`, `service`, `context`…).
const DOCKER_SUBCOMMANDS: [&str; 19] = [
    "run",
    "create",
    "start",
    "checkpoint",
    "stop",
    "kill",
    "rm",
    "pause",
    "unpause",
    "wait",
    "inspect",
    "ps",
    "logs",
    "top",
    "port",
    "version",
    "info",
    "image",
    "images",
];
/// `docker run|create` options without a value that change nothing about privilege.
const DOCKER_FLAGS: [&str; 11] = [
    "-d",
    "--detach",
    "--rm",
    "-i",
    "--interactive",
    "-t",
    "--tty",
    "--init",
    "--read-only",
    "-q",
    "--quiet",
];
/// `docker run|create` options with a value that change nothing about privilege. Not
/// `--env-file` nor `--label-file` (the CLI reads them from the host, and `inspect` shows
/// them), nor `--cidfile` (the CLI writes it on the host).
const DOCKER_VALUED: [&str; 30] = [
    "--name",
    "--network",
    "--net",
    "--ulimit",
    "--annotation",
    "-e",
    "--env",
    "-l",
    "--label",
    "-h",
    "--hostname",
    "-p",
    "--publish",
    "-w",
    "--workdir",
    "--entrypoint",
    "-u",
    "--user",
    "-m",
    "--memory",
    "--cpus",
    "--restart",
    "--stop-signal",
    "--stop-timeout",
    "--log-driver",
    "--log-opt",
    "--pull",
    "--tmpfs",
    "--shm-size",
    "--health-cmd",
];
const DOCKER_NAMESPACES: [&str; 5] = ["--pid", "--ipc", "--userns", "--uts", "--cgroupns"];

const DOCKER_RUN: RunRules = RunRules {
    runtime: "docker",
    flags: &DOCKER_FLAGS,
    valued: &DOCKER_VALUED,
    namespaces: &DOCKER_NAMESPACES,
};

fn docker(args: &[String], mounts: &[PathBuf], images: Option<&Path>) -> Result<(), String> {
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if !a.starts_with('-') {
            break;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (a.as_str(), None),
        };
        if DOCKER_GLOBAL_FLAGS.contains(&flag) {
            i += 1;
            continue;
        }
        if !DOCKER_GLOBAL_VALUED.contains(&flag) {
            return Err(format!(
                "docker global option {flag} is not one Ferry lets an adapter pass \
                 (-H unix:///…, --log-level, --debug)"
            ));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .map(String::as_str)
                    .ok_or_else(|| format!("docker option {flag} needs a value"))?
            }
        };
        let local_socket = value.starts_with("unix:///") && !value.contains("..");
        if matches!(flag, "-H" | "--host") && !local_socket {
            return Err(format!(
                "docker -H {value}: only a local daemon's socket (unix:///PATH); other \
                 transports run programs (ssh) or reach other hosts"
            ));
        }
        i += 1;
    }
    let Some(mut sub) = args.get(i).map(String::as_str) else {
        return Ok(());
    };
    if sub == "container" {
        i += 1;
        sub = args.get(i).map(String::as_str).unwrap_or_default();
    }
    if !DOCKER_SUBCOMMANDS.contains(&sub) {
        return Err(format!(
            "docker {sub} is not a subcommand Ferry lets an adapter run (it may reach the \
             host's files or start code outside a container)"
        ));
    }
    let rest = &args[i + 1..];
    match sub {
        "run" | "create" => run_options(&DOCKER_RUN, rest, mounts),
        "start" => docker_start(rest),
        "checkpoint" => docker_checkpoint(rest, images),
        "image" => match rest.first().map(String::as_str) {
            Some("inspect" | "ls") => Ok(()),
            other => Err(format!(
                "docker image {} is not allowed (inspect and ls are)",
                other.unwrap_or_default()
            )),
        },
        _ => Ok(()),
    }
}

/// A name Docker accepts for a checkpoint (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`): one path
/// component below the container's checkpoint directory.
fn checkpoint_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name != "."
        && !name.contains("..")
}

/// `docker start`: a container, from a named checkpoint of its own at most.
fn docker_start(args: &[String]) -> Result<(), String> {
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if !a.starts_with('-') {
            i += 1;
            continue;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        if flag != "--checkpoint" {
            return Err(format!(
                "docker start {flag} is not allowed (--checkpoint NAME is)"
            ));
        }
        let name = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or("docker start --checkpoint needs a name")?
            }
        };
        if !checkpoint_name(&name) {
            return Err(format!(
                "docker start --checkpoint {name:?} is not a checkpoint name"
            ));
        }
        i += 1;
    }
    Ok(())
}

/// `docker checkpoint create|ls|rm`: names Docker accepts; a `--checkpoint-dir` only the
/// call's own image directory (the daemon makes a new `NAME` directory there and writes
/// CRIU's image into it; it never overwrites an existing one).
fn docker_checkpoint(args: &[String], images: Option<&Path>) -> Result<(), String> {
    let Some((verb, rest)) = args.split_first() else {
        return Ok(());
    };
    if !matches!(verb.as_str(), "create" | "ls" | "rm") {
        return Err(format!("docker checkpoint {verb} is not allowed"));
    }
    let mut operands = Vec::new();
    let mut i = 0;
    while let Some(a) = rest.get(i) {
        if !a.starts_with('-') {
            operands.push(a.as_str());
            i += 1;
            continue;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        match flag {
            "--leave-running" => {}
            "--checkpoint-dir" => {
                let dir = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        rest.get(i)
                            .cloned()
                            .ok_or("docker checkpoint --checkpoint-dir needs a value")?
                    }
                };
                if !inside(Path::new(&dir), Path::new("/")) || dir.contains("..") {
                    return Err(format!(
                        "docker checkpoint --checkpoint-dir {dir}: an absolute path without .."
                    ));
                }
                if images != Some(Path::new(&dir)) {
                    return Err(format!(
                        "docker checkpoint --checkpoint-dir {dir}: only this call's image \
                         directory ({})",
                        images.map_or_else(|| "none".into(), |d| d.display().to_string())
                    ));
                }
            }
            _ => return Err(format!("docker checkpoint option {flag} is not allowed")),
        }
        i += 1;
    }
    // `create` and `rm` take CONTAINER NAME.
    if verb != "ls" {
        if let Some(name) = operands.get(1).filter(|n| !checkpoint_name(n)) {
            return Err(format!(
                "docker checkpoint {verb}: {name:?} is not a checkpoint name"
            ));
        }
    }
    Ok(())
}

/// `cp`: only `cp -a SRC DST` placing the call's image directory (SRC, a CRIU image: it
/// holds `inventory.img`) as a new checkpoint of a Docker container
/// (`…/containers/ID/checkpoints/NAME`, where `…/containers/ID` holds the container's
/// `config.v2.json`).
fn cp(args: &[String], images: Option<&Path>) -> Result<(), String> {
    let [flag, src, dst] = args else {
        return Err("cp may only run as `cp -a SRC DST` (a Docker checkpoint)".into());
    };
    if flag != "-a" {
        return Err(format!("cp {flag}: only -a is allowed"));
    }
    let (src, dst) = (Path::new(src), Path::new(dst));
    for p in [src, dst] {
        if !inside(p, Path::new("/")) || p.components().any(|c| c == Component::ParentDir) {
            return Err(format!("cp {}: an absolute path without ..", p.display()));
        }
    }
    if images != Some(src) {
        return Err(format!(
            "cp {}: only this call's image directory may be copied",
            src.display()
        ));
    }
    let image = src.join("inventory.img");
    if !src.is_dir() || src.is_symlink() || !image.is_file() {
        return Err(format!(
            "cp {}: only a CRIU image directory (holding inventory.img) may be copied",
            src.display()
        ));
    }
    let name = dst
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| checkpoint_name(n));
    let checkpoints = dst.parent();
    let container = checkpoints.and_then(Path::parent);
    let container_id = container
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
    let placed = name.is_some()
        && checkpoints.is_some_and(|c| c.file_name().is_some_and(|n| n == "checkpoints"))
        && container.is_some_and(|c| c.parent().is_some_and(|p| p.ends_with("containers")))
        && container_id.is_some()
        && container.is_some_and(|c| c.join("config.v2.json").is_file())
        && checkpoints.is_some_and(|c| c.is_dir() && !c.is_symlink());
    if !placed {
        return Err(format!(
            "cp to {}: only into a Docker container's checkpoints directory \
             (…/containers/ID/checkpoints/NAME)",
            dst.display()
        ));
    }
    if dst.symlink_metadata().is_ok() {
        return Err(format!("cp to {}: it exists already", dst.display()));
    }
    Ok(())
}

const RUNC_GLOBAL_VALUED: [&str; 4] = ["--root", "--log", "--log-format", "--rootless"];
const RUNC_GLOBAL_REFUSED: [&str; 1] = ["--criu"];

fn runc(args: &[String], mounts: &[PathBuf]) -> Result<(), String> {
    let Some(i) = subcommand(args, &RUNC_GLOBAL_VALUED, &RUNC_GLOBAL_REFUSED)? else {
        return Ok(());
    };
    if !matches!(args[i].as_str(), "run" | "create" | "restore") {
        return Ok(());
    }
    let rest = &args[i + 1..];
    let mut bundle = PathBuf::from(".");
    for (n, a) in rest.iter().enumerate() {
        if let Some(v) = a
            .strip_prefix("--bundle=")
            .or_else(|| a.strip_prefix("-b="))
        {
            bundle = PathBuf::from(v);
        } else if a == "--bundle" || a == "-b" {
            bundle = PathBuf::from(rest.get(n + 1).ok_or("runc --bundle needs a value")?);
        }
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the bundle's {}: {e}", path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| format!("the bundle's {} is not JSON: {e}", path.display()))?;
    let bundle =
        std::fs::canonicalize(&bundle).map_err(|e| format!("bundle {}: {e}", bundle.display()))?;
    runc_config(&config, &bundle, mounts)
}

/// The checks on a runc bundle's configuration (`bundle` is its absolute directory).
fn runc_config(config: &Value, bundle: &Path, mounts: &[PathBuf]) -> Result<(), String> {
    let root = config["root"]["path"].as_str().unwrap_or("rootfs");
    if !inside(&bundle.join(root), bundle) {
        return Err(format!(
            "the bundle's root {root} is outside the bundle: the container would see the host's files"
        ));
    }
    if let Some(hooks) = config["hooks"].as_object() {
        if hooks
            .values()
            .any(|h| h.as_array().is_some_and(|a| !a.is_empty()))
        {
            return Err("the bundle has hooks: programs run on the host as root".into());
        }
    }
    for m in config["mounts"].as_array().into_iter().flatten() {
        let bind = m["type"] == "bind"
            || m["options"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
        if bind {
            let source = m["source"].as_str().unwrap_or_default();
            let source = bundle.join(source);
            if !inside(&source, bundle) {
                granted_mount(&source, mounts)?;
            }
        }
    }
    let caps = &config["process"]["capabilities"];
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        for cap in caps[set].as_array().into_iter().flatten() {
            let cap = cap.as_str().unwrap_or_default();
            if !DEFAULT_CAPS.contains(&cap) {
                return Err(format!(
                    "the bundle gives the container {cap}, beyond the capabilities containers get by default"
                ));
            }
        }
    }
    let namespaces: Vec<&str> = config["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["path"].as_str().is_none_or(str::is_empty))
        .filter_map(|n| n["type"].as_str())
        .collect();
    for ns in ["pid", "mount"] {
        if !namespaces.contains(&ns) {
            return Err(format!(
                "the bundle shares the host's {ns} namespace; a container needs its own"
            ));
        }
    }
    if config["linux"]["devices"]
        .as_array()
        .is_some_and(|d| !d.is_empty())
    {
        return Err("the bundle gives the container host devices".into());
    }
    Ok(())
}

/// Is the host path `source` under one of the granted `mounts`?
fn granted_mount(source: &Path, mounts: &[PathBuf]) -> Result<(), String> {
    if mounts.iter().any(|m| inside(source, m)) {
        return Ok(());
    }
    Err(format!(
        "the container would bind the host path {}; the site grants its containers {} \
         (add it to `mounts` in the adapter's grant to allow it)",
        source.display(),
        if mounts.is_empty() {
            "no host path".to_string()
        } else {
            format!("{mounts:?}")
        }
    ))
}

/// Is `path` (absolute) `dir` or below it, without `..` or `.` tricks?
fn inside(path: &Path, dir: &Path) -> bool {
    let clean = |p: &Path| -> Option<PathBuf> {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::RootDir => out.push("/"),
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => {
                    if !out.pop() {
                        return None;
                    }
                }
                Component::Prefix(_) => return None,
            }
        }
        Some(out)
    };
    match (clean(path), clean(dir)) {
        (Some(p), Some(d)) => p.is_absolute() && p.starts_with(d),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn podman_runs_what_the_adapter_runs_today_and_nothing_privileged() {
        let ok = "run -d --name a-redis --network host --ulimit nofile=20000:20000 --annotation org.criu.config=/w/c.conf -e K=V img redis-server --privileged";
        assert_eq!(
            podman(&args(ok), &[]),
            Ok(()),
            "flags after the image are the command's"
        );
        for bad in [
            "run --privileged img",
            "run --privileged=true img",
            "container create --cap-add SYS_ADMIN img",
            "run --device /dev/kvm img",
            "run --security-opt seccomp=unconfined img",
            "run --pid host img",
            "run --pid=host img",
            "run -v /:/host img",
            "run --volume /etc:/etc:ro img",
            "run --mount type=bind,source=/root,target=/r img",
            "run --mount type=devpts,target=/x img",
            "--runtime /tmp/evil run img",
            "run --some-new-option x img",
        ] {
            assert!(podman(&args(bad), &[]).is_err(), "{bad}");
        }
        let data = [PathBuf::from("/srv/data")];
        assert_eq!(
            podman(&args("run -v /srv/data/redis:/data img"), &data),
            Ok(())
        );
        assert!(podman(&args("run -v /srv/data/../etc:/data img"), &data).is_err());
        assert!(podman(&args("run -v ./etc:/data img"), &[]).is_err());
        assert_eq!(podman(&args("run -v named:/data img"), &[]), Ok(()));
        assert_eq!(
            podman(&args("container checkpoint --export x a-redis"), &[]),
            Ok(())
        );
        assert_eq!(podman(&args("--root /x run -d img"), &[]), Ok(()));
    }

    #[test]
    fn docker_runs_what_the_adapter_runs_and_nothing_privileged() {
        let sock = "-H unix:///run/ferry-docker/a/docker.sock";
        let m1 = Path::new("/var/lib/ferry/images/m1");
        for ok in [
            "run -d --name a-redis --network host --ulimit nofile=20000:20000 -e K=V img redis-server --privileged",
            "container create --name b-redis --network=host img redis-server",
            "checkpoint create --leave-running --checkpoint-dir=/var/lib/ferry/images/m1 a-redis ferry",
            "start --checkpoint ferry b-redis",
            "inspect --format {{.State.Pid}} a-redis",
            "image inspect --format {{.Id}} localhost/redis",
            "info --format {{.DockerRootDir}}",
            "pause a-redis",
            "rm -f a-redis",
            "run -d --mount type=volume,source=data,target=/data img",
            "run -d --mount type=tmpfs,target=/tmp img",
        ] {
            let line = format!("{sock} {ok}");
            assert_eq!(docker(&args(&line), &[], Some(m1)), Ok(()), "{line}");
            assert_eq!(docker(&args(ok), &[], Some(m1)), Ok(()), "{ok}");
        }
        for (bad, word) in [
            ("run --privileged img", "--privileged"),
            ("run --privileged=true img", "--privileged"),
            ("container create --cap-add SYS_ADMIN img", "--cap-add"),
            ("run --device /dev/kvm img", "--device"),
            ("run --security-opt seccomp=unconfined img", "--security-opt"),
            ("run --runtime=runc-unconfined img", "--runtime"),
            ("run --pid host img", "host"),
            ("run --uts=host img", "host"),
            ("run --userns host img", "host"),
            ("run -v /:/host img", "host path /"),
            ("run --volume /etc:/etc:ro img", "/etc"),
            ("run -dv /:/host img", "-dv"),
            ("run -v .:/host img", "volume's name"),
            ("run -v ./etc:/x img", "volume's name"),
            ("run -v ~/.ssh:/x img", "volume's name"),
            ("run --mount type=bind,source=/root,target=/r img", "/root"),
            ("run --mount type=volume,type=bind,src=/root,target=/r img", "/root"),
            ("run --mount TYPE=bind,src=/root,target=/r img", "/root"),
            (
                "run --mount type=volume,target=/r,volume-opt=type=none,volume-opt=o=bind,volume-opt=device=/etc img",
                "volume-opt",
            ),
            ("run --mount type=volume,src=x,target=/r,volume-driver=evil img", "volume-driver"),
            ("run --mount type=bind,\"src=/etc,x\",target=/r img", "quoted"),
            ("run --env-file /etc/shadow img", "--env-file"),
            ("run --cidfile /etc/cron.d/x img", "--cidfile"),
            ("run --volumes-from other img", "--volumes-from"),
            ("cp /etc/shadow a-redis:/x", "docker cp"),
            ("container cp a-redis:/x /etc/cron.d/x", "docker cp"),
            ("exec --privileged a-redis sh", "docker exec"),
            ("volume create --opt device=/etc x", "docker volume"),
            ("plugin install evil", "docker plugin"),
            ("save -o /etc/passwd img", "docker save"),
            ("image save -o /etc/passwd img", "save"),
            ("build /", "docker build"),
            ("start --checkpoint-dir /tmp/x --checkpoint c b-redis", "--checkpoint-dir"),
            ("start --checkpoint ../../../../tmp/x b-redis", "checkpoint name"),
            ("checkpoint create a-redis ../x", "checkpoint name"),
            ("checkpoint create --checkpoint-dir ../x a-redis c", "absolute"),
            (
                "checkpoint create --checkpoint-dir /var/lib/ferry/images/m2 a-redis c",
                "this call's image directory",
            ),
            (
                "checkpoint create --checkpoint-dir=/etc/cron.d a-redis c",
                "this call's image directory",
            ),
            ("-H ssh://root@elsewhere ps", "ssh"),
            ("--host=tcp://10.0.0.1:2375 ps", "unix"),
            ("--config /work/evil ps", "--config"),
            ("--context evil ps", "--context"),
        ] {
            let err = docker(&args(bad), &[], Some(m1)).expect_err(bad);
            assert!(err.contains(word), "{bad}: {err}");
        }
        let data = [PathBuf::from("/srv/data")];
        assert_eq!(
            docker(&args("run -v /srv/data/redis:/data img"), &data, None),
            Ok(())
        );
        assert_eq!(
            docker(
                &args("run --mount type=bind,src=/srv/data/r,target=/data img"),
                &data,
                None
            ),
            Ok(())
        );
        assert!(docker(&args("run -v /srv/data/../etc:/data img"), &data, None).is_err());
    }

    #[test]
    fn cp_only_places_a_docker_checkpoint() {
        let dir = std::env::temp_dir().join(format!("ferry-cp-rule-{}", std::process::id()));
        let images = dir.join("images");
        let id = "ab".repeat(32);
        let container = dir.join("docker/containers").join(&id);
        std::fs::create_dir_all(&images).expect("mkdir images");
        std::fs::create_dir_all(container.join("checkpoints")).expect("mkdir container");
        std::fs::write(images.join("inventory.img"), b"x").expect("write image");
        std::fs::write(container.join("config.v2.json"), b"{}").expect("write config");
        let cp_args = |src: &Path, dst: &Path| {
            vec![
                "-a".to_string(),
                src.display().to_string(),
                dst.display().to_string(),
            ]
        };
        let into = container.join("checkpoints/ferry");
        let mine = Some(images.as_path());
        assert_eq!(cp(&cp_args(&images, &into), mine), Ok(()));
        // Another call's image (or none) is not this call's to copy.
        assert!(cp(&cp_args(&images, &into), Some(dir.as_path())).is_err());
        assert!(cp(&cp_args(&images, &into), None).is_err());
        let refused = [
            cp_args(&dir.join("docker"), &into),
            cp_args(&images, &dir.join("elsewhere")),
            cp_args(&images, &container.join("ferry")),
            cp_args(&images, &container.join("checkpoints/../config.v2.json")),
            cp_args(Path::new("/etc"), &into),
            cp_args(
                &images,
                &dir.join("docker/containers/short/checkpoints/ferry"),
            ),
            vec![
                "-r".into(),
                images.display().to_string(),
                into.display().to_string(),
            ],
            vec!["/etc/shadow".into(), "/tmp/x".into()],
        ];
        for a in refused {
            assert!(cp(&a, mine).is_err(), "{a:?}");
        }
        std::fs::create_dir_all(&into).expect("mkdir checkpoint");
        assert!(
            cp(&cp_args(&images, &into), mine).is_err(),
            "an existing checkpoint is not overwritten"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn bundle_config() -> Value {
        serde_json::json!({
            "root": {"path": "rootfs"},
            "process": {"capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_KILL"]
            }},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}]}
        })
    }

    #[test]
    fn a_runc_bundle_may_not_reach_the_host() {
        let dir = Path::new("/tmp/bundle");
        assert_eq!(runc_config(&bundle_config(), dir, &[]), Ok(()));
        let refused = |edit: fn(&mut Value)| {
            let mut c = bundle_config();
            edit(&mut c);
            runc_config(&c, dir, &[])
        };
        type Edit = fn(&mut Value);
        let cases: [(&str, Edit); 7] = [
            ("root", |c| c["root"]["path"] = "/".into()),
            ("root", |c| c["root"]["path"] = "../..".into()),
            ("/etc", |c| {
                c["mounts"][1]["source"] = "/etc".into();
            }),
            ("CAP_SYS_ADMIN", |c| {
                c["process"]["capabilities"]["bounding"][0] = "CAP_SYS_ADMIN".into();
            }),
            ("pid", |c| {
                c["linux"]["namespaces"][0]["type"] = "network".into();
            }),
            ("devices", |c| {
                c["linux"]["devices"] = serde_json::json!([{"path": "/dev/sda"}]);
            }),
            ("hooks", |c| {
                c["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/sh"}]});
            }),
        ];
        for (word, edit) in cases {
            let err = refused(edit).expect_err(word);
            assert!(err.contains(word), "{word}: {err}");
        }
        // A granted host directory may be bound.
        let mut c = bundle_config();
        c["mounts"][1]["source"] = "/srv/data/redis".into();
        assert_eq!(runc_config(&c, dir, &[PathBuf::from("/srv/data")]), Ok(()));
        // A global option naming another CRIU is refused before the bundle is read.
        assert_eq!(
            runc(
                &args("--root /run/x --criu /tmp/evil restore --bundle /b id"),
                &[]
            )
            .map_err(|e| e.contains("--criu")),
            Err(true)
        );
    }

    #[test]
    fn paths_inside_a_directory() {
        assert!(inside(Path::new("/b/rootfs"), Path::new("/b")));
        assert!(!inside(Path::new("/b/../etc"), Path::new("/b")));
        assert!(!inside(Path::new("/bb"), Path::new("/b")));
        assert!(!inside(Path::new("rel"), Path::new("/b")));
    }
}
