//! `tidelock-operator`: reconciles `Model` and `Tenant` resources onto the cluster (DESIGN.md,
//! "Custom resources").
//!
//! Not built yet: it arrives with issue #6. Until then the binary says so and exits non-zero rather
//! than pretending to reconcile.

use clap::Parser;

/// Tidelock operator (not implemented yet: issue #6).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {}

fn main() -> std::process::ExitCode {
    let _config = Config::parse();
    eprintln!(
        "tidelock-operator: the operator is not implemented yet (issue #6); nothing is reconciled"
    );
    std::process::ExitCode::from(2)
}
