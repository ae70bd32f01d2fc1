//! The HTTP pieces the router's background tasks and proxy share: a pooled client for GETs to
//! workers that presents the cluster credential ([`Http`]), and a reader of newline-delimited
//! JSON bodies ([`NdjsonLines`]) used for both the KV event stream and the generate stream.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
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
    /// For the few POSTs (a draining worker's handoff plan).
    posts: Client<HttpConnector, Full<Bytes>>,
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
            client: Client::builder(TokioExecutor::new()).build(connector.clone()),
            posts: Client::builder(TokioExecutor::new()).build(connector),
            authorization,
        }
    }

    /// The `Authorization` value it presents, for the proxy's own client.
    pub(crate) fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// GETs `url` with the credential; the response as it comes, whatever its status (streams
    /// are read by the caller).
    pub(crate) async fn get(&self, url: &str) -> Result<hyper::Response<Incoming>, HttpError> {
        let uri: hyper::Uri = url.parse()?;
        let mut request = hyper::Request::get(uri);
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        Ok(self.client.request(request.body(Empty::new())?).await?)
    }

    /// GETs `url` and returns its body; a non-2xx status is an error, and so is the whole
    /// exchange taking longer than `timeout`.
    pub(crate) async fn get_body(&self, url: &str, timeout: Duration) -> Result<Bytes, HttpError> {
        tokio::time::timeout(timeout, async {
            let response = self.get(url).await?;
            if !response.status().is_success() {
                return Err(HttpError::Status(response.status()));
            }
            Ok(response.into_body().collect().await?.to_bytes())
        })
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
    }

    /// POSTs `body` as JSON to `url` with the credential; the reply's body if its status is a
    /// success, all within `timeout`.
    pub(crate) async fn post_json(
        &self,
        url: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, HttpError> {
        let uri: hyper::Uri = url.parse()?;
        let mut request = hyper::Request::post(uri)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        tokio::time::timeout(timeout, async {
            let response = self.posts.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            match status.is_success() {
                true => Ok(body),
                false => Err(HttpError::Refused {
                    status,
                    message: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
                }),
            }
        })
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
    }

    /// GETs `url` and parses its JSON body.
    pub(crate) async fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, HttpError> {
        let body = self.get_body(url, timeout).await?;
        Ok(serde_json::from_slice(&body)?)
    }
}

/// Why a GET to a worker failed; the messages do not repeat the URL (callers add it).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not a URL: {0}")]
    Url(#[from] hyper::http::uri::InvalidUri),
    #[error("not a request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No connection, or it broke before the response's head.
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("HTTP {0}")]
    Status(hyper::StatusCode),
    /// An error status with the body that explains it.
    #[error("HTTP {status}: {message}")]
    Refused {
        status: hyper::StatusCode,
        message: String,
    },
    /// The connection broke while the body was read.
    #[error("reading the body: {0}")]
    Body(#[from] hyper::Error),
    /// The worker answered nothing (or not all) within the time allowed: it may be alive and
    /// only slow.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
}

/// Why reading one line of an NDJSON body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineError {
    /// The body could not be read (connection lost).
    #[error("reading the stream: {0}")]
    Read(#[source] hyper::Error),
    /// A line was not the JSON value expected.
    #[error("not the JSON expected: {0}")]
    Parse(#[source] serde_json::Error),
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
                let parsed = (!line.iter().all(u8::is_ascii_whitespace))
                    .then(|| serde_json::from_slice(line).map_err(LineError::Parse));
                self.buf.drain(..=end);
                match parsed {
                    None => continue,
                    Some(value) => return value.map(Some),
                }
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(LineError::Read(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
