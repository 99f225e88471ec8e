//! The `dstore` binary: reads the configuration, sets up logging and runs the service.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dstore::config::Settings;
use dstore::startup::Application;

/// mimalloc: the journal and the projectors allocate many small, short-lived buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// dstore: describe records once as blueprints, freeze them into versions, and write items to every
/// store for every live version.
#[derive(Parser)]
#[command(name = "dstore", version, about)]
struct Cli {
    /// A TOML configuration file; environment variables override it.
    #[arg(long, short, env = "DSTORE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run every enabled projector (the default).
    Serve,
    /// Check the configuration and print the settings in effect.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("dstore: {error}");
            return ExitCode::from(2);
        }
    };
    dstore::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::CheckConfig => {
            println!("{}", toml::to_string_pretty(&settings).unwrap_or_default());
            ExitCode::SUCCESS
        }
    }
}

fn serve(settings: Settings) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dstore: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match Application::build(settings).await {
            Ok(app) => match app.run_until_stopped().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "server failed");
                    ExitCode::FAILURE
                }
            },
            Err(error) => {
                eprintln!("dstore: {error}");
                ExitCode::FAILURE
            }
        }
    })
}
