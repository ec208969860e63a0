//! The content token (`.vpptoken` file): Base64 of `{token, expDate, orgName}`.
//!
//! Apple wants the whole file content as the bearer, not the inner `token` field.

use std::fmt;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;

const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A parsed content token. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerToken {
    pub org_name: String,
    pub expires_at: DateTime<Utc>,
    location_token: String,
    raw: String,
}

/// Why a token file could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Empty,
    NotBase64,
    NotJson(String),
    MissingField(&'static str),
    BadDate(String),
}

impl TokenError {
    /// Stable snake_case code for API errors and logs.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Empty => "token_empty",
            TokenError::NotBase64 => "token_not_base64",
            TokenError::NotJson(_) => "token_not_json",
            TokenError::MissingField(_) => "token_missing_field",
            TokenError::BadDate(_) => "token_bad_date",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Empty => write!(f, "the token file is empty"),
            TokenError::NotBase64 => write!(f, "the token file is not Base64"),
            TokenError::NotJson(e) => write!(f, "the decoded token is not a JSON object: {e}"),
            TokenError::MissingField(name) => write!(f, "the token has no `{name}` field"),
            TokenError::BadDate(d) => write!(f, "the token's expDate `{d}` is not a date"),
        }
    }
}

impl std::error::Error for TokenError {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawToken {
    token: Option<serde_json::Value>,
    exp_date: Option<String>,
    org_name: Option<String>,
}

impl ServerToken {
    /// Parse the content of a `.vpptoken` file.
    pub fn parse(file_content: &str) -> Result<ServerToken, TokenError> {
        let trimmed = file_content.trim();
        if trimmed.is_empty() {
            return Err(TokenError::Empty);
        }
        // Files are sometimes wrapped or copied with line breaks; ignore inner whitespace.
        let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = LENIENT_STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| TokenError::NotBase64)?;
        let raw: RawToken =
            serde_json::from_slice(&bytes).map_err(|e| TokenError::NotJson(e.to_string()))?;
        let location_token = match raw.token {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(serde_json::Value::Null) | None => return Err(TokenError::MissingField("token")),
            Some(serde_json::Value::String(_)) => return Err(TokenError::MissingField("token")),
            Some(other) => other.to_string(),
        };
        let exp = raw
            .exp_date
            .filter(|s| !s.trim().is_empty())
            .ok_or(TokenError::MissingField("expDate"))?;
        let expires_at = parse_apple_date(&exp).ok_or_else(|| TokenError::BadDate(exp.clone()))?;
        let org_name = raw.org_name.ok_or(TokenError::MissingField("orgName"))?;
        Ok(ServerToken {
            org_name,
            expires_at,
            location_token,
            raw: trimmed.to_string(),
        })
    }

    /// The value for `Authorization: Bearer {…}`: the whole (trimmed) file content.
    pub fn bearer(&self) -> &str {
        &self.raw
    }

    /// The inner `token` field (identifies the location; not the bearer).
    pub fn location_token(&self) -> &str {
        &self.location_token
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }

    /// True when the token expires within `days` days of `now` (or already has).
    pub fn expires_within(&self, now: DateTime<Utc>, days: i64) -> bool {
        now + Duration::days(days) >= self.expires_at
    }
}

impl fmt::Debug for ServerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerToken")
            .field("org_name", &self.org_name)
            .field("expires_at", &self.expires_at)
            .field("location_token", &"<redacted>")
            .field("bearer", &"<redacted>")
            .finish()
    }
}

/// Parse Apple's dates: `2030-11-08T22:33:22+0000` (numeric offset without colon), RFC 3339
/// (`…Z`, `…+00:00`), with or without fractional seconds.
pub fn parse_apple_date(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S%.f%z"] {
        if let Ok(d) = DateTime::parse_from_str(s, fmt) {
            return Some(d.with_timezone(&Utc));
        }
    }
    // `…Z` with fractional seconds or without seconds' offset colon is handled above; a bare
    // `Z` suffix after a non-RFC layout is accepted by swapping it for +0000.
    if let Some(stripped) = s.strip_suffix('Z') {
        let with_offset = format!("{stripped}+0000");
        for fmt in ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S%.f%z"] {
            if let Ok(d) = DateTime::parse_from_str(&with_offset, fmt) {
                return Some(d.with_timezone(&Utc));
            }
        }
    }
    None
}
