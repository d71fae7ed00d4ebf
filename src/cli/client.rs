//! The client subcommands: `put-image`, `get-image`, `retag-image` and `resolve-image` talk
//! gRPC to a running service with the AWS CLI's flag names and output
//! shape, so `aws ecr put-image …` habits carry over; `digest` works offline.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use super::DEFAULT_ENDPOINT;
use super::exit::{self, exit_code};
use crate::api::pb;
use crate::api::pb::image_service_client::ImageServiceClient;
use crate::domain::image::Digest;

/// A call to the service, retries included, gets this long: a cold put is paced by ECR's rate.
const DEFAULT_CALL_TIMEOUT: &str = "30s";
/// Manifests are at most 4 MiB; a reply carries one plus its envelope, as a put does: the
/// method table's largest request.
const MAX_MESSAGE_BYTES: usize = crate::api::methods::MAX_REQUEST_BYTES;
/// The largest GetImage answer seen for a legal 4 MiB manifest (the manifest, its identifiers
/// and the envelope): over gRPC clients' default 4 MiB receive limit.
const RESPONSE_BYTES_NEEDED: usize = 4_194_424;

/// Where the service is, for every client subcommand.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The service, as an `http://HOST:PORT` URL.
    #[arg(long, env = "ECR_IMAGE_SERVICE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,

    /// How long the call may take (sent as its gRPC deadline).
    #[arg(long, default_value = DEFAULT_CALL_TIMEOUT, value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `put-image`: `aws ecr put-image`'s flags.
#[derive(Debug, Clone, Args)]
pub struct PutImageArgs {
    #[command(flatten)]
    target: Target,
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The manifest: `file://PATH` (or `fileb://PATH`) for a file's exact bytes, else the text.
    #[arg(long)]
    image_manifest: String,
    /// The tag to put the image under.
    #[arg(long)]
    image_tag: Option<String>,
    /// The manifest's media type, when it has no `mediaType` of its own.
    #[arg(long)]
    image_manifest_media_type: Option<String>,
    /// The digest the manifest must have; the put is refused otherwise.
    #[arg(long)]
    image_digest: Option<String>,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
}

/// What `get-image` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetOutput {
    /// `{"image": {...}}`, as the AWS CLI prints images.
    Json,
    /// The manifest's exact bytes, nothing else: pipe it to a file or to `sha256sum`.
    Manifest,
}

/// The image a command names: `aws ecr batch-get-image`'s flags for one image.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The tag.
    #[arg(long, required_unless_present = "image_digest")]
    image_tag: Option<String>,
    /// The digest.
    #[arg(long)]
    image_digest: Option<String>,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
}

impl ImageArgs {
    /// The API's identifier for the image.
    fn identifier(&self) -> pb::ImageIdentifier {
        pb::ImageIdentifier {
            image_tag: self.image_tag.clone().unwrap_or_default(),
            image_digest: self.image_digest.clone().unwrap_or_default(),
        }
    }

    /// The registry ID, empty for the service's own.
    fn registry_id(&self) -> String {
        self.registry_id.clone().unwrap_or_default()
    }
}

/// `get-image`: one image by tag or digest (ECR `BatchGetImage`).
#[derive(Debug, Clone, Args)]
pub struct GetImageArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    image: ImageArgs,
    /// Media types to accept; every manifest type when omitted.
    #[arg(long, num_args = 1..)]
    accepted_media_types: Vec<String>,
    /// What to print.
    #[arg(long, value_enum, default_value_t = GetOutput::Json)]
    output: GetOutput,
    /// From an index, the image for this platform (`os/arch[/variant]`, e.g. linux/arm64/v8).
    #[arg(long, value_parser = parse_platform)]
    platform: Option<pb::Platform>,
}

/// `--platform os/arch[/variant]`, as Docker takes it.
fn parse_platform(text: &str) -> Result<pb::Platform, String> {
    let platform = crate::api::platform::Platform::parse(text)?;
    Ok(pb::Platform {
        os: platform.os,
        architecture: platform.architecture,
        variant: platform.variant,
        ..pb::Platform::default()
    })
}

/// `retag-image`: point tags at an existing image, server-side.
#[derive(Debug, Clone, Args)]
pub struct RetagImageArgs {
    #[command(flatten)]
    target: Target,
    /// The source image.
    #[command(flatten)]
    source: ImageArgs,
    /// The tags to point at the source image.
    #[arg(long, num_args = 1.., required = true)]
    target_tags: Vec<String>,
}

/// `batch-delete-image`: `aws ecr batch-delete-image`'s flags, shorthand ids included.
#[derive(Debug, Clone, Args)]
pub struct BatchDeleteImageArgs {
    #[command(flatten)]
    target: Target,
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The images, in the AWS CLI's shorthand: `imageTag=v1`, `imageDigest=sha256:…`, or both
    /// separated by a comma.
    #[arg(long, num_args = 1.., required = true, value_parser = parse_image_id)]
    image_ids: Vec<pb::ImageIdentifier>,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
}

/// One `--image-ids` entry in the AWS CLI's shorthand syntax.
fn parse_image_id(text: &str) -> Result<pb::ImageIdentifier, String> {
    let mut id = pb::ImageIdentifier::default();
    for pair in text.split(',') {
        match pair.split_once('=') {
            Some(("imageTag", tag)) => id.image_tag = tag.to_owned(),
            Some(("imageDigest", digest)) => id.image_digest = digest.to_owned(),
            _ => {
                return Err(format!(
                    "{pair:?}: expected imageTag=TAG or imageDigest=DIGEST"
                ));
            }
        }
    }
    Ok(id)
}

/// The paging flags of `aws ecr list-images` and `describe-images`.
#[derive(Debug, Clone, Args)]
pub struct PagingArgs {
    /// The most items to print; with more left, a `NextToken` is printed to continue.
    #[arg(long)]
    max_items: Option<usize>,
    /// A `NextToken` printed by an earlier call.
    #[arg(long)]
    starting_token: Option<String>,
    /// Items per call to the service (it pages ECR the same way); 100 when omitted.
    #[arg(long)]
    page_size: Option<i32>,
    /// `tagStatus=TAGGED|UNTAGGED|ANY`, as the AWS CLI takes it.
    #[arg(long, value_parser = parse_filter)]
    filter: Option<pb::ListImagesFilter>,
}

fn parse_filter(text: &str) -> Result<pb::ListImagesFilter, String> {
    let status = match text.strip_prefix("tagStatus=") {
        Some("TAGGED") => pb::TagStatus::Tagged,
        Some("UNTAGGED") => pb::TagStatus::Untagged,
        Some("ANY") => pb::TagStatus::Any,
        _ => {
            return Err(format!(
                "{text:?}: expected tagStatus=TAGGED, UNTAGGED or ANY"
            ));
        }
    };
    Ok(pb::ListImagesFilter {
        tag_status: status.into(),
    })
}

/// `list-images`: every image id of a repository, paging automatically as the AWS CLI does.
#[derive(Debug, Clone, Args)]
pub struct ListImagesArgs {
    #[command(flatten)]
    target: Target,
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
    #[command(flatten)]
    paging: PagingArgs,
}

/// `describe-images`: details of the images named, or of every image, paging automatically.
#[derive(Debug, Clone, Args)]
pub struct DescribeImagesArgs {
    #[command(flatten)]
    target: Target,
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The images (`imageTag=v1`, `imageDigest=sha256:…`); every image when omitted.
    #[arg(long, num_args = 1.., value_parser = parse_image_id)]
    image_ids: Vec<pb::ImageIdentifier>,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
    #[command(flatten)]
    paging: PagingArgs,
}

/// Calls `fetch` (one page at a service page token) until the listing ends or `max_items`
/// are collected; the items, and the AWS-CLI-style `NextToken` when `max_items` cut it
/// short: the page's token and how many of its items were printed, `TOKEN:SKIP`.
async fn paginate<T, F, Fut>(
    paging: &PagingArgs,
    mut fetch: F,
) -> Result<(Vec<T>, Option<String>), CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let (mut token, mut skip) = match paging.starting_token.as_deref() {
        None => (String::new(), 0),
        Some(text) => match text.rsplit_once(':') {
            Some((token, skip)) => (token.to_owned(), skip.parse().unwrap_or(0)),
            None => (text.to_owned(), 0),
        },
    };
    let mut items = Vec::new();
    loop {
        let (page, next) = fetch(token.clone()).await?;
        for (position, item) in page.into_iter().enumerate().skip(skip) {
            if paging.max_items.is_some_and(|max| items.len() >= max) {
                return Ok((items, Some(format!("{token}:{position}"))));
            }
            items.push(item);
        }
        skip = 0;
        if next.is_empty() {
            return Ok((items, None));
        }
        if paging.max_items.is_some_and(|max| items.len() >= max) {
            return Ok((items, Some(format!("{next}:0"))));
        }
        token = next;
    }
}

/// What `aws ecr list-images` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListOutput {
    image_ids: Vec<ImageIdJson>,
    #[serde(rename = "NextToken", skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// `list-images`.
pub async fn list_images(args: ListImagesArgs) -> Result<(), CliError> {
    let client = connect(&args.target).await?;
    let (ids, next_token) = paginate(&args.paging, |token| {
        let mut client = client.clone();
        let message = pb::ListImagesRequest {
            registry_id: args.registry_id.clone().unwrap_or_default(),
            region: String::new(),
            repository_name: args.repository_name.clone(),
            filter: args.paging.filter,
            page_size: args.paging.page_size.unwrap_or_default(),
            page_token: token,
        };
        let message = request(message, &args.target);
        async move {
            let page = client
                .list_images(message)
                .await
                .map_err(CliError::Status)?
                .into_inner();
            Ok((page.image_ids, page.next_page_token))
        }
    })
    .await?;
    print_json(&ListOutput {
        image_ids: ids.into_iter().map(Into::into).collect(),
        next_token,
    })
}

/// One image as `aws ecr describe-images` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DetailJson {
    repository_name: String,
    image_digest: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    image_tags: Vec<String>,
    image_size_in_bytes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_pushed_at: Option<String>,
    image_manifest_media_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    artifact_media_type: String,
}

/// What `aws ecr describe-images` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescribeOutput {
    image_details: Vec<DetailJson>,
    #[serde(rename = "NextToken", skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// `describe-images`.
pub async fn describe_images(args: DescribeImagesArgs) -> Result<(), CliError> {
    let client = connect(&args.target).await?;
    let by_ids = !args.image_ids.is_empty();
    let (details, next_token) = paginate(&args.paging, |token| {
        let mut client = client.clone();
        let message = pb::DescribeImagesRequest {
            registry_id: args.registry_id.clone().unwrap_or_default(),
            region: String::new(),
            repository_name: args.repository_name.clone(),
            image_ids: args.image_ids.clone(),
            filter: args.paging.filter,
            page_size: if by_ids {
                0
            } else {
                args.paging.page_size.unwrap_or_default()
            },
            page_token: token,
        };
        let message = request(message, &args.target);
        async move {
            let page = client
                .describe_images(message)
                .await
                .map_err(CliError::Status)?
                .into_inner();
            Ok((page.image_details, page.next_page_token))
        }
    })
    .await?;
    let repository_name = args.repository_name;
    print_json(&DescribeOutput {
        image_details: details
            .into_iter()
            .map(|d| DetailJson {
                repository_name: repository_name.clone(),
                image_digest: d.image_digest,
                image_tags: d.image_tags,
                image_size_in_bytes: d.image_size_in_bytes,
                image_pushed_at: d.image_pushed_at.and_then(|t| {
                    let seconds = u64::try_from(t.seconds).ok()?;
                    let at = std::time::UNIX_EPOCH + Duration::from_secs(seconds);
                    Some(humantime::format_rfc3339_seconds(at).to_string())
                }),
                image_manifest_media_type: d.image_manifest_media_type,
                artifact_media_type: d.artifact_media_type,
            })
            .collect(),
        next_token,
    })
}

/// `watch-tag`: one JSON line per event, until interrupted (or the server ends the stream).
#[derive(Debug, Clone, Args)]
pub struct WatchTagArgs {
    /// The service, as an `http://HOST:PORT` URL (no call timeout: a watch lasts).
    #[arg(long, env = "ECR_IMAGE_SERVICE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The tag to watch.
    #[arg(long)]
    image_tag: String,
    /// The digest already known: the stream then starts with a heartbeat if it is current.
    #[arg(long)]
    last_known_digest: Option<String>,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
}

/// One event as `watch-tag` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WatchEventJson {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_id: Option<ImageIdJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exists: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stale_since: Option<i64>,
}

/// `watch-tag`.
pub async fn watch_tag(args: WatchTagArgs) -> Result<(), CliError> {
    // The connection attempt is bounded as for any call; the stream itself is not.
    let target = Target {
        endpoint: args.endpoint,
        timeout: Duration::from_secs(10),
    };
    let mut client = connect(&target).await?;
    let message = pb::WatchTagRequest {
        registry_id: args.registry_id.unwrap_or_default(),
        region: String::new(),
        repository_name: args.repository_name,
        image_tag: args.image_tag,
        last_known_digest: args.last_known_digest.unwrap_or_default(),
    };
    let mut stream = client
        .watch_tag(tonic::Request::new(message))
        .await
        .map_err(CliError::Status)?
        .into_inner();
    while let Some(response) = stream.message().await.map_err(CliError::Status)? {
        let line = match response.event {
            Some(pb::watch_tag_response::Event::State(state)) => WatchEventJson {
                event: "state",
                exists: Some(state.exists),
                source: Some(match state.source() {
                    pb::TagStateSource::Write => "WRITE",
                    _ => "POLL",
                }),
                image_id: state.image_id.map(Into::into),
                stale_since: None,
            },
            Some(pb::watch_tag_response::Event::Heartbeat(beat)) => WatchEventJson {
                event: "heartbeat",
                image_id: None,
                exists: None,
                source: None,
                stale_since: beat.stale_since.map(|t| t.seconds),
            },
            None => continue,
        };
        let text = serde_json::to_string(&line).map_err(|e| CliError::Output(e.into()))?;
        writeln!(std::io::stdout(), "{text}").map_err(CliError::Output)?;
    }
    Ok(())
}

/// `resolve-image`: a tag's digest, media type and size, without the manifest.
#[derive(Debug, Clone, Args)]
pub struct ResolveImageArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    image: ImageArgs,
    /// From an index, the image for this platform (`os/arch[/variant]`).
    #[arg(long, value_parser = parse_platform)]
    platform: Option<pb::Platform>,
}

/// `verify-image`: the verification policy's verdict on an image, as the service reaches it;
/// the same arguments as `resolve-image`, whose answer carries the verdict.
pub type VerifyImageArgs = ResolveImageArgs;

/// `list-referrers`: what is attached to an image (pages automatically).
#[derive(Debug, Clone, Args)]
pub struct ListReferrersArgs {
    #[command(flatten)]
    target: Target,
    /// The repository.
    #[arg(long)]
    repository_name: String,
    /// The image's digest.
    #[arg(long)]
    image_digest: String,
    /// Only referrers of this artifact type.
    #[arg(long)]
    artifact_type: Option<String>,
    /// The registry (12-digit account ID); the service's own when omitted.
    #[arg(long)]
    registry_id: Option<String>,
}

/// `digest`: the digest ECR gives a manifest file, computed here without any service.
#[derive(Debug, Clone, Args)]
pub struct DigestArgs {
    /// The manifest file (`file://PATH` is accepted too).
    file: PathBuf,
}

/// Why a client subcommand failed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file named on the command line cannot be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The endpoint is not a URL, or nothing answers there.
    #[error("cannot reach the service at {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The service refused or failed the call.
    #[error("{}", describe_status(.0))]
    Status(tonic::Status),
    /// RetagImage answered, but some targets failed; the first failure's code decides the exit.
    #[error("{failed} of {total} target tags failed")]
    PartialRetag {
        /// How many failed.
        failed: usize,
        /// How many were asked for.
        total: usize,
        /// The first failure's gRPC code.
        code: Code,
    },
    /// Printing the answer failed (a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    /// The image does not pass its verify rule (audit mode: served, but not passing).
    #[error("the image does not pass its verify rule")]
    Unverified,
}

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Input { .. } => exit::NO_INPUT,
            Self::Unreachable { .. } => exit::UNREACHABLE,
            Self::Status(status) => exit_code(status.code()),
            Self::PartialRetag { code, .. } => exit_code(*code),
            Self::Output(_) => exit::OTHER,
            Self::Unverified => exit_code(Code::FailedPrecondition),
        }
    }
}

/// `CODE (REASON): message`, then one line per offending field.
fn describe_status(status: &tonic::Status) -> String {
    let code = crate::api::error::code_name(status.code());
    let reason = status
        .get_details_error_info()
        .map(|info| format!(" ({})", info.reason))
        .unwrap_or_default();
    let mut text = format!("{code}{reason}: {}", status.message());
    // A message-size refusal on this side: say which setting a client needs, and what is legal.
    if status.message().contains("message length too large") {
        text.push_str(&format!(
            "\n  hint: a GetImage answer with a 4 MiB manifest is up to {RESPONSE_BYTES_NEEDED} \
             bytes; gRPC clients default to a 4 MiB receive limit, and need at least 5 MiB \
             (this CLI allows {MAX_MESSAGE_BYTES})"
        ));
    }
    if let Some(bad_request) = status.get_details_bad_request() {
        for violation in bad_request.field_violations {
            text.push_str(&format!(
                "\n  {}: {}",
                violation.field, violation.description
            ));
        }
    }
    text
}

/// Reads `file://PATH` / `fileb://PATH` as exact bytes (the AWS CLI's convention); anything
/// else is the value itself.
fn argument_text(value: &str) -> Result<String, CliError> {
    let Some(path) = value
        .strip_prefix("fileb://")
        .or_else(|| value.strip_prefix("file://"))
    else {
        return Ok(value.to_owned());
    };
    std::fs::read_to_string(path).map_err(|source| CliError::Input {
        path: path.to_owned(),
        source,
    })
}

async fn connect(target: &Target) -> Result<ImageServiceClient<Channel>, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        endpoint: target.endpoint.clone(),
        reason,
    };
    let channel = Endpoint::from_shared(target.endpoint.clone())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(target.timeout)
        .connect()
        .await
        .map_err(|e| unreachable(crate::api::error::with_sources(&e)))?;
    Ok(ImageServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A request with the call's deadline.
fn request<T>(message: T, target: &Target) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(target.timeout);
    request
}

/// The AWS CLI's JSON: 4-space indentation, camelCase fields, a trailing newline.
fn print_json(value: &impl Serialize) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value
        .serialize(&mut serializer)
        .map_err(|e| CliError::Output(e.into()))?;
    writeln!(out).map_err(CliError::Output)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageIdJson {
    #[serde(skip_serializing_if = "String::is_empty")]
    image_digest: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    image_tag: String,
}

impl From<pb::ImageIdentifier> for ImageIdJson {
    fn from(id: pb::ImageIdentifier) -> Self {
        Self {
            image_digest: id.image_digest,
            image_tag: id.image_tag,
        }
    }
}

/// An image as `aws ecr put-image` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageJson {
    registry_id: String,
    repository_name: String,
    image_id: ImageIdJson,
    #[serde(skip_serializing_if = "String::is_empty")]
    image_manifest: String,
    /// Left out of put-image's output, which (as in the AWS CLI's documented example) has
    /// none; printed by get-image and retag-image.
    #[serde(skip_serializing_if = "Option::is_none")]
    image_manifest_media_type: Option<String>,
}

impl ImageJson {
    fn new(image: pb::Image, with_media_type: bool) -> Self {
        Self {
            registry_id: image.registry_id,
            repository_name: image.repository_name,
            image_id: image.image_id.unwrap_or_default().into(),
            image_manifest: image.image_manifest,
            image_manifest_media_type: with_media_type.then_some(image.image_manifest_media_type),
        }
    }
}

#[derive(Serialize)]
struct ImageOutput {
    image: ImageJson,
}

/// `put-image`.
pub async fn put_image(args: PutImageArgs) -> Result<(), CliError> {
    let image_manifest = argument_text(&args.image_manifest)?;
    let mut client = connect(&args.target).await?;
    let message = pb::PutImageRequest {
        registry_id: args.registry_id.unwrap_or_default(),
        region: String::new(),
        repository_name: args.repository_name,
        image_manifest,
        image_manifest_media_type: args.image_manifest_media_type.unwrap_or_default(),
        image_tag: args.image_tag.unwrap_or_default(),
        image_digest: args.image_digest.unwrap_or_default(),
    };
    let response = client
        .put_image(request(message, &args.target))
        .await
        .map_err(CliError::Status)?
        .into_inner();
    print_json(&ImageOutput {
        image: ImageJson::new(response.image.unwrap_or_default(), false),
    })
}

/// `get-image`.
pub async fn get_image(args: GetImageArgs) -> Result<(), CliError> {
    let mut client = connect(&args.target).await?;
    let message = pb::GetImageRequest {
        registry_id: args.image.registry_id(),
        region: String::new(),
        image_id: Some(args.image.identifier()),
        repository_name: args.image.repository_name,
        accepted_media_types: args.accepted_media_types,
        max_staleness: None,
        platform: args.platform,
    };
    let image = client
        .get_image(request(message, &args.target))
        .await
        .map_err(CliError::Status)?
        .into_inner()
        .image
        .unwrap_or_default();
    match args.output {
        GetOutput::Json => print_json(&ImageOutput {
            image: ImageJson::new(image, true),
        }),
        GetOutput::Manifest => {
            let mut out = std::io::stdout().lock();
            out.write_all(image.image_manifest.as_bytes())
                .and_then(|()| out.flush())
                .map_err(CliError::Output)
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RetagResultJson {
    image_tag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<FailureJson>,
}

#[derive(Serialize)]
struct FailureJson {
    code: String,
    reason: String,
    message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RetagOutput {
    source_image: ImageJson,
    results: Vec<RetagResultJson>,
}

/// `retag-image`: prints every target's result; exits non-zero if any failed.
pub async fn retag_image(args: RetagImageArgs) -> Result<(), CliError> {
    let mut client = connect(&args.target).await?;
    let total = args.target_tags.len();
    let message = pb::RetagImageRequest {
        registry_id: args.source.registry_id(),
        region: String::new(),
        source_image_id: Some(args.source.identifier()),
        repository_name: args.source.repository_name,
        target_tags: args.target_tags,
    };
    let response = client
        .retag_image(request(message, &args.target))
        .await
        .map_err(CliError::Status)?
        .into_inner();
    let first_failure = response
        .results
        .iter()
        .find_map(|r| r.failure.as_ref())
        .map(|f| code_named(&f.code));
    let failed = response
        .results
        .iter()
        .filter(|r| r.failure.is_some())
        .count();
    let results = response
        .results
        .into_iter()
        .map(|result| RetagResultJson {
            outcome: result
                .failure
                .is_none()
                .then(|| outcome_name(result.outcome())),
            image_tag: result.image_tag,
            failure: result.failure.map(|f| FailureJson {
                code: f.code,
                reason: f.reason,
                message: f.message,
            }),
        })
        .collect();
    print_json(&RetagOutput {
        source_image: ImageJson::new(response.source_image.unwrap_or_default(), true),
        results,
    })?;
    match first_failure {
        Some(code) => Err(CliError::PartialRetag {
            failed,
            total,
            code,
        }),
        None => Ok(()),
    }
}

fn outcome_name(outcome: pb::PutImageOutcome) -> &'static str {
    match outcome {
        pb::PutImageOutcome::Created => "CREATED",
        pb::PutImageOutcome::AlreadyExisted => "ALREADY_EXISTED",
        pb::PutImageOutcome::Unspecified => "UNSPECIFIED",
    }
}

/// The gRPC code with this canonical name (as the service writes it); UNKNOWN otherwise.
fn code_named(name: &str) -> Code {
    (0..=16)
        .map(Code::from_i32)
        .find(|code| crate::api::error::code_name(*code) == name)
        .unwrap_or(Code::Unknown)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResolveOutput {
    registry_id: String,
    repository_name: String,
    image_id: ImageIdJson,
    image_manifest_media_type: String,
    image_manifest_size: i64,
}

/// The ResolveImage `args` ask for, its tag resolution at most `max_staleness` old.
async fn resolve(
    args: ResolveImageArgs,
    max_staleness: Option<prost_types::Duration>,
) -> Result<pb::ResolveImageResponse, CliError> {
    let mut client = connect(&args.target).await?;
    let message = pb::ResolveImageRequest {
        registry_id: args.image.registry_id(),
        region: String::new(),
        image_id: Some(args.image.identifier()),
        repository_name: args.image.repository_name,
        max_staleness,
        platform: args.platform,
    };
    Ok(client
        .resolve_image(request(message, &args.target))
        .await
        .map_err(CliError::Status)?
        .into_inner())
}

/// `resolve-image`.
pub async fn resolve_image(args: ResolveImageArgs) -> Result<(), CliError> {
    let response = resolve(args, None).await?;
    print_json(&ResolveOutput {
        registry_id: response.registry_id,
        repository_name: response.repository_name,
        image_id: response.image_id.unwrap_or_default().into(),
        image_manifest_media_type: response.image_manifest_media_type,
        image_manifest_size: response.image_manifest_size,
    })
}

/// What `verify-image` prints: the image and the verdict.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VerifyOutput {
    image_id: ImageIdJson,
    verification: Option<VerificationJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VerificationJson {
    rule: String,
    mode: String,
    passed: bool,
    refusal_reason: String,
    key_name: String,
    key_fingerprint: String,
    signature_form: String,
    scan_status: String,
    scan_severity_counts: std::collections::BTreeMap<String, i64>,
}

impl From<pb::Verification> for VerificationJson {
    fn from(v: pb::Verification) -> Self {
        Self {
            rule: v.rule,
            mode: v.mode,
            passed: v.passed,
            refusal_reason: v.refusal_reason,
            key_name: v.key_name,
            key_fingerprint: v.key_fingerprint,
            signature_form: v.signature_form,
            scan_status: v.scan_status,
            scan_severity_counts: v.scan_severity_counts.into_iter().collect(),
        }
    }
}

/// `verify-image`: prints the verdict; a refusal (enforce mode) is the service's error and its
/// exit code, a failed verdict in audit mode exits as FAILED_PRECONDITION would.
pub async fn verify_image(args: VerifyImageArgs) -> Result<(), CliError> {
    // A fresh resolution: the answer is about the tag as it is now.
    let response = resolve(args, Some(prost_types::Duration::default())).await?;
    let passed = response.verification.as_ref().is_none_or(|v| v.passed);
    print_json(&VerifyOutput {
        image_id: response.image_id.unwrap_or_default().into(),
        verification: response.verification.map(VerificationJson::from),
    })?;
    if passed {
        Ok(())
    } else {
        Err(CliError::Unverified)
    }
}

/// One referrer as `list-referrers` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferrerJson {
    digest: String,
    media_type: String,
    artifact_type: String,
    size: i64,
    annotations: std::collections::BTreeMap<String, String>,
}

/// `list-referrers`: every page, one JSON document.
pub async fn list_referrers(args: ListReferrersArgs) -> Result<(), CliError> {
    let mut client = connect(&args.target).await?;
    let mut referrers = Vec::new();
    let mut page_token = String::new();
    loop {
        let message = pb::ListReferrersRequest {
            registry_id: args.registry_id.clone().unwrap_or_default(),
            region: String::new(),
            repository_name: args.repository_name.clone(),
            image_digest: args.image_digest.clone(),
            artifact_type: args.artifact_type.clone().unwrap_or_default(),
            page_size: 0,
            page_token,
        };
        let page = client
            .list_referrers(request(message, &args.target))
            .await
            .map_err(CliError::Status)?
            .into_inner();
        referrers.extend(page.referrers.into_iter().map(|r| ReferrerJson {
            digest: r.digest,
            media_type: r.media_type,
            artifact_type: r.artifact_type,
            size: r.size,
            annotations: r.annotations.into_iter().collect(),
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    print_json(&serde_json::json!({ "referrers": referrers }))
}

/// What `aws ecr batch-delete-image` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeleteOutput {
    image_ids: Vec<ImageIdJson>,
    failures: Vec<ImageFailureJson>,
}

/// One entry of `failures`, as `aws ecr` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageFailureJson {
    image_id: ImageIdJson,
    failure_code: String,
    failure_reason: String,
}

/// `batch-delete-image`: prints what was deleted and what was not, as the AWS CLI does; the
/// exit code is 0 even with per-id failures, as there.
pub async fn batch_delete_image(args: BatchDeleteImageArgs) -> Result<(), CliError> {
    let mut client = connect(&args.target).await?;
    let message = pb::BatchDeleteImageRequest {
        registry_id: args.registry_id.unwrap_or_default(),
        region: String::new(),
        repository_name: args.repository_name,
        image_ids: args.image_ids,
    };
    let response = client
        .batch_delete_image(request(message, &args.target))
        .await
        .map_err(CliError::Status)?
        .into_inner();
    print_json(&DeleteOutput {
        image_ids: response.image_ids.into_iter().map(Into::into).collect(),
        failures: response
            .failures
            .into_iter()
            .map(|f| ImageFailureJson {
                image_id: f.image_id.unwrap_or_default().into(),
                failure_code: f.failure_code,
                failure_reason: f.failure_reason,
            })
            .collect(),
    })
}

/// `digest`: prints `sha256:…` of the file's exact bytes.
pub fn digest(args: &DigestArgs) -> Result<(), CliError> {
    let text = args.file.to_string_lossy();
    let path = text
        .strip_prefix("fileb://")
        .or_else(|| text.strip_prefix("file://"))
        .unwrap_or(&text);
    let bytes = std::fs::read(path).map_err(|source| CliError::Input {
        path: path.to_owned(),
        source,
    })?;
    writeln!(std::io::stdout(), "{}", Digest::of(&bytes)).map_err(CliError::Output)
}
