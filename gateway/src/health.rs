//! Is a workload serving? After a start and after a restore (and for a service-level
//! replica) a site waits until the workload's health check passes ([`HealthCheck`]; a TCP
//! connection to its port by default) while its process stays alive; a workload with
//! neither a port nor a check must keep running for a moment. Every wait and every probe
//! is bounded.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::spec::{HealthCheck, WorkloadSpec};
use crate::sys::process::{self, WORKLOAD_PATH};

/// How long a workload without a port or a check must keep running to count as started.
const LIVENESS: Duration = Duration::from_millis(200);
/// One probe's own bound (a connection, a request, a command).
const PROBE: Duration = Duration::from_secs(2);
/// Between two probes.
const RETRY: Duration = Duration::from_millis(25);

/// Waits (at most `timeout`) until `spec`'s check passes for the workload whose root is
/// `pid`. It fails at once if that process exits. The error says what failed and how.
pub async fn wait(spec: &WorkloadSpec, pid: i32, timeout: Duration) -> Result<(), String> {
    let start = process::start_time(pid);
    let alive = || start.is_some_and(|s| process::alive(pid, s));
    let check = match (&spec.health, spec.port) {
        (Some(check), _) => check.clone(),
        (None, Some(_)) => HealthCheck::Tcp,
        (None, None) => {
            tokio::time::sleep(LIVENESS).await;
            return if alive() {
                Ok(())
            } else {
                Err(format!(
                    "it exited within {} ms of starting",
                    LIVENESS.as_millis()
                ))
            };
        }
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no probe finished");
    loop {
        if !alive() {
            return Err(format!(
                "it exited before its health check ({check}) passed (last probe: {last})"
            ));
        }
        match tokio::time::timeout(PROBE, probe(&check, spec.port)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("the probe took over {} s", PROBE.as_secs()),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "its health check ({check}) did not pass within {} s: {last}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One probe of `check` against `port` on this site's loopback.
async fn probe(check: &HealthCheck, port: Option<u16>) -> Result<(), String> {
    let connect = || async {
        let port = port.ok_or("no port to probe")?;
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("port {port}: {e}"))
    };
    match check {
        HealthCheck::Tcp => connect().await.map(drop),
        HealthCheck::Http { path } => {
            let mut conn = connect().await?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: ferry-health\r\nConnection: close\r\n\r\n"
            );
            conn.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let code = status_code(&mut conn)
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("GET {path} answered {code}"))
            }
        }
        HealthCheck::Exec { command } => {
            let Some((program, args)) = command.split_first() else {
                return Err("an empty health command".into());
            };
            let status = tokio::process::Command::new(process::resolve(program))
                .args(args)
                .env_clear()
                .env("PATH", WORKLOAD_PATH)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{} exited with {status}", command.join(" ")))
            }
        }
    }
}

/// The status code of an HTTP/1.x response's first line.
async fn status_code(conn: &mut tokio::net::TcpStream) -> Result<u16, String> {
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = conn.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    match (words.next(), words.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!(
            "not an HTTP answer: {:?}",
            line.lines().next().unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec(port: Option<u16>, health: Option<HealthCheck>) -> WorkloadSpec {
        WorkloadSpec {
            name: "w".into(),
            command: vec!["sleep".into(), "30".into()],
            port,
            env: BTreeMap::new(),
            runtime: "process".into(),
            settings: BTreeMap::new(),
            routes: Vec::new(),
            health,
            checkpoints: None,
            restart: None,
            volumes: Vec::new(),
        }
    }

    /// A one-shot HTTP server answering every request with `code`.
    async fn http_answering(code: u16) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let answer = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                let _ = c.write_all(answer.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn a_check_passes_only_when_the_service_says_so() {
        let mut me = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(me.id()).expect("pid");
        let short = Duration::from_millis(300);
        let ok = http_answering(204).await;
        let http = |path: &str| Some(HealthCheck::Http { path: path.into() });
        assert!(wait(&spec(Some(ok), http("/health")), pid, short)
            .await
            .is_ok());
        let bad = http_answering(503).await;
        let err = wait(&spec(Some(bad), http("/health")), pid, short)
            .await
            .unwrap_err();
        assert!(err.contains("GET /health answered 503"), "{err}");
        // A port that answers TCP is healthy by default.
        assert!(wait(&spec(Some(bad), None), pid, short).await.is_ok());
        let exec = |cmd: &str| {
            Some(HealthCheck::Exec {
                command: cmd.split(' ').map(String::from).collect(),
            })
        };
        assert!(wait(&spec(None, exec("true")), pid, short).await.is_ok());
        let err = wait(&spec(None, exec("false")), pid, short)
            .await
            .unwrap_err();
        assert!(err.contains("false exited with"), "{err}");
        // Without port and check: it must keep running.
        assert!(wait(&spec(None, None), pid, short).await.is_ok());
        me.kill().expect("kill");
        me.wait().expect("reap");
        let err = wait(&spec(None, None), pid, short).await.unwrap_err();
        assert!(err.contains("exited"), "{err}");
        let err = wait(&spec(Some(ok), None), pid, short).await.unwrap_err();
        assert!(err.contains("exited before its health check"), "{err}");
    }

    #[test]
    fn checks_parse_and_are_validated() {
        assert_eq!("tcp".parse::<HealthCheck>(), Ok(HealthCheck::Tcp));
        assert_eq!(
            "http:/ready".parse::<HealthCheck>(),
            Ok(HealthCheck::Http {
                path: "/ready".into()
            })
        );
        assert_eq!(
            "exec:redis-cli -p 6379 ping".parse::<HealthCheck>(),
            Ok(HealthCheck::Exec {
                command: vec![
                    "redis-cli".into(),
                    "-p".into(),
                    "6379".into(),
                    "ping".into()
                ]
            })
        );
        assert!("http:ready".parse::<HealthCheck>().is_err());
        assert!("http:/a b".parse::<HealthCheck>().is_err());
        assert!("exec:".parse::<HealthCheck>().is_err());
        assert!("ping".parse::<HealthCheck>().is_err());
        let mut s = spec(None, Some(HealthCheck::Tcp));
        assert!(s.validate().is_err(), "tcp needs a port");
        s.port = Some(80);
        assert!(s.validate().is_ok());
    }
}
