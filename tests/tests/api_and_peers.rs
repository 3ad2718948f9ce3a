//! The gateways' front doors: peers are authenticated by pinned certificate fingerprints,
//! API calls need the bearer token, and bad input gets a clear 4xx that loses nothing.

use anyhow::Result;
use ferry_e2e::{Options, TwoSites};
use serde_json::Value;

/// `curl` inside site A's namespace; returns (HTTP status, body).
#[test]
fn api_calls_without_the_token_get_401() -> Result<()> {
    let sites = TwoSites::start(Options::new("auth"))?;
    let (code, body) = sites.a.curl("GET", "/v1/workloads", None, None)?;
    assert_eq!(code, 401, "{body}");
    let err: Value = serde_json::from_str(&body)?;
    assert_eq!(err["code"], "unauthorized");
    assert!(err["message"]
        .as_str()
        .unwrap_or("")
        .contains("bearer token"));
    let (code, _) = sites
        .a
        .curl("GET", "/v1/workloads", Some("wrong-token-0123456789"), None)?;
    assert_eq!(code, 401);
    // Metrics need the token too.
    assert_eq!(sites.a.curl("GET", "/metrics", None, None)?.0, 401);
    let (code, text) = sites
        .a
        .curl("GET", "/metrics", Some(&sites.a.token()?), None)?;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("# TYPE ferry_migrations gauge"), "{text}");
    // Health needs no token; the CLI with a wrong token fails and says why.
    assert_eq!(sites.a.curl("GET", "/healthz", None, None)?.0, 200);
    let out = sites
        .a
        .ferry_output(&["--token", "wrong-token-0123456789", "workload", "ls"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    // A client pinning another certificate refuses to talk to the gateway at all.
    let out = sites
        .a
        .ferry_output(&["--fingerprint", &"ab".repeat(32), "workload", "ls"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn the_token_and_the_images_are_for_the_owner_only() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let sites = TwoSites::start(Options::new("perm"))?;
    let mode = |p: &std::path::Path| -> Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    // `ferry init` wrote the token owner-only; the gateway made its data directory
    // (journal, checkpoint images of workload memory) owner-only.
    assert_eq!(mode(&sites.a.config)?, 0o600);
    assert_eq!(mode(&sites.a.dir.join("data"))?, 0o700);
    // A config others can read is refused, with what to do.
    std::fs::set_permissions(&sites.a.config, std::fs::Permissions::from_mode(0o644))?;
    let out = sites.a.ferry_output(&["workload", "ls"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a world-readable token was used");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    std::fs::set_permissions(&sites.a.config, std::fs::Permissions::from_mode(0o600))?;
    sites.a.ferry(&["workload", "ls"])?;
    Ok(())
}

#[test]
fn bad_api_input_gets_a_clear_4xx_and_loses_nothing() -> Result<()> {
    let sites = TwoSites::start(Options::new("input"))?;
    let t = sites.a.token()?;
    sites
        .a
        .ferry(&["workload", "run", "sleeper", "--", "sleep", "600"])?;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "POST",
            "/v1/workloads",
            Some(r#"{"name":"x","command":["sleep","1"],"prot":1}"#),
            422,
            "prot",
        ),
        (
            "POST",
            "/v1/workloads",
            Some(r#"{"name":"Bad_Name","command":["sleep","1"]}"#),
            400,
            "invalid workload name",
        ),
        (
            "POST",
            "/v1/workloads",
            Some(r#"{"name":"x","command":"sleep"}"#),
            422,
            "invalid type",
        ),
        (
            "POST",
            "/v1/workloads",
            Some(r#"{"name":"x","command":[]}"#),
            400,
            "command must not be empty",
        ),
        (
            "POST",
            "/v1/workloads",
            Some(r#"{"name":"sleeper","command":["sleep","1"]}"#),
            409,
            "already exists",
        ),
        ("POST", "/v1/workloads", Some("not json"), 422, "not valid"),
        (
            "POST",
            "/v1/migrations",
            Some(r#"{"workload":"sleeper","to":"nowhere"}"#),
            400,
            "not a configured peer",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(r#"{"workload":"ghost","to":"b"}"#),
            404,
            "not found",
        ),
        ("GET", "/v1/migrations/0000", None, 404, "not found"),
        ("DELETE", "/v1/migrations", None, 405, "not allowed"),
        ("GET", "/v1/nothing", None, 404, "no such endpoint"),
    ];
    for (method, path, body, want, needle) in cases {
        let (code, text) = sites.a.curl(method, path, Some(&t), *body)?;
        assert_eq!(code, *want, "{method} {path} {body:?}: {text}");
        let err: Value = serde_json::from_str(&text)?;
        let msg = err["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: message {msg:?} lacks {needle:?}"
        );
        assert!(err["code"].is_string());
    }
    let huge = format!(r#"{{"name":"x","command":["{}"]}}"#, "a".repeat(100_000));
    let (code, text) = sites
        .a
        .curl("POST", "/v1/workloads", Some(&t), Some(&huge))?;
    assert_eq!(code, 413, "{text}");
    // Nothing was lost or added.
    let list = sites.a.ferry_json(&["workload", "ls"])?;
    let names: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["sleeper"]);
    assert_eq!(list[0]["state"], "running");
    Ok(())
}

#[test]
fn unknown_peer_certificates_are_refused() -> Result<()> {
    // B does not list A: B must refuse A's connection.
    let mut opts = Options::new("peer");
    opts.b_knows_a = false;
    let mut sites = TwoSites::start(opts)?;
    let peers = sites.a.ferry_json(&["peer", "ls"])?;
    assert_eq!(peers[0]["name"], "b");
    assert_eq!(peers[0]["reachable"], false, "{peers}");
    assert!(
        sites
            .b
            .log()
            .contains("refused a peer with an unknown certificate"),
        "{}",
        sites.b.log()
    );

    // A migration to a peer that refuses us fails before anything is frozen.
    sites
        .a
        .ferry(&["workload", "run", "sleeper", "--", "sleep", "600"])?;
    let (ok, m) = sites.migrate("sleeper", "b")?;
    assert!(!ok);
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert!(m["timings"]["dump_ms"].is_null());
    let list = sites.a.ferry_json(&["workload", "ls"])?;
    assert_eq!(list[0]["state"], "running");

    // A pins a wrong fingerprint for B: A refuses B's certificate.
    sites.a.stop_gateway();
    sites.a.ferry(&[
        "peer",
        "add",
        "b",
        &format!("{}:7444", sites.b.addr),
        &"cd".repeat(32),
    ])?;
    sites.start_gateway_a()?;
    let peers = sites.a.ferry_json(&["peer", "ls"])?;
    assert_eq!(peers[0]["reachable"], false);
    let err = peers[0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("fingerprint") || err.contains("certificate"),
        "{err}"
    );
    // The peer that is known and correctly pinned (B -> A is not configured) is the only
    // way in: with both sides fixed, the link works.
    sites.a.stop_gateway();
    sites.a.ferry(&[
        "peer",
        "add",
        "b",
        &format!("{}:7444", sites.b.addr),
        &sites.b.fingerprint,
    ])?;
    sites.b.stop_gateway();
    sites.b.ferry(&[
        "peer",
        "add",
        "a",
        &format!("{}:7444", sites.a.addr),
        &sites.a.fingerprint,
    ])?;
    sites.start_gateway_a()?;
    sites.start_gateway_b()?;
    let peers = sites.a.ferry_json(&["peer", "ls"])?;
    assert_eq!(peers[0]["reachable"], true, "{peers}");
    Ok(())
}

#[test]
fn doctor_checks_a_running_site_and_measures_its_peer() -> Result<()> {
    let sites = TwoSites::start(Options::new("doctor"))?;
    // JSON: one finding per check (doctor exits 1 if any failed; the findings say which).
    let out = sites.a.ferry_output(&["--output", "json", "doctor"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let findings: Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("not JSON ({e}): {text}"))?;
    let find = |check: &str| -> Vec<Value> {
        findings
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["check"] == check)
            .cloned()
            .collect()
    };
    for check in [
        "config",
        "config mode",
        "key mode",
        "criu",
        "criu check",
        "api port",
    ] {
        let f = find(check);
        assert_eq!(f.len(), 1, "{check}: {findings}");
        assert_eq!(f[0]["status"], "ok", "{check}: {findings}");
    }
    assert!(
        find("api port")[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("the gateway answers")),
        "{findings}"
    );
    // Its peer, through the gateway: reachable, with a measured rate and clock offset.
    let peer = find("peer");
    assert_eq!(peer.len(), 1, "{findings}");
    assert_eq!(peer[0]["status"], "ok", "{findings}");
    let detail = peer[0]["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("b at "), "{detail}");
    assert!(
        detail.contains("Mbit/s") && detail.contains("clock"),
        "{detail}"
    );
    // The link check itself, through the API.
    let link = sites.a.ferry_json(&["peer", "ls"])?;
    assert_eq!(link[0]["reachable"], true, "{link}");
    Ok(())
}
