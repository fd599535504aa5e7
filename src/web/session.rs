//! Dashboard sessions: an API token exchanged at login for a random session id in an
//! `HttpOnly`, `SameSite=Strict` cookie, with a CSRF token for the session's forms.
//!
//! Sessions live in memory only (a restart logs everyone out), at most [`MAX_SESSIONS`]
//! of them (the oldest go first). A session holds the token it was opened with and
//! re-verifies it on every request, so a revoked token ends its sessions at once and a
//! changed role applies at once. Login itself is protected against cross-site posting
//! by a pre-session cookie whose random value the login form mirrors (double submit).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::COOKIE;

use crate::secret::Secret;
use crate::token::{TokenInfo, Tokens};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "capstan_session";
/// The login form's pre-session cookie (login CSRF).
pub const LOGIN_COOKIE: &str = "capstan_login";
/// Sessions held at most; past it the oldest is ended.
pub const MAX_SESSIONS: usize = 10_000;

/// 32 random bytes as hex: session ids, CSRF tokens, login nonces.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    crate::vault::crypto::random_fill(&mut b);
    hex::encode(b)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Secure` over TLS; `max_age`
/// 0 removes the cookie.
pub fn set_cookie(name: &str, value: &str, path: &str, max_age: u64, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

struct Session {
    /// The token the session was opened with, re-verified on each request.
    token: Secret,
    csrf: String,
    created: Instant,
    expires: Instant,
}

/// What a request with a live session carries.
#[derive(Debug, Clone)]
pub struct Authed {
    /// The token's record as it is now.
    pub token: TokenInfo,
    /// The session's CSRF token, for the page's forms.
    pub csrf: String,
    /// The session id (to end it at logout).
    pub session: String,
}

/// The sessions of one dashboard.
pub struct Sessions {
    ttl: Duration,
    inner: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            inner: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session for `token` (already verified); returns its id.
    pub fn open(&self, token: Secret) -> String {
        let id = random_token();
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.expires > now);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                token,
                csrf: random_token(),
                created: now,
                expires: now + self.ttl,
            },
        );
        id
    }

    /// The live session `id`, its token re-verified; an expired session or one whose
    /// token was revoked is ended.
    pub fn check(&self, id: &str, tokens: &Tokens) -> Option<Authed> {
        let (token, csrf) = {
            let mut map = self.lock();
            let s = map.get(id)?;
            if s.expires <= Instant::now() {
                map.remove(id);
                return None;
            }
            (s.token.clone(), s.csrf.clone())
        };
        match tokens.verify(token.expose()) {
            Ok(Some(info)) => Some(Authed {
                token: info,
                csrf,
                session: id.to_string(),
            }),
            Ok(None) => {
                self.end(id);
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot verify a dashboard session's token");
                None
            }
        }
    }

    /// Whether session `id` is still open and unexpired (no token check: for streams
    /// that re-check often).
    pub fn is_live(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|s| s.expires > Instant::now())
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; capstan_session=abc ; b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn session_cookies_are_http_only_strict_and_secure_over_tls() {
        let c = set_cookie(SESSION_COOKIE, "x", "/", 60, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(!set_cookie(SESSION_COOKIE, "x", "/", 60, false).contains("Secure"));
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::new(Duration::from_secs(60));
        for _ in 0..(MAX_SESSIONS + 3) {
            s.open(Secret::from_str_owned("cap_x".into()));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }
}
