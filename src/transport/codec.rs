//! The protobuf codec: prost's, except that
//! - a request field that is not valid UTF-8 is the caller's INVALID_ARGUMENT naming that field,
//!   not the INTERNAL that gRPC uses for parse errors (manifests are `string`s, and a client that
//!   sends raw bytes in one deserves to be told which);
//! - a request larger than its type can legally be is refused before it is decoded: decoding
//!   100,000 strings costs the runtime's workers tens of milliseconds each, time in which health
//!   checks and every other caller wait.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::api::error::{Error, Reason, Violation};

/// The message type's own name (`GetImageRequest`), without its module path.
fn message_name<U>() -> &'static str {
    let name = std::any::type_name::<U>();
    name.rsplit("::").next().unwrap_or(name)
}

/// The size limit of request type `U`, from the method table; `None` for a response.
fn size_limit<U>() -> Option<usize> {
    crate::api::methods::by_request(message_name::<U>()).map(|m| m.request_limit)
}

/// [`ProstCodec`] with request decode errors mapped to field violations.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = Encoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        Encoder(self.0.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// The first size of a response's encode buffer. tonic starts every response body with an
/// 8 KiB buffer and keeps it for the body's life: on a long WatchTag stream of small messages
/// that is most of what a watcher costs (10,000 watchers: +125 MiB). 1 KiB holds every message
/// but GetImage's, whose buffer grows to its manifest once.
const ENCODE_BUFFER_BYTES: usize = 1024;
/// tonic's own: a stream yields to the runtime after this much encoded data.
const ENCODE_YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstEncoder`] with a small first buffer ([`ENCODE_BUFFER_BYTES`]).
#[derive(Debug)]
pub struct Encoder<T>(ProstEncoder<T>);

impl<T: Message> tonic::codec::Encoder for Encoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        // Room for the whole message at once: grown by prost's writes, a 2.6 KB GetImage
        // answer in the small first buffer was copied twice more (1 KiB -> 2 KiB -> 4 KiB).
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(ENCODE_BUFFER_BYTES, ENCODE_YIELD_THRESHOLD)
    }
}

/// [`ProstDecoder`] with request decode errors mapped to field violations.
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf as _;
        if let Some(limit) = size_limit::<U>()
            && buf.remaining() > limit
        {
            return Err(Error::RequestTooLarge {
                bytes: buf.remaining(),
                limit,
            }
            .into());
        }
        self.0.decode(buf).map_err(|status| {
            invalid_request_field(status.message())
                .or_else(|| undecodable_request::<U>(status.message()))
                .unwrap_or(status)
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// A request that is not protobuf at all (wrong wire types, truncated fields) is the caller's
/// INVALID_ARGUMENT, with prost's words for what is wrong, not the INTERNAL that reads as a server
/// bug. A response that cannot be decoded (on the client side) stays INTERNAL.
fn undecodable_request<U>(message: &str) -> Option<Status> {
    if !message_name::<U>().ends_with("Request") {
        return None;
    }
    let description = message
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(message);
    Some(
        Error::invalid(
            Reason::InvalidField,
            vec![Violation::new(
                "request",
                format!("is not a valid protobuf message: {description}"),
            )],
        )
        .into(),
    )
}

/// Reads prost's error text, `failed to decode Protobuf message: GetImageRequest.image_id:
/// ImageIdentifier.image_tag: invalid string value: data is not UTF-8 encoded`, into the field
/// path `image_id.image_tag`. Only request messages are the caller's fault; anything else keeps
/// gRPC's INTERNAL.
fn invalid_request_field(message: &str) -> Option<Status> {
    let rest = message.strip_prefix("failed to decode Protobuf message: ")?;
    let mut path = Vec::new();
    let mut description = rest;
    for (i, segment) in rest.split(": ").enumerate() {
        match segment.split_once('.') {
            Some((message_name, field))
                if !field.contains(' ') && (i > 0 || message_name.ends_with("Request")) =>
            {
                path.push(field);
                description = &rest[rest.find(segment)? + segment.len()..];
            }
            _ => break,
        }
    }
    if path.is_empty() {
        return None;
    }
    let description = description.trim_start_matches(": ");
    let problem = if description.contains("UTF-8") {
        "must be valid UTF-8".to_owned()
    } else {
        format!("cannot be decoded: {description}")
    };
    Some(
        Error::invalid(
            Reason::InvalidField,
            vec![Violation::new(path.join("."), problem)],
        )
        .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    #[test]
    fn utf8_errors_name_the_request_field() {
        let status = invalid_request_field(
            "failed to decode Protobuf message: GetImageRequest.image_id: \
             ImageIdentifier.image_tag: invalid string value: data is not UTF-8 encoded",
        )
        .unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "image_id.image_tag");
        assert_eq!(violations[0].description, "must be valid UTF-8");
    }

    #[test]
    fn responses_and_unknown_texts_keep_internal() {
        for text in [
            "failed to decode Protobuf message: GetImageResponse.image: Image.image_manifest: \
             invalid string value: data is not UTF-8 encoded",
            "failed to decode Protobuf message: buffer underflow",
            "something else",
        ] {
            assert!(invalid_request_field(text).is_none(), "{text}");
        }
    }
}
