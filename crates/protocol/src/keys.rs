//! The etcd key layout, as functions: no other code spells a key.
//!
//! Layout under a configurable root (default `/tidelock/`):
//! `workers/<model>/<worker>`, `sessions/<model>/<tenant>/<session>`, `tenants/<tenant>`,
//! `models/<model>`, `turns/<model>/<tenant>/<endpoint>/<session>/<n>` (a session's turn log,
//! shared by router replicas), and `salts/shared` (the secret salt of the tenants that share their cache). Directory functions end in '/', so a prefix watch on one model's directory
//! never sees another model whose name merely starts the same way.
//!
//! Invariant: every name is one path segment. Ids may contain '/' and '%', so each segment is
//! escaped by percent-encoding exactly those two characters ('%' as `%25`, '/' as `%2F`). The
//! escaping is injective and its output contains no '/', so names can neither collide nor climb
//! out of their directory; parsers accept only canonically escaped segments.

use std::borrow::Cow;

use crate::ids::{ModelName, SessionKey, TenantId, WorkerId};

const WORKERS: &str = "workers/";
const SESSIONS: &str = "sessions/";
const TENANTS: &str = "tenants/";
const MODELS: &str = "models/";
const SALTS: &str = "salts/";
const TURNS: &str = "turns/";

/// Escapes one path segment: '%' becomes `%25` and '/' becomes `%2F`; nothing else changes.
pub fn escape_segment(segment: &str) -> Cow<'_, str> {
    if !segment.contains(['%', '/']) {
        return Cow::Borrowed(segment);
    }
    let mut out = String::with_capacity(segment.len() + 8);
    for c in segment.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

/// Inverts [`escape_segment`]. Returns `None` for anything `escape_segment` cannot produce: a raw
/// '/', or a '%' not followed by `25` or `2F`.
pub fn unescape_segment(segment: &str) -> Option<Cow<'_, str>> {
    if segment.contains('/') {
        return None;
    }
    if !segment.contains('%') {
        return Some(Cow::Borrowed(segment));
    }
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3)?;
        out.push(match escape {
            "%25" => '%',
            "%2F" => '/',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(Cow::Owned(out))
}

/// Whose turn memory: one session of one tenant on one model, through one endpoint (a chat's
/// token ids are not a completion's: a text completion's tokenization may add BOS, a chat's
/// never does). The router's memory is keyed by it and the shared log's directory is
/// [`KeyLayout::turns_of`] of it, so the parts are never joined by hand.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TurnKey {
    /// The model whose token ids the memory holds.
    pub model: ModelName,
    /// The tenant: one tenant's memory is never another's.
    pub tenant: TenantId,
    /// The endpoint's name (`chat_completions`, `completions`).
    pub endpoint: &'static str,
    /// The session.
    pub session: SessionKey,
}

/// Where Tidelock's records live in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyLayout {
    root: String,
}

impl Default for KeyLayout {
    fn default() -> Self {
        Self::new(Self::DEFAULT_ROOT)
    }
}

impl KeyLayout {
    /// The root used when none is configured.
    pub const DEFAULT_ROOT: &'static str = "/tidelock/";

    /// A layout under `root`, normalised to end in exactly one '/'.
    pub fn new(root: impl Into<String>) -> Self {
        let mut root = root.into();
        root.truncate(root.trim_end_matches('/').len());
        root.push('/');
        Self { root }
    }

    /// The root, ending in '/'.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn dir(&self, dir: &str, segments: &[&str]) -> String {
        let mut key = String::with_capacity(self.root.len() + dir.len() + 16 * segments.len());
        key.push_str(&self.root);
        key.push_str(dir);
        for segment in segments {
            key.push_str(&escape_segment(segment));
            key.push('/');
        }
        key
    }

    fn leaf(&self, dir: &str, segments: &[&str]) -> String {
        let mut key = self.dir(dir, segments);
        key.pop();
        key
    }

    /// `<root>workers/`: every worker of every model.
    pub fn workers_dir(&self) -> String {
        self.dir(WORKERS, &[])
    }

    /// `<root>workers/<model>/`: the workers of one model.
    pub fn workers_of(&self, model: &ModelName) -> String {
        self.dir(WORKERS, &[model.as_str()])
    }

    /// `<root>workers/<model>/<worker>`: one worker's [`crate::WorkerRegistration`].
    pub fn worker(&self, model: &ModelName, worker: &WorkerId) -> String {
        self.leaf(WORKERS, &[model.as_str(), worker.as_str()])
    }

    /// `<root>sessions/`: every session pin.
    pub fn sessions_dir(&self) -> String {
        self.dir(SESSIONS, &[])
    }

    /// `<root>sessions/<model>/`: the session pins of one model.
    pub fn sessions_of_model(&self, model: &ModelName) -> String {
        self.dir(SESSIONS, &[model.as_str()])
    }

    /// `<root>sessions/<model>/<tenant>/`: one tenant's session pins for one model.
    pub fn sessions_of(&self, model: &ModelName, tenant: &TenantId) -> String {
        self.dir(SESSIONS, &[model.as_str(), tenant.as_str()])
    }

    /// `<root>sessions/<model>/<tenant>/<session>`: one session's [`crate::SessionRecord`].
    pub fn session(&self, model: &ModelName, tenant: &TenantId, session: &SessionKey) -> String {
        self.leaf(
            SESSIONS,
            &[model.as_str(), tenant.as_str(), session.as_str()],
        )
    }

    /// `<root>turns/`: every session's turn log.
    pub fn turns_dir(&self) -> String {
        self.dir(TURNS, &[])
    }

    /// `<root>turns/<model>/<tenant>/<endpoint>/<session>/`: one session's turn log, the
    /// answered turns router replicas share so that the next turn keeps its cached ids wherever
    /// it lands (`endpoint` keeps a chat's log apart from a completion's of the same session).
    pub fn turns_of(&self, key: &TurnKey) -> String {
        self.dir(
            TURNS,
            &[
                key.model.as_str(),
                key.tenant.as_str(),
                key.endpoint,
                key.session.as_str(),
            ],
        )
    }

    /// `<turns_of(..)><n>`: turn `n` of a session's log (zero-padded, so a listing is in turn
    /// order).
    pub fn turn(log: &str, n: u32) -> String {
        format!("{log}{n:010}")
    }

    /// A `turn` key's log directory and turn number.
    pub fn parse_turn<'k>(&self, key: &'k str) -> Option<(&'k str, u32)> {
        let [_, _, _, _, n] = self.segments::<5>(key, TURNS)?;
        let n = n.parse().ok()?;
        let (log, _) = key.rsplit_once('/')?;
        Some((&key[..log.len() + 1], n))
    }

    /// `<root>tenants/`: every tenant.
    pub fn tenants_dir(&self) -> String {
        self.dir(TENANTS, &[])
    }

    /// `<root>tenants/<tenant>`: one tenant's [`crate::TenantRecord`].
    pub fn tenant(&self, tenant: &TenantId) -> String {
        self.leaf(TENANTS, &[tenant.as_str()])
    }

    /// `<root>salts/shared`: the one secret cache salt of every tenant that opts into sharing
    /// its cache. Written once by the operator; read only by it (tenant records carry it).
    pub fn shared_cache_salt(&self) -> String {
        self.leaf(SALTS, &["shared"])
    }

    /// `<root>models/`: every model.
    pub fn models_dir(&self) -> String {
        self.dir(MODELS, &[])
    }

    /// `<root>models/<model>`: one model's record.
    pub fn model(&self, model: &ModelName) -> String {
        self.leaf(MODELS, &[model.as_str()])
    }

    /// The unescaped segments of `key` below `<root><dir>`, if there are exactly `N`.
    fn segments<'k, const N: usize>(&self, key: &'k str, dir: &str) -> Option<[Cow<'k, str>; N]> {
        let rest = key.strip_prefix(self.root.as_str())?.strip_prefix(dir)?;
        let segments: Vec<Cow<'k, str>> = rest
            .split('/')
            .map(unescape_segment)
            .collect::<Option<_>>()?;
        segments.try_into().ok()
    }

    /// The model and worker named by a `worker` key.
    pub fn parse_worker(&self, key: &str) -> Option<(ModelName, WorkerId)> {
        let [model, worker] = self.segments(key, WORKERS)?;
        Some((ModelName::new(model).ok()?, WorkerId::new(worker).ok()?))
    }

    /// The model, tenant and session named by a `session` key.
    pub fn parse_session(&self, key: &str) -> Option<(ModelName, TenantId, SessionKey)> {
        let [model, tenant, session] = self.segments(key, SESSIONS)?;
        Some((
            ModelName::new(model).ok()?,
            TenantId::new(tenant).ok()?,
            SessionKey::new(session).ok()?,
        ))
    }

    /// The tenant named by a `tenant` key.
    pub fn parse_tenant(&self, key: &str) -> Option<TenantId> {
        let [tenant] = self.segments(key, TENANTS)?;
        TenantId::new(tenant).ok()
    }

    /// The model named by a `model` key.
    pub fn parse_model(&self, key: &str) -> Option<ModelName> {
        let [model] = self.segments(key, MODELS)?;
        ModelName::new(model).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelName {
        ModelName::new(name).unwrap()
    }

    fn worker(name: &str) -> WorkerId {
        WorkerId::new(name).unwrap()
    }

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn session(name: &str) -> SessionKey {
        SessionKey::new(name).unwrap()
    }

    #[test]
    fn default_layout() {
        let keys = KeyLayout::default();
        assert_eq!(keys.root(), "/tidelock/");
        assert_eq!(keys.workers_dir(), "/tidelock/workers/");
        assert_eq!(keys.workers_of(&model("smol")), "/tidelock/workers/smol/");
        assert_eq!(
            keys.worker(&model("smol"), &worker("smol-0-1")),
            "/tidelock/workers/smol/smol-0-1"
        );
        assert_eq!(keys.sessions_dir(), "/tidelock/sessions/");
        assert_eq!(
            keys.sessions_of_model(&model("smol")),
            "/tidelock/sessions/smol/"
        );
        assert_eq!(
            keys.sessions_of(&model("smol"), &tenant("acme")),
            "/tidelock/sessions/smol/acme/"
        );
        assert_eq!(
            keys.session(&model("smol"), &tenant("acme"), &session("chat-1")),
            "/tidelock/sessions/smol/acme/chat-1"
        );
        assert_eq!(keys.tenants_dir(), "/tidelock/tenants/");
        assert_eq!(keys.tenant(&tenant("acme")), "/tidelock/tenants/acme");
        assert_eq!(keys.shared_cache_salt(), "/tidelock/salts/shared");
        assert_eq!(keys.parse_tenant(&keys.shared_cache_salt()), None);
        assert_eq!(keys.models_dir(), "/tidelock/models/");
        assert_eq!(keys.model(&model("smol")), "/tidelock/models/smol");
    }

    #[test]
    fn custom_roots_are_normalised() {
        for root in ["/prod", "/prod/", "/prod///"] {
            let keys = KeyLayout::new(root);
            assert_eq!(keys.root(), "/prod/", "root {root:?}");
            assert_eq!(keys.tenant(&tenant("t")), "/prod/tenants/t");
            assert_eq!(keys.parse_tenant("/prod/tenants/t"), Some(tenant("t")));
            assert_eq!(keys.parse_tenant("/tidelock/tenants/t"), None);
        }
        assert_eq!(KeyLayout::new("").root(), "/");
        assert_eq!(KeyLayout::new("").workers_dir(), "/workers/");
    }

    #[test]
    fn parsers_invert_builders() {
        let keys = KeyLayout::new("/x");
        let (m, w, t, s) = (
            model("org/model%v2"),
            worker("pod/../../tenants/evil"),
            tenant("a%2Fb"),
            session("user/42%"),
        );
        let key = keys.worker(&m, &w);
        assert_eq!(
            key,
            "/x/workers/org%2Fmodel%25v2/pod%2F..%2F..%2Ftenants%2Fevil"
        );
        assert!(key.starts_with(&keys.workers_of(&m)));
        assert_eq!(keys.parse_worker(&key), Some((m.clone(), w)));
        assert_eq!(keys.parse_tenant(&key), None);

        let key = keys.session(&m, &t, &s);
        assert!(key.starts_with(&keys.sessions_of(&m, &t)));
        assert!(key.starts_with(&keys.sessions_of_model(&m)));
        assert_eq!(keys.parse_session(&key), Some((m.clone(), t.clone(), s)));
        assert_eq!(keys.parse_tenant(&keys.tenant(&t)), Some(t));
        assert_eq!(keys.parse_model(&keys.model(&m)), Some(m));
    }

    #[test]
    fn parsers_reject_foreign_and_malformed_keys() {
        let keys = KeyLayout::default();
        for bad in [
            "/tidelock/workers/m",
            "/tidelock/workers/m/",
            "/tidelock/workers//w",
            "/tidelock/workers/m/w/extra",
            "/tidelock/workers/m/w%",
            "/tidelock/workers/m/w%2f",
            "/tidelock/workers/m/w%41",
            "/tidelock/workers/m/w\u{1}",
            "/other/workers/m/w",
            "/tidelock/tenants/m/w",
        ] {
            assert_eq!(keys.parse_worker(bad), None, "{bad:?}");
        }
        assert_eq!(keys.parse_tenant("/tidelock/tenants/"), None);
        assert_eq!(keys.parse_tenant("/tidelock/tenants/a/b"), None);
        assert_eq!(keys.parse_session("/tidelock/sessions/m/t"), None);
        assert_eq!(keys.parse_session("/tidelock/sessions/m/t/"), None);
    }

    #[test]
    fn model_directories_are_exact() {
        let keys = KeyLayout::default();
        let a = keys.workers_of(&model("a"));
        for key in [
            keys.workers_of(&model("ab")),
            keys.worker(&model("ab"), &worker("w")),
            keys.worker(&model("a/b"), &worker("w")),
            keys.worker(&model("a%"), &worker("w")),
        ] {
            assert!(!key.starts_with(&a), "{key} is under {a}");
        }
        let sessions_a = keys.sessions_of(&model("a"), &tenant("t"));
        let other = keys.session(&model("a"), &tenant("tt"), &session("s"));
        assert!(!other.starts_with(&sessions_a));
    }

    #[test]
    fn escaping_is_injective_and_reversible() {
        let tricky = [
            "", "a", "/", "%", "%2F", "%25", "%%", "//", "a/b", "a%2Fb", "a%252Fb", "%2", "ü/%",
        ];
        let escaped: Vec<String> = tricky
            .iter()
            .map(|s| escape_segment(s).into_owned())
            .collect();
        for (i, e) in escaped.iter().enumerate() {
            assert!(!e.contains('/'), "{e:?}");
            assert_eq!(unescape_segment(e).as_deref(), Some(tricky[i]));
            for (j, other) in escaped.iter().enumerate() {
                assert_eq!(i == j, e == other, "{:?} vs {:?}", tricky[i], tricky[j]);
            }
        }
        assert!(matches!(escape_segment("plain"), Cow::Borrowed("plain")));
        assert_eq!(unescape_segment("a/b"), None);
        assert_eq!(unescape_segment("%2f"), None);
        assert_eq!(unescape_segment("%"), None);
        assert_eq!(unescape_segment("%2"), None);
    }

    #[test]
    fn turn_logs_are_one_directory_per_session_and_endpoint() {
        let keys = KeyLayout::default();
        let of = |endpoint| TurnKey {
            model: model("smol"),
            tenant: tenant("acme"),
            endpoint,
            session: session("a/b%"),
        };
        let log = keys.turns_of(&of("chat"));
        assert_eq!(log, "/tidelock/turns/smol/acme/chat/a%2Fb%25/");
        let key = KeyLayout::turn(&log, 7);
        assert_eq!(key, "/tidelock/turns/smol/acme/chat/a%2Fb%25/0000000007");
        assert_eq!(keys.parse_turn(&key), Some((log.as_str(), 7)));
        assert!(key.starts_with(&keys.turns_dir()));
        assert_ne!(log, keys.turns_of(&of("completion")));
        // Listed in turn order.
        assert!(KeyLayout::turn(&log, 9) < KeyLayout::turn(&log, 10));
        for bad in [
            "/tidelock/turns/smol/acme/chat/s",
            "/tidelock/turns/smol/acme/chat/s/x",
            "/tidelock/turns/smol/acme/chat/s/1/2",
            "/tidelock/sessions/smol/acme/s",
        ] {
            assert_eq!(keys.parse_turn(bad), None, "{bad}");
        }
    }
}
