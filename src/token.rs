//! Token authentication: `AUTH <name> <access token>` with a JWT from an identity provider
//! (Microsoft Entra ID and the like), as Azure Managed Redis accepts it.
//!
//! Issuers come from `[[token_issuers]]` in `proxy.toml`, each with its signing keys in a
//! JWKS file (`jwks_file`) or at an HTTPS URL (`jwks_url`, see [`remote`]). A token is checked in this order: it names a configured issuer (`iss`, exact),
//! its header's `alg` is one slotgate verifies (RS256/384/512, PS256/384/512, ES256/384,
//! EdDSA; never `none` or an HMAC), its `kid` is one of that issuer's keys (an unknown `kid`
//! re-reads a JWKS file at once, at most once a second per issuer; for a URL it asks for a
//! download, and this AUTH is refused), the signature verifies
//! (`jsonwebtoken` on ring), `exp` and `nbf` hold within the issuer's leeway, `aud` names the
//! issuer's audience, and the issuer's username claim equals the AUTH user name. The user the
//! token maps to is the first `[[users]]` entry listing that name in `token_subjects`, else
//! the first one sharing a role of the token's `roles` claim in `token_roles`
//! (see [`crate::auth::Users::for_token`]).
//!
//! What fails is counted by reason ([`Failure`]); the token itself is never logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::auth::{OneOrMany, User, Users};

mod remote;

/// One `[[token_issuers]]` table.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// A name for logs, metrics and INFO.
    pub name: String,
    /// The `iss` claim, matched exactly.
    pub issuer: String,
    /// Accepted `aud` values: the token's `aud` (a string or a list) must name one.
    pub audience: OneOrMany,
    /// The issuer's signing keys, a JWKS document (`{"keys": [...]}`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Or: the issuer's keys at an `https://` URL, downloaded at start-up and every
    /// `jwks_refresh`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `jwks_url`, besides the system's.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// How often `jwks_url` is downloaded again, e.g. `"1h"` [default: 1h].
    #[serde(default)]
    pub jwks_refresh: Option<String>,
    /// The claim that must equal the AUTH user name [default: `oid`].
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, e.g. `"1s"` [default: 1s].
    #[serde(default)]
    pub leeway: Option<String>,
}

fn default_username_claim() -> String {
    "oid".into()
}

/// Why a token was refused; counted per reason (INFO and `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not three base64url parts of JSON, or claims of the wrong type.
    Malformed,
    /// `alg` is `none`, an HMAC, unknown, or not one the key is for.
    Algorithm,
    /// No configured issuer has this `iss`.
    Issuer,
    /// The issuer has no key with this `kid`, even after re-reading its keys.
    UnknownKey,
    /// The signature does not verify.
    Signature,
    /// `exp` is past (beyond the leeway).
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// `aud` names none of the issuer's audiences.
    Audience,
    /// The username claim is missing or differs from the AUTH user name.
    Username,
    /// A required claim (`exp`, `iss`, `aud`) is missing.
    MissingClaim,
    /// Valid, but no `[[users]]` entry maps its subject or roles (or that user is disabled).
    NoUser,
}

impl Failure {
    pub const ALL: [Failure; 11] = [
        Failure::Malformed,
        Failure::Algorithm,
        Failure::Issuer,
        Failure::UnknownKey,
        Failure::Signature,
        Failure::Expired,
        Failure::NotYetValid,
        Failure::Audience,
        Failure::Username,
        Failure::MissingClaim,
        Failure::NoUser,
    ];

    /// Counts a refused token by its reason (`/metrics`).
    #[cold]
    pub fn count(self) {
        metrics::counter!(crate::metrics::TOKEN_AUTH_FAILURES, "reason" => self.as_str())
            .increment(1);
    }

    /// The reason's label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::Algorithm => "algorithm",
            Failure::Issuer => "issuer",
            Failure::UnknownKey => "unknown_key",
            Failure::Signature => "signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::Audience => "audience",
            Failure::Username => "username",
            Failure::MissingClaim => "missing_claim",
            Failure::NoUser => "no_user",
        }
    }
}

/// A token that passed: the user it maps to and when it expires.
#[derive(Debug)]
pub struct Login {
    pub user: Arc<User>,
    /// The token's `exp` (Unix seconds), shown by CLIENT LIST as `token-exp`.
    pub expires: u64,
    /// When the connection is closed unless it re-authenticates: `exp` plus the leeway.
    pub deadline: SystemTime,
}

/// The configured issuers; empty when token authentication is off.
#[derive(Default)]
pub struct Issuers {
    list: Vec<Arc<Issuer>>,
}

struct Issuer {
    name: String,
    issuer: String,
    audience: Vec<String>,
    username_claim: String,
    leeway: u64,
    source: Source,
    keys: RwLock<Arc<KeySet>>,
    /// When the keys were last read again for an unknown `kid`.
    refreshed: Mutex<Option<Instant>>,
}

/// Where an issuer's keys come from.
#[derive(Debug)]
enum Source {
    File(PathBuf),
    Url(remote::Remote),
}

/// One issuer's keys, by `kid` (a key without one is found only by a token without one).
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    without_kid: Vec<Key>,
}

struct Key {
    key: DecodingKey,
    /// The algorithms this key verifies (its JWK `alg`, or every one of its family).
    algorithms: Vec<Algorithm>,
}

/// How often an unknown `kid` may make an issuer's keys be read again.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// The most clock skew an issuer may allow.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Longest token considered (Entra ID tokens are 1–3 KiB).
const MAX_TOKEN: usize = 16 * 1024;

impl std::fmt::Debug for Issuers {
    /// What a reload compares: every setting and the key ids (never key material).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for i in &self.list {
            let keys = i.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
            let mut kids: Vec<&String> = keys.by_kid.keys().collect();
            kids.sort();
            l.entry(&(
                &i.name,
                &i.issuer,
                &i.audience,
                &i.username_claim,
                i.leeway,
                &i.source,
                kids,
                keys.without_kid.len(),
            ));
        }
        l.finish()
    }
}

impl Issuers {
    /// Checks the `[[token_issuers]]` tables and reads their JWKS files.
    pub fn build(configs: &[IssuerConfig]) -> Result<Self, String> {
        let mut list: Vec<Arc<Issuer>> = Vec::with_capacity(configs.len());
        for c in configs {
            let what = format!("token issuer '{}'", c.name);
            if c.name.trim().is_empty() {
                return Err("a token issuer needs a name".into());
            }
            if list.iter().any(|i| i.name == c.name) {
                return Err(format!("{what} is defined twice"));
            }
            if c.issuer.is_empty() {
                return Err(format!("{what}: issuer must not be empty"));
            }
            if let Some(other) = list.iter().find(|i| i.issuer == c.issuer) {
                return Err(format!(
                    "{what}: issuer '{}' is also token issuer '{}'",
                    c.issuer, other.name
                ));
            }
            let audience = c.audience.clone().into_vec();
            if audience.is_empty() || audience.iter().any(String::is_empty) {
                return Err(format!("{what}: audience must name at least one value"));
            }
            if c.username_claim.is_empty() {
                return Err(format!("{what}: username_claim must not be empty"));
            }
            let leeway = match c.leeway.as_deref() {
                None => 1,
                Some(s) if s.trim() == "0" => 0,
                Some(s) => {
                    let d = crate::units::parse_duration(s)
                        .map_err(|why| format!("{what}: leeway '{s}': {why}"))?;
                    if d.subsec_nanos() != 0 || d > MAX_LEEWAY {
                        return Err(format!(
                            "{what}: leeway '{s}' must be whole seconds, at most 5m"
                        ));
                    }
                    d.as_secs()
                }
            };
            if c.jwks_url.is_none() && (c.jwks_ca_file.is_some() || c.jwks_refresh.is_some()) {
                return Err(format!(
                    "{what}: jwks_ca_file and jwks_refresh go with jwks_url"
                ));
            }
            let (source, keys) = match (&c.jwks_file, &c.jwks_url) {
                (Some(f), None) => {
                    let keys = read_jwks(f).map_err(|e| format!("{what}: {e}"))?;
                    (Source::File(f.clone()), keys)
                }
                (None, Some(url)) => {
                    let every = match c.jwks_refresh.as_deref() {
                        None => Duration::from_secs(3600),
                        Some(s) => crate::units::parse_duration(s)
                            .map_err(|why| format!("{what}: jwks_refresh '{s}': {why}"))?,
                    };
                    if every < Duration::from_secs(1) {
                        return Err(format!("{what}: jwks_refresh must be at least 1s"));
                    }
                    let remote = remote::Remote::new(url, c.jwks_ca_file.as_deref(), every)
                        .map_err(|e| format!("{what}: {e}"))?;
                    // Downloaded when slotgate starts (`Issuers::start`), not here: the
                    // configuration check contacts nothing.
                    (Source::Url(remote), KeySet::default())
                }
                _ => return Err(format!("{what}: give jwks_file or jwks_url (one of them)")),
            };
            list.push(Arc::new(Issuer {
                name: c.name.clone(),
                issuer: c.issuer.clone(),
                audience,
                username_claim: c.username_claim.clone(),
                leeway,
                source,
                keys: RwLock::new(Arc::new(keys)),
                refreshed: Mutex::new(None),
            }));
        }
        if !list.is_empty() {
            // Every reason shows in /metrics from the start (a reload adds nothing to them).
            for why in Failure::ALL {
                metrics::counter!(crate::metrics::TOKEN_AUTH_FAILURES, "reason" => why.as_str())
                    .increment(0);
            }
        }
        Ok(Issuers { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Downloads the keys of every `jwks_url` issuer (each for at most 10 s; one that fails
    /// keeps the keys a reload carried over and is retried in the background), then keeps
    /// them fresh. Called before slotgate accepts clients, and for the issuers of a reload
    /// (SIGHUP downloads the keys again, as it reads a `jwks_file` again).
    pub async fn start(&self) {
        for issuer in &self.list {
            if let Source::Url(remote) = &issuer.source {
                let due = if !remote::fetch_now(issuer).await {
                    tokio::time::Instant::now() + Duration::from_secs(1)
                } else {
                    tokio::time::Instant::now() + remote.every
                };
                tokio::spawn(remote::keep_fresh(Arc::downgrade(issuer), due));
            }
        }
    }

    /// A reload: `jwks_url` issuers whose URL stays keep the keys downloaded so far (until
    /// a download replaces them: a failed one leaves no gap).
    pub fn keep_keys_of(&self, running: &Issuers) {
        for issuer in &self.list {
            let Source::Url(new) = &issuer.source else {
                continue;
            };
            let old = running.list.iter().find(|o| match &o.source {
                Source::Url(r) => r.url == new.url,
                Source::File(_) => false,
            });
            if let Some(old) = old {
                *issuer.keys.write().unwrap_or_else(|e| e.into_inner()) = old.keys();
            }
        }
    }

    /// Keys over every issuer (for `--check-config`).
    pub fn key_count(&self) -> usize {
        self.list.iter().map(|i| i.keys().len()).sum()
    }

    /// Validates `token` for AUTH user `name` and maps it to a user.
    pub fn login(&self, name: &[u8], token: &[u8], users: &Users) -> Result<Login, Failure> {
        let token = std::str::from_utf8(token).map_err(|_| Failure::Malformed)?;
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Failure::Malformed);
        };
        let header: serde_json::Value = b64_json(header)?;
        let alg = header
            .get("alg")
            .and_then(|a| a.as_str())
            .ok_or(Failure::Malformed)?;
        let alg: Algorithm = alg.parse().map_err(|_| Failure::Algorithm)?;
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(Failure::Algorithm);
        }
        if header.get("crit").is_some() {
            // Extensions slotgate does not know must not be ignored (RFC 7515, 4.1.11).
            return Err(Failure::Malformed);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(k) => Some(k.as_str().ok_or(Failure::Malformed)?),
        };
        // The issuer is chosen by the (not yet verified) `iss`; the signature check below
        // uses only that issuer's keys, and the claims are checked again after it.
        let claims: serde_json::Value = b64_json(payload)?;
        let iss = claims.get("iss").and_then(|i| i.as_str());
        let issuer = self
            .list
            .iter()
            .find(|i| Some(i.issuer.as_str()) == iss)
            .ok_or(Failure::Issuer)?;
        let claims = issuer.verify(token, kid, alg)?;
        if claims.get("nbf").is_some_and(|n| !n.is_number()) {
            // (jsonwebtoken skips an `nbf` it cannot read.)
            return Err(Failure::Malformed);
        }
        let subject = claims
            .get(&issuer.username_claim)
            .and_then(|v| v.as_str())
            .ok_or(Failure::Username)?;
        if subject.as_bytes() != name {
            return Err(Failure::Username);
        }
        let roles: Vec<&str> = match claims.get("roles") {
            None => Vec::new(),
            Some(serde_json::Value::String(r)) => vec![r.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|r| r.as_str()).collect(),
            Some(_) => return Err(Failure::Malformed),
        };
        let user = users.for_token(subject, &roles).ok_or(Failure::NoUser)?;
        let expires = claims
            .get("exp")
            .and_then(|e| e.as_f64())
            .filter(|e| *e >= 0.0)
            .ok_or(Failure::MissingClaim)? as u64;
        // A far `exp` (2^63, or a float that saturated) is a deadline of never, not a panic.
        let deadline = UNIX_EPOCH
            .checked_add(Duration::from_secs(expires.saturating_add(issuer.leeway)))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(u32::MAX as u64 * 16));
        Ok(Login {
            user,
            expires,
            deadline,
        })
    }
}

/// Whether an AUTH password may be a JWT: three dot-separated base64url parts.
pub fn looks_like_jwt(p: &[u8]) -> bool {
    p.len() <= MAX_TOKEN
        && p.iter().filter(|&&c| c == b'.').count() == 2
        && p.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'='))
}

impl Issuer {
    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_keys(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// The signature and the standard claims; the claims when they pass.
    fn verify(
        &self,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Failure> {
        let mut keys = self.keys();
        if !keys.has(kid) && self.refresh() {
            keys = self.keys();
        }
        let candidates: Vec<&Key> = match kid {
            Some(k) => keys.by_kid.get(k).into_iter().collect(),
            None => keys.without_kid.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(Failure::UnknownKey);
        }
        let mut failure = Failure::Algorithm;
        for key in candidates {
            if !key.algorithms.contains(&alg) {
                continue;
            }
            let mut v = Validation::new(alg);
            v.leeway = self.leeway;
            v.validate_nbf = true;
            v.set_issuer(&[&self.issuer]);
            v.set_audience(&self.audience);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token, &key.key, &v,
            ) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    failure = match e.kind() {
                        ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => Failure::Signature,
                        ErrorKind::ExpiredSignature => Failure::Expired,
                        ErrorKind::ImmatureSignature => Failure::NotYetValid,
                        ErrorKind::InvalidIssuer => Failure::Issuer,
                        ErrorKind::InvalidAudience => Failure::Audience,
                        ErrorKind::MissingRequiredClaim(_) => Failure::MissingClaim,
                        ErrorKind::InvalidAlgorithm
                        | ErrorKind::MissingAlgorithm
                        | ErrorKind::InvalidAlgorithmName => Failure::Algorithm,
                        _ => Failure::Malformed,
                    };
                    // Only a wrong signature makes another key of the same kid worth a try.
                    if failure != Failure::Signature {
                        return Err(failure);
                    }
                }
            }
        }
        Err(failure)
    }

    /// Reads the JWKS file again (an unknown `kid`: the keys may have rotated), at most once
    /// a second; whether it was read. A URL's keys are downloaded in the background instead
    /// (`false`: this token is checked against the keys at hand).
    #[cold]
    fn refresh(&self) -> bool {
        let path = match &self.source {
            Source::File(path) => path,
            Source::Url(remote) => {
                remote.wake.notify_one();
                return false;
            }
        };
        {
            let mut last = self.refreshed.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if last.is_some_and(|t| now < t + REFRESH_AT_MOST_EVERY) {
                return false;
            }
            *last = Some(now);
        }
        match read_jwks(path) {
            Ok(keys) => {
                tracing::info!(
                    issuer = %self.name,
                    "token signed by an unknown key: read the issuer's JWKS again"
                );
                self.set_keys(keys);
                true
            }
            Err(e) => {
                tracing::warn!(issuer = %self.name, "cannot read the issuer's keys again: {e}");
                false
            }
        }
    }
}

impl KeySet {
    fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    fn has(&self, kid: Option<&str>) -> bool {
        match kid {
            Some(k) => self.by_kid.contains_key(k),
            None => !self.without_kid.is_empty(),
        }
    }
}

fn b64_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, Failure> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| Failure::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| Failure::Malformed)
}

/// Reads a JWKS document: every signing key slotgate can verify with. Keys of other kinds
/// (encryption keys, HMAC secrets, unknown types) are skipped; a file with none usable is
/// an error.
fn read_jwks(path: &Path) -> Result<KeySet, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))?;
    parse_jwks(&text).map_err(|e| format!("JWKS file {}: {e}", path.display()))
}

fn parse_jwks(text: &[u8]) -> Result<KeySet, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("no \"keys\" array")?;
    let mut set = KeySet::default();
    for entry in entries {
        if entry
            .get("use")
            .and_then(|u| u.as_str())
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
            continue;
        };
        let Some(algorithms) = algorithms_of(&jwk) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let key = Key { key, algorithms };
        match jwk.common.key_id {
            Some(kid) => {
                if set.by_kid.insert(kid.clone(), key).is_some() {
                    return Err(format!("key id '{kid}' appears twice"));
                }
            }
            None => set.without_kid.push(key),
        }
    }
    if set.by_kid.is_empty() && set.without_kid.is_empty() {
        return Err("no signing key slotgate can use (RSA, EC P-256/P-384 or Ed25519)".into());
    }
    Ok(set)
}

/// The algorithms a JWK verifies: its `alg` when given, else every one of its key type's.
/// `None` for keys slotgate does not verify with (HMAC secrets, unknown curves).
fn algorithms_of(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
        AlgorithmParameters::OctetKey(_) => return None,
    };
    match &jwk.common.key_algorithm {
        None => Some(family),
        Some(a) => {
            let a: Algorithm = format!("{a:?}").parse().ok()?;
            family.contains(&a).then(|| vec![a])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_reason_is_exported_from_start_up() {
        use Failure::*;
        let all = [
            Malformed,
            Algorithm,
            Issuer,
            UnknownKey,
            Signature,
            Expired,
            NotYetValid,
            Audience,
            Username,
            MissingClaim,
            NoUser,
        ];
        let names: Vec<&str> = all.iter().map(|f| f.as_str()).collect();
        assert_eq!(names, crate::metrics::TOKEN_FAILURE_REASONS);
    }

    #[test]
    fn jwt_shapes() {
        assert!(looks_like_jwt(b"eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln"));
        assert!(!looks_like_jwt(b"hunter2"));
        assert!(!looks_like_jwt(b"a.b"));
        assert!(!looks_like_jwt(b"a.b.c.d"));
        assert!(!looks_like_jwt(b"a b.c.d"));
        assert!(!looks_like_jwt(&[b'a'; MAX_TOKEN + 1]));
    }

    #[test]
    fn jwks_skips_keys_it_cannot_use_and_refuses_a_file_without_any() {
        let ec = r#"{"kty":"EC","crv":"P-256","kid":"e1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRjM2znb-bRg7SPVR_ZhkKeW5dkE5nPWk5wRaiE"}"#;
        let hmac = r#"{"kty":"oct","kid":"h","k":"c2VjcmV0"}"#;
        let enc = r#"{"kty":"EC","crv":"P-256","use":"enc","kid":"x","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRjM2znb-bRg7SPVR_ZhkKeW5dkE5nPWk5wRaiE"}"#;
        let odd = r#"{"kty":"XYZ","kid":"z"}"#;
        let set = parse_jwks(format!(r#"{{"keys":[{ec},{hmac},{enc},{odd}]}}"#).as_bytes())
            .expect("one usable key");
        assert_eq!(set.by_kid.len(), 1);
        assert_eq!(set.by_kid["e1"].algorithms, [Algorithm::ES256]);
        assert!(parse_jwks(format!(r#"{{"keys":[{hmac}]}}"#).as_bytes()).is_err());
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"not json").is_err());
        assert!(parse_jwks(format!(r#"{{"keys":[{ec},{ec}]}}"#).as_bytes()).is_err());
    }
}
