//! The access layer: who calls ([`identity`], from exactly one configured source) and what
//! they may do ([`authz`]). Uses the domain only.

pub mod authz;
pub mod identity;
pub mod verify;
