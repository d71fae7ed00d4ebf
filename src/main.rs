//! The `ecr-image-service` binary: parse the command line, start logging, and hand over to the
//! library: `serve` to [`app::serve`] until SIGTERM or SIGINT, every other subcommand to
//! [`cli::run`].

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use tracing::error;

use ecr_image_service::cli::{self, Cli, Command, exit};
use ecr_image_service::config::ServeArgs;
use ecr_image_service::{app, runtime, server, shutdown, telemetry};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => return config_error(&first_line(&err.to_string())),
    };
    match cli.command {
        Command::Serve(args) => serve(*args),
        other => cli::run(other),
    }
}

/// Validates the configuration, starts logging, and serves until a stop signal.
fn serve(args: ServeArgs) -> ExitCode {
    if let Err(err) = args.validate() {
        return config_error(&err.to_string());
    }
    // The policy, page-token key and TLS files, read once: a bad one is a configuration error.
    let loaded = match server::Loaded::load(&args.server_settings()) {
        Ok(loaded) => loaded,
        Err(err) => return config_error(&err.to_string()),
    };
    let runtime = match runtime::build(args.worker_threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ecr-image-service: cannot start the async runtime: {err}");
            return ExitCode::from(exit::OTHER);
        }
    };
    // Inside the runtime: the OTLP exporter's channel is spawned on it.
    let telemetry = {
        let _runtime = runtime.enter();
        telemetry::init(
            args.log_format,
            &args.log_filter,
            args.otlp_endpoint.as_deref(),
        )
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(err) => return config_error(&err.to_string()),
    };
    runtime.block_on(async {
        let exit = match app::serve(args, loaded, shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                error!(error = %err, "cannot serve");
                ExitCode::from(err.exit_code())
            }
        };
        // The last spans are sent on the runtime's connection, so the runtime must be driven
        // while the exporter flushes: from a blocking thread, whatever the workers are doing.
        // A failed join (the flush panicked) loses spans, not the exit code.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        exit
    })
}

/// Prints one line saying what is wrong, and exits 64.
fn config_error(problem: &str) -> ExitCode {
    eprintln!("ecr-image-service: invalid configuration: {problem}");
    ExitCode::from(exit::USAGE)
}

/// clap's message (`error: …`) on one line, without the usage block that follows it; a
/// message that lists what is missing on the lines below keeps the list.
fn first_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let message = message.join(" ");
    match message.strip_prefix("error: ") {
        Some(rest) => rest.to_owned(),
        None => message,
    }
}
