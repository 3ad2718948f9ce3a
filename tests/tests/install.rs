//! Installing Ferry like a service: `scripts/install` into a scratch root puts the binary,
//! the adapters, a starter site, the systemd unit, completions and manual pages in place,
//! and `ferry doctor` finds the installed site ready, first without its gateway, then
//! with it running.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{ferry_bin, output_from, wait_for};

const API: &str = "127.0.0.1:17643";
const PEER: &str = "127.0.0.1:17644";

fn doctor(ferry: &Path, config: &Path) -> Result<(bool, String)> {
    let out = output_from(
        Command::new(ferry)
            .arg("doctor")
            .arg("--config")
            .arg(config),
        Stdio::null(),
    )?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check)))
        .unwrap_or("")
}

#[test]
fn the_install_puts_a_site_in_place_and_doctor_finds_it_ready() -> Result<()> {
    let root = std::env::temp_dir().join("ferry-install-root");
    let _ = std::fs::remove_dir_all(&root);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = ferry_bin()?;
    let out = output_from(
        Command::new("bash")
            .arg(repo.join("scripts/install"))
            .arg("--root")
            .arg(&root)
            .args(["--site", "inst", "--adapters", "process"])
            .arg("--bin")
            .arg(&bin)
            .args(["--api-listen", API, "--peer-listen", PEER]),
        Stdio::null(),
    )?;
    assert!(
        out.status.success(),
        "install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything in its place, the secrets readable by their owner only.
    let ferry = root.join("usr/local/bin/ferry");
    let site = root.join("etc/ferry/inst");
    let config = site.join("site.toml");
    for f in [
        "usr/local/lib/ferry/plugins/process.wasm",
        "usr/local/lib/ferry/plugins/process.toml",
        "usr/local/share/man/man1/ferry.1",
        "usr/local/share/man/man1/ferry-migrate.1",
        "etc/ferry/inst/cert.pem",
    ] {
        assert!(root.join(f).is_file(), "{f} missing");
    }
    for secret in [&config, &site.join("key.pem")] {
        let mode = std::fs::metadata(secret)?.permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", secret.display());
    }
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/ferry-gateway@.service"))?;
    for want in [
        "ExecStart=/usr/local/bin/ferry gateway --config /etc/ferry/%i/site.toml",
        "Restart=on-failure",
        "CAP_CHECKPOINT_RESTORE",
    ] {
        assert!(unit.contains(want), "the unit lacks {want:?}:\n{unit}");
    }
    let completion =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/ferry"))?;
    assert!(completion.contains("_ferry") && completion.contains("migrate"));

    // The site as installed: ready, its gateway not running yet.
    let (ok, report) = doctor(&ferry, &config)?;
    assert!(ok, "{report}");
    for (check, want) in [
        ("config mode", "owner only"),
        ("criu check", "Looks good"),
        ("userfaultfd", "available"),
        ("plugins", "process"),
        ("api port", "is free"),
        ("peers", "no peer configured"),
    ] {
        assert!(
            line(&report, check).contains(want),
            "{check}: {want:?} not in {:?}\n{report}",
            line(&report, check)
        );
    }

    // Its gateway started as the unit would: doctor sees it answer.
    let mut gateway = Command::new(&ferry)
        .arg("gateway")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the installed gateway")?;
    let answered = wait_for("doctor to see the gateway", Duration::from_secs(30), || {
        let (_, report) = doctor(&ferry, &config).ok()?;
        line(&report, "api port")
            .contains("the gateway answers")
            .then_some(report)
    });
    let _ = gateway.kill();
    let _ = gateway.wait();
    let report = answered?;
    assert!(
        line(&report, "peer port").contains("the gateway answers"),
        "{report}"
    );

    // A key others can read is a failure doctor names, with the command that fixes it.
    std::fs::set_permissions(site.join("key.pem"), std::fs::Permissions::from_mode(0o644))?;
    let (ok, report) = doctor(&ferry, &config)?;
    assert!(!ok, "{report}");
    assert!(line(&report, "key mode").starts_with("FAIL"), "{report}");
    assert!(report.contains("chmod 600"), "{report}");
    let _ = std::fs::remove_dir_all(&root);
    // The site's workload group its gateway made (empty: it ran no workload).
    for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let _ = std::fs::remove_dir(Path::new(mount).join("ferry/inst"));
        let _ = std::fs::remove_dir(Path::new(mount).join("ferry"));
    }
    Ok(())
}
