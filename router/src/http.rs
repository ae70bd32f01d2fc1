//! The HTTP pieces the router's background tasks and proxy share: a pooled client for GETs to
//! workers that presents the cluster credential ([`Http`]), and a reader of newline-delimited
//! JSON bodies ([`NdjsonLines`]) used for both the KV event stream and the generate stream.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use tidelock_protocol::ClusterToken;

/// A pooled HTTP client for GETs to workers, presenting the cluster credential when it has one.
/// Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    authorization: Option<HeaderValue>,
}

impl Default for Http {
    /// Without a credential (workers started with `--no-cluster-auth`, or tests).
    fn default() -> Self {
        Http::new(None)
    }
}

impl Http {
    /// A client presenting `credential` on every request.
    pub fn new(credential: Option<&ClusterToken>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let authorization = credential.map(|token| {
            let mut value =
                HeaderValue::from_str(&token.authorization()).expect("a token is visible ASCII");
            value.set_sensitive(true);
            value
        });
        Http {
            client: Client::builder(TokioExecutor::new()).build(connector),
            authorization,
        }
    }

    /// The `Authorization` value it presents, for the proxy's own client.
    pub(crate) fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// GETs `url` with the credential; the response as it comes (streams are read by the
    /// caller), or the failure as a sentence.
    pub(crate) async fn get(&self, url: &str) -> Result<hyper::Response<Incoming>, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let mut request = hyper::Request::get(uri);
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| format!("not a request: {e}"))?;
        self.client
            .request(request)
            .await
            .map_err(|e| e.to_string())
    }

    /// GETs `url` and returns its body; any failure (bad URL, connection, non-2xx status,
    /// timeout) as a sentence that does not repeat the URL.
    pub(crate) async fn get_body(&self, url: &str, timeout: Duration) -> Result<Bytes, String> {
        tokio::time::timeout(timeout, async {
            let response = self.get(url).await?;
            if !response.status().is_success() {
                return Err(format!("HTTP {}", response.status()));
            }
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok(body.to_bytes())
        })
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// GETs `url` and parses its JSON body.
    pub(crate) async fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, String> {
        let body = self.get_body(url, timeout).await?;
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
}

/// Why reading one line of an NDJSON body failed.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The body could not be read (connection lost).
    Read(String),
    /// A line was not the JSON value expected.
    Parse(String),
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Read(problem) => write!(f, "reading the stream: {problem}"),
            LineError::Parse(problem) => write!(f, "not the JSON expected: {problem}"),
        }
    }
}

/// The JSON values of a newline-delimited body, one line at a time; blank lines are skipped.
pub(crate) struct NdjsonLines {
    body: Incoming,
    buf: Vec<u8>,
}

impl NdjsonLines {
    pub(crate) fn new(body: Incoming) -> Self {
        NdjsonLines {
            body,
            buf: Vec::new(),
        }
    }

    /// The next value; `Ok(None)` at the end of the body.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, LineError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                // Parsed in place (this runs per token): no copy of the line.
                let line = &self.buf[..end];
                let parsed = (!line.iter().all(u8::is_ascii_whitespace)).then(|| {
                    serde_json::from_slice(line).map_err(|e| LineError::Parse(e.to_string()))
                });
                self.buf.drain(..=end);
                match parsed {
                    None => continue,
                    Some(value) => return value.map(Some),
                }
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(LineError::Read(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
