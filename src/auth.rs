//! Authentication and authorization: JWT bearer tokens whose `topichub` claim lists the topic
//! patterns a client may publish to and subscribe to:
//!
//! ```json
//! {"sub": "billing", "exp": 1767225600,
//!  "topichub": {"publish": ["orders.>"], "subscribe": ["orders.*.created", "logs.>"]}}
//! ```
//!
//! `"admin": true` in the same claim allows deleting topics (`DELETE /topics/{topic}`,
//! `DeleteTopic`).
//!
//! Keys: an HS256 secret, an RSA or EC public key in PEM (RS256/PS256, ES256/ES384), or a JWKS
//! file (keys chosen by the token's `kid`). With no key configured, authentication is off and
//! every client may do everything. `exp` (and `nbf`) are honoured, also during a stream: a
//! subscription ends with UNAUTHENTICATED when its token expires.
//!
//! The transports authenticate each request once, in a middleware ([`http_guard`] here, the
//! gRPC door's gate layer there), which leaves an [`Access`] in the request's extensions;
//! handlers then ask it whether a topic or pattern is allowed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::{HeaderMap, header};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::topic::{Pattern, Topic};

/// Name of the query parameter and cookie that carry a token where a header cannot (a browser's
/// `EventSource`).
pub const TOKEN_PARAM: &str = "access_token";

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY: Duration = Duration::from_secs(5);

/// Where the keys come from (the `--jwt-*` server options).
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Shared secret for HS256/HS384/HS512.
    pub secret: Option<String>,
    /// PEM file with an RSA or EC public key.
    pub public_key: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`).
    pub jwks: Option<PathBuf>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
}

/// Verifies tokens; cheap to clone (clones share the keys, and [`Authenticator::reload`]).
#[derive(Clone, Default)]
pub struct Authenticator {
    /// `None`: authentication is off.
    keys: Option<Arc<Keys>>,
}

/// The configured key source and the verifier loaded from it last.
struct Keys {
    config: AuthConfig,
    // A std lock: held only to clone an `Arc`, never across an await.
    current: RwLock<Arc<Verifier>>,
}

struct Verifier {
    keys: Vec<VerifyingKey>,
    audience: Option<String>,
    issuer: Option<String>,
}

struct VerifyingKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// What an authenticated client may do.
#[derive(Clone, Debug)]
pub struct Access {
    /// `None`: everything (authentication is off).
    grants: Option<Arc<Grants>>,
    /// When the token stops being valid.
    expires_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct Grants {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
    subject: Option<String>,
    /// May delete topics (`"admin": true`).
    admin: bool,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    topichub: Permissions,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Permissions {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    /// Administrative operations (deleting a topic).
    #[serde(default)]
    admin: bool,
}

impl Authenticator {
    /// Loads the configured keys; authentication is off when none is configured.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, String> {
        let sources = [
            config.secret.is_some(),
            config.public_key.is_some(),
            config.jwks.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => return Ok(Authenticator::default()),
            1 => {}
            _ => {
                return Err(
                    "configure one of --jwt-secret, --jwt-public-key and --jwks, not several"
                        .into(),
                );
            }
        }
        Ok(Authenticator {
            keys: Some(Arc::new(Keys {
                current: RwLock::new(Arc::new(Verifier::load(config)?)),
                config: config.clone(),
            })),
        })
    }

    /// Whether tokens are required.
    pub fn is_enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Reads the key file (`--jwt-public-key` or `--jwks`) again; tokens are verified with the
    /// new keys from then on. `Ok(false)`: there is no file to read (no keys, or a secret). On
    /// error the old keys stay.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(keys) = &self.keys else {
            return Ok(false);
        };
        if keys.config.secret.is_some() {
            return Ok(false);
        }
        let verifier = Arc::new(Verifier::load(&keys.config)?);
        *keys.current.write().unwrap_or_else(|e| e.into_inner()) = verifier;
        Ok(true)
    }

    /// Checks a token (`None`: none was sent) and returns what it allows.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Access, Error> {
        let Some(keys) = &self.keys else {
            return Ok(Access::unrestricted());
        };
        let verifier = keys
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let token = token.ok_or_else(|| {
            Error::Unauthenticated(
                "a token is required: send `authorization: Bearer <JWT>` (SSE: ?access_token=<JWT>)"
                    .into(),
            )
        })?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Error::Unauthenticated(format!("malformed token: {e}")))?;
        let key = match &header.kid {
            Some(kid) => verifier
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None => verifier.keys.first().filter(|_| verifier.keys.len() == 1),
        }
        .ok_or_else(|| {
            Error::Unauthenticated(format!(
                "no configured key matches the token's key id {:?}",
                header.kid.as_deref().unwrap_or("(none)")
            ))
        })?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = key.algorithms.clone();
        validation.required_spec_claims.clear();
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = verifier.audience.is_some();
        if let Some(audience) = &verifier.audience {
            validation.set_audience(&[audience]);
        }
        if let Some(issuer) = &verifier.issuer {
            validation.set_issuer(&[issuer]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            Error::Unauthenticated(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                ErrorKind::InvalidAlgorithm => {
                    format!("the token's algorithm {:?} is not accepted for its key", header.alg)
                }
                ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
                ErrorKind::Json(_) => format!("the token's claims are malformed: {e}; the `topichub` claim is {{\"publish\": [patterns], \"subscribe\": [patterns], \"admin\": bool}}"),
                _ => format!("invalid token: {e}"),
            })
        })?;
        let claims = data.claims;
        let parse = |patterns: Vec<String>| {
            patterns
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::Unauthenticated(format!("the token grants an invalid pattern: {e}"))
                })
        };
        Ok(Access {
            grants: Some(Arc::new(Grants {
                publish: parse(claims.topichub.publish)?,
                subscribe: parse(claims.topichub.subscribe)?,
                subject: claims.sub,
                admin: claims.topichub.admin,
            })),
            expires_at: claims
                .exp
                .map(|exp| UNIX_EPOCH + Duration::from_secs(exp) + LEEWAY),
        })
    }
}

impl Verifier {
    fn load(config: &AuthConfig) -> Result<Verifier, String> {
        Ok(Verifier {
            keys: load_keys(config)?,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
        })
    }
}

fn load_keys(config: &AuthConfig) -> Result<Vec<VerifyingKey>, String> {
    use Algorithm::*;
    if let Some(secret) = &config.secret {
        if secret.len() < 32 {
            tracing::warn!(
                "--jwt-secret is shorter than 32 bytes; HS256 secrets should be long and random"
            );
        }
        return Ok(vec![VerifyingKey {
            kid: None,
            key: DecodingKey::from_secret(secret.as_bytes()),
            algorithms: vec![HS256, HS384, HS512],
        }]);
    }
    if let Some(path) = &config.public_key {
        let pem = read(path)?;
        let (key, algorithms) = match DecodingKey::from_rsa_pem(&pem) {
            Ok(key) => (key, vec![RS256, RS384, RS512, PS256, PS384, PS512]),
            Err(_) => match DecodingKey::from_ec_pem(&pem) {
                Ok(key) => (key, vec![ES256, ES384]),
                Err(e) => {
                    return Err(format!(
                        "{}: not an RSA or EC public key in PEM form ({e})",
                        path.display()
                    ));
                }
            },
        };
        return Ok(vec![VerifyingKey {
            kid: None,
            key,
            algorithms,
        }]);
    }
    let path = config.jwks.as_ref().expect("one key source is configured");
    let set: JwkSet = serde_json::from_slice(&read(path)?)
        .map_err(|e| format!("{}: not a JWKS document ({e})", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| format!("{}: unusable key: {e}", path.display()))?;
        let algorithms = match jwk.common.key_algorithm.map(|a| a.to_string()) {
            Some(name) => vec![name.parse::<Algorithm>().map_err(|_| {
                format!(
                    "{}: key algorithm {name} cannot verify tokens",
                    path.display()
                )
            })?],
            None => match key.family() {
                jsonwebtoken::AlgorithmFamily::Rsa => {
                    vec![RS256, RS384, RS512, PS256, PS384, PS512]
                }
                jsonwebtoken::AlgorithmFamily::Ec => vec![ES256, ES384],
                jsonwebtoken::AlgorithmFamily::Hmac => vec![HS256, HS384, HS512],
                jsonwebtoken::AlgorithmFamily::Ed => vec![EdDSA],
            },
        };
        keys.push(VerifyingKey {
            kid: jwk.common.key_id.clone(),
            key,
            algorithms,
        });
    }
    if keys.is_empty() {
        return Err(format!("{}: the JWKS has no keys", path.display()));
    }
    Ok(keys)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

impl Access {
    /// Everything is allowed (authentication is off).
    pub fn unrestricted() -> Access {
        Access {
            grants: None,
            expires_at: None,
        }
    }

    /// The token's subject (`sub`), when authentication is on and the token names one.
    pub fn subject(&self) -> Option<&str> {
        self.grants.as_ref()?.subject.as_deref()
    }

    /// When the token expires (`None`: never).
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// Whether this client may publish to `topic`.
    pub fn check_publish(&self, topic: &Topic) -> Result<(), Error> {
        let Some(grants) = &self.grants else {
            return Ok(());
        };
        if grants.publish.iter().any(|p| p.matches(topic.as_str())) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{} may not publish to {topic:?}; the token allows publishing to {}",
            grants.who(),
            list(&grants.publish)
        )))
    }

    /// Whether this client may subscribe to every one of `patterns`.
    pub fn check_subscribe(&self, patterns: &[Pattern]) -> Result<(), Error> {
        let Some(grants) = &self.grants else {
            return Ok(());
        };
        for pattern in patterns {
            if !grants.subscribe.iter().any(|g| g.covers(pattern)) {
                return Err(Error::PermissionDenied(format!(
                    "{} may not subscribe to {:?}; the token allows subscribing to {}",
                    grants.who(),
                    pattern.as_str(),
                    list(&grants.subscribe)
                )));
            }
        }
        Ok(())
    }

    /// Whether this client may delete topics: a token with `"topichub": {"admin": true}`.
    pub fn check_admin(&self, topic: &Topic) -> Result<(), Error> {
        let Some(grants) = &self.grants else {
            return Ok(());
        };
        if grants.admin {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{} may not delete topic {topic:?}: deleting a topic needs a token with the admin claim {{\"topichub\": {{\"admin\": true}}}}",
            grants.who()
        )))
    }

    /// Whether this client may see `topic` (in listings).
    pub fn may_see(&self, topic: &str) -> bool {
        self.grants
            .as_ref()
            .is_none_or(|g| g.subscribe.iter().any(|p| p.matches(topic)))
    }
}

impl Grants {
    fn who(&self) -> String {
        match &self.subject {
            Some(subject) => format!("token subject {subject:?}"),
            None => "this token".to_owned(),
        }
    }
}

fn list(patterns: &[Pattern]) -> String {
    if patterns.is_empty() {
        return "nothing".to_owned();
    }
    patterns
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bearer token of a request: the `authorization` header, else, where `from` allows it (a
/// browser's `EventSource` cannot send headers), the `access_token` cookie or query parameter.
/// A cookie or query token where only the header is accepted is refused rather than ignored, so
/// the client learns which header to use.
fn token_of(
    headers: &HeaderMap,
    query: Option<&str>,
    from: TokenFrom,
) -> Result<Option<String>, Error> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization header must be `Bearer <JWT>`".into())
            })?;
        return Ok(Some(token.to_owned()));
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_PARAM)
        .map(|(_, value)| value.to_owned());
    let query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == TOKEN_PARAM)
            .map(|(_, v)| v.into_owned())
    });
    let (Some(token), place) = (match (cookie, query) {
        (Some(cookie), _) => (Some(cookie), "cookie"),
        (None, query) => (query, "query parameter"),
    }) else {
        return Ok(None);
    };
    match from {
        TokenFrom::HeaderCookieOrQuery => Ok(Some(token)),
        TokenFrom::Header => Err(Error::Unauthenticated(format!(
            "the {TOKEN_PARAM} {place} is accepted only by GET /subscribe and GET /topics/{{topic}}/messages (for EventSource); send the token as `authorization: Bearer <JWT>`"
        ))),
        TokenFrom::Metadata => Err(Error::Unauthenticated(format!(
            "gRPC takes no {TOKEN_PARAM} {place}; send the token as metadata `authorization: Bearer <JWT>`"
        ))),
    }
}

/// Where a transport's clients may put their token.
#[derive(Clone, Copy)]
pub enum TokenFrom {
    /// gRPC metadata (`authorization`) only.
    Metadata,
    /// HTTP: the `authorization` header only.
    Header,
    /// HTTP: the header, else the cookie or query parameter (for EventSource).
    HeaderCookieOrQuery,
}

/// Authenticates `request` and stores its [`Access`] in the extensions; a refusal is counted.
/// Each door's middleware calls this and answers a refusal in its own wire format.
pub fn admit(
    auth: &Authenticator,
    metrics: &Metrics,
    request: &mut Request,
    from: TokenFrom,
) -> Result<(), Error> {
    let access = if auth.is_enabled() {
        let query = match from {
            TokenFrom::Metadata => None,
            TokenFrom::Header | TokenFrom::HeaderCookieOrQuery => request.uri().query(),
        };
        token_of(request.headers(), query, from)
            .and_then(|token| auth.authenticate(token.as_deref()))
    } else {
        Ok(Access::unrestricted())
    };
    match access {
        Ok(access) => {
            request.extensions_mut().insert(access);
            Ok(())
        }
        Err(error) => {
            metrics.auth_failed();
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "a test secret that is at least 32 bytes long";

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            secret: Some(SECRET.into()),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn grants_decide_publish_and_subscribe() {
        let access = auth()
            .authenticate(Some(&token(serde_json::json!({
                "sub": "svc",
                "topichub": {"publish": ["orders.>"], "subscribe": ["orders.*", "logs.>"]}
            }))))
            .unwrap();
        assert!(
            access
                .check_publish(&Topic::parse("orders.eu.created").unwrap())
                .is_ok()
        );
        let denied = access
            .check_publish(&Topic::parse("logs.a").unwrap())
            .unwrap_err();
        assert!(matches!(denied, Error::PermissionDenied(_)));
        assert!(
            denied
                .to_string()
                .contains("\"svc\" may not publish to \"logs.a\""),
            "{denied}"
        );
        let p = |s: &str| Pattern::parse(s).unwrap();
        assert!(
            access
                .check_subscribe(&[p("orders.eu"), p("logs.a.>")])
                .is_ok()
        );
        assert!(
            access.check_subscribe(&[p("orders.>")]).is_err(),
            "orders.* does not cover orders.>"
        );
        assert!(access.may_see("logs.x") && !access.may_see("secret"));
    }

    #[test]
    fn bad_tokens_are_unauthenticated_with_a_reason() {
        let auth = auth();
        let expired = token(serde_json::json!({"exp": 1_000_000, "topichub": {}}));
        let forged = encode(
            &Header::default(),
            &serde_json::json!({}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        let bad_claim = token(serde_json::json!({"topichub": {"publish": ["a..b"]}}));
        let typo = token(serde_json::json!({"topichub": {"publsh": ["a"]}}));
        for (token, why) in [
            (None, "a token is required"),
            (Some("not a jwt"), "malformed token"),
            (Some(expired.as_str()), "expired"),
            (Some(forged.as_str()), "signature"),
            (Some(bad_claim.as_str()), "invalid pattern"),
            (Some(typo.as_str()), "claims are malformed"),
        ] {
            let error = auth.authenticate(token).unwrap_err();
            assert!(matches!(error, Error::Unauthenticated(_)), "{error:?}");
            assert!(
                error.to_string().contains(why),
                "{error} should mention {why}"
            );
        }
    }

    #[test]
    fn tokens_come_from_header_cookie_or_query() {
        use TokenFrom::*;
        let mut headers = HeaderMap::new();
        let browser = |h: &HeaderMap, q| token_of(h, q, HeaderCookieOrQuery);
        assert_eq!(
            browser(&headers, Some("topic=a&access_token=q"))
                .unwrap()
                .as_deref(),
            Some("q")
        );
        assert!(token_of(&headers, Some("access_token=q"), Header).is_err());
        assert_eq!(token_of(&headers, Some("topic=a"), Header).unwrap(), None);
        headers.insert(header::COOKIE, "x=1; access_token=c".parse().unwrap());
        assert_eq!(
            browser(&headers, Some("access_token=q"))
                .unwrap()
                .as_deref(),
            Some("c")
        );
        for from in [Header, Metadata] {
            let refused = token_of(&headers, None, from).unwrap_err().to_string();
            assert!(refused.contains("authorization: Bearer"), "{refused}");
        }
        headers.insert(header::AUTHORIZATION, "bearer h".parse().unwrap());
        for from in [Header, Metadata, HeaderCookieOrQuery] {
            assert_eq!(
                token_of(&headers, None, from).unwrap().as_deref(),
                Some("h")
            );
        }
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(browser(&headers, None).is_err());
    }

    #[test]
    fn without_keys_everything_is_allowed() {
        let access = Authenticator::default().authenticate(None).unwrap();
        assert!(access.check_publish(&Topic::parse("any").unwrap()).is_ok());
        assert!(
            access
                .check_subscribe(&[Pattern::parse(">").unwrap()])
                .is_ok()
        );
    }
}
