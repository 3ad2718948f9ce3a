//! What the adapter asks curl and `sha256sum` and reads back from them, as plain data: the
//! state path a workload names, transfers of its state document between servers and
//! files, curl's per-transfer reports (`--write-out`) and `sha256sum`'s digests. No host
//! calls here, so it is tested natively.

use std::fmt;

/// The longest `state-path` taken (a request target, not a document).
const MAX_PATH: usize = 2048;

/// Where a service serves its state document (`--setting state-path=/state`): sent
/// verbatim as the request target of every `GET` and `PUT`, so it must be one already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePath(String);

impl StatePath {
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("state-path {text:?} must start with '/'"));
        }
        if text.len() > MAX_PATH {
            return Err(format!("state-path is longer than {MAX_PATH} bytes"));
        }
        // A request target is visible ASCII; a fragment is never sent.
        if let Some(c) = text.chars().find(|c| !c.is_ascii_graphic() || *c == '#') {
            return Err(format!(
                "state-path {text:?} holds {c:?}; it is sent as the request target, so it takes visible ASCII without '#' (percent-encode the rest)"
            ));
        }
        Ok(StatePath(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StatePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An HTTP server curl reaches from this site: the local instance, or the source through
/// the tunnel's local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    /// For messages: "the local instance", "the source (through the tunnel)".
    pub what: &'static str,
}

impl Server {
    /// The URL curl connects to. Only its authority matters: the path goes out as
    /// `--request-target`, so curl neither normalises it nor, for an upload to a path
    /// ending in '/', appends the local file's name to it.
    fn url(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}/", self.host, self.port)
        } else {
            format!("http://{}:{}/", self.host, self.port)
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}:{})", self.what, self.host, self.port)
    }
}

/// One transfer of the state document.
#[derive(Debug, Clone, Copy)]
pub enum Transfer<'a> {
    /// `GET` it from a server into a file (`/dev/null` to measure it only).
    Get { from: &'a Server, into: &'a str },
    /// `PUT` a file's bytes to a server.
    Put { from: &'a str, to: &'a Server },
}

/// How long curl may take to connect to a server (the tunnel's endpoint is local).
const CONNECT_TIMEOUT_S: &str = "5";
/// One line per transfer on stdout: status, bytes received, bytes sent.
const REPORT: &str = "%{http_code} %{size_download} %{size_upload}\n";

/// curl's arguments for `transfers` on `path`, run one after another by one curl process.
/// `--fail-early` ends it at the first that fails (so a failed `GET` into a file is never
/// followed by a `PUT` of what the file held before); `--upload-file` opens its file when
/// that transfer starts, after the ones before it wrote it, and streams it.
pub fn args(path: &StatePath, transfers: &[Transfer<'_>]) -> Vec<String> {
    // `-q` first: no ~/.curlrc changes what these transfers do.
    let mut args: Vec<String> = ["-q", "--silent", "--show-error", "--fail-early"]
        .map(String::from)
        .to_vec();
    for (i, t) in transfers.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        args.extend(
            [
                "--fail",
                "--connect-timeout",
                CONNECT_TIMEOUT_S,
                "--request-target",
                path.as_str(),
                // No `Expect: 100-continue` wait before a large upload's body.
                "--header",
                "Expect:",
                "--write-out",
                REPORT,
            ]
            .map(String::from),
        );
        match *t {
            Transfer::Get { from, into } => {
                args.extend(["--output", into].map(String::from));
                args.push(from.url());
            }
            Transfer::Put { from, to } => {
                args.extend(["--upload-file", from, "--output", "/dev/null"].map(String::from));
                args.push(to.url());
            }
        }
    }
    args
}

impl Transfer<'_> {
    /// For messages: "GET /state from the source (through the tunnel) (127.0.0.1:41234)".
    pub fn describe(&self, path: &StatePath) -> String {
        match self {
            Transfer::Get { from, .. } => format!("GET {path} from {from}"),
            Transfer::Put { to, .. } => format!("PUT {path} to {to}"),
        }
    }
}

/// Why a curl run of `transfers` that exited with `status` failed, naming the transfer:
/// curl reports every transfer it ran, the failed one included, and `--fail-early` runs
/// none after it.
pub fn failure(
    path: &StatePath,
    transfers: &[Transfer<'_>],
    status: i32,
    stdout: &str,
    stderr: &str,
) -> String {
    let ran = stdout.lines().filter(|l| !l.trim().is_empty()).count();
    let which = match ran.checked_sub(1).and_then(|i| transfers.get(i)) {
        Some(t) => t.describe(path),
        None => format!(
            "{} of {path}",
            if transfers.len() == 1 {
                "the transfer"
            } else {
                "the transfers"
            }
        ),
    };
    format!(
        "{which} failed (curl exited with {status}): {}",
        stderr.trim()
    )
}

/// What curl reports of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub status: u16,
    pub downloaded: u64,
    pub uploaded: u64,
}

/// The reports of `expected` transfers, each with a 2xx status (`--fail` only fails
/// 4xx and 5xx; a redirect is not the document).
pub fn reports(stdout: &str, expected: usize) -> Result<Vec<Report>, String> {
    let parsed: Vec<Report> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u64>);
            match (f.next(), f.next(), f.next(), f.next()) {
                (Some(Ok(status)), Some(Ok(downloaded)), Some(Ok(uploaded)), None) => Ok(Report {
                    status: u16::try_from(status).unwrap_or(u16::MAX),
                    downloaded,
                    uploaded,
                }),
                _ => Err(format!(
                    "curl reported {l:?}, not \"STATUS DOWNLOADED UPLOADED\""
                )),
            }
        })
        .collect::<Result<_, _>>()?;
    if parsed.len() != expected {
        return Err(format!(
            "curl reported {} transfers of {expected}: {:?}",
            parsed.len(),
            stdout.trim()
        ));
    }
    if let Some(r) = parsed.iter().find(|r| !(200..300).contains(&r.status)) {
        return Err(format!("HTTP status {} where 2xx was expected", r.status));
    }
    Ok(parsed)
}

/// The digests `sha256sum FILE…` printed, one per file, in order.
pub fn digests(stdout: &str, expected: usize) -> Result<Vec<String>, String> {
    let parsed: Vec<String> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let hex = l.split_whitespace().next().unwrap_or_default();
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(hex.to_ascii_lowercase())
            } else {
                Err(format!("sha256sum printed {l:?}, not a digest and a file"))
            }
        })
        .collect::<Result<_, _>>()?;
    if parsed.len() != expected {
        return Err(format!(
            "sha256sum printed {} digests of {expected}: {:?}",
            parsed.len(),
            stdout.trim()
        ));
    }
    Ok(parsed)
}

/// The fixed part of the switch: a curl process, four connections, two through the peer
/// link.
const SWITCH_MS: u64 = 20;
/// What a copy of the document moves per millisecond (50 MB/s).
const BYTES_PER_MS: u64 = 50_000;

/// How long clients wait at the switch for a document of `size` bytes: it is exported
/// and imported once more, and read back at both ends to compare.
pub fn expected_downtime_ms(size: u64) -> u64 {
    SWITCH_MS + size / BYTES_PER_MS
}

/// A size for people: "512 bytes", "1.5 kB", "2.0 MB".
pub fn size(bytes: u64) -> String {
    match bytes {
        0..=999 => format!("{bytes} bytes"),
        1_000..=999_999 => format!("{:.1} kB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Server {
        Server {
            host: "127.0.0.1".into(),
            port: 8080,
            what: "the local instance",
        }
    }

    fn source() -> Server {
        Server {
            host: "127.0.0.1".into(),
            port: 41234,
            what: "the source (through the tunnel)",
        }
    }

    #[test]
    fn a_state_path_is_a_request_target() {
        assert_eq!(StatePath::parse("/state").unwrap().as_str(), "/state");
        assert!(StatePath::parse("/v1/state?format=json").is_ok());
        assert!(StatePath::parse("/state/").is_ok());
        let err = StatePath::parse("state").unwrap_err();
        assert!(err.contains("must start with '/'"), "{err}");
        let err = StatePath::parse("/my state").unwrap_err();
        assert!(err.contains("percent-encode"), "{err}");
        assert!(StatePath::parse("/state#top").is_err());
        assert!(StatePath::parse("/st\u{e4}te").is_err());
        assert!(StatePath::parse(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn a_copy_is_one_curl_that_stops_at_the_first_failure() {
        let path = StatePath::parse("/state/").unwrap();
        let (src, here) = (source(), local());
        let args = args(
            &path,
            &[
                Transfer::Get {
                    from: &src,
                    into: "/w/.export",
                },
                Transfer::Put {
                    from: "/w/.export",
                    to: &here,
                },
            ],
        );
        assert_eq!(
            args[..4],
            ["-q", "--silent", "--show-error", "--fail-early"]
        );
        let transfers: Vec<&[String]> = args[4..].split(|a| a == "--next").collect();
        assert_eq!(transfers.len(), 2);
        let (get, put) = (transfers[0], transfers[1]);
        let has = |t: &[String], pair: [&str; 2]| t.windows(2).any(|w| w == pair);
        for t in [get, put] {
            assert!(t.contains(&"--fail".to_string()));
            assert!(has(t, ["--request-target", "/state/"]));
            assert!(has(t, ["--header", "Expect:"]));
            assert!(has(t, ["--write-out", REPORT]));
        }
        assert!(has(get, ["--output", "/w/.export"]));
        assert_eq!(get.last().unwrap(), "http://127.0.0.1:41234/");
        assert!(has(put, ["--upload-file", "/w/.export"]));
        assert!(has(put, ["--output", "/dev/null"]));
        assert_eq!(put.last().unwrap(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn a_failure_names_the_transfer_that_failed() {
        let path = StatePath::parse("/state").unwrap();
        let (src, here) = (source(), local());
        let copy = [
            Transfer::Get {
                from: &src,
                into: "/w/.export",
            },
            Transfer::Put {
                from: "/w/.export",
                to: &here,
            },
        ];
        let stderr = "curl: (22) The requested URL returned error: 404\n";
        assert_eq!(
            failure(&path, &copy, 22, "200 12 0\n404 0 12\n", stderr),
            "PUT /state to the local instance (127.0.0.1:8080) failed (curl exited with 22): curl: (22) The requested URL returned error: 404"
        );
        assert!(failure(&path, &copy, 7, "000 0 0\n", "").starts_with(
            "GET /state from the source (through the tunnel) (127.0.0.1:41234) failed"
        ));
        assert!(failure(&path, &copy, 2, "", "curl: option --bad")
            .starts_with("the transfers of /state failed"));
    }

    #[test]
    fn an_ipv6_endpoint_is_bracketed() {
        let s = Server {
            host: "::1".into(),
            port: 9,
            what: "x",
        };
        assert_eq!(s.url(), "http://[::1]:9/");
    }

    #[test]
    fn reports_are_read_per_transfer_and_need_2xx() {
        let r = reports("200 2000040 0\n204 0 2000040\n", 2).unwrap();
        assert_eq!(
            r[1],
            Report {
                status: 204,
                downloaded: 0,
                uploaded: 2_000_040
            }
        );
        assert_eq!(r[0].downloaded, 2_000_040);
        let err = reports("301 0 0\n", 1).unwrap_err();
        assert_eq!(err, "HTTP status 301 where 2xx was expected");
        assert!(reports("200 5 0\n", 2)
            .unwrap_err()
            .contains("1 transfers of 2"));
        assert!(reports("200 five 0\n", 1).is_err());
    }

    #[test]
    fn digests_are_read_in_order() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let out = format!("{a}  /w/.export\n{b}  /w/.local\n");
        assert_eq!(digests(&out, 2).unwrap(), vec![a, "b".repeat(64)]);
        assert!(digests("sha256sum: /w/.x: No such file or directory\n", 1).is_err());
        assert!(digests(&out, 3).is_err());
    }

    #[test]
    fn downtime_grows_with_the_document_and_sizes_read_well() {
        assert_eq!(expected_downtime_ms(0), 20);
        assert_eq!(expected_downtime_ms(2_000_000), 60);
        assert_eq!(size(512), "512 bytes");
        assert_eq!(size(1_500), "1.5 kB");
        assert_eq!(size(2_000_040), "2.0 MB");
    }
}
