//! `hostile` adapter, for the sandbox tests only: runs real process workloads, but its
//! `checkpoint` misbehaves as the workload's `mode` setting says: `loop` spins forever,
//! `memory` grows without bound, `exec` calls a capability the site does not grant,
//! `trap` traps, `connect` opens a TCP connection to the `target` setting, `hang` waits
//! on one for a reply that never comes, `container` runs the `program` setting with the
//! `args` setting (split on spaces), as a runtime adapter asks runc or podman to start a
//! container. Any other mode
//! checkpoints normally (a `connect` that succeeds goes on to the real checkpoint).
//! Its workload hooks (`ferry:hooks`) misbehave the same way.

use ferry_adapter_sdk::hooks::{About, Hooks};
use ferry_adapter_sdk::service::reason;
use ferry_adapter_sdk::*;

struct Hostile;

fn misbehave(settings: &[(String, String)]) -> Result<(), AdapterError> {
    let setting = |key: &str| setting_in(settings, key);
    match setting("mode") {
        Some("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some("memory") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0xa5; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Some("exec") => {
            run("sh", &["-c", "echo escaped"], 1000)?;
            Ok(())
        }
        Some("container") => {
            let program = setting("program").unwrap_or("podman");
            let args: Vec<&str> = setting("args")
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            run(program, &args, 5000)?;
            Ok(())
        }
        Some("trap") => panic!("hostile adapter traps in checkpoint"),
        Some("hang") => {
            // Waits in the host for a reply that never comes.
            let target = setting("target").unwrap_or("127.0.0.1:9");
            let mut s = std::net::TcpStream::connect(target)
                .map_err(|e| AdapterError::Denied(format!("socket {target}: {e}")))?;
            let mut byte = [0u8; 1];
            let _ = std::io::Read::read(&mut s, &mut byte);
            Ok(())
        }
        Some("connect") => {
            let target = setting("target").unwrap_or("127.0.0.1:9");
            std::net::TcpStream::connect(target)
                .map(|_| ())
                .map_err(|e| AdapterError::Denied(format!("socket {target}: {e}")))
        }
        _ => Ok(()),
    }
}

impl Adapter for Hostile {
    fn describe() -> AdapterInfo {
        AdapterInfo {
            name: "hostile".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            approaches: vec![Approach::Container],
            runtimes: vec!["hostile".into()],
        }
    }

    fn probe(_w: Workload) -> Plan {
        Plan {
            feasible: true,
            approach: Some(Approach::Container),
            reason: "test adapter".into(),
            expected_downtime_ms: None,
        }
    }

    fn start_fresh(_w: Workload) -> Result<i32, AdapterError> {
        Ok(process::spawn()?)
    }

    fn checkpoint(w: Workload) -> Result<Notes, AdapterError> {
        misbehave(&w.settings)?;
        criu::dump()?;
        Ok(Vec::new())
    }

    fn restore(_w: Workload, _notes: Notes) -> Result<i32, AdapterError> {
        Ok(criu::restore()?)
    }

    fn resume_source(_w: Workload) -> Result<Option<i32>, AdapterError> {
        process::resume()?;
        Ok(None)
    }

    fn release_source(_w: Workload) -> Result<(), AdapterError> {
        Ok(process::kill()?)
    }
}

impl Hooks for Hostile {
    fn post_checkpoint(about: About) -> Result<(), String> {
        misbehave(&about.settings).map_err(reason)
    }

    fn pre_restore(about: About) -> Result<(), String> {
        misbehave(&about.settings).map_err(reason)
    }
}

export_adapter!(Hostile);
ferry_adapter_sdk::export_hooks!(Hostile);
