//! The transport layer: how requests arrive and answers leave. The listener and the one tower
//! stack ([`server`]), connections ([`connection`], [`tls`], served by [`http2`]), admission
//! (bodies, byte budget, request slots, the call context), the codec, the admin endpoint and
//! the shutdown signal.
//! It uses every layer below; nothing below uses it.

pub mod admin;
pub mod admission;
pub mod codec;
pub mod connection;
pub mod http2;
pub mod server;
pub mod shutdown;
pub mod tls;
