//! The command line: one binary, whose subcommands are the server (`serve`), its probe
//! (`health-check`) and an AWS-CLI-shaped client ([`client`]). `main.rs` parses, then hands the
//! server to [`crate::app`] and everything else to [`run`].

pub mod client;
pub mod policy;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use humantime::Duration as Human;

use crate::config::ServeArgs;
use crate::health_check::{self, HealthCheckError};

/// Where the client subcommands and `health-check` call when no endpoint is given: a server on
/// this host's default port.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";
/// The service name Kubernetes' readiness probe asks about: NOT_SERVING while draining.
pub const DEFAULT_HEALTH_SERVICE: &str = "imageservice.v1.ImageService";
/// A health answer comes from memory; a server slower than this is as good as down.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A gRPC facade over Amazon ECR: put and get image manifests by tag or digest.
#[derive(Debug, Parser)]
#[command(name = "ecr-image-service", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The binary's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the ImageService gRPC API.
    Serve(Box<ServeArgs>),
    /// Ask a running server's gRPC health service whether it serves; exit 0 if it does.
    /// The container image has no shell, so this is what a `helm test` pod runs.
    HealthCheck(HealthCheckArgs),
    /// Store a manifest under a tag, like `aws ecr put-image`, through a running service.
    PutImage(client::PutImageArgs),
    /// Fetch an image by tag or digest; `--output manifest` writes its exact bytes.
    GetImage(client::GetImageArgs),
    /// Point one or more tags at an existing image, server-side.
    RetagImage(client::RetagImageArgs),
    /// Resolve a tag to its digest, media type and size.
    ResolveImage(client::ResolveImageArgs),
    /// Delete images by tag or digest, like `aws ecr batch-delete-image`.
    BatchDeleteImage(client::BatchDeleteImageArgs),
    /// List a repository's image ids, like `aws ecr list-images` (pages automatically).
    ListImages(client::ListImagesArgs),
    /// Describe images, like `aws ecr describe-images` (pages automatically).
    DescribeImages(client::DescribeImagesArgs),
    /// Watch a tag: one JSON line per change and heartbeat, until interrupted.
    WatchTag(client::WatchTagArgs),
    /// Print the verification policy's verdict on an image (JSON); exit 0 if it passes.
    VerifyImage(client::VerifyImageArgs),
    /// List what is attached to an image: signatures, SBOMs, attestations (pages automatically).
    ListReferrers(client::ListReferrersArgs),
    /// Print the digest ECR gives a manifest file (offline: SHA-256 of its exact bytes).
    Digest(client::DigestArgs),
    /// Audit an authorization policy offline.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

/// `ecr-image-service health-check`.
#[derive(Debug, Clone, Args)]
pub struct HealthCheckArgs {
    /// The server to ask, as an `http://HOST:PORT` URL.
    #[arg(long, env = "ECR_IMAGE_SERVICE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,

    /// The service whose status to ask for; `""` asks about the server as a whole.
    #[arg(long, default_value = DEFAULT_HEALTH_SERVICE)]
    pub service: String,

    /// How long to wait for the connection and the answer together.
    #[arg(long, default_value_t = Human::from(DEFAULT_HEALTH_TIMEOUT))]
    pub timeout: Human,
}

/// The binary's exit codes, one per class of failure, for every subcommand (the README's table).
pub mod exit {
    use tonic::Code;

    /// Any failure not listed below: the server could not start or stopped on an error; a
    /// call failed with INTERNAL, DATA_LOSS, UNKNOWN…
    pub const OTHER: u8 = 1;
    /// The service could not be reached (client subcommands and `health-check`).
    pub const UNREACHABLE: u8 = 2;
    /// `health-check`: the server answered, but not SERVING (e.g. draining). Shares its number
    /// with [`NOT_FOUND`]: the two belong to different subcommands.
    pub const NOT_SERVING: u8 = 3;
    /// NOT_FOUND: no such repository or image.
    pub const NOT_FOUND: u8 = 3;
    /// ALREADY_EXISTS: an immutable tag points elsewhere.
    pub const ALREADY_EXISTS: u8 = 4;
    /// FAILED_PRECONDITION: referenced layers or images missing, KMS, archived image.
    pub const FAILED_PRECONDITION: u8 = 5;
    /// PERMISSION_DENIED or UNAUTHENTICATED; `policy check`: the policy denies the request.
    pub const DENIED: u8 = 6;
    /// UNAVAILABLE or RESOURCE_EXHAUSTED: try again later.
    pub const RETRY_LATER: u8 = 7;
    /// DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: u8 = 8;
    /// sysexits `EX_USAGE`: bad flags or an invalid configuration; restarting will not help.
    pub const USAGE: u8 = 64;
    /// sysexits `EX_DATAERR`: INVALID_ARGUMENT, the request itself is wrong.
    pub const INVALID_ARGUMENT: u8 = 65;
    /// sysexits `EX_NOINPUT`: a file named on the command line cannot be read.
    pub const NO_INPUT: u8 = 66;

    /// The exit code for a gRPC code.
    pub fn exit_code(code: Code) -> u8 {
        match code {
            Code::Ok => 0,
            Code::InvalidArgument | Code::OutOfRange => INVALID_ARGUMENT,
            Code::NotFound => NOT_FOUND,
            Code::AlreadyExists => ALREADY_EXISTS,
            Code::FailedPrecondition => FAILED_PRECONDITION,
            Code::PermissionDenied | Code::Unauthenticated => DENIED,
            Code::Unavailable | Code::ResourceExhausted | Code::Aborted => RETRY_LATER,
            Code::DeadlineExceeded => DEADLINE_EXCEEDED,
            _ => OTHER,
        }
    }
}

/// Runs a subcommand other than `serve` on a small runtime of its own; its exit code.
pub fn run(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ecr-image-service: cannot start the async runtime: {err}");
            return ExitCode::from(exit::OTHER);
        }
    };
    let result = match command {
        Command::Serve(_) => {
            eprintln!("ecr-image-service: `serve` runs through the server's own path");
            return ExitCode::from(exit::USAGE);
        }
        Command::HealthCheck(args) => return runtime.block_on(health(&args)),
        Command::Policy(command) => return policy::run(command),
        Command::Digest(args) => client::digest(&args),
        Command::PutImage(args) => runtime.block_on(client::put_image(args)),
        Command::GetImage(args) => runtime.block_on(client::get_image(args)),
        Command::RetagImage(args) => runtime.block_on(client::retag_image(args)),
        Command::ResolveImage(args) => runtime.block_on(client::resolve_image(args)),
        Command::BatchDeleteImage(args) => runtime.block_on(client::batch_delete_image(args)),
        Command::ListImages(args) => runtime.block_on(client::list_images(args)),
        Command::DescribeImages(args) => runtime.block_on(client::describe_images(args)),
        Command::WatchTag(args) => runtime.block_on(client::watch_tag(args)),
        Command::VerifyImage(args) => runtime.block_on(client::verify_image(args)),
        Command::ListReferrers(args) => runtime.block_on(client::list_referrers(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ecr-image-service: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// `health-check`: one line on failure, and an exit code per kind of failure.
async fn health(args: &HealthCheckArgs) -> ExitCode {
    match health_check::check(&args.endpoint, &args.service, *args.timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ecr-image-service: health check failed: {err}");
            ExitCode::from(match err {
                HealthCheckError::Endpoint { .. } => exit::USAGE,
                HealthCheckError::Unreachable { .. } => exit::UNREACHABLE,
                HealthCheckError::NotServing { .. } => exit::NOT_SERVING,
            })
        }
    }
}
