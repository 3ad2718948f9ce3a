//! HTTPS client of the REST API, used by the CLI: trusts exactly the gateway certificate
//! whose fingerprint it was given.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio_rustls::TlsConnector;

use super::types::ErrorBody;
use crate::identity::{self, Fingerprint, IdentityError};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("API URL {0:?} must look like https://HOST:PORT")]
    BadUrl(String),
    #[error("cannot connect to the gateway at {url}: {detail}; is `ferry gateway` running there?")]
    Connect { url: String, detail: String },
    #[error("TLS with the gateway at {url} failed: {detail} (check --fingerprint / the config's certificate)")]
    Tls { url: String, detail: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("HTTP exchange with the gateway failed: {0}")]
    Http(String),
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot decode the gateway's answer: {0}")]
    Decode(String),
}

#[derive(Clone)]
pub struct ApiClient {
    url: String,
    authority: String,
    token: String,
    tls: TlsConnector,
}

impl ApiClient {
    pub fn new(url: &str, token: &str, fingerprint: Fingerprint) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("https://")
            .map(|s| s.trim_end_matches('/'))
            .filter(|s| !s.is_empty() && !s.contains('/'))
            .ok_or_else(|| ClientError::BadUrl(url.to_string()))?
            .to_string();
        let cfg = identity::client_config(fingerprint, None, b"http/1.1")?;
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            authority,
            token: token.to_string(),
            tls: TlsConnector::from(Arc::new(cfg)),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>)
            .await
            .map(|(_, v)| v)
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>)
            .await
            .map(|(_, v)| v)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(StatusCode, T), ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Sends raw bytes (used to check how the API treats bad input).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.exchange(method, path, body).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, T), ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Decode(e.to_string()))?,
            None => Vec::new(),
        };
        let (status, body) = self.exchange(method, path, bytes).await?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        let value =
            serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((status, value))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (response, driver) = self.send(method, path, body).await?;
        whole(response, driver).await
    }

    /// A migration's server-sent events (`GET /v1/migrations/{id}/events`), as they come.
    pub async fn events(&self, id: &str) -> Result<EventStream, ClientError> {
        let (response, driver) = self
            .send(
                Method::GET,
                &format!("/v1/migrations/{id}/events"),
                Vec::new(),
            )
            .await?;
        if !response.status().is_success() {
            let (status, body) = whole(response, driver).await?;
            return Err(api_error(status, &body));
        }
        Ok(EventStream {
            body: response.into_body(),
            buf: String::new(),
            _driver: AbortOnDrop(driver),
        })
    }

    /// Sends one request on a new connection; the response, and the task driving the
    /// connection (abort it when done).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<
        (
            hyper::Response<hyper::body::Incoming>,
            tokio::task::JoinHandle<()>,
        ),
        ClientError,
    > {
        let connect = |detail: String| ClientError::Connect {
            url: self.url.clone(),
            detail,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| connect("no answer within 10 s".into()))?
        .map_err(|e| connect(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from("ferry-gateway")
            .map_err(|e| ClientError::BadUrl(e.to_string()))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls {
                url: self.url.clone(),
                detail: e.to_string(),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(&self.authority) {
            headers.insert(HOST, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", self.token)) {
            headers.insert(AUTHORIZATION, v);
        }
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok((response, driver))
    }
}

/// A response read whole; its connection's task ends then.
async fn whole(
    response: hyper::Response<hyper::body::Incoming>,
    driver: tokio::task::JoinHandle<()>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    driver.abort();
    Ok((status, bytes))
}

/// The error an API answer of `status` with `body` (an [`ErrorBody`]) stands for.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let err: ErrorBody = serde_json::from_slice(body).unwrap_or(ErrorBody {
        code: "unknown".into(),
        message: String::from_utf8_lossy(body).into_owned(),
    });
    ClientError::Api {
        status: status.as_u16(),
        code: err.code,
        message: err.message,
    }
}

/// Aborts a task when dropped (the connection behind a stream).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Server-sent events as they arrive: `(event, data)` pairs.
pub struct EventStream {
    body: hyper::body::Incoming,
    buf: String,
    _driver: AbortOnDrop,
}

impl EventStream {
    /// The next event (None: the stream ended).
    pub async fn next(&mut self) -> Result<Option<(String, String)>, ClientError> {
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..at + 2).collect();
                let (mut event, mut data) = (String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Ok(Some((event, data)));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Http(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&data));
                    }
                }
            }
        }
    }
}
