//! Service-level migration, snapshot-style: the `http-state` service adapter moves an HTTP
//! counter that serves its state as a document (`GET`/`PUT /state`) by exporting it at
//! site A and importing it into a fresh instance at site B through a tunnel over the peer
//! link, then once more while A's ingress holds the clients. A second kind of service
//! adapter beside `redis`'s live replica, through the same world. Real gateways, a real
//! HTTP service, two network namespaces.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_e2e::{wait_for, Options, Site, TwoSites};
use serde_json::Value;

/// The counter's port (tunnelled to by the adapter) and its route at each site.
const PORT: u16 = 8080;
const ROUTE: &str = "http:0.0.0.0:18080";
/// The state document also carries a blob this long, so it is larger than anything an
/// adapter could pass through `exec`'s captured output or a command line.
const BLOB_BYTES: usize = 2_000_000;

/// A stateful HTTP service: POST /inc counts, GET / answers the count, GET /state exports
/// `{"count": N, "blob": "…"}`, PUT /state replaces it (or, run with `lossy`, answers 204
/// and keeps nothing). As ingress.rs's counter: a thread per connection and no Nagle delay.
const COUNTER: &str = r#"
import http.server, json, sys, threading
count = 0
blob = "".join("%08x" % i for i in range(int(sys.argv[2]) // 8))
lossy = sys.argv[3:] == ["lossy"]
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def reply(self, status, body=b""):
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))
    def do_POST(self):
        global count
        self.body()
        if self.path != "/inc":
            return self.reply(404)
        with lock:
            count += 1
            now = count
        self.reply(200, str(now).encode())
    def do_GET(self):
        if self.path == "/":
            self.reply(200, str(count).encode())
        elif self.path == "/state":
            with lock:
                doc = json.dumps({"count": count, "blob": blob})
            self.reply(200, doc.encode())
        else:
            self.reply(404)
    def do_PUT(self):
        global count, blob
        body = self.body()
        if self.path != "/state":
            return self.reply(404)
        doc = json.loads(body)
        if not lossy:
            with lock:
                count, blob = int(doc["count"]), str(doc["blob"])
        self.reply(204)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// The blob the counter starts with.
fn blob() -> String {
    (0..BLOB_BYTES / 8).map(|i| format!("{i:08x}")).collect()
}

/// Both sites run `process` and `http-state`; `ferry init` grants `http-state` nothing, so
/// the test grants what its manifest asks for, the three programs it runs, and the
/// counter's port for its tunnel.
fn options(tag: &str) -> Options {
    let mut o = Options::new(tag);
    o.adapters = vec!["process".into(), "http-state".into()];
    let strings = |l: &[&str]| l.iter().map(std::string::ToString::to_string).collect();
    o.grants = vec![(
        "http-state".into(),
        strings(&["log", "exec", "tunnel"]),
        strings(&["curl", "sha256sum", "rm"]),
    )];
    o.tunnel_ports = vec![("http-state".into(), vec![PORT])];
    o
}

/// Runs the counter at A as a `process` workload `name` on `port`, with extra
/// `workload run` flags and arguments for the counter.
fn run_counter(
    sites: &TwoSites,
    name: &str,
    port: u16,
    flags: &[&str],
    app: &[&str],
) -> Result<()> {
    std::fs::create_dir_all(&sites.work_root)?;
    let script = sites.work_root.join("counter-state.py");
    std::fs::write(&script, COUNTER)?;
    let (script, p, blob) = (
        script.display().to_string(),
        port.to_string(),
        BLOB_BYTES.to_string(),
    );
    let mut args = vec!["workload", "run", name, "--port", &p];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "python3", &script, &p, &blob]);
    args.extend_from_slice(app);
    sites.a.ferry(&args)?;
    Ok(())
}

/// `curl -sf http://127.0.0.1:PORT/PATH` at a site.
fn get(site: &Site, port: u16, path: &str) -> Result<String> {
    site.exec("curl", &["-sf", &format!("http://127.0.0.1:{port}{path}")])
}

#[test]
fn an_http_service_moves_by_export_and_import_while_clients_count() -> Result<()> {
    let sites = TwoSites::start(options("hsnap"))?;
    run_counter(
        &sites,
        "counter",
        PORT,
        &["--route", ROUTE, "--setting", "state-path=/state"],
        &[],
    )?;
    // The plan chooses the service level, through http-state.
    let plan = sites
        .a
        .ferry_json(&["migrate", "counter", "--to", "b", "--plan"])?;
    let chosen = &plan["candidates"][plan["chosen"].as_u64().context("nothing chosen")? as usize];
    assert_eq!(chosen["approach"], "service", "{plan}");
    assert_eq!(chosen["adapter"], "http-state", "{plan}");
    let reason = chosen["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("state document /state"), "{plan}");
    assert!(reason.contains("2.0 MB"), "{plan}");

    // 300 increments/s for 4 s over 4 connections, through A's ingress.
    let client = sites.a.start_load(
        "http",
        "127.0.0.1:18080",
        "300",
        "4",
        "4",
        &sites.root.join("acked.txt"),
    )?;
    std::thread::sleep(Duration::from_millis(1200));
    let (ok, m) = sites.migrate("counter", "b")?;
    let out = client.finish()?;
    assert!(ok, "{m}\n{}", sites.logs());
    assert_eq!(m["approach"], "service", "{m}");
    assert_eq!(m["service"], "http-state", "{m}");
    assert!(m["timings"]["dump_ms"].is_null(), "a checkpoint ran: {m}");
    assert_eq!(m["sync"]["in_sync"], true, "{m}");
    assert!(
        m["bytes_moved"].as_u64().unwrap_or(0) > BLOB_BYTES as u64,
        "the first import's bytes: {m}"
    );
    eprintln!(
        "migration: approach {} ({}), timings {}, sync {}",
        m["approach"], m["service"], m["timings"], m["sync"]
    );
    assert!(out.ok, "{}", out.stderr);
    let summary = out.summary;
    eprintln!("client: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["unavailable"], 0, "{summary}");
    assert_eq!(summary["ok"], summary["requests"], "{summary}");

    // Every acknowledged increment is in B's count, exactly once, and the rest of the
    // document came along whole.
    let acked = summary["ok"].to_string();
    assert_eq!(get(&sites.b, PORT, "/")?.trim(), acked);
    let state: Value = serde_json::from_str(&get(&sites.b, PORT, "/state")?)?;
    assert_eq!(state["count"].to_string(), acked);
    assert!(
        state["blob"].as_str() == Some(blob().as_str()),
        "blob differs"
    );
    // Nothing serves at A's port any more; A's route leads to B.
    wait_for("the source to stop", Duration::from_secs(10), || {
        get(&sites.a, PORT, "/").is_err().then_some(())
    })?;
    assert_eq!(get(&sites.a, 18080, "/")?.trim(), acked);
    let at_b = sites.b.ferry_json(&["workload", "ls"])?;
    assert_eq!(at_b[0]["name"], "counter", "{at_b}");
    assert_eq!(at_b[0]["runtime"], "process", "{at_b}");
    let shown = sites
        .a
        .ferry(&["migration", "show", m["id"].as_str().unwrap_or("")])?;
    assert!(shown.contains("approach    service"), "{shown}");
    Ok(())
}

#[test]
fn a_workload_without_a_state_path_is_not_one_http_state_moves() -> Result<()> {
    let sites = TwoSites::start(options("hsplan"))?;
    run_counter(&sites, "counter", PORT, &[], &[])?;
    // Its state path names nothing the service serves.
    run_counter(
        &sites,
        "elsewhere",
        8081,
        &["--setting", "state-path=/nope"],
        &[],
    )?;
    let candidate = |workload: &str| -> Result<(Value, Value)> {
        let plan = sites
            .a
            .ferry_json(&["migrate", workload, "--to", "b", "--plan"])?;
        let c = plan["candidates"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["adapter"] == "http-state"))
            .cloned()
            .with_context(|| format!("no http-state candidate: {plan}"))?;
        Ok((c, plan))
    };

    let (c, plan) = candidate("counter")?;
    eprintln!(
        "{}",
        sites
            .a
            .ferry(&["migrate", "counter", "--to", "b", "--plan"])?
    );
    assert_eq!(c["feasible"], false, "{plan}");
    assert_eq!(
        c["reason"],
        "counter has no state-path setting; the http-state adapter moves HTTP services that serve their state at GET and PUT PATH (--setting state-path=PATH)",
        "{plan}"
    );
    // The checkpoint still can.
    let chosen = &plan["candidates"][plan["chosen"].as_u64().context("nothing chosen")? as usize];
    assert_eq!(chosen["approach"], "container", "{plan}");

    let (c, plan) = candidate("elsewhere")?;
    assert_eq!(c["feasible"], false, "{plan}");
    let reason = c["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("GET /nope from the local instance (127.0.0.1:8081) failed")
            && reason.contains("404"),
        "{plan}"
    );
    // Planning moved nothing.
    assert_eq!(
        sites.a.ferry_json(&["migration", "ls"])?,
        serde_json::json!([])
    );
    assert_eq!(get(&sites.a, PORT, "/")?.trim(), "0");
    Ok(())
}

#[test]
fn an_instance_that_does_not_serve_back_its_import_is_not_promoted() -> Result<()> {
    let sites = TwoSites::start(options("hslost"))?;
    // At B too the counter keeps nothing it is given.
    run_counter(
        &sites,
        "counter",
        PORT,
        &["--setting", "state-path=/state"],
        &["lossy"],
    )?;
    for _ in 0..3 {
        sites
            .a
            .exec("curl", &["-sf", "-X", "POST", "http://127.0.0.1:8080/inc"])?;
    }
    let (ok, m) = sites.migrate("counter", "b")?;
    assert!(!ok, "{m}");
    assert_eq!(m["approach"], "service", "{m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    let error = m["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("does not serve back what it was given"),
        "{error}\n{}",
        sites.logs()
    );
    eprintln!("rolled back: {error}");
    // The source served throughout and still does, with its count; B's instance is gone.
    assert_eq!(get(&sites.a, PORT, "/")?.trim(), "3");
    wait_for("the instance at b to go", Duration::from_secs(10), || {
        get(&sites.b, PORT, "/").is_err().then_some(())
    })?;
    assert_eq!(
        sites.b.ferry_json(&["workload", "ls"])?,
        serde_json::json!([])
    );
    Ok(())
}
