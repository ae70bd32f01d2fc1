//! Where the control plane's programs are. `scripts/prereqs.sh` (`ensure_kube_tools`) builds
//! them once from the Go module `tools/k8s` into `$TIDELOCK_CACHE/k8s/<kubernetes version>/bin`,
//! outside the clone so CI reuses them; `TIDELOCK_K8S_BIN` names another folder. The versions
//! are read from that module's `go.mod`, so the code and the build never disagree.

use std::path::{Path, PathBuf};

use crate::Error;

/// The Go module the programs are built from (its `require` and `tool` lines pin them).
const GO_MOD: &str = include_str!("../../../tools/k8s/go.mod");

/// Every program the control plane and the user's path need, by file name.
pub const PROGRAMS: [&str; 8] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
    // Written by the build once every other program is in place.
    "stamp",
];

/// The version `go.mod` requires of `module` (e.g. `v1.36.3` for `k8s.io/kubernetes`).
pub fn pinned(module: &str) -> Option<&'static str> {
    GO_MOD.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(module))
            .then(|| words.next())
            .flatten()
            .filter(|v| v.starts_with('v'))
    })
}

/// The Kubernetes release of the control plane.
pub fn kubernetes_version() -> &'static str {
    pinned("k8s.io/kubernetes").expect("tools/k8s/go.mod requires k8s.io/kubernetes")
}

/// The folder of built programs.
#[derive(Debug, Clone)]
pub struct Tools {
    dir: PathBuf,
}

impl Tools {
    /// `TIDELOCK_K8S_BIN`, else `$TIDELOCK_CACHE/k8s/<version>/bin` (the cache defaults to
    /// `$XDG_CACHE_HOME/tidelock`, then `~/.cache/tidelock`). Fails naming the first missing
    /// program and the command that builds them.
    pub fn locate() -> Result<Tools, Error> {
        let dir = match std::env::var_os("TIDELOCK_K8S_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => Tools::dir_in(&cache_dir()),
        };
        Tools::at(dir)
    }

    /// Where the programs are built in the cache folder `cache`.
    pub fn dir_in(cache: &Path) -> PathBuf {
        cache.join("k8s").join(kubernetes_version()).join("bin")
    }

    /// The programs in `dir`, all of them present.
    pub fn at(dir: PathBuf) -> Result<Tools, Error> {
        for program in PROGRAMS {
            if !dir.join(program).is_file() {
                return Err(Error::ToolsMissing {
                    path: dir.join(program),
                });
            }
        }
        Ok(Tools { dir })
    }

    /// The folder (for `PATH`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One program's path, e.g. `kube-apiserver`.
    pub fn path(&self, program: &str) -> PathBuf {
        self.dir.join(program)
    }
}

/// Tidelock's cache folder, as `scripts/prereqs.sh` chooses it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TIDELOCK_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("tidelock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_go_module() {
        let k8s = kubernetes_version();
        assert!(k8s.starts_with("v1."), "{k8s}");
        // The staging modules are pinned to the same release (v1.X.Y -> v0.X.Y).
        let staging = format!("v0.{}", k8s.trim_start_matches("v1."));
        assert!(
            GO_MOD.contains(&format!("k8s.io/client-go => k8s.io/client-go {staging}")),
            "client-go must be replaced with {staging}"
        );
        assert!(pinned("sigs.k8s.io/kwok").is_some());
        assert!(pinned("helm.sh/helm/v4").is_some());
        assert_eq!(pinned("no.such/module"), None);
    }

    #[test]
    fn a_folder_without_the_programs_is_refused_naming_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tools::at(dir.path().to_path_buf()).unwrap_err();
        assert!(err.to_string().contains("etcd"), "{err}");
        for program in PROGRAMS {
            std::fs::write(dir.path().join(program), "").unwrap();
        }
        let tools = Tools::at(dir.path().to_path_buf()).unwrap();
        assert_eq!(tools.path("kwok"), dir.path().join("kwok"));
    }
}
