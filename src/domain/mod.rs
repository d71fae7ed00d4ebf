//! The domain: value types every layer shares and none depends on anything above: image
//! names, tags, digests and manifests as exact bytes ([`image`]), the call context ([`call`]),
//! bounded text ([`text`]), randomness for spreading work in time ([`random`]).

pub mod call;
pub mod image;
pub mod random;
pub mod text;
