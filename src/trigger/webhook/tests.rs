//! Deliveries as senders make them: GitHub-style signatures, Slack-style signed
//! timestamps, bearer tokens; each refusal checked for its status and message.

use http_body_util::BodyExt;

use super::*;
use crate::vault::{Argon2Params, KeySource};

const SECRET: &str = "It's a Secret to Everybody";

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn keys(current: &str, previous: Option<&str>) -> HookKeys {
    HookKeys {
        current: Secret::from_str_owned(current.into()),
        previous: previous.map(|p| Secret::from_str_owned(p.into())),
    }
}

fn spec(toml_text: &str) -> HookSpec {
    toml::from_str::<HookConfig>(toml_text)
        .unwrap()
        .validate()
        .unwrap()
}

fn config_error(toml_text: &str) -> String {
    match toml::from_str::<HookConfig>(toml_text) {
        Ok(c) => c.validate().unwrap_err().to_string(),
        Err(e) => e.to_string(),
    }
}

fn hooks_with(store: &Store, toml_text: &str, k: HookKeys) -> Webhooks {
    let hooks = Webhooks::open(store).unwrap();
    hooks.install("deploy", spec(toml_text), k).unwrap();
    hooks
}

fn github(store: &Store) -> Webhooks {
    hooks_with(
        store,
        "name = \"gh\"\nauth = \"hmac-sha256\"\ndelivery_header = \"X-GitHub-Delivery\"\n",
        keys(SECRET, None),
    )
}

fn hmac_hex(secret: &str, payload: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::try_from(k.to_ascii_lowercase()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn signed(secret: &str, body: &str, delivery: &str) -> HeaderMap {
    headers(&[
        (
            "X-Hub-Signature-256",
            &format!("sha256={}", hmac_hex(secret, body.as_bytes())),
        ),
        ("X-GitHub-Delivery", delivery),
        ("Content-Type", "application/json"),
    ])
}

fn verify(
    hooks: &Webhooks,
    name: &str,
    h: &HeaderMap,
    body: &str,
) -> Result<Admission, WebhookError> {
    hooks.verify(name, h, Bytes::from(body.to_string()))
}

async fn json_of(answer: impl IntoResponse) -> (StatusCode, HeaderMap, serde_json::Value) {
    let resp = answer.into_response();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, serde_json::from_slice(&bytes).unwrap())
}

async fn deliver(
    hooks: &Webhooks,
    name: &str,
    h: &HeaderMap,
    body: &str,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let run = RunId::new();
    let resp = receive(
        hooks,
        name,
        h,
        Bytes::from(body.to_string()),
        |_| async move { Ok(run) },
    )
    .await;
    json_of(resp).await
}

#[tokio::test]
async fn a_github_signed_delivery_is_accepted_with_its_run_id_and_no_credentials_reach_the_plugin()
{
    let (_dir, store) = store();
    let hooks = github(&store);
    let body = r#"{"action":"published"}"#;
    let mut h = signed(SECRET, body, "d-1");
    h.insert(AUTHORIZATION, HeaderValue::from_static("Basic c2VjcmV0"));
    h.insert("cookie", HeaderValue::from_static("session=1"));
    h.insert(API_TOKEN_HEADER, HeaderValue::from_static("cap_x_y"));
    let run = RunId::new();
    let mut seen = None;
    let resp = receive(&hooks, "gh", &h, Bytes::from(body), |d| {
        seen = Some(d);
        async move { Ok(run) }
    })
    .await;
    let (status, _, json) = json_of(resp).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(json["status"], "accepted");
    assert_eq!(json["run_id"], run.to_string());
    let d = seen.unwrap();
    assert_eq!((d.hook.as_str(), d.plugin.as_str()), ("gh", "deploy"));
    assert_eq!(d.delivery_id.as_deref(), Some("d-1"));
    assert_eq!(&d.body[..], body.as_bytes());
    let names: Vec<_> = d.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"x-github-delivery") && names.contains(&"content-type"));
    assert!(
        !names.contains(&"authorization")
            && !names.contains(&"cookie")
            && !names.contains(&"x-capstan-token"),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_missing_wrong_or_malformed_signature_answers_401() {
    let (_dir, store) = store();
    let hooks = github(&store);
    let body = r#"{"a":1}"#;
    let cases: Vec<(HeaderMap, &str)> = vec![
        (
            headers(&[("X-GitHub-Delivery", "d")]),
            "missing signature header x-hub-signature-256",
        ),
        (
            signed("another secret", body, "d"),
            "does not match the body",
        ),
        (signed(SECRET, r#"{"a":2}"#, "d"), "does not match the body"),
        (
            headers(&[
                ("X-Hub-Signature-256", "sha256=zz"),
                ("X-GitHub-Delivery", "d"),
            ]),
            "does not match the body",
        ),
        (
            headers(&[
                ("X-Hub-Signature-256", &hmac_hex(SECRET, body.as_bytes())),
                ("X-GitHub-Delivery", "d"),
            ]),
            "does not match the body",
        ),
    ];
    for (h, expected) in cases {
        let (status, _, json) = deliver(&hooks, "gh", &h, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
        assert_eq!(json["error"]["kind"], "unauthorized");
        let msg = json["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expected), "{msg}");
    }
}

#[test]
fn a_configured_header_and_prefix_are_used_and_a_bare_digest_works() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"gitea\"\nauth = \"hmac-sha256\"\nsignature_header = \"X-Gitea-Signature\"\nsignature_prefix = \"\"\n",
        keys(SECRET, None),
    );
    let body = "payload";
    let h = headers(&[(
        "x-gitea-signature",
        &hmac_hex(SECRET, body.as_bytes()).to_uppercase(),
    )]);
    assert!(matches!(
        verify(&hooks, "gitea", &h, body),
        Ok(Admission::Run(_))
    ));
}

#[test]
fn either_of_two_secrets_verifies_during_a_rotation_and_a_retired_one_does_not() {
    let (dir, store) = store();
    let key_file = dir.path().join("vault.key");
    crate::vault::generate_key_file(&key_file).unwrap();
    let vault = Vault::init(&store, &KeySource::KeyFile(key_file), Argon2Params::DEFAULT).unwrap();
    assert!(matches!(
        HookKeys::load(&vault, "gh"),
        Err(HookError::NoSecret(_))
    ));
    HookKeys::set(&vault, "gh", &Secret::from_str_owned("old".into())).unwrap();
    let hooks = Webhooks::open(&store).unwrap();
    hooks
        .install(
            "deploy",
            spec("name = \"gh\"\nauth = \"hmac-sha256\"\n"),
            HookKeys::load(&vault, "gh").unwrap(),
        )
        .unwrap();
    let body = "{}";
    let by = |secret: &str| {
        headers(&[(
            "X-Hub-Signature-256",
            &format!("sha256={}", hmac_hex(secret, body.as_bytes())),
        )])
    };
    assert!(verify(&hooks, "gh", &by("old"), body).is_ok());

    HookKeys::rotate(&vault, "gh", &Secret::from_str_owned("new".into())).unwrap();
    assert!(hooks.set_keys("gh", HookKeys::load(&vault, "gh").unwrap()));
    assert!(
        verify(&hooks, "gh", &by("new"), body).is_ok(),
        "the new secret verifies"
    );
    assert!(
        verify(&hooks, "gh", &by("old"), body).is_ok(),
        "the old one still does"
    );
    assert!(matches!(
        verify(&hooks, "gh", &by("other"), body),
        Err(WebhookError::BadSignature(_))
    ));

    assert!(HookKeys::retire_previous(&vault, "gh").unwrap());
    hooks.set_keys("gh", HookKeys::load(&vault, "gh").unwrap());
    assert!(verify(&hooks, "gh", &by("new"), body).is_ok());
    assert!(matches!(
        verify(&hooks, "gh", &by("old"), body),
        Err(WebhookError::BadSignature(_))
    ));
    assert!(!HookKeys::retire_previous(&vault, "gh").unwrap());
    assert_eq!(HookKeys::remove(&vault, "gh").unwrap(), 1);
    assert!(format!("{:?}", HookKeys::load(&vault, "gh")).contains("NoSecret"));
}

#[tokio::test]
async fn a_bearer_hook_accepts_either_token_and_refuses_a_missing_or_wrong_one_with_401() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"ci\"\nauth = \"bearer\"\n",
        keys("tok-new", Some("tok-old")),
    );
    for good in ["Bearer tok-new", "bearer tok-old", "BEARER  tok-new "] {
        let h = headers(&[("Authorization", good)]);
        assert!(
            matches!(verify(&hooks, "ci", &h, ""), Ok(Admission::Run(_))),
            "{good}"
        );
    }
    for (h, expected) in [
        (headers(&[]), "missing bearer token"),
        (
            headers(&[("Authorization", "Basic dG9r")]),
            "missing bearer token",
        ),
        (
            headers(&[("Authorization", "Bearer ")]),
            "missing bearer token",
        ),
        (
            headers(&[("Authorization", "Bearer tok-ne")]),
            "does not match",
        ),
        (
            headers(&[("Authorization", "Bearer tok-new-and-more")]),
            "does not match",
        ),
    ] {
        let (status, _, json) = deliver(&hooks, "ci", &h, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{json}"
        );
    }
}

fn slack(store: &Store) -> Webhooks {
    hooks_with(
        store,
        "name = \"slack\"\nauth = \"hmac-sha256\"\nsignature_header = \"X-Slack-Signature\"\n\
         signature_prefix = \"v0=\"\nsigned_payload = \"v0:{timestamp}:{body}\"\n\
         timestamp_header = \"X-Slack-Request-Timestamp\"\nreplay_window = \"5m\"\n",
        keys(SECRET, None),
    )
}

fn slack_headers(ts: &str, body: &str) -> HeaderMap {
    let sig = hmac_hex(SECRET, format!("v0:{ts}:{body}").as_bytes());
    headers(&[
        ("X-Slack-Signature", &format!("v0={sig}")),
        ("X-Slack-Request-Timestamp", ts),
    ])
}

#[test]
fn a_signed_timestamp_inside_the_window_is_accepted() {
    let (_dir, store) = store();
    let hooks = slack(&store);
    let now = Utc::now();
    for ts in [
        now.timestamp().to_string(),
        (now.timestamp() - 299).to_string(),
        (now.timestamp_millis() + 60_000).to_string(),
        now.to_rfc3339(),
    ] {
        let h = slack_headers(&ts, "x=1");
        assert!(
            matches!(verify(&hooks, "slack", &h, "x=1"), Ok(Admission::Run(_))),
            "{ts}"
        );
    }
}

#[tokio::test]
async fn a_stale_future_missing_or_unreadable_timestamp_answers_401_and_says_which() {
    let (_dir, store) = store();
    let hooks = slack(&store);
    let now = Utc::now().timestamp();
    let cases = [
        (
            slack_headers(&(now - 400).to_string(), "b"),
            "timestamp too old: sent 6m40s ago",
            "stale",
        ),
        (
            slack_headers(&(now + 600).to_string(), "b"),
            "ahead of this host's clock, at most 5m is accepted",
            "stale",
        ),
        (
            slack_headers("yesterday", "b"),
            "neither Unix time nor an RFC 3339 date",
            "unauthorized",
        ),
        (
            headers(&[("X-Slack-Signature", "v0=00")]),
            "missing timestamp header x-slack-request-timestamp",
            "unauthorized",
        ),
    ];
    for (h, expected, kind) in cases {
        let (status, _, json) = deliver(&hooks, "slack", &h, "b").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
        assert_eq!(json["error"]["kind"], kind);
        let msg = json["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expected), "{msg}");
    }
    // A replayed request with a fresh timestamp but the old signature fails the signature.
    let mut h = slack_headers(&(now - 400).to_string(), "b");
    h.insert("x-slack-request-timestamp", HeaderValue::from(now));
    assert!(matches!(
        verify(&hooks, "slack", &h, "b"),
        Err(WebhookError::BadSignature(_))
    ));
}

#[tokio::test]
async fn a_body_over_the_limit_answers_413_whether_declared_or_sent() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"small\"\nauth = \"bearer\"\nmax_body = \"1KiB\"\n",
        keys("t", None),
    );
    let big = "x".repeat(1025);
    let h = headers(&[("Authorization", "Bearer t")]);
    let (status, _, json) = deliver(&hooks, "small", &h, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 1024 bytes"),
        "{json}"
    );
    let declared = headers(&[("Authorization", "Bearer t"), ("Content-Length", "5000000")]);
    assert!(matches!(
        verify(&hooks, "small", &declared, ""),
        Err(WebhookError::TooLarge {
            size: 5_000_000,
            limit: 1024
        })
    ));
    assert!(verify(&hooks, "small", &h, &"x".repeat(1024)).is_ok());
    assert_eq!(hooks.max_body("small"), Some(1024));

    let read = read_body(axum::body::Body::from(big.clone()), 1024).await;
    assert!(matches!(
        read,
        Err(WebhookError::TooLarge { limit: 1024, .. })
    ));
    let read = read_body(axum::body::Body::from("ok"), 1024).await.unwrap();
    assert_eq!(&read[..], b"ok");
}

#[tokio::test]
async fn an_unknown_hook_answers_404() {
    let (_dir, store) = store();
    let hooks = github(&store);
    let (status, _, json) = deliver(&hooks, "nope", &signed(SECRET, "{}", "d"), "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"]["message"], "no webhook named \"nope\"");
}

#[tokio::test]
async fn past_the_rate_limit_a_delivery_answers_429_with_retry_after() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"rl\"\nauth = \"bearer\"\nrate_limit = { requests = 2, per = \"1m\" }\n",
        keys("t", None),
    );
    let h = headers(&[("Authorization", "Bearer t")]);
    for _ in 0..2 {
        assert_eq!(deliver(&hooks, "rl", &h, "").await.0, StatusCode::ACCEPTED);
    }
    let (status, resp_headers, json) = deliver(&hooks, "rl", &h, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp_headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry), "{retry}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry in")
    );
    // Forged requests do not use up the allowance: they fail authentication first.
    let bad = headers(&[("Authorization", "Bearer wrong")]);
    assert_eq!(
        deliver(&hooks, "rl", &bad, "").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_repeated_delivery_answers_200_with_the_first_run_id_and_does_not_run_again() {
    let (_dir, store) = store();
    let hooks = github(&store);
    let body = "{}";
    let h = signed(SECRET, body, "7f1c");
    let first = RunId::new();
    let resp = receive(
        &hooks,
        "gh",
        &h,
        Bytes::from(body),
        |_| async move { Ok(first) },
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let mut launched = false;
    let resp = receive(&hooks, "gh", &h, Bytes::from(body), |_| {
        launched = true;
        async move { Ok(RunId::new()) }
    })
    .await;
    let (status, _, json) = json_of(resp).await;
    assert!(!launched, "a duplicate must not launch a run");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "duplicate");
    assert_eq!(json["matched"], "delivery-id");
    assert_eq!(json["delivery"], "7f1c");
    assert_eq!(json["run_id"], first.to_string());
    // Another delivery (another id, another body) runs.
    let other = r#"{"n":2}"#;
    let (status, _, _) = deliver(&hooks, "gh", &signed(SECRET, other, "7f1d"), other).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

/// Delivers as the engine does, counting the runs launched.
async fn deliver_counting(
    hooks: &Webhooks,
    name: &str,
    h: &HeaderMap,
    body: &str,
    launched: &mut usize,
) -> (StatusCode, serde_json::Value) {
    let resp = receive(hooks, name, h, Bytes::from(body.to_string()), |_| {
        *launched += 1;
        async move { Ok(RunId::new()) }
    })
    .await;
    let (status, _, json) = json_of(resp).await;
    (status, json)
}

/// A GitHub-style delivery to hook `gh`, signed with [`SECRET`], counting runs launched.
async fn deliver_github(
    hooks: &Webhooks,
    body: &str,
    id: &str,
    launched: &mut usize,
) -> (StatusCode, serde_json::Value) {
    deliver_counting(hooks, "gh", &signed(SECRET, body, id), body, launched).await
}

#[tokio::test]
async fn a_github_delivery_replayed_with_fresh_delivery_ids_answers_duplicate_with_the_first_run_id()
 {
    let (_dir, store) = store();
    let hooks = github(&store);
    let body = r#"{"ref":"refs/heads/main"}"#;
    let mut launched = 0;
    let (status, first) = deliver_github(&hooks, body, "d-0", &mut launched).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let first_run = first["run_id"].clone();
    // The delivery id is not signed: a captured request sent again with fresh ids.
    for i in 1..=5 {
        let id = format!("fresh-{i}");
        let (status, json) = deliver_github(&hooks, body, &id, &mut launched).await;
        assert_eq!(status, StatusCode::OK, "replay {i}: {json}");
        assert_eq!(json["status"], "duplicate");
        assert_eq!(json["matched"], "signature");
        assert_eq!(json["delivery"], id.as_str());
        assert_eq!(json["run_id"], first_run, "the first run's id");
    }
    // The same signature written differently (upper-case hex, spaces) is the same one.
    let upper = format!(
        "sha256={} ",
        hmac_hex(SECRET, body.as_bytes()).to_uppercase()
    );
    let h = headers(&[
        ("X-Hub-Signature-256", upper.as_str()),
        ("X-GitHub-Delivery", "fresh-6"),
    ]);
    let (status, json) = deliver_counting(&hooks, "gh", &h, body, &mut launched).await;
    assert_eq!(
        (status, &json["matched"]),
        (StatusCode::OK, &"signature".into())
    );
    // GitHub's "Redeliver": same id, same signature: the first run too.
    let (status, json) = deliver_github(&hooks, body, "d-0", &mut launched).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["run_id"], first_run);
    assert_eq!(launched, 1, "only the first delivery ran");
    // A replay's fresh id was not kept: a genuine delivery may carry it later.
    let next = r#"{"ref":"refs/heads/next"}"#;
    let (status, _) = deliver_github(&hooks, next, "fresh-1", &mut launched).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(launched, 2);
}

#[tokio::test]
async fn a_hook_without_delivery_ids_still_answers_a_replayed_signature_as_a_duplicate() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"plain\"\nauth = \"hmac-sha256\"\ndelivery_retention = \"1h\"\n",
        keys(SECRET, None),
    );
    let body = "{}";
    let h = headers(&[(
        "X-Hub-Signature-256",
        &format!("sha256={}", hmac_hex(SECRET, body.as_bytes())),
    )]);
    let mut launched = 0;
    let (status, _) = deliver_counting(&hooks, "plain", &h, body, &mut launched).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, json) = deliver_counting(&hooks, "plain", &h, body, &mut launched).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["delivery"], serde_json::Value::Null);
    assert_eq!(json["matched"], "signature");
    assert_eq!(launched, 1);
    // Remembered for delivery_retention, then forgotten.
    let later = Utc::now() + chrono::Duration::minutes(61);
    assert_eq!(hooks.signatures.purge_expired(later).unwrap(), 1);
}

#[tokio::test]
async fn a_slack_style_delivery_sent_twice_within_the_window_runs_once() {
    let (_dir, store) = store();
    let hooks = slack(&store);
    let now = Utc::now().timestamp();
    let ts = now.to_string();
    let mut launched = 0;
    let h = slack_headers(&ts, "x=1");
    let (status, first) = deliver_counting(&hooks, "slack", &h, "x=1", &mut launched).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, json) = deliver_counting(&hooks, "slack", &h, "x=1", &mut launched).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["matched"], "signature");
    assert_eq!(json["run_id"], first["run_id"]);
    assert_eq!(launched, 1);
    // The same body signed at another time is another delivery.
    let h = slack_headers(&(now - 1).to_string(), "x=1");
    let (status, _) = deliver_counting(&hooks, "slack", &h, "x=1", &mut launched).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Remembered only while the timestamp is inside the window: later it is stale anyway.
    let sent = DateTime::from_timestamp(now, 0).unwrap();
    assert_eq!(
        hooks
            .signatures
            .purge_expired(sent + chrono::Duration::seconds(299))
            .unwrap(),
        0,
        "still inside the window"
    );
    assert_eq!(
        hooks
            .signatures
            .purge_expired(sent + chrono::Duration::seconds(302))
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn with_replay_allow_the_same_signed_delivery_runs_again() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"gh\"\nauth = \"hmac-sha256\"\ndelivery_header = \"X-GitHub-Delivery\"\nreplay = \"allow\"\n",
        keys(SECRET, None),
    );
    let mut launched = 0;
    for id in ["a", "b", "c"] {
        let (status, _) = deliver_github(&hooks, "{}", id, &mut launched).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    // Delivery ids are still told apart.
    let (status, json) = deliver_github(&hooks, "{}", "a", &mut launched).await;
    assert_eq!(
        (status, &json["matched"]),
        (StatusCode::OK, &"delivery-id".into())
    );
    assert_eq!(launched, 3);
    assert!(hooks.signatures.is_empty());
    assert!(!hooks.list()[0].rejects_replays);
}

#[tokio::test]
async fn a_delivery_whose_run_could_not_start_answers_503_and_its_retry_runs() {
    let (_dir, store) = store();
    let hooks = github(&store);
    let h = signed(SECRET, "{}", "r-1");
    let resp = receive(&hooks, "gh", &h, Bytes::from("{}"), |_| async {
        Err::<RunId, _>("plugin is disabled".to_string())
    })
    .await;
    let (status, _, json) = json_of(resp).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !json.to_string().contains("disabled"),
        "internal detail is logged, not returned"
    );
    assert!(
        hooks.signatures.is_empty() && hooks.deliveries.is_empty(),
        "both claims released"
    );
    assert_eq!(
        deliver(&hooks, "gh", &h, "{}").await.0,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_missing_or_odd_delivery_id_or_a_non_json_body_answers_422() {
    let (_dir, store) = store();
    let hooks = hooks_with(
        &store,
        "name = \"j\"\nauth = \"bearer\"\ndelivery_header = \"X-Request-Id\"\nrequire_json = true\n",
        keys("t", None),
    );
    let long = "x".repeat(201);
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 4] = [
        (
            &[("Authorization", "Bearer t")],
            "{}",
            "missing delivery id header x-request-id",
        ),
        (
            &[("Authorization", "Bearer t"), ("X-Request-Id", "a b")],
            "{}",
            "printable ASCII",
        ),
        (
            &[("Authorization", "Bearer t"), ("X-Request-Id", &long)],
            "{}",
            "1-200",
        ),
        (
            &[("Authorization", "Bearer t"), ("X-Request-Id", "ok")],
            "{not json",
            "not valid JSON",
        ),
    ];
    for (pairs, body, expected) in cases {
        let (status, _, json) = deliver(&hooks, "j", &headers(pairs), body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{json}"
        );
    }
}

#[test]
fn every_refusal_maps_to_its_documented_status() {
    use WebhookError::*;
    let cases = [
        (UnknownHook("x".into()), 404),
        (TooLarge { size: 2, limit: 1 }, 413),
        (MissingSignature("h".into()), 401),
        (BadSignature("h".into()), 401),
        (MissingToken, 401),
        (BadToken, 401),
        (MissingTimestamp("h".into()), 401),
        (BadTimestamp("h".into()), 401),
        (
            StaleTimestamp {
                age: "1m".into(),
                window: "5m".into(),
            },
            401,
        ),
        (
            FutureTimestamp {
                ahead: "1m".into(),
                window: "5m".into(),
            },
            401,
        ),
        (Unprocessable("x".into()), 422),
        (BadApiToken, 401),
        (
            RateLimited {
                retry_after_secs: 3,
            },
            429,
        ),
        (Internal("x".into()), 500),
    ];
    for (e, code) in cases {
        assert_eq!(e.status().as_u16(), code, "{e:?}");
        assert_eq!(e.clone().into_response().status().as_u16(), code);
    }
    let resp = RateLimited {
        retry_after_secs: 3,
    }
    .into_response();
    assert_eq!(resp.headers()[RETRY_AFTER], "3");
    let body = format!(
        "{:?}",
        Internal("sled: disk full".into())
            .into_response()
            .into_body()
    );
    assert!(!body.contains("disk full"));
}

#[test]
fn each_answer_labels_the_delivery_metric_as_its_status_says() {
    use WebhookError::*;
    let cases = [
        (
            Answer::Accepted {
                run_id: RunId::new(),
            },
            202,
            "accepted",
        ),
        (
            Answer::Replayed {
                delivery: None,
                matched: Matched::Signature,
                run_id: None,
            },
            200,
            "duplicate",
        ),
        (Answer::Unavailable, 503, "unavailable"),
        (
            Answer::Rejected(UnknownHook("x".into())),
            404,
            "unknown-hook",
        ),
        (
            Answer::Rejected(TooLarge { size: 2, limit: 1 }),
            413,
            "too-large",
        ),
        (
            Answer::Rejected(BadSignature("h".into())),
            401,
            "unauthorized",
        ),
        (Answer::Rejected(BadApiToken), 401, "unauthorized"),
        (
            Answer::Rejected(StaleTimestamp {
                age: "1m".into(),
                window: "5m".into(),
            }),
            401,
            "unauthorized",
        ),
        (Answer::Rejected(Unprocessable("x".into())), 422, "invalid"),
        (
            Answer::Rejected(RateLimited {
                retry_after_secs: 3,
            }),
            429,
            "rate-limited",
        ),
        (Answer::Rejected(Internal("x".into())), 500, "error"),
    ];
    for (answer, code, label) in cases {
        assert_eq!(answer.result(), label, "{answer:?}");
        assert_eq!(answer.status().as_u16(), code, "{answer:?}");
        assert_eq!(answer.names_a_hook(), code != 404, "{answer:?}");
        assert_eq!(answer.into_response().status().as_u16(), code);
    }
}

#[test]
fn hook_configs_are_strict_and_explain_what_to_fix() {
    let cases = [
        (
            "name = \"gh\"\nauth = \"hmac-sha256\"\nsecret = \"x\"\n",
            "unknown field `secret`",
        ),
        ("name = \"gh\"\nauth = \"hmac-md5\"\n", "hmac-md5"),
        (
            "name = \"Git Hub\"\nauth = \"bearer\"\n",
            "name: use 1-64 lower-case letters",
        ),
        (
            "name = \"ci\"\nauth = \"bearer\"\nsignature_header = \"X-Sig\"\n",
            "signature_header: only applies to auth = \"hmac-sha256\"",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\ntimestamp_header = \"X-Ts\"\n",
            "must include {timestamp}",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nsigned_payload = \"{timestamp}.{body}\"\n",
            "set timestamp_header",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nsigned_payload = \"{id}.{body}\"\n",
            "unknown placeholder {id}",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nsigned_payload = \"{timestamp}\"\ntimestamp_header = \"X-Ts\"\n",
            "{body} exactly once",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nreplay_window = \"5m\"\n",
            "replay_window: needs timestamp_header",
        ),
        (
            "name = \"s\"\nauth = \"bearer\"\nmax_body = \"1GiB\"\n",
            "max_body: must be between",
        ),
        (
            "name = \"s\"\nauth = \"bearer\"\nrate_limit = { requests = 0, per = \"1m\" }\n",
            "at least 1",
        ),
        (
            "name = \"s\"\nauth = \"bearer\"\nrate_limit = { requests = 5, per = \"5\" }\n",
            "no unit",
        ),
        (
            "name = \"s\"\nauth = \"bearer\"\ndelivery_retention = \"1h\"\n",
            "needs delivery_header",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nsignature_header = \"bad header\"\n",
            "not a valid header name",
        ),
        (
            "name = \"ci\"\nauth = \"bearer\"\nreplay = \"reject\"\n",
            "replay: only applies to auth = \"hmac-sha256\": a bearer token is the same on every delivery",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nreplay = \"sometimes\"\n",
            "unknown variant `sometimes`, expected `reject` or `allow`",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nwait_response = \"logs\"\n",
            "unknown variant `logs`, expected `summary` or `full`",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nsigned_payload = \"{timestamp}.{body}\"\ntimestamp_header = \"X-Ts\"\ndelivery_retention = \"1h\"\n",
            "delivery_retention: needs delivery_header: this hook remembers signatures while their timestamp is within replay_window",
        ),
        (
            "name = \"s\"\nauth = \"hmac-sha256\"\nreplay = \"allow\"\ndelivery_retention = \"1h\"\n",
            "delivery_retention: needs delivery_header (there are no ids to remember)",
        ),
    ];
    for (text, expected) in cases {
        let e = config_error(text);
        assert!(e.contains(expected), "{text}\n=> {e}");
    }
}

#[test]
fn a_hook_name_belongs_to_one_plugin_and_removing_it_forgets_its_deliveries() {
    let (_dir, store) = store();
    let hooks = github(&store);
    let e = hooks
        .install(
            "other-plugin",
            spec("name = \"gh\"\nauth = \"bearer\"\n"),
            keys("t", None),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("already installed by plugin \"deploy\""),
        "{e}"
    );
    hooks
        .install(
            "deploy",
            spec("name = \"gh2\"\nauth = \"bearer\"\n"),
            keys("t", None),
        )
        .unwrap();
    assert_eq!(hooks.names(), ["gh", "gh2"]);
    let Ok(Admission::Run(claim)) = verify(&hooks, "gh", &signed(SECRET, "{}", "x"), "{}") else {
        panic!("expected a run");
    };
    claim.accept(RunId::new()).unwrap();
    assert_eq!(hooks.deliveries.len(), 1);
    assert_eq!(hooks.signatures.len(), 1);
    assert_eq!(hooks.remove_plugin("deploy").unwrap().len(), 2);
    assert!(hooks.names().is_empty());
    assert!(hooks.deliveries.is_empty() && hooks.signatures.is_empty());
    assert!(matches!(
        verify(&hooks, "gh", &signed(SECRET, "{}", "x"), "{}"),
        Err(WebhookError::UnknownHook(_))
    ));
}
