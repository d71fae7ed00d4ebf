//! The API layer: the ImageService RPCs. One handler skeleton ([`service`]) reads the method
//! table ([`methods`]), validates ([`validate`]), authorizes (access) and calls the registry;
//! the API's errors map to statuses in one place ([`error`]). Uses access, registry and domain.

pub mod audit;
pub mod error;
pub mod methods;
pub mod paging;
pub mod pb;
pub mod platform;
pub mod retag;
pub mod service;
pub mod validate;
pub mod watch;
