//! Every account, every caller on record (issue 21): registries in other accounts reached with
//! their own role sessions, refused before any AWS call when not configured, one audit event per
//! write, retag target, deleted id and denial, and, opted in, each caller's writes signed with a
//! role session named for it.
//!
//! The emulator holds several accounts: its AssumeRole needs no existing role, and the
//! credentials it returns act in the role's account. STS and ECR are each reached through a
//! proxy that records what was sent (moto ignores `SourceIdentity`), and who signed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ecr_image_service::audit::AuditSink;
use ecr_image_service::identity::IdentitySource;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::{CacheStatus, ImageIdentifier, RetagImageRequest};
use ecr_image_service::registry::accounts::Routes;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::ecr::calls::UpstreamCalls;
use ecr_image_service::registry::ecr::lanes::LanesConfig;
use ecr_image_service::registry::ecr::roles::{DEFAULT_STS_RATE, attribution_name};
use ecr_image_service::registry::ecr::{EcrRegistry, client_config};
use ecr_image_service::server::{self, ServerSettings};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::backend::ScratchDir;
use crate::support::fault_proxy::{Fault, FaultProxy, Seen};
use crate::support::recorded::form_field;
use crate::support::requests::{as_xfcc, delete, get, put};
use crate::support::{
    MOTO_ACCOUNT, REGION, admin_in, assert_status, digest_of, error_info, moto, sdk_config_at,
    server_settings, settings, unique,
};

/// Another account of the organisation, reached through its role.
const ACCOUNT_B: &str = "111122223333";
/// An account the registries file does not name.
const ACCOUNT_C: &str = "444455556666";

fn role(account: &str) -> String {
    format!("arn:aws:iam::{account}:role/ecr-image-service")
}

/// The service's own account (with a role only when writes are attributed) and account B in
/// the service's region and in eu-west-1.
fn registries_file(attributed: bool) -> String {
    let own_role = if attributed {
        format!("\n    roleArn: {}", role(MOTO_ACCOUNT))
    } else {
        String::new()
    };
    format!(
        "registries:\n  - account: \"{ACCOUNT_B}\"\n    roleArn: {}\n    regions: [{REGION}, eu-west-1]\n  - account: \"{MOTO_ACCOUNT}\"{own_role}\n",
        role(ACCOUNT_B)
    )
}

/// Audit lines, as the service wrote them.
#[derive(Debug, Default)]
struct Lines(Mutex<Vec<String>>);

impl AuditSink for Lines {
    fn write_line(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }
}

impl Lines {
    /// Every event so far, parsed.
    fn events(&self) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// The events after the first `from`.
    fn since(&self, from: usize) -> Vec<Value> {
        self.events().split_off(from)
    }
}

/// The service in front of the emulator, serving its own account and account B, with the
/// recording proxies and the audit trail.
struct Org {
    client: ImageServiceClient<Channel>,
    ecr: FaultProxy,
    sts: FaultProxy,
    audit: Arc<Lines>,
    calls: UpstreamCalls,
    _dir: ScratchDir,
}

impl Org {
    /// The AssumeRole calls STS received, in order.
    fn assumed_roles(&self) -> Vec<Seen> {
        self.sts
            .seen()
            .into_iter()
            .filter(|s| s.operation == "AssumeRole")
            .collect()
    }
}

async fn org(identity: IdentitySource, policy: Option<&str>, attributed: bool) -> Org {
    org_with(identity, policy, attributed, |_, _| Fault::Forward).await
}

/// [`org`] with STS's answers decided by `sts_plan`.
async fn org_with(
    identity: IdentitySource,
    policy: Option<&str>,
    attributed: bool,
    sts_plan: impl Fn(&str, u32) -> Fault + Send + Sync + 'static,
) -> Org {
    let dir = ScratchDir::new("accounts");
    let file = dir.0.join("registries.yaml");
    std::fs::write(&file, registries_file(attributed)).unwrap();
    let ecr = FaultProxy::start(moto::endpoint(), |_, _| Fault::Forward).await;
    let sts = FaultProxy::start(moto::endpoint(), sts_plan).await;
    let sdk = sdk_config_at(Some(&sts.endpoint));
    let settings = ecr_image_service::registry::ecr::EcrSettings {
        endpoint_url: Some(ecr.endpoint.clone()),
        ..settings()
    };
    let routes =
        Arc::new(Routes::from_file(Some(MOTO_ACCOUNT.into()), Some(REGION), &file).unwrap());
    let registry = EcrRegistry::from_config(client_config(&sdk, &settings), settings.batch_window)
        .with_registries(LanesConfig {
            sdk,
            settings,
            routes: Arc::clone(&routes),
            budgets: None,
            sts_rate: DEFAULT_STS_RATE,
            attributed_sessions: attributed.then_some(100),
            slots: None,
        });
    let calls = registry.calls().clone();
    let stack = CachedRegistry::new(Arc::new(registry), CacheSettings::default());
    let policy = policy.map(|text| {
        let path = dir.0.join("policy.yaml");
        std::fs::write(&path, text).unwrap();
        path
    });
    let settings = ServerSettings {
        identity_source: identity,
        authz_policy: policy,
        ..server_settings()
    };
    let audit = Arc::new(Lines::default());
    let bound = server::bind(settings)
        .await
        .unwrap()
        .with_routes(routes)
        .with_audit_sink(Arc::clone(&audit) as Arc<dyn AuditSink>);
    let address = bound.address();
    tokio::spawn(bound.serve(Arc::new(stack), std::future::pending()));
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    Org {
        client,
        ecr,
        sts,
        audit,
        calls,
        _dir: dir,
    }
}

/// A distinct image manifest.
fn manifest(label: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[],"annotations":{{"label":"{label}"}}}}"#,
        "0".repeat(64)
    )
}

/// What `tag` points at in the emulator, asked of `ecr` directly ("" for nothing).
async fn emulator_digest(ecr: &aws_sdk_ecr::Client, repository: &str, tag: &str) -> String {
    let answer = ecr
        .batch_get_image()
        .repository_name(repository)
        .image_ids(tag_id(tag))
        .send()
        .await
        .unwrap();
    answer
        .images()
        .first()
        .and_then(|i| i.image_id())
        .and_then(|id| id.image_digest())
        .unwrap_or_default()
        .to_owned()
}

/// ECR's id of `tag`.
fn tag_id(tag: &str) -> aws_sdk_ecr::types::ImageIdentifier {
    aws_sdk_ecr::types::ImageIdentifier::builder()
        .image_tag(tag)
        .build()
}

/// Creates `repository` through `ecr`.
async fn create(ecr: &aws_sdk_ecr::Client, repository: &str) {
    ecr.create_repository()
        .repository_name(repository)
        .send()
        .await
        .unwrap();
}

/// An image put into account B with B's own credentials is read through the facade with
/// `registry_id` = B, byte for byte; the same repository and tag in the service's own account
/// reads its own image; neither ever answers from the other's cache entry.
#[tokio::test]
async fn another_accounts_image_is_read_with_its_own_credentials() {
    let mut org = org(IdentitySource::None, None, false).await;
    let repository = unique("org/app");
    let (own, other) = (manifest("own"), manifest("b"));
    let own_ecr = admin_in(MOTO_ACCOUNT).await;
    let b_ecr = admin_in(ACCOUNT_B).await;
    create(&own_ecr, &repository).await;
    create(&b_ecr, &repository).await;
    for (ecr, text) in [(&own_ecr, &own), (&b_ecr, &other)] {
        ecr.put_image()
            .repository_name(&repository)
            .image_tag("v1")
            .image_manifest(text.as_str())
            .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
            // As the service sends it: the emulator otherwise records a digest of nothing.
            .image_digest(digest_of(text))
            .send()
            .await
            .unwrap();
    }
    let in_b = |mut request: ecr_image_service::pb::GetImageRequest| {
        request.registry_id = ACCOUNT_B.into();
        request
    };
    for round in 0..2 {
        let mine = org
            .client
            .get_image(get(&repository, "v1", ""))
            .await
            .unwrap()
            .into_inner();
        let theirs = org
            .client
            .get_image(in_b(get(&repository, "v1", "")))
            .await
            .unwrap()
            .into_inner();
        let (mine_status, theirs_status) = (mine.cache_status(), theirs.cache_status());
        let (mine_image, theirs_image) = (mine.image.unwrap(), theirs.image.unwrap());
        assert_eq!(mine_image.image_manifest, own, "round {round}");
        assert_eq!(
            theirs_image.image_manifest, other,
            "round {round}: B's exact bytes"
        );
        assert_eq!(theirs_image.registry_id, ACCOUNT_B);
        let expected = if round == 0 {
            CacheStatus::Miss
        } else {
            CacheStatus::Hit
        };
        assert_eq!(theirs_status, expected, "round {round}");
        assert_eq!(mine_status, expected, "round {round}");
    }
    // B's digest, asked of the own account, is not there: the digest cache is per registry.
    let status = org
        .client
        .get_image(get(&repository, "", &digest_of(&other)))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
    // Every call to B was signed by a session of B's role, assumed once.
    let assumed = org.assumed_roles();
    assert_eq!(assumed.len(), 1, "one session for B");
    assert_eq!(
        form_field(&assumed[0].body, "RoleArn").as_deref(),
        Some(role(ACCOUNT_B).as_str())
    );
    let b_key = returned_access_key(&assumed[0].answer);
    let to_b: Vec<_> = org
        .ecr
        .seen()
        .into_iter()
        .filter(|s| s.access_key() == b_key)
        .collect();
    assert_eq!(
        to_b.len(),
        1,
        "one BatchGetImage to B; the second read was a hit"
    );
}

/// The access key id in an AssumeRole answer.
fn returned_access_key(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    text.split("<AccessKeyId>")
        .nth(1)
        .and_then(|rest| rest.split("</AccessKeyId>").next())
        .unwrap_or_default()
        .to_owned()
}

/// An account or a region the service does not serve is FAILED_PRECONDITION
/// `REGISTRY_NOT_CONFIGURED`, naming what was asked and nothing else, and no AWS call is made:
/// neither ECR nor STS sees a request.
#[tokio::test]
async fn an_unconfigured_account_or_region_is_refused_before_any_aws_call() {
    let mut org = org(IdentitySource::None, None, false).await;
    let repository = unique("org/app");
    for (account, region) in [
        (ACCOUNT_C, ""),
        (ACCOUNT_B, "ap-south-1"),
        ("", "eu-west-1"),
    ] {
        let mut read = get(&repository, "v1", "");
        read.registry_id = account.into();
        read.region = region.into();
        let status = org.client.get_image(read).await.unwrap_err();
        assert_status(&status, Code::FailedPrecondition, "REGISTRY_NOT_CONFIGURED");
        let info = error_info(&status);
        assert_eq!(info.metadata["registryId"], account);
        assert_eq!(info.metadata["region"], region);
        // Nothing of the file: not the accounts it names, not their roles.
        assert!(!status.message().contains("role"), "{status:?}");
        if account != ACCOUNT_B {
            assert!(!status.message().contains(ACCOUNT_B), "{status:?}");
        }
        let mut write = put(&repository, "v1", &manifest("x"));
        write.registry_id = account.into();
        write.region = region.into();
        let status = org.client.put_image(write).await.unwrap_err();
        assert_status(&status, Code::FailedPrecondition, "REGISTRY_NOT_CONFIGURED");
    }
    assert_eq!(org.ecr.seen().len(), 0, "ECR saw a request");
    assert_eq!(org.sts.seen().len(), 0, "STS saw a request");
    assert_eq!(
        org.calls.calls("BatchGetImage") + org.calls.calls("PutImage"),
        0
    );
}

/// A rule that allows a caller only account B: its write to the service's own account is
/// PERMISSION_DENIED with exactly one audit event (`denied`, `ACCESS_DENIED`, the account
/// named), while its write to B goes through, with one `ok` event.
#[tokio::test]
async fn a_policy_limited_to_one_account_denies_the_other_with_one_event() {
    let policy = format!(
        "rules:\n  - id: ci-in-b\n    principals: [\"spiffe://cluster.local/ns/ci/sa/ci\"]\n    actions: [write, read]\n    repositories: [\"**\"]\n    registries: [\"{ACCOUNT_B}\"]\n"
    );
    let mut org = org(IdentitySource::IstioXfcc, Some(&policy), false).await;
    let repository = unique("org/app");
    create(&admin_in(ACCOUNT_B).await, &repository).await;
    create(&admin_in(MOTO_ACCOUNT).await, &repository).await;
    let text = manifest("policy");
    let status = org
        .client
        .put_image(as_xfcc("ci", put(&repository, "v1", &text)))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
    let events = org.audit.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    let denied = &events[0];
    assert_eq!(denied["type"], "audit");
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["reason"], "ACCESS_DENIED");
    assert_eq!(denied["action"], "write");
    assert_eq!(denied["registryId"], MOTO_ACCOUNT);
    assert_eq!(denied["region"], REGION);
    assert_eq!(denied["principal"], "spiffe://cluster.local/ns/ci/sa/ci");
    assert_eq!(denied["repository"], repository.as_str());
    assert_eq!(org.calls.calls("PutImage"), 0);

    let mut in_b = put(&repository, "v1", &text);
    in_b.registry_id = ACCOUNT_B.into();
    org.client.put_image(as_xfcc("ci", in_b)).await.unwrap();
    let events = org.audit.since(1);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "ok");
    assert_eq!(events[0]["registryId"], ACCOUNT_B);
    assert_eq!(events[0]["digestBefore"], "");
    assert_eq!(events[0]["digestAfter"], digest_of(&text).as_str());
    assert!(!events[0]["ecrRequestId"].as_str().unwrap().is_empty());
}

/// 100 writes from three callers (puts, retags to 5 targets, deletes): exactly one event per
/// put, retag target and deleted id, each naming its caller, with the digests before and after
/// as the emulator had them just before and just after that write.
#[tokio::test]
async fn every_write_and_target_is_one_event_with_its_digests() {
    let mut org = org(IdentitySource::IstioXfcc, None, false).await;
    let repository = unique("org/audited");
    let ecr = admin_in(MOTO_ACCOUNT).await;
    create(&ecr, &repository).await;
    let callers = ["alpha", "beta", "gamma"];
    let tags: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    let mut writes = 0;
    let mut n = 0;
    while writes < 100 {
        let caller = callers[n % 3];
        let from = org.audit.events().len();
        let step = n % 5;
        // What the emulator says before, for every tag this step can touch.
        let mut before = HashMap::new();
        for tag in &tags {
            before.insert(tag.clone(), emulator_digest(&ecr, &repository, tag).await);
        }
        let expected: Vec<(String, String)> = match step {
            // Retag the image of t0 to five targets.
            3 if !before["t0"].is_empty() => {
                let targets: Vec<String> = (1..=5).map(|k| tags[(n + k) % 8].clone()).collect();
                let mut distinct = targets.clone();
                distinct.dedup();
                org.client
                    .retag_image(as_xfcc(
                        caller,
                        RetagImageRequest {
                            repository_name: repository.clone(),
                            source_image_id: Some(ImageIdentifier {
                                image_tag: "t0".into(),
                                image_digest: String::new(),
                            }),
                            target_tags: distinct.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap();
                distinct
                    .into_iter()
                    .map(|t| (t.clone(), before[&t].clone()))
                    .collect()
            }
            // Delete one tag that exists.
            4 if before.values().any(|d| !d.is_empty()) => {
                let tag = tags
                    .iter()
                    .find(|t| !before[*t].is_empty())
                    .unwrap()
                    .clone();
                org.client
                    .batch_delete_image(as_xfcc(caller, delete(&repository, &[(&tag, "")])))
                    .await
                    .unwrap();
                vec![(tag.clone(), before[&tag].clone())]
            }
            _ => {
                let tag = tags[n % 8].clone();
                let text = manifest(&format!("w{n}"));
                org.client
                    .put_image(as_xfcc(caller, put(&repository, &tag, &text)))
                    .await
                    .unwrap();
                vec![(tag.clone(), before[&tag].clone())]
            }
        };
        let events = org.audit.since(from);
        assert_eq!(events.len(), expected.len(), "write {n}: {events:#?}");
        for (event, (tag, digest_before)) in events.iter().zip(&expected) {
            let after = emulator_digest(&ecr, &repository, tag).await;
            assert_eq!(event["imageTag"], tag.as_str(), "write {n}");
            assert_eq!(event["outcome"], "ok", "write {n}: {event}");
            assert_eq!(
                event["digestBefore"],
                digest_before.as_str(),
                "write {n}: {event}"
            );
            assert_eq!(event["digestAfter"], after.as_str(), "write {n}: {event}");
            assert_eq!(
                event["principal"],
                format!("spiffe://cluster.local/ns/{caller}/sa/{caller}").as_str()
            );
            assert_eq!(event["registryId"], MOTO_ACCOUNT);
            assert!(!event["requestId"].as_str().unwrap().is_empty());
            assert!(
                !event["ecrRequestId"].as_str().unwrap().is_empty(),
                "{event}"
            );
        }
        writes += expected.len();
        n += 1;
    }
    assert!(writes >= 100);
    // The metric counts what the trail holds.
    let total = org.audit.events().len();
    assert_eq!(total, writes);
}

/// With writes attributed: each caller's writes to an account use a role session of their
/// own, assumed once, whose RoleSessionName and SourceIdentity name the caller, and each
/// PutImage is signed with its caller's session credentials. Reads keep the shared session.
#[tokio::test]
async fn attributed_writes_are_signed_with_the_callers_own_session() {
    let mut org = org(IdentitySource::IstioXfcc, None, true).await;
    let repository = unique("org/attributed");
    create(&admin_in(ACCOUNT_B).await, &repository).await;
    create(&admin_in(MOTO_ACCOUNT).await, &repository).await;
    let callers = ["alpha", "beta", "gamma"];
    for round in 0..3 {
        for caller in callers {
            for account in [MOTO_ACCOUNT, ACCOUNT_B] {
                let text = manifest(&format!("{caller}-{account}-{round}"));
                let mut request = put(&repository, &format!("{caller}-{round}"), &text);
                request.registry_id = account.into();
                org.client
                    .put_image(as_xfcc(caller, request))
                    .await
                    .unwrap();
            }
        }
    }
    // Sessions: one per (account, caller), and one shared for B's reads and before-reads.
    let assumed = org.assumed_roles();
    let mut keys: HashMap<String, (String, String)> = HashMap::new();
    for call in &assumed {
        let name = form_field(&call.body, "RoleSessionName").unwrap();
        let identity = form_field(&call.body, "SourceIdentity");
        let arn = form_field(&call.body, "RoleArn").unwrap();
        if let Some(identity) = &identity {
            assert_eq!(identity, &name, "SourceIdentity and RoleSessionName agree");
        }
        keys.insert(
            returned_access_key(&call.answer),
            (arn, identity.unwrap_or_default()),
        );
    }
    for caller in callers {
        let principal = format!("spiffe://cluster.local/ns/{caller}/sa/{caller}");
        let name = attribution_name(&principal);
        assert!(name.starts_with(&format!("{caller}.{caller}-")), "{name}");
        for account in [MOTO_ACCOUNT, ACCOUNT_B] {
            let sessions = assumed
                .iter()
                .filter(|c| {
                    form_field(&c.body, "SourceIdentity").as_deref() == Some(name.as_str())
                        && form_field(&c.body, "RoleArn").as_deref() == Some(role(account).as_str())
                })
                .count();
            assert_eq!(
                sessions, 1,
                "{caller} in {account}: one session for three writes"
            );
        }
    }
    assert_eq!(
        assumed.len(),
        callers.len() * 2 + 1,
        "six attributed sessions and B's shared one"
    );
    // Every PutImage was signed by the session of its own caller and account.
    let puts: Vec<_> = org
        .ecr
        .seen()
        .into_iter()
        .filter(|s| s.operation == "PutImage")
        .collect();
    assert_eq!(puts.len(), 18);
    for sent in &puts {
        let body: Value = serde_json::from_slice(&sent.body).unwrap();
        let tag = body["imageTag"].as_str().unwrap();
        let caller = tag.split('-').next().unwrap();
        let (arn, identity) = keys
            .get(sent.access_key())
            .unwrap_or_else(|| panic!("PutImage of {tag} signed by {}", sent.access_key()));
        let principal = format!("spiffe://cluster.local/ns/{caller}/sa/{caller}");
        assert_eq!(identity, &attribution_name(&principal), "{tag}");
        let account = body["registryId"].as_str().unwrap_or(MOTO_ACCOUNT);
        assert_eq!(arn, &role(account), "{tag}");
    }
}

/// STS failing: a read of the other account is UNAVAILABLE `ASSUME_ROLE_FAILED` with RetryInfo,
/// never the caller's fault, and the failure is remembered: a herd of reads meanwhile makes no
/// more AssumeRole calls (no tight loop against STS).
#[tokio::test]
async fn a_failing_sts_is_assume_role_failed_and_not_asked_again_at_once() {
    let mut org = org_with(IdentitySource::None, None, false, |operation, _| {
        if operation == "AssumeRole" {
            Fault::ServerError
        } else {
            Fault::Forward
        }
    })
    .await;
    let repository = unique("org/app");
    for _ in 0..20 {
        let mut read = get(&repository, "v1", "");
        read.registry_id = ACCOUNT_B.into();
        let status = org.client.get_image(read).await.unwrap_err();
        assert_status(&status, Code::Unavailable, "ASSUME_ROLE_FAILED");
        use tonic_types::StatusExt;
        assert!(status.get_details_retry_info().is_some(), "{status:?}");
        assert!(!status.message().contains("arn:aws"), "{status:?}");
    }
    // The SDK's own retries of one credentials resolution aside, STS was asked once.
    let asked = org.assumed_roles().len();
    assert!(
        asked <= 3,
        "{asked} AssumeRole calls for 20 reads within the cool-down"
    );
    assert_eq!(
        org.ecr.seen().len(),
        0,
        "nothing reached ECR without credentials"
    );
}
