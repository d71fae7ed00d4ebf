//! The method table: for each ImageService RPC, in one place, what every layer needs to know
//! about it. Admission reads its size limit, the codec its size limit by request type, the
//! service the actions it authorizes, and the docs (held to this table by `tests/docs.rs`) and
//! the client retry policy whether it is safe to retry.
//!
//! The handler of each method is `ImageService`'s trait method of the same name (tonic's
//! generated router dispatches by path; a method missing from the table is a compile error in
//! `service.rs`, which looks its entry up by name).

use crate::access::authz::Action;
use crate::domain::image::MAX_MANIFEST_BYTES;

/// The largest PutImage: a manifest at ECR's 4 MiB limit plus room for the other fields.
/// tonic's default (4 MiB for the whole message) would refuse a legal manifest before
/// validation could say which field is too large.
pub const MAX_PUT_REQUEST_BYTES: usize = MAX_MANIFEST_BYTES + 64 * 1024;
/// The largest BatchDeleteImage: 1,000 ids of a 300-character tag and a digest (~384 KB).
pub const MAX_DELETE_REQUEST_BYTES: usize = 512 * 1024;
/// The largest of every other request. The largest legal one is under 32 KiB (100 accepted
/// media types of 255 bytes, or 20 target tags of 300, plus the identifiers); twice that leaves
/// room for fields added later.
pub const MAX_SMALL_REQUEST_BYTES: usize = 64 * 1024;

/// One RPC of the ImageService.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The RPC's name in the proto (`GetImage`).
    pub name: &'static str,
    /// Its request message's name (`GetImageRequest`), which the codec knows it by.
    pub request: &'static str,
    /// The largest request accepted, encoded, without gRPC's 5-byte prefix: a larger one is
    /// refused on its length prefix, before its body is read or decoded.
    pub request_limit: usize,
    /// What the caller must be allowed on the repository, each checked.
    pub actions: &'static [Action],
    /// Whether a client may send it again after UNAVAILABLE without asking anyone: a repeat
    /// has the effect of one call.
    pub idempotent: bool,
    /// Whether the answer is a stream (WatchTag).
    pub server_streaming: bool,
}

/// `PutImage`.
pub const PUT_IMAGE: Method = Method {
    name: "PutImage",
    request: "PutImageRequest",
    request_limit: MAX_PUT_REQUEST_BYTES,
    actions: &[Action::Write],
    // The same bytes under the same tag again is ALREADY_EXISTED, nothing more.
    idempotent: true,
    server_streaming: false,
};

/// `GetImage`.
pub const GET_IMAGE: Method = Method {
    name: "GetImage",
    request: "GetImageRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    actions: &[Action::Read],
    idempotent: true,
    server_streaming: false,
};

/// `ResolveImage`.
pub const RESOLVE_IMAGE: Method = Method {
    name: "ResolveImage",
    request: "ResolveImageRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    actions: &[Action::Read],
    idempotent: true,
    server_streaming: false,
};

/// `RetagImage`.
pub const RETAG_IMAGE: Method = Method {
    name: "RetagImage",
    request: "RetagImageRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    // Read on the source, write on the targets: one repository, both actions.
    actions: &[Action::Read, Action::Write],
    // Targets already at the image are ALREADY_EXISTED; a retry completes the rest.
    idempotent: true,
    server_streaming: false,
};

/// `BatchDeleteImage`.
pub const BATCH_DELETE_IMAGE: Method = Method {
    name: "BatchDeleteImage",
    request: "BatchDeleteImageRequest",
    request_limit: MAX_DELETE_REQUEST_BYTES,
    actions: &[Action::Delete],
    // The end state of a repeat is the same, but its answer is not: ids deleted by the
    // first call come back as failures (ImageNotFound). The caller decides.
    idempotent: false,
    server_streaming: false,
};

/// `ListImages`.
pub const LIST_IMAGES: Method = Method {
    name: "ListImages",
    request: "ListImagesRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    actions: &[Action::Read],
    idempotent: true,
    server_streaming: false,
};

/// `DescribeImages`.
pub const DESCRIBE_IMAGES: Method = Method {
    name: "DescribeImages",
    request: "DescribeImagesRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    actions: &[Action::Read],
    idempotent: true,
    server_streaming: false,
};

/// `WatchTag`.
pub const WATCH_TAG: Method = Method {
    name: "WatchTag",
    request: "WatchTagRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    actions: &[Action::Read],
    // A watch holds no state of the caller's: reconnecting is watching again.
    idempotent: true,
    server_streaming: true,
};

/// `ListReferrers`.
pub const LIST_REFERRERS: Method = Method {
    name: "ListReferrers",
    request: "ListReferrersRequest",
    request_limit: MAX_SMALL_REQUEST_BYTES,
    actions: &[Action::Read],
    idempotent: true,
    server_streaming: false,
};

/// Every RPC, in the proto's order.
pub const METHODS: [Method; 9] = [
    PUT_IMAGE,
    GET_IMAGE,
    RESOLVE_IMAGE,
    RETAG_IMAGE,
    BATCH_DELETE_IMAGE,
    LIST_IMAGES,
    DESCRIBE_IMAGES,
    WATCH_TAG,
    LIST_REFERRERS,
];

/// The retry policy of the shipped service config: five attempts in all. Where the service
/// says when (`grpc-retry-pushback-ms`, from its RetryInfo) clients wait exactly that; the
/// policy's own backoff (the first retry within 50 ms, doubling to at most 2 s) applies only
/// where it says nothing (ECR failing after the service's own retries). Only UNAVAILABLE: the
/// one code whose answers say nothing was done (AIP-194).
pub const RETRY_MAX_ATTEMPTS: u32 = 5;

/// The gRPC service config clients load (`proto/imageservice/v1/service_config.json`, generated
/// from this table, a test holds the file to it): every method waits for a ready connection
/// (a rollout's churn is waited out within the deadline instead of failing at once); the
/// methods safe to repeat retry UNAVAILABLE. Retries are throttled client-side (gRFC A6's
/// token bucket), so a struggling service is not met with a storm of them.
pub fn service_config() -> serde_json::Value {
    let names = |retry: bool| -> Vec<serde_json::Value> {
        METHODS
            .iter()
            .filter(|m| m.idempotent == retry)
            .map(|m| {
                serde_json::json!({
                    "service": crate::api::pb::image_service_server::SERVICE_NAME,
                    "method": m.name,
                })
            })
            .collect()
    };
    serde_json::json!({
        "methodConfig": [
            {
                "name": names(true),
                "waitForReady": true,
                "retryPolicy": {
                    "maxAttempts": RETRY_MAX_ATTEMPTS,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {
                "name": names(false),
                "waitForReady": true,
            },
        ],
        // Retries stop while more than 50 of the channel's recent calls failed (a success
        // earns back a tenth): a burst shed by a busy service retries, a dead one is not
        // hammered.
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    })
}

/// The method named `name` (`GetImage`). Every RPC's name is in the table: a miss is a bug
/// the table's tests catch.
pub fn named(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

/// The method of request path `path` (`/imageservice.v1.ImageService/GetImage`).
pub fn by_path(path: &str) -> Option<&'static Method> {
    named(path.rsplit('/').next()?)
}

/// The method whose request message is named `request` (`GetImageRequest`).
pub fn by_request(request: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.request == request)
}

/// The largest request accepted on `path`: its method's limit, the smallest for a path that
/// names no method (tonic answers UNIMPLEMENTED; its body need not be large).
pub fn request_limit(path: &str) -> usize {
    by_path(path).map_or(MAX_SMALL_REQUEST_BYTES, |m| m.request_limit)
}

/// The largest request of any method: the server's decoding limit.
pub const MAX_REQUEST_BYTES: usize = MAX_PUT_REQUEST_BYTES;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// The proto's ImageService, from the compiled descriptor set.
    fn image_service() -> prost_types::ServiceDescriptorProto {
        let set =
            prost_types::FileDescriptorSet::decode(crate::api::pb::FILE_DESCRIPTOR_SET).unwrap();
        set.file
            .into_iter()
            .flat_map(|f| f.service)
            .find(|s| s.name() == "ImageService")
            .unwrap()
    }

    /// The table and the proto name the same RPCs, in the same order, with the same request
    /// types and streaming.
    #[test]
    fn the_table_is_the_proto() {
        let service = image_service();
        let proto: Vec<(&str, &str, bool)> = service
            .method
            .iter()
            .map(|m| {
                let input = m.input_type().rsplit('.').next().unwrap();
                (m.name(), input, m.server_streaming())
            })
            .collect();
        let table: Vec<(&str, &str, bool)> = METHODS
            .iter()
            .map(|m| (m.name, m.request, m.server_streaming))
            .collect();
        assert_eq!(proto, table);
    }

    /// `rpc Name(Request) returns (Response)` lines of the first ```proto block of `text`:
    /// (name, request, response, streaming).
    fn documented_rpcs(text: &str) -> Vec<(String, String, String, bool)> {
        let block = text
            .split("```proto")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        block
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| {
                let (name, rest) = l.split_once('(').unwrap();
                let (request, rest) = rest.split_once(')').unwrap();
                let response = rest.split('(').nth(1).unwrap().split(')').next().unwrap();
                let streaming = response.starts_with("stream ");
                let response = response.trim_start_matches("stream ");
                (name.into(), request.into(), response.into(), streaming)
            })
            .collect()
    }

    fn with_commas(n: usize) -> String {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }

    /// The README's and docs/api.md's service blocks are the proto's service, and the limits
    /// table of docs/api.md is this table: a method added, a limit or an action changed, and
    /// the docs that say otherwise fail here.
    #[test]
    fn the_docs_hold_to_the_proto_and_the_table() {
        let service = image_service();
        let short = |t: &str| t.rsplit('.').next().unwrap().to_owned();
        let proto: Vec<(String, String, String, bool)> = service
            .method
            .iter()
            .map(|m| {
                let streaming = m.server_streaming();
                (
                    m.name().into(),
                    short(m.input_type()),
                    short(m.output_type()),
                    streaming,
                )
            })
            .collect();
        let readme = include_str!("../../README.md");
        let api = include_str!("../../docs/api.md");
        assert_eq!(documented_rpcs(readme), proto, "README.md's service block");
        assert_eq!(documented_rpcs(api), proto, "docs/api.md's service block");
        for method in &METHODS {
            let actions: Vec<&str> = method.actions.iter().map(|a| a.as_str()).collect();
            let row = format!(
                "| `{}` | {} bytes | {} | {} |",
                method.name,
                with_commas(method.request_limit),
                actions.join(", "),
                if method.idempotent { "yes" } else { "no" }
            );
            assert!(api.contains(&row), "docs/api.md lacks the row {row}");
        }
    }

    /// The shipped service config is the method table's: it cannot drift from it.
    #[test]
    fn the_shipped_service_config_is_the_method_tables() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proto/imageservice/v1/service_config.json"
        );
        let generated = serde_json::to_string_pretty(&service_config()).unwrap() + "\n";
        if std::env::var_os("WRITE_SERVICE_CONFIG").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let shipped = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            shipped, generated,
            "{path} is not the method table's (WRITE_SERVICE_CONFIG=1 cargo test --lib \
             service_config rewrites it)"
        );
    }

    #[test]
    fn lookups_find_each_method() {
        for method in &METHODS {
            let path = format!("/imageservice.v1.ImageService/{}", method.name);
            assert_eq!(by_path(&path), Some(method));
            assert_eq!(by_request(method.request), Some(method));
            assert_eq!(request_limit(&path), method.request_limit);
            assert!(method.request_limit <= MAX_REQUEST_BYTES);
        }
        assert_eq!(
            request_limit("/grpc.health.v1.Health/Check"),
            MAX_SMALL_REQUEST_BYTES
        );
    }
}
