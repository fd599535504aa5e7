//! Deliveries already accepted, so neither a sender's retry nor a captured request
//! replayed by someone else runs a plugin twice: remembered by the sender's delivery id
//! and by the verified signature, each claimed atomically by the first copy to arrive.
//!
//! They are storage, kept (with the claim, accept, release and purge operations, and
//! the per-hook cap) by [`crate::store::deliveries`]; this module names them for the
//! webhook trigger.

pub use crate::store::deliveries::{ClaimResult, Deliveries};
