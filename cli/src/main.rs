//! `tidelock`: the command a newcomer runs first.
//!
//! - `tidelock up`: the local cluster, router and workers on loopback (`up.rs`);
//! - `tidelock chat`: a terminal chat that shows the cache at work (`chat.rs`).

mod chat;
mod config;
mod http;
mod up;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = config::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tidelock: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            config::Command::Up(args) => up::run(args).await,
            config::Command::Chat(args) => chat::run(args).await,
        }
    })
}
