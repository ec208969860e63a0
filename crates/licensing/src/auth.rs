//! Who is calling: API keys and their roles.
//!
//! The admin key comes from the secret Spin variable `admin_api_key`; an optional read-only key
//! from `reader_api_key`. Keys are compared in constant time and never logged: the audit log
//! names a caller by role and a short fingerprint.

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Reader,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// `admin:1a2b3c4d`: role and a fingerprint of the key, safe to record.
    pub name: String,
}

impl Caller {
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Reader => Err(ApiError::forbidden(what)),
        }
    }
}

/// The keys this deployment accepts.
#[derive(Clone)]
pub struct Keys {
    pub admin: String,
    pub reader: Option<String>,
}

impl Keys {
    /// Check an `Authorization` header value. Empty configured keys never match.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let presented = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        if !self.admin.is_empty() && constant_time_eq(presented.as_bytes(), self.admin.as_bytes()) {
            return Ok(Caller {
                role: Role::Admin,
                name: format!("admin:{}", fingerprint(presented)),
            });
        }
        if let Some(reader) = self.reader.as_deref().filter(|r| !r.is_empty()) {
            if constant_time_eq(presented.as_bytes(), reader.as_bytes()) {
                return Ok(Caller {
                    role: Role::Reader,
                    name: format!("reader:{}", fingerprint(presented)),
                });
            }
        }
        Err(ApiError::unauthorized())
    }
}

/// The apple component's caller check. With `secret` set, every request must present it,
/// whatever its path: a route alone proves nothing (a chained request and one through a public
/// mount look alike to the component). Without a secret only service chaining can reach the
/// component, so a request through the public mount (`public_prefix`) is refused. Returns the
/// path with the public prefix taken off.
pub fn authorize_internal(
    path: &str,
    public_prefix: &str,
    secret: Option<&str>,
    presented: Option<&str>,
) -> Result<String, ApiError> {
    let public = path
        .strip_prefix(public_prefix)
        .filter(|r| r.is_empty() || r.starts_with('/'));
    let allowed = match secret.filter(|s| !s.is_empty()) {
        Some(secret) => constant_time_eq(presented.unwrap_or("").as_bytes(), secret.as_bytes()),
        None => public.is_none(),
    };
    if !allowed {
        return Err(ApiError::unauthorized());
    }
    Ok(match public {
        Some("") => "/".to_string(),
        Some(rest) => rest.to_string(),
        None => path.to_string(),
    })
}

/// Compare without an early exit, so timing does not reveal how much of a key matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// A short, non-reversible tag of a secret (FNV-1a, 32 bits): enough to tell keys apart in the
/// audit log, useless for guessing one.
pub fn fingerprint(secret: &str) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in secret.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x01000193);
    }
    format!("{h:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_secret_is_required_on_every_path_when_set() {
        let s = Some("s3cret-s3cret");
        let p = "/internal/apple";
        // A chained path (no public prefix) without the secret: refused when one is set.
        assert!(authorize_internal("/accounts/a/mdm/v2/assets", p, s, None).is_err());
        assert!(authorize_internal("/health", p, s, Some("wrong")).is_err());
        assert_eq!(
            authorize_internal("/accounts/a/mdm/v2/assets", p, s, Some("s3cret-s3cret")).unwrap(),
            "/accounts/a/mdm/v2/assets"
        );
        assert!(authorize_internal("/internal/apple/health", p, s, None).is_err());
        assert_eq!(
            authorize_internal("/internal/apple/health", p, s, Some("s3cret-s3cret")).unwrap(),
            "/health"
        );
        assert_eq!(
            authorize_internal("/internal/apple", p, s, Some("s3cret-s3cret")).unwrap(),
            "/"
        );
        // Without a secret: chaining only.
        assert!(authorize_internal("/internal/apple/health", p, None, None).is_err());
        assert!(authorize_internal("/internal/apple/health", p, Some(""), None).is_err());
        assert_eq!(
            authorize_internal("/health", p, None, None).unwrap(),
            "/health"
        );
        assert_eq!(
            authorize_internal("/internal/applex", p, None, None).unwrap(),
            "/internal/applex"
        );
    }

    fn keys() -> Keys {
        Keys {
            admin: "adm-secret".into(),
            reader: Some("read-secret".into()),
        }
    }

    #[test]
    fn roles() {
        let k = keys();
        assert_eq!(
            k.authenticate(Some("Bearer adm-secret")).unwrap().role,
            Role::Admin
        );
        assert_eq!(
            k.authenticate(Some("Bearer read-secret")).unwrap().role,
            Role::Reader
        );
        assert!(k.authenticate(Some("Bearer nope")).is_err());
        assert!(k.authenticate(Some("adm-secret")).is_err());
        assert!(k.authenticate(Some("Bearer ")).is_err());
        assert!(k.authenticate(None).is_err());
        let c = k.authenticate(Some("Bearer read-secret")).unwrap();
        assert!(c.require_admin("change accounts").is_err());
        assert!(!c.name.contains("read-secret"));
    }

    #[test]
    fn empty_keys_never_match() {
        let k = Keys {
            admin: String::new(),
            reader: Some(String::new()),
        };
        assert!(k.authenticate(Some("Bearer ")).is_err());
        assert!(k.authenticate(Some("Bearer x")).is_err());
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
