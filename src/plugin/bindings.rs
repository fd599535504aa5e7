//! The host side of the `capstan:plugin` WIT world: one `bindgen!` for the whole world.
//!
//! Imports are `async | trappable`: every host function is an `async fn` that returns
//! `wasmtime::Result<…>`, so a host bug (an `Err` that is not a WIT error) traps the
//! guest, while everything a plugin should handle (`denied`, `not-found`, …) is a WIT
//! value. Functions whose WIT result is `result<T, error>` return
//! `Result<T, HostError>`: a [`HostError::Wit`] goes back to the guest as a value, a
//! [`HostError::Trap`] ends the run.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
    imports: { default: async | trappable },
    exports: { default: async },
    trappable_error_type: {
        "capstan:plugin/types.error" => crate::plugin::host::HostError,
    },
});

pub use self::capstan::plugin::docker as wit_docker;
pub use self::capstan::plugin::host as wit_host;
pub use self::capstan::plugin::types::{DockerError, Error as WitError};
