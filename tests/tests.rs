//! The integration tests, compiled into one binary. They run against the real dockerd,
//! sshd and TLS endpoint that `scripts/testinfra up` starts.

mod util;

mod docker;
