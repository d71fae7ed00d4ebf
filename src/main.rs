//! The `ecr-image-service` binary: parse the configuration, start logging, serve until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use ecr_image_service::cli::{self, CliError};
use ecr_image_service::config::{Backend, Cli, Command, HealthCheckArgs, ServeArgs};
use ecr_image_service::health_check::{self, HealthCheckError};
use ecr_image_service::registry::Registry;
use ecr_image_service::registry::cached::CachedRegistry;
use ecr_image_service::registry::ecr::{self, EcrRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use ecr_image_service::{server, telemetry};
use tokio::net::TcpListener;
use tracing::{error, info};

/// sysexits.h `EX_USAGE`: the configuration is wrong; restarting will not help.
const EXIT_CONFIG: u8 = 64;
/// The server could not start or stopped on an error.
const EXIT_FAILURE: u8 = 1;
/// `health-check`: no answer (nothing listening, timeout, or the health service failed).
const EXIT_UNREACHABLE: u8 = 2;
/// `health-check`: the server answered, but not SERVING (e.g. draining).
const EXIT_NOT_SERVING: u8 = 3;

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
    let args = match cli.command {
        Command::Serve(args) => *args,
        Command::HealthCheck(args) => return health_check(&args),
        Command::Digest(args) => return client_exit(cli::digest(&args)),
        Command::PutImage(args) => return client(cli::put_image(args)),
        Command::GetImage(args) => return client(cli::get_image(args)),
        Command::RetagImage(args) => return client(cli::retag_image(args)),
        Command::ResolveImage(args) => return client(cli::resolve_image(args)),
    };
    if let Err(err) = args.validate() {
        return config_error(&err.to_string());
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ecr-image-service: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
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
    let exit = runtime.block_on(serve(args));
    // Before the runtime goes: the last spans are sent on its connection.
    telemetry.shutdown();
    exit
}

/// Runs a client subcommand on a small runtime of its own.
fn client(call: impl Future<Output = Result<(), CliError>>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => client_exit(runtime.block_on(call)),
        Err(err) => {
            eprintln!("ecr-image-service: cannot start the async runtime: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A client subcommand's failure: one message on stderr, and its class's exit code.
fn client_exit(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ecr-image-service: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Runs `health-check`: one line on failure, and an exit code per kind of failure.
fn health_check(args: &HealthCheckArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ecr-image-service: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(health_check::check(
        &args.endpoint,
        &args.service,
        args.timeout,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ecr-image-service: health check failed: {err}");
            ExitCode::from(match err {
                HealthCheckError::Endpoint { .. } => EXIT_CONFIG,
                HealthCheckError::Unreachable { .. } => EXIT_UNREACHABLE,
                HealthCheckError::NotServing { .. } => EXIT_NOT_SERVING,
            })
        }
    }
}

/// Prints one line saying what is wrong, and exits 64.
fn config_error(problem: &str) -> ExitCode {
    eprintln!("ecr-image-service: invalid configuration: {problem}");
    ExitCode::from(EXIT_CONFIG)
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

async fn serve(args: ServeArgs) -> ExitCode {
    match args.backend {
        Backend::Ecr => serve_ecr(args).await,
        Backend::Local => serve_local(args).await,
    }
}

/// Serves in front of ECR: the SDK's configuration, then the cache over the ECR client.
async fn serve_ecr(args: ServeArgs) -> ExitCode {
    let settings = args.ecr_settings();
    let sdk = ecr::load_sdk_config(&settings).await;
    let Some(region) = sdk.region().map(ToString::to_string) else {
        return config_error(
            "no AWS region: set --region, ECR_IMAGE_SERVICE_REGION, AWS_REGION or a profile region",
        );
    };
    let registry = CachedRegistry::new(
        EcrRegistry::from_config(ecr::client_config(&sdk, &settings)),
        args.cache_settings(),
    );
    let metrics = ecr_image_service::metrics::registry(Some(&registry));
    run(&args, registry, metrics, |address, admin_address| {
        info!(
            %address,
            %admin_address,
            backend = "ecr",
            %region,
            ecr_endpoint = settings.endpoint_url.as_deref().unwrap_or("(SDK default)"),
            max_attempts = settings.max_attempts,
            digest_cache_bytes = args.digest_cache_bytes,
            tag_ttl = ?args.tag_ttl,
            "listening"
        );
    })
    .await
}

/// Serves from the embedded store in `--data-dir`: no AWS account, no cache needed.
async fn serve_local(args: ServeArgs) -> ExitCode {
    let settings = args.local_settings();
    let registry = match LocalRegistry::open(&settings) {
        Ok(registry) => registry,
        Err(err) => {
            error!(error = %err, "cannot open the local store");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let metrics = ecr_image_service::metrics::registry(None);
    run(&args, registry, metrics, |address, admin_address| {
        info!(
            %address,
            %admin_address,
            backend = "local",
            data_dir = %settings.data_dir.display(),
            registry_id = settings.registry_id,
            "listening"
        );
    })
    .await
}

/// Binds both listeners, serves `/metrics`, says where it listens, and serves until SIGTERM.
async fn run(
    args: &ServeArgs,
    registry: impl Registry,
    metrics: prometheus_client::registry::Registry,
    announce: impl FnOnce(SocketAddr, SocketAddr),
) -> ExitCode {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            error!(address = %args.listen, error = %err, "cannot listen");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let admin = match TcpListener::bind(args.admin_listen).await {
        Ok(admin) => admin,
        Err(err) => {
            error!(address = %args.admin_listen, error = %err, "cannot listen for admin");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let admin_address = admin.local_addr().map_or(args.admin_listen, |a| a);
    tokio::spawn(async move {
        if let Err(err) = ecr_image_service::admin::serve(admin, metrics).await {
            error!(error = %err, "admin endpoint failed");
        }
    });
    announce(
        listener.local_addr().map_or(args.listen, |a| a),
        admin_address,
    );
    match server::serve(
        listener,
        registry,
        args.server_settings(),
        shutdown_signal(),
    )
    .await
    {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            error!(error = %err, "server failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Completes on SIGTERM (Kubernetes asks a pod to stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    info!("shutting down: finishing in-flight requests");
}
