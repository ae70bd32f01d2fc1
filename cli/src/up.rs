//! `tidelock up`: today a readiness report. It checks the model the local cluster would serve and
//! states that the cluster itself is not implemented yet (issue #5), exiting non-zero so no script
//! mistakes it for a running endpoint.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use crate::config::UpArgs;

/// Exit code when a prerequisite is missing or broken.
const EXIT_MISSING_PREREQUISITE: u8 = 1;
/// Exit code when prerequisites are in place but the cluster cannot be started yet.
const EXIT_NOT_IMPLEMENTED: u8 = 2;

/// First four bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

pub(crate) fn run(args: &UpArgs) -> ExitCode {
    let model = args.model_path();
    match check_model(&model) {
        Ok(size) => {
            println!("tidelock up: prerequisites");
            println!(
                "  model  {} ({:.1} MB, GGUF)",
                model.display(),
                size as f64 / 1e6
            );
            println!();
            eprintln!(
                "tidelock up: the local cluster (router + workers) is not implemented yet \
                 (issue #5); nothing is being served."
            );
            ExitCode::from(EXIT_NOT_IMPLEMENTED)
        }
        Err(problem) => {
            eprintln!("tidelock up: model {}: {problem}", model.display());
            eprintln!("  run ./scripts/up (it fetches the default model), or pass --model PATH");
            ExitCode::from(EXIT_MISSING_PREREQUISITE)
        }
    }
}

/// Checks that `path` is a readable GGUF file; returns its size in bytes.
fn check_model(path: &Path) -> Result<u64, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|_| format!("too short to be a GGUF file ({size} bytes)"))?;
    if &magic != GGUF_MAGIC {
        return Err(format!("not a GGUF file (starts with {magic:02x?})"));
    }
    Ok(size)
}
