//! A mocked Kubernetes API server for the reconcile tests, in the style of kube-rs's
//! controller-rs (a `tower_test::mock` pair behind a real `kube::Client`), but stateful: it keeps
//! the objects it is sent, so a test asserts on what the reconciler left in the cluster rather
//! than on a script of expected requests. It implements what the operator uses, with the
//! semantics that matter to it:
//!
//! - GET (one object, or a list filtered by `labelSelector` equality terms), POST (409 when the
//!   name exists), PUT (409 when `resourceVersion` is stale), DELETE (marks `deletionTimestamp`
//!   while finalizers remain; otherwise removes the object and, like the garbage collector, the
//!   objects it owns);
//! - PATCH: server-side apply (the applied fields replace the object's, metadata labels and
//!   owner references included; on `/status` only the status), JSON merge and strategic merge
//!   (as a merge), JSON patch (a failed `test` is 422);
//! - `resourceVersion` bumps on every real change (not on a no-op apply) and `generation` on
//!   every spec change, as the real server does;
//! - injected faults: the next N requests of a method whose path contains a string fail with a
//!   status code.
//!
//! Watches are not implemented: the tests call the reconcilers directly, as controller-rs does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// `(collection, namespace, name)`; collection is `<group/version>/<plural>`, e.g.
/// `apps/v1/statefulsets` or `v1/secrets`.
type Key = (String, String, String);

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    version: u64,
    faults: Vec<Fault>,
    requests: Vec<String>,
    /// Every change, for watches: `(resourceVersion, key, ADDED|MODIFIED|DELETED, object)`.
    changes: Vec<(u64, Key, &'static str, Value)>,
}

impl State {
    /// Stores `obj` under `key` and records the change for watches.
    fn store(&mut self, key: Key, obj: Value, change: &'static str) {
        self.changes
            .push((self.version, key.clone(), change, obj.clone()));
        self.objects.insert(key, obj);
    }
}

#[derive(Debug)]
struct Fault {
    method: Method,
    path: String,
    code: u16,
    left: usize,
}

/// The mocked API server. Clones share the state.
#[derive(Debug, Clone, Default)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    /// Starts the server; returns it and a client talking to it (default namespace `default`).
    pub fn start() -> (ApiServer, kube::Client) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = ApiServer::default();
        let state = server.state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.unwrap_or_default();
                let (code, value) = handle_request(&state, &parts, &body);
                let response = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap();
                respond.send_response(response);
            }
        });
        let client = kube::Client::new(service, "default");
        (server, client)
    }

    /// Serves a fresh state over HTTP on a loopback port, watches included, for processes (the
    /// operator binary) that find it through a kubeconfig. Returns it and its URL.
    pub async fn serve_http() -> (ApiServer, String) {
        let server = ApiServer::default();
        let state = server.state.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let state = state.clone();
            async move {
                let (parts, body) = request.into_parts();
                let is_watch = parts.method == Method::GET
                    && query(&parts.uri)
                        .get("watch")
                        .is_some_and(|w| w == "true" || w == "1");
                if is_watch && let Some(response) = watch(state.clone(), &parts.uri) {
                    return response;
                }
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let (code, value) = handle_request(&state, &parts, &body);
                axum::response::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (server, url)
    }

    /// The object, if any.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every object of `collection` in `namespace`.
    pub fn list(&self, collection: &str, namespace: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|((c, ns, _), _)| c == collection && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Replaces an object's `status` as a controller of Kubernetes would (e.g. the StatefulSet
    /// controller reporting ready pods). Bumps `resourceVersion`.
    pub fn set_status(&self, collection: &str, namespace: &str, name: &str, status: Value) {
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        let version = state.version.to_string();
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        let obj = state.objects.get_mut(&key).expect("object exists");
        obj["status"] = status;
        obj["metadata"]["resourceVersion"] = json!(version);
        let obj = obj.clone();
        state.store(key, obj, "MODIFIED");
    }

    /// Makes the next `times` requests with `method` whose path contains `path` fail with `code`.
    pub fn fail(&self, method: Method, path: &str, code: u16, times: usize) {
        self.state.lock().unwrap().faults.push(Fault {
            method,
            path: path.into(),
            code,
            left: times,
        });
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn status(code: u16, reason: &str, message: String) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Where a request points: collection, namespace, name, subresource.
#[derive(Debug)]
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match *segments.first()? {
        "api" => (segments.get(1)?.to_string(), &segments[2..]),
        "apis" => (
            format!("{}/{}", segments.get(1)?, segments.get(2)?),
            &segments[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    Some(Target {
        collection: format!("{group_version}/{}", rest.first()?),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

/// A watch over HTTP: every change after `resourceVersion` to the collection (in the
/// namespace, matching the label selector), as JSON lines, until the client hangs up.
fn watch(state: Arc<Mutex<State>>, uri: &http::Uri) -> Option<axum::response::Response> {
    let t = target(uri.path())?;
    let q = query(uri);
    let seen: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let stream = futures::stream::unfold(seen, move |mut seen| {
        let state = state.clone();
        let (collection, namespace, selector) =
            (t.collection.clone(), t.namespace.clone(), selector.clone());
        async move {
            loop {
                let mut lines = Vec::new();
                {
                    let state = state.lock().unwrap();
                    for (version, (c, ns, _), change, obj) in &state.changes {
                        if *version <= seen {
                            continue;
                        }
                        seen = *version;
                        let here = *c == collection && namespace.as_ref().is_none_or(|n| n == ns);
                        if here && matches_labels(obj, &selector) {
                            let line = json!({"type": change, "object": obj});
                            lines.extend(serde_json::to_vec(&line).unwrap());
                            lines.push(b'\n');
                        }
                    }
                }
                if !lines.is_empty() {
                    return Some((Ok::<_, std::convert::Infallible>(lines), seen));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    });
    Some(
        axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(stream))
            .unwrap(),
    )
}

fn matches_labels(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn handle_request(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    body: &[u8],
) -> (StatusCode, Value) {
    let mut state = state.lock().unwrap();
    let path = parts.uri.path().to_owned();
    state.requests.push(format!("{} {path}", parts.method));
    if let Some(fault) = state
        .faults
        .iter_mut()
        .find(|f| f.left > 0 && f.method == parts.method && path.contains(&f.path))
    {
        fault.left -= 1;
        let code = fault.code;
        return status(code, "InjectedFault", format!("injected fault for {path}"));
    }
    let query = query(&parts.uri);
    if path == "/version" {
        let info = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-mocked",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "", "compiler": "", "platform": "linux/amd64"});
        return (StatusCode::OK, info);
    }
    let Some(t) = target(&path) else {
        return status(404, "NotFound", format!("no such path {path}"));
    };
    let namespace = t.namespace.clone().unwrap_or_default();
    let mut body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return status(400, "BadRequest", format!("body is not JSON: {e}")),
        }
    };
    // Like the real server: a Secret's `stringData` is write-only, merged into `data`.
    if let Some(Value::Object(strings)) = body.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        for (k, v) in strings {
            let bytes = k8s_openapi::ByteString(v.as_str().unwrap_or_default().as_bytes().to_vec());
            body["data"][k] = serde_json::to_value(bytes).unwrap();
        }
    }
    let Some(name) = t.name.clone() else {
        return match parts.method {
            Method::GET => {
                if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                    return status(405, "MethodNotAllowed", "watches are not mocked".into());
                }
                let selector = query.get("labelSelector").cloned().unwrap_or_default();
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((c, ns, _), _)| {
                        *c == t.collection && (t.namespace.is_none() || *ns == namespace)
                    })
                    .map(|(_, v)| v.clone())
                    .filter(|v| matches_labels(v, &selector))
                    .collect();
                let version = state.version.to_string();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": version}, "items": items}),
                )
            }
            Method::POST => {
                let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(422, "Invalid", "metadata.name is required".into());
                };
                let key = (t.collection.clone(), namespace.clone(), name.clone());
                if state.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", format!("{name} already exists"));
                }
                let obj = created(&mut state, body, &namespace);
                state.store(key, obj.clone(), "ADDED");
                (StatusCode::CREATED, obj)
            }
            _ => status(
                405,
                "MethodNotAllowed",
                format!("{} on a collection", parts.method),
            ),
        };
    };
    let key = (t.collection.clone(), namespace.clone(), name.clone());
    let existing = state.objects.get(&key).cloned();
    let not_found = || {
        status(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", t.collection),
        )
    };
    match parts.method {
        Method::GET => match existing {
            Some(obj) => (StatusCode::OK, obj),
            None => not_found(),
        },
        Method::PUT => {
            let Some(old) = existing else {
                return not_found();
            };
            let sent = body["metadata"]["resourceVersion"].as_str();
            if sent.is_some_and(|v| Some(v) != old["metadata"]["resourceVersion"].as_str()) {
                return status(
                    409,
                    "Conflict",
                    format!("{name}: the object has been modified"),
                );
            }
            let mut new = body;
            for field in [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
            ] {
                new["metadata"][field] = old["metadata"][field].clone();
            }
            if t.subresource.as_deref() == Some("status") {
                let mut whole = old.clone();
                whole["status"] = new["status"].clone();
                new = whole;
            } else if t.subresource.is_none() {
                new["status"] = old["status"].clone();
            }
            finish_update(&mut state, key, &old, new)
        }
        Method::PATCH => {
            let content_type = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let mut new = match &existing {
                Some(obj) => obj.clone(),
                None if content_type.starts_with("application/apply-patch") => {
                    if t.subresource.is_some() {
                        return not_found();
                    }
                    let obj = created(&mut state, body, &namespace);
                    state.store(key, obj.clone(), "ADDED");
                    return (StatusCode::CREATED, obj);
                }
                None => return not_found(),
            };
            if content_type.starts_with("application/apply-patch") {
                apply(&mut new, &body, t.subresource.as_deref());
            } else if content_type.starts_with("application/json-patch") {
                let patch: json_patch::Patch = match serde_json::from_value(body) {
                    Ok(p) => p,
                    Err(e) => return status(400, "BadRequest", format!("JSON patch: {e}")),
                };
                // The real server's JSON patch reads an absent field as null (kube's finalizer
                // helper tests `/metadata/finalizers` against null before adding the first).
                let absent = new["metadata"].get("finalizers").is_none();
                if absent {
                    new["metadata"]["finalizers"] = Value::Null;
                }
                if let Err(e) = json_patch::patch(&mut new, &patch) {
                    return status(422, "Invalid", format!("JSON patch failed: {e}"));
                }
                if new["metadata"]["finalizers"].is_null() {
                    new["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("finalizers");
                }
            } else {
                json_patch::merge(&mut new, &body);
            }
            let old = existing.expect("checked above");
            finish_update(&mut state, key, &old, new)
        }
        Method::DELETE => {
            let Some(mut obj) = existing else {
                return not_found();
            };
            let finalizers = obj["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if finalizers {
                if obj["metadata"]["deletionTimestamp"].is_null() {
                    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    state.version += 1;
                    obj["metadata"]["resourceVersion"] = json!(state.version.to_string());
                    state.store(key, obj.clone(), "MODIFIED");
                }
                (StatusCode::OK, obj)
            } else {
                remove(&mut state, &key);
                (StatusCode::OK, obj)
            }
        }
        _ => status(405, "MethodNotAllowed", format!("{}", parts.method)),
    }
}

/// A new object with the fields the server sets.
fn created(state: &mut State, mut obj: Value, namespace: &str) -> Value {
    state.version += 1;
    let meta = &mut obj["metadata"];
    meta["uid"] = json!(format!("uid-{}", state.version));
    meta["resourceVersion"] = json!(state.version.to_string());
    meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    meta["generation"] = json!(1);
    if !namespace.is_empty() {
        meta["namespace"] = json!(namespace);
    }
    obj
}

/// Server-side apply by the only manager there is: the applied fields replace the object's.
fn apply(obj: &mut Value, applied: &Value, subresource: Option<&str>) {
    let Some(fields) = applied.as_object() else {
        return;
    };
    if subresource == Some("status") {
        obj["status"] = applied["status"].clone();
        return;
    }
    for (k, v) in fields {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for field in ["labels", "annotations", "ownerReferences", "finalizers"] {
                    if !v[field].is_null() {
                        obj["metadata"][field] = v[field].clone();
                    }
                }
            }
            _ => obj[k] = v.clone(),
        }
    }
}

fn finish_update(state: &mut State, key: Key, old: &Value, mut new: Value) -> (StatusCode, Value) {
    if new != *old {
        let spec_changed = old["spec"] != new["spec"];
        state.version += 1;
        new["metadata"]["resourceVersion"] = json!(state.version.to_string());
        if spec_changed {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(generation);
        }
    }
    let finalizers_done = new["metadata"]["finalizers"]
        .as_array()
        .is_none_or(|f| f.is_empty());
    if !new["metadata"]["deletionTimestamp"].is_null() && finalizers_done {
        remove(state, &key);
    } else if new != *old {
        state.store(key, new.clone(), "MODIFIED");
    }
    (StatusCode::OK, new)
}

/// Removes an object and, like the garbage collector, everything it owns.
fn remove(state: &mut State, key: &Key) {
    let Some(mut obj) = state.objects.remove(key) else {
        return;
    };
    state.version += 1;
    obj["metadata"]["resourceVersion"] = json!(state.version.to_string());
    state
        .changes
        .push((state.version, key.clone(), "DELETED", obj.clone()));
    let Some(uid) = obj["metadata"]["uid"].as_str() else {
        return;
    };
    let owned: Vec<Key> = state
        .objects
        .iter()
        .filter(|(_, v)| {
            v["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in owned {
        remove(state, &k);
    }
}
