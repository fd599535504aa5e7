//! Creating the cluster's streams, consumers and buckets right after NATS elected a
//! leader (a server restarted, the JetStream meta leader moved) can fail for a moment:
//! "no suitable peers for placement", "JetStream system temporarily unavailable", a
//! request that timed out while the new leader settles. An engine starting at that
//! moment once exited with such an error. [`with_retry`] tries again with a growing
//! pause for a bounded time ([`CREATE_PATIENCE`]) when [`is_transient`] says the error
//! can pass, and fails at once with the clear error otherwise (a stream that exists
//! with another configuration, no permission).

use std::future::Future;
use std::time::{Duration, Instant};

use super::ClusterError;

/// How long creation is retried before the error is the answer.
pub const CREATE_PATIENCE: Duration = Duration::from_secs(30);
/// The first pause between two tries; doubled up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Whether a failure to create or look up a stream, consumer or bucket may pass by
/// itself (a leader election under way), judged on the error's text as the client and
/// server give it.
pub fn is_transient(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    const PASSING: [&str; 10] = [
        "no suitable peers",
        "temporarily unavailable",
        "timed out",
        "timeout",
        "no responders",
        "no leader",
        "leader not",
        "not current",
        "jetstream not ready",
        "cluster not available",
    ];
    const LASTING: [&str; 4] = [
        "already in use",
        "different configuration",
        "permission",
        "authorization",
    ];
    !LASTING.iter().any(|p| d.contains(p)) && PASSING.iter().any(|p| d.contains(p))
}

/// The pause before try number `attempt` (1 = the first retry).
fn pause(attempt: u32) -> Duration {
    FIRST_PAUSE
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(MAX_PAUSE)
}

/// The KV bucket `config.bucket`, created with `config` when missing, looked up and
/// created under [`with_retry`] like the streams: every bucket of the cluster (nodes,
/// leases, shared state) is made right after a leader election as often as a stream.
pub async fn kv_bucket(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
    what: &'static str,
) -> Result<async_nats::jetstream::kv::Store, ClusterError> {
    with_retry(what, || {
        let config = config.clone();
        async move {
            match js.get_key_value(&config.bucket).await {
                Ok(kv) => Ok(kv),
                Err(_) => js.create_key_value(config).await.map_err(|e| e.to_string()),
            }
        }
    })
    .await
}

/// Runs `op` until it succeeds, fails for good, or [`CREATE_PATIENCE`] has passed.
pub async fn with_retry<T, F, Fut>(what: &'static str, op: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    with_retry_for(what, CREATE_PATIENCE, op).await
}

async fn with_retry_for<T, F, Fut>(
    what: &'static str,
    patience: Duration,
    mut op: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(detail) => {
                attempt += 1;
                let wait = pause(attempt);
                if !is_transient(&detail) || started.elapsed() + wait > patience {
                    return Err(ClusterError::Nats { what, detail });
                }
                tracing::warn!(what, attempt, error = %detail, "cluster: NATS is not ready (a leader election?); trying again");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_election_is_waited_out_and_a_wrong_configuration_is_not() {
        for passing in [
            "insufficient resources: no suitable peers for placement",
            "JetStream system temporarily unavailable",
            "jetstream error: timed out: didn't receive a response",
            "request timeout",
            "no responders",
        ] {
            assert!(is_transient(passing), "{passing}");
        }
        for lasting in [
            "stream name already in use with a different configuration",
            "Permissions Violation for Publish to \"$JS.API.STREAM.CREATE.X\"",
            "authorization violation",
            "subjects overlap with an existing stream",
            "insufficient resources",
            "",
        ] {
            assert!(!is_transient(lasting), "{lasting}");
        }
    }

    #[test]
    fn pauses_grow_and_stay_bounded() {
        assert_eq!(pause(1), FIRST_PAUSE);
        assert_eq!(pause(2), FIRST_PAUSE * 2);
        assert_eq!(pause(3), FIRST_PAUSE * 4);
        assert_eq!(pause(10), MAX_PAUSE);
        assert_eq!(pause(u32::MAX), MAX_PAUSE);
    }

    #[tokio::test]
    async fn retries_a_passing_failure_until_it_passes_and_not_a_lasting_one() {
        let mut tries = 0;
        let v = with_retry_for("creating a stream", Duration::from_secs(5), || {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err("no suitable peers for placement".to_string())
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let mut tries = 0;
        let e = with_retry_for("creating a stream", Duration::from_secs(5), || {
            tries += 1;
            async { Err::<(), _>("stream name already in use".to_string()) }
        })
        .await
        .unwrap_err();
        assert_eq!(tries, 1);
        assert!(e.to_string().contains("creating a stream"), "{e}");

        // Bounded: a failure that never passes ends within the patience.
        let started = Instant::now();
        let e = with_retry_for("creating a stream", Duration::from_millis(600), || async {
            Err::<(), _>("timed out".to_string())
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains("timed out"), "{e}");
    }
}
