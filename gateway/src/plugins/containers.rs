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
//!
//! Other subcommands (checkpoint, restore of an exported podman container, inspect, rm…)
//! start nothing new from the adapter's arguments and pass.

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
/// the site lets its containers bind. The error says what was refused and why.
pub fn check(program: &str, args: &[String], mounts: &[PathBuf]) -> Result<(), String> {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    match name {
        "podman" => podman(args, mounts),
        "runc" => runc(args, mounts),
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
    i += 1;
    while let Some(a) = args.get(i) {
        if a == "--" || !a.starts_with('-') {
            // The image; what follows is the container's own command.
            return Ok(());
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        if PODMAN_FLAGS.contains(&flag) {
            i += 1;
            continue;
        }
        let known = PODMAN_VALUED.contains(&flag)
            || PODMAN_NAMESPACES.contains(&flag)
            || matches!(flag, "-v" | "--volume" | "--mount");
        if !known {
            return Err(format!(
                "podman option {flag} is not one Ferry lets an adapter pass (privileged, \
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
                    .ok_or_else(|| format!("podman option {flag} needs a value"))?
            }
        };
        if PODMAN_NAMESPACES.contains(&flag) && value == "host" {
            return Err(format!("podman {flag}=host shares the host's namespace"));
        }
        match flag {
            "-v" | "--volume" => {
                let source = value.split(':').next().unwrap_or_default();
                if source.starts_with('/') {
                    granted_mount(Path::new(source), mounts)?;
                }
            }
            "--mount" => {
                let fields: Vec<(&str, &str)> =
                    value.split(',').filter_map(|f| f.split_once('=')).collect();
                let kind = fields
                    .iter()
                    .find(|(k, _)| *k == "type")
                    .map_or("volume", |(_, v)| *v);
                if kind == "bind" {
                    let source = fields
                        .iter()
                        .find(|(k, _)| matches!(*k, "source" | "src"))
                        .map(|(_, v)| *v)
                        .ok_or("podman --mount type=bind needs a source")?;
                    granted_mount(Path::new(source), mounts)?;
                } else if kind != "volume" && kind != "tmpfs" {
                    return Err(format!("podman --mount type={kind} is not allowed"));
                }
            }
            _ => {}
        }
        i += 1;
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
        assert_eq!(podman(&args("run -v named:/data img"), &[]), Ok(()));
        assert_eq!(
            podman(&args("container checkpoint --export x a-redis"), &[]),
            Ok(())
        );
        assert_eq!(podman(&args("--root /x run -d img"), &[]), Ok(()));
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
