//! `tidelock fetch`: downloads a Model's weights where its worker reads them. The operator runs
//! it as the worker pods' init container (the worker image carries it), so a pod installs
//! nothing at start and the source's fields reach it as arguments, never through a shell.
//!
//! - `tidelock fetch hf --repo owner/name --revision REV [--file F] --dest DIR`: the files of a
//!   Hugging Face repository at a revision (the one `--file`, or all), listed by the Hub's API
//!   (`$HF_ENDPOINT`, default the public Hub), with `$HF_TOKEN` as a bearer token for gated
//!   repositories (the Model's `huggingFace.tokenSecret`);
//! - `tidelock fetch url --url URL [--sha256 HEX] --dest FILE`: one file, its SHA-256 checked.
//!
//! Each file is streamed to `<dest>.partial` and renamed when complete (and, for `url`, when
//! its digest matches), so a killed download never leaves a file the worker would load; a file
//! already complete is kept (an init container that ran before, on a kept volume). Redirects are
//! followed (the Hub serves files from a CDN), at most [`MAX_REDIRECTS`]. Progress goes to
//! stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{FetchArgs, FetchCommand};

/// The public Hugging Face Hub, unless `$HF_ENDPOINT` names another.
const HUB: &str = "https://huggingface.co";
/// Redirects followed per file.
const MAX_REDIRECTS: usize = 10;
/// A download that sends nothing for this long has stalled: it fails (the pod restarts it).
const STALL: std::time::Duration = std::time::Duration::from_secs(120);

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub(crate) async fn run(args: FetchArgs) -> Result<(), String> {
    let client = client()?;
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    match args.command {
        FetchCommand::Hf {
            repo,
            revision,
            file,
            dest,
        } => {
            let hub = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| HUB.to_owned());
            let hub = hub.trim_end_matches('/');
            let files = match file {
                Some(file) => vec![file],
                None => list(&client, hub, &repo, &revision, token.as_deref()).await?,
            };
            eprintln!(
                "fetching {} file(s) of {repo} at {revision} into {}",
                files.len(),
                dest.display()
            );
            for name in files {
                let target = inside(&dest, &name)?;
                let url = format!(
                    "{hub}/{}/resolve/{}/{}",
                    encode_path(&repo),
                    encode(&revision),
                    encode_path(&name)
                );
                download(&client, &url, token.as_deref(), &target, None).await?;
            }
            Ok(())
        }
        FetchCommand::Url { url, sha256, dest } => {
            download(&client, &url, None, &dest, sha256.as_deref()).await
        }
    }
}

fn client() -> Result<Client<Https, Empty<Bytes>>, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no CA certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// The repository's files at `revision`, from the Hub's model API.
async fn list(
    client: &Client<Https, Empty<Bytes>>,
    hub: &str,
    repo: &str,
    revision: &str,
    token: Option<&str>,
) -> Result<Vec<String>, String> {
    let url = format!(
        "{hub}/api/models/{}/revision/{}",
        encode_path(repo),
        encode(revision)
    );
    let (_, body) = get(client, &url, token).await?;
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    #[derive(serde::Deserialize)]
    struct Sibling {
        rfilename: String,
    }
    #[derive(serde::Deserialize)]
    struct Info {
        siblings: Vec<Sibling>,
    }
    let info: Info =
        serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not a model listing ({e})"))?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// GETs `url`, following redirects; the bearer goes to the first host only.
async fn get(
    client: &Client<Https, Empty<Bytes>>,
    url: &str,
    token: Option<&str>,
) -> Result<(String, hyper::body::Incoming), String> {
    let mut at = url.to_owned();
    let first: hyper::Uri = at.parse().map_err(|e| format!("{url}: {e}"))?;
    for _ in 0..=MAX_REDIRECTS {
        let uri: hyper::Uri = at.parse().map_err(|e| format!("{at}: {e}"))?;
        let mut request = hyper::Request::get(uri.clone()).header(
            hyper::header::USER_AGENT,
            concat!("tidelock/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(token) = token
            && uri.authority() == first.authority()
            && uri.scheme() == first.scheme()
        {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{at}: {e}"))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("{at}: {status} without a Location"))?;
            at = resolve(&uri, location);
            continue;
        }
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => {
                    " (a gated or private repository needs a token: the Model's huggingFace.tokenSecret)"
                }
                404 => " (no such repository, revision or file)",
                _ => "",
            };
            return Err(format!("{at}: {status}{hint}"));
        }
        return Ok((at, response.into_body()));
    }
    Err(format!("{url}: more than {MAX_REDIRECTS} redirects"))
}

/// A redirect's target against `base` (RFC 3986: absolute, scheme-relative, absolute path or
/// relative path).
fn resolve(base: &hyper::Uri, location: &str) -> String {
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{scheme}://{authority}{dir}{location}")
    }
}

/// Streams `url` into `dest` through `dest.partial`, checking `sha256` when given.
async fn download(
    client: &Client<Https, Empty<Bytes>>,
    url: &str,
    token: Option<&str>,
    dest: &Path,
    sha256: Option<&str>,
) -> Result<(), String> {
    if let Ok(meta) = std::fs::metadata(dest)
        && meta.len() > 0
    {
        match sha256 {
            Some(want) if digest_of(dest)? != want => {
                eprintln!(
                    "{}: present but its SHA-256 differs; fetching again",
                    dest.display()
                );
            }
            _ => {
                eprintln!("{}: present ({} bytes), kept", dest.display(), meta.len());
                return Ok(());
            }
        }
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let partial = PathBuf::from(format!("{}.partial", dest.display()));
    let (_, mut body) = get(client, url, token).await?;
    let mut file =
        std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let (started, mut written, mut shown) = (Instant::now(), 0u64, 0u64);
    loop {
        let next = tokio::time::timeout(STALL, body.frame())
            .await
            .map_err(|_| format!("{url}: no data for {} s", STALL.as_secs()))?;
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| format!("{url}: {e}"))?;
        if let Some(data) = frame.data_ref() {
            file.write_all(data)
                .map_err(|e| format!("{}: {e}", partial.display()))?;
            context.update(data);
            written += data.len() as u64;
            if written - shown >= 256 << 20 {
                shown = written;
                eprintln!(
                    "  {}: {} MiB, {:.0} MiB/s",
                    dest.display(),
                    written >> 20,
                    written as f64 / 1048576.0 / started.elapsed().as_secs_f64().max(1e-3)
                );
            }
        }
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let got = hex(context.finish().as_ref());
    if let Some(want) = sha256
        && got != want
    {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "{url}: SHA-256 {got}, the Model says {want}: refused, nothing written"
        ));
    }
    std::fs::rename(&partial, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    eprintln!(
        "{}: {written} bytes in {:.1} s",
        dest.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The SHA-256 of a file, read in pieces (weights are tens of GiB; the init container has
/// a few hundred MiB).
fn digest_of(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(hex(context.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `name` under `dir`, refused when it would leave it (a listing naming `../x` or `/x`).
fn inside(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let relative = Path::new(name);
    let plain = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain || name.is_empty() {
        return Err(format!(
            "refusing the file name {name:?}: it leaves {}",
            dir.display()
        ));
    }
    Ok(dir.join(relative))
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes each segment of a `/`-separated path.
fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_and_segments_are_encoded() {
        let dir = Path::new("/models/hf");
        assert_eq!(inside(dir, "a/b.json").unwrap(), dir.join("a/b.json"));
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(inside(dir, bad).is_err(), "{bad}");
        }
        assert_eq!(encode("main'; rm -rf /"), "main%27%3B%20rm%20-rf%20%2F");
        assert_eq!(encode_path("owner/name"), "owner/name");
        let base: hyper::Uri = "https://hub.example/a/b".parse().unwrap();
        assert_eq!(resolve(&base, "/c?x=1"), "https://hub.example/c?x=1");
        assert_eq!(
            resolve(&base, "http://cdn.example/f"),
            "http://cdn.example/f"
        );
        assert_eq!(resolve(&base, "//cdn.example/f"), "https://cdn.example/f");
        assert_eq!(resolve(&base, "c/d"), "https://hub.example/a/c/d");
        assert_eq!(
            resolve(&base, "/x?next=https://elsewhere"),
            "https://hub.example/x?next=https://elsewhere"
        );
    }
}
