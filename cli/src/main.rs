//! `tidelock`: the command a newcomer runs first.
//!
//! - `tidelock up`: the local cluster, router and workers on loopback (`up.rs`);
//! - `tidelock chat`: a terminal chat that shows the cache at work (`chat.rs`);
//! - `tidelock crds`: the CustomResourceDefinitions as YAML (`crds/` is its output);
//! - `tidelock bench trace`: a request trace replayed against any endpoint (`bench.rs`);
//! - `tidelock bench sessions`: concurrent multi-turn conversations (`sessions.rs`);
//! - `tidelock bench compare`: one workload through each of our policies and the peers' routers
//!   on the same simulated workers, with a table and PNG charts (`compare.rs`, `chart.rs`);
//! - `tidelock kube up`: a local Kubernetes control plane for the chart and the operator
//!   (`kube.rs`);
//! - `tidelock fetch hf|url`: a model's weights, as a worker pod's init container fetches them
//!   (`fetch.rs`).

mod bench;
mod chaos;
mod chart;
mod chat;
mod compare;
mod config;
mod fetch;
mod http;
mod kube;
mod sessions;
mod up;

use std::process::ExitCode;

use clap::Parser;

/// Prints the CRDs, or writes them into `--write`'s folder.
fn crds(args: &config::CrdsArgs) -> ExitCode {
    let all = tidelock_api::crd::all_yaml();
    let Some(dir) = &args.write else {
        for (_, yaml) in all {
            print!("---\n{yaml}");
        }
        return ExitCode::SUCCESS;
    };
    for (name, yaml) in all {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("tidelock crds: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

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
            config::Command::Crds(args) => crds(&args),
            config::Command::Bench(args) => match args.command {
                config::BenchCommand::Trace(args) => bench::run(args).await,
                config::BenchCommand::Sessions(args) => sessions::run(args).await,
                config::BenchCommand::Compare(args) => compare::run(*args).await,
                config::BenchCommand::Chaos(args) => chaos::run(args).await,
            },
            config::Command::Kube(args) => match args.command {
                config::KubeCommand::Up(args) => kube::up(args).await,
            },
            config::Command::Fetch(args) => match fetch::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tidelock fetch: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
