//! The `dstore` binary: reads the configuration, sets up logging and runs the service; its client
//! commands (`blueprint`, `freeze`, `versions`, `item`, in `cli/`) talk to a running server.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dstore::config::Settings;
use dstore::projector::ProjectorKind;
use dstore::startup::Application;

/// See `dstore::allocator`.
#[global_allocator]
static GLOBAL: dstore::allocator::Allocator = mimalloc::MiMalloc;

/// dstore: describe records once as blueprints, freeze them into versions, and write items to every
/// store for every live version.
#[derive(Parser)]
#[command(
    name = "dstore",
    version,
    about,
    after_help = "\
Without a command, dstore serves (`dstore serve`). The blueprint, freeze, versions and item commands
talk to a running server (--server, or DSTORE_SERVER; default http://127.0.0.1:2020), e.g.:
  dstore blueprint put myblog article article.json
  dstore freeze myblog
  dstore item put myblog article item.json
  dstore versions myblog --watch"
)]
struct Cli {
    /// A TOML configuration file for serve and check-config; environment variables override it.
    #[arg(long, short, env = "DSTORE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run every enabled projector (the default).
    Serve,
    /// Check the configuration: print the settings in effect and whether each configured store answers.
    CheckConfig,
    /// Apply one projector's tasks in this process: from RabbitMQ (needs QUEUE_CONNECTIONSTRING and the
    /// store's settings; run `dstore serve` with queue.external naming the projector), or in cluster
    /// mode from the shared PostgreSQL storage (storage.backend = "postgresql"), beside the nodes.
    Worker {
        /// rocksdb, postgresql (or postgres) or elasticsearch.
        #[arg(long, short, value_parser = parse_projector)]
        projector: ProjectorKind,
        /// Base URL of the dstore server, whose catalog the worker reads.
        #[arg(long, env = "DSTORE_SERVER", default_value = "http://127.0.0.1:2020")]
        server: String,
    },
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> ExitCode {
    dstore::allocator::tune();
    let cli = Cli::parse();
    // Client commands talk to a server over HTTP and need no configuration file.
    let command = match cli.command {
        Some(Command::Client(command)) => return cli::run(command),
        command => command,
    };
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("dstore: {error}");
            return ExitCode::from(2);
        }
    };
    dstore::telemetry::init(&settings.log);
    match command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::CheckConfig => check_config(&settings),
        Command::Worker { projector, server } => worker(settings, projector, &server),
        Command::Client(command) => cli::run(command),
    }
}

/// Prints the settings in effect and whether each configured store answers; fails if one does not.
fn check_config(settings: &Settings) -> ExitCode {
    println!("{}", toml::to_string_pretty(settings).unwrap_or_default());
    if let Err(error) = dstore::startup::check_settings(settings) {
        println!("FAILING settings       {error}");
        return ExitCode::from(2);
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let checks = runtime.block_on(dstore::startup::check_stores(settings));
    let mut ok = true;
    for check in checks {
        match check.result {
            Ok(detail) => println!("ok      {:<14} {detail}", check.store),
            Err(error) => {
                ok = false;
                println!(
                    "FAILING {:<14} {error} (check {})",
                    check.store, check.setting
                );
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .inspect_err(|error| eprintln!("dstore: cannot start the async runtime: {error}"))
        .ok()
}

fn parse_projector(name: &str) -> Result<ProjectorKind, String> {
    ProjectorKind::parse(name).ok_or_else(|| {
        format!(
            "there is no projector {name:?}; projectors are {}",
            ProjectorKind::names()
        )
    })
}

fn worker(settings: Settings, projector: ProjectorKind, server: &str) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        match dstore::startup::run_worker(settings, projector, server).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("dstore: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

fn serve(settings: Settings) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        match Application::build(settings).await {
            Ok(app) => {
                app.stop_on_signals();
                match app.run_until_stopped().await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        tracing::error!(%error, "server failed");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(error) => {
                eprintln!("dstore: {error}");
                ExitCode::FAILURE
            }
        }
    })
}
