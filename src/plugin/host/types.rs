//! `capstan:plugin/types`: no functions, only the error conversion the trappable error
//! type needs — a [`HostError::Wit`] becomes the WIT value, a [`HostError::Trap`] traps.

use super::{HostError, RunState};
use crate::plugin::bindings::capstan::plugin::types::{Error, Host};

impl Host for RunState {
    fn convert_error(&mut self, err: HostError) -> wasmtime::Result<Error> {
        match err {
            HostError::Wit(e) => Ok(e),
            HostError::Trap(e) => Err(e),
        }
    }
}
