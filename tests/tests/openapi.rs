//! The OpenAPI document (`GET /v1/openapi.json`) against the gateway that serves it: every
//! documented operation is called on real gateways (a workload run, checkpointed, planned
//! and moved), no call finds the route missing, and every answer, success or error,
//! validates against the schema the document gives for its status.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_e2e::{wait_for, Options, Site, TwoSites};
use serde_json::{json, Value};

const PORT: u16 = 6420;

/// A site's API as the document describes it, with the operations called so far.
struct Api<'a> {
    site: &'a Site,
    token: String,
    doc: Value,
    called: BTreeSet<(String, String)>,
}

impl<'a> Api<'a> {
    fn new(site: &'a Site) -> Result<Self> {
        let (code, text) = site.curl("GET", "/v1/openapi.json", None, None)?;
        if code != 200 {
            bail!("GET /v1/openapi.json answered {code}: {text}");
        }
        let doc: Value = serde_json::from_str(&text).context("the document is not JSON")?;
        assert_eq!(doc["openapi"], "3.1.0", "{doc}");
        Ok(Self {
            site,
            token: site.token()?,
            doc,
            called: BTreeSet::new(),
        })
    }

    /// Calls `method template` with `params` filled in, checks that the route exists and
    /// that the answer validates against the document, and returns status and body.
    fn call(
        &mut self,
        method: &str,
        template: &str,
        params: &[&str],
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        let op = self.doc["paths"][template][method.to_lowercase()].clone();
        if op.is_null() {
            bail!("{method} {template} is not in the document");
        }
        let mut path = template.to_string();
        for p in params {
            let start = path
                .find('{')
                .context("more parameters than the template has")?;
            let end = path[start..].find('}').context("an unclosed parameter")? + start;
            path.replace_range(start..=end, p);
        }
        let auth = !op["security"].is_null();
        let (code, text) =
            self.site
                .curl(method, &path, auth.then_some(self.token.as_str()), body)?;
        if code == 405 || (code == 404 && text.contains("no such endpoint")) {
            bail!("{method} {path}: documented, but the router answered {code}: {text}");
        }
        let response = if op["responses"][code.to_string()].is_null() {
            &op["responses"]["default"]
        } else {
            &op["responses"][code.to_string()]
        };
        let content = response["content"]
            .as_object()
            .and_then(|c| c.iter().next())
            .with_context(|| format!("{method} {template}: no content for {code}"))?;
        if content.0 == "application/json" {
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{method} {path} answered {code}, not JSON: {text}"))?;
            self.validate(&content.1["schema"], &value)
                .with_context(|| format!("{method} {path} answered {code}"))?;
        }
        self.called
            .insert((method.to_string(), template.to_string()));
        Ok((code, text))
    }

    /// `value` against `schema`, whose references point into the document's components.
    fn validate(&self, schema: &Value, value: &Value) -> Result<()> {
        let mut root = schema.clone();
        let obj = root
            .as_object_mut()
            .context("a schema that is not an object")?;
        obj.insert("components".into(), self.doc["components"].clone());
        obj.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        let validator = jsonschema::validator_for(&root)
            .map_err(|e| anyhow::anyhow!("the document's schema does not compile: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        if !errors.is_empty() {
            bail!(
                "does not validate against {schema}:\n{}\nvalue: {value:#}",
                errors.join("\n")
            );
        }
        Ok(())
    }

    /// Every operation of the document.
    fn documented(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }
}

#[test]
fn every_documented_operation_exists_and_its_answers_validate_against_the_document() -> Result<()> {
    let sites = TwoSites::start(Options::new("oapi"))?;
    sites.run_redis_at_a_with("redis", PORT, &["--route", "0.0.0.0:16420"])?;
    sites
        .a
        .redis(PORT, &["DEBUG", "POPULATE", "1000", "key", "64"])?;
    let mut a = Api::new(&sites.a)?;

    // Whole-site reads.
    for path in [
        "/healthz",
        "/v1/openapi.json",
        "/metrics",
        "/v1/site",
        "/v1/plugins",
        "/v1/peers",
        "/v1/routes",
        "/v1/workloads",
        "/v1/migrations",
    ] {
        let (code, text) = a.call("GET", path, &[], None)?;
        assert_eq!(code, 200, "GET {path}: {text}");
    }
    let (code, text) = a.call("GET", "/v1/peers/{name}/link", &["b"], None)?;
    assert_eq!(code, 200, "{text}");

    // A workload's life through the API.
    let spec = r#"{"name":"sleeper","command":["sleep","1000"]}"#;
    let (code, text) = a.call("POST", "/v1/workloads", &[], Some(spec))?;
    assert_eq!(code, 201, "{text}");
    let (code, text) = a.call("GET", "/v1/workloads/{name}", &["sleeper"], None)?;
    assert_eq!(code, 200, "{text}");
    // Errors validate too: starting a running workload is refused.
    let (code, text) = a.call("POST", "/v1/workloads/{name}/start", &["sleeper"], None)?;
    assert!(code >= 400, "{text}");
    let (code, text) = a.call("DELETE", "/v1/workloads/{name}", &["sleeper"], None)?;
    assert_eq!(code, 200, "{text}");
    let (code, text) = a.call(
        "POST",
        "/v1/workloads/{name}/checkpoints",
        &["redis"],
        Some(r#"{"leave_running":true}"#),
    )?;
    assert_eq!(code, 201, "{text}");
    let (code, text) = a.call("GET", "/v1/workloads/{name}/checkpoints", &["redis"], None)?;
    assert_eq!(code, 200, "{text}");
    let (code, text) = a.call(
        "POST",
        "/v1/workloads/{name}/restore",
        &["redis"],
        Some(r#"{"from":"no-such-checkpoint"}"#),
    )?;
    assert!(code >= 400, "{text}");
    let (code, text) = a.call("POST", "/v1/workloads/{name}/recover", &["redis"], None)?;
    assert!(code >= 400, "{text}");

    // A migration: planned, started, followed through its events, then its record.
    let request = r#"{"workload":"redis","to":"b"}"#;
    let (code, text) = a.call("POST", "/v1/migrations/plan", &[], Some(request))?;
    assert_eq!(code, 200, "{text}");
    let (code, text) = a.call("POST", "/v1/migrations", &[], Some(request))?;
    assert_eq!(code, 202, "{text}");
    let id = serde_json::from_str::<Value>(&text)?["id"]
        .as_str()
        .context("a migration without an id")?
        .to_string();
    let (code, stream) = a.call("GET", "/v1/migrations/{id}/events", &[&id], None)?;
    assert_eq!(code, 200, "{stream}");
    // `progress` events, then one `end` with the final record.
    let mut kinds = Vec::new();
    for block in stream.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let (kind, data) = (field("event:"), field("data:"));
        let schema = match kind.as_str() {
            "progress" => json!({"$ref": "#/components/schemas/MigrationEvent"}),
            "end" => json!({"$ref": "#/components/schemas/Migration"}),
            other => bail!("an event of kind {other:?}: {block}"),
        };
        a.validate(&schema, &serde_json::from_str(&data)?)
            .with_context(|| format!("a {kind} event"))?;
        kinds.push(kind);
    }
    assert!(kinds.len() > 1, "{stream}");
    assert_eq!(kinds.last().map(String::as_str), Some("end"), "{stream}");
    let record = wait_for("the move's end", Duration::from_secs(60), || {
        let (_, text) = a.call("GET", "/v1/migrations/{id}", &[&id], None).ok()?;
        let m: Value = serde_json::from_str(&text).ok()?;
        (m["phase"] == "completed").then_some(m)
    })?;
    assert_eq!(record["workload"], "redis");
    // Too late to abort: refused, with an error body.
    let (code, text) = a.call("DELETE", "/v1/migrations/{id}", &[&id], None)?;
    assert!(code >= 400, "{text}");
    // A's route now forwards to B; closing it answers what was closed.
    let (code, text) = a.call("GET", "/v1/routes", &[], None)?;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("peer:b"), "{text}");
    let (code, text) = a.call("DELETE", "/v1/routes/{workload}", &["redis"], None)?;
    assert_eq!(code, 200, "{text}");

    // The destination's side of the same records validates too.
    let mut b = Api::new(&sites.b)?;
    for (template, params) in [
        ("/v1/workloads", vec![]),
        ("/v1/workloads/{name}", vec!["redis"]),
        ("/v1/migrations", vec![]),
        ("/v1/migrations/{id}", vec![id.as_str()]),
    ] {
        let (code, text) = b.call("GET", template, &params, None)?;
        assert_eq!(code, 200, "b: GET {template}: {text}");
    }

    let missing: Vec<_> = a.documented().difference(&a.called).cloned().collect();
    assert!(missing.is_empty(), "documented but not called: {missing:?}");
    Ok(())
}
