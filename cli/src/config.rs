//! Command-line configuration: the only place that reads the environment.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// File name of the default model inside the model cache.
pub(crate) const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Tidelock: an LLM inference cluster that keeps every conversation's KV cache.
#[derive(Debug, Parser)]
#[command(name = "tidelock", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start a local cluster (router + workers on loopback) and print its endpoint.
    Up(UpArgs),
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Model to serve: a GGUF file. Default: the SmolLM2-135M-Instruct GGUF in the model cache,
    /// which `./scripts/up` fetches.
    #[arg(long, env = "TIDELOCK_MODEL")]
    model: Option<PathBuf>,

    /// Cache directory for models and tools. Default: `$XDG_CACHE_HOME/tidelock` or
    /// `~/.cache/tidelock`.
    #[arg(long, env = "TIDELOCK_CACHE")]
    cache_dir: Option<PathBuf>,
}

impl UpArgs {
    /// The model path, resolved against the cache when not given.
    pub(crate) fn model_path(&self) -> PathBuf {
        match &self.model {
            Some(path) => path.clone(),
            None => self.cache_dir().join("models").join(DEFAULT_MODEL_FILE),
        }
    }

    fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("tidelock");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".cache").join("tidelock")
    }
}
