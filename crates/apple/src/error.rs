//! Apple's errors, classified from status, body and `Retry-After`.
//!
//! Apple puts `errorNumber` in the body even on HTTP 200 (9622, sometimes 9646), so every body
//! is inspected before the status.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::transport::AppleResponse;
use crate::types::{ErrorResponse, ResponseErrorInfo};

/// Everything that can go wrong talking to Apple.
#[derive(Debug, Clone, PartialEq)]
pub enum AppleError {
    /// 9621: the content token expired; a new one must be downloaded.
    TokenExpired,
    /// 9625: Apple revoked the content token.
    TokenRevoked,
    /// 9601, 9622, 9722, or a 401 without a known number.
    TokenInvalid { number: Option<i64> },
    /// 9646 or HTTP 429.
    RateLimited { retry_after: Option<Duration> },
    /// HTTP 5xx, 9603, 9729, 9644.
    Unavailable {
        status: u16,
        number: Option<i64>,
        retry_after: Option<Duration>,
    },
    /// Any other Apple error (4xx, or an unknown number): never retried.
    Validation {
        status: u16,
        number: Option<i64>,
        message: String,
        info: Option<ResponseErrorInfo>,
    },
    /// The request never got an HTTP answer.
    Transport(String),
    /// The answer was not what the endpoint documents.
    Decode(String),
}

impl AppleError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            AppleError::TokenExpired => "apple_token_expired",
            AppleError::TokenRevoked => "apple_token_revoked",
            AppleError::TokenInvalid { .. } => "apple_token_invalid",
            AppleError::RateLimited { .. } => "apple_rate_limited",
            AppleError::Unavailable { .. } => "apple_unavailable",
            AppleError::Validation { .. } => "apple_validation",
            AppleError::Transport(_) => "apple_transport",
            AppleError::Decode(_) => "apple_decode",
        }
    }

    /// Worth another attempt (later): rate limits, outages and transport failures.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AppleError::RateLimited { .. }
                | AppleError::Unavailable { .. }
                | AppleError::Transport(_)
        )
    }

    /// The token is unusable until someone uploads a new one.
    pub fn is_token_error(&self) -> bool {
        matches!(
            self,
            AppleError::TokenExpired | AppleError::TokenRevoked | AppleError::TokenInvalid { .. }
        )
    }

    /// The wait Apple asked for, if any (uncapped).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AppleError::RateLimited { retry_after } => *retry_after,
            AppleError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Apple's `errorNumber`, where there was one.
    pub fn number(&self) -> Option<i64> {
        match self {
            AppleError::TokenExpired => Some(9621),
            AppleError::TokenRevoked => Some(9625),
            AppleError::TokenInvalid { number } => *number,
            AppleError::RateLimited { .. } => Some(9646),
            AppleError::Unavailable { number, .. } => *number,
            AppleError::Validation { number, .. } => *number,
            AppleError::Transport(_) | AppleError::Decode(_) => None,
        }
    }

    /// Classify a response. `None` means success (2xx and no `errorNumber` in the body).
    pub fn from_response(resp: &AppleResponse, now: DateTime<Utc>) -> Option<AppleError> {
        let retry_after = resp
            .retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, now));
        let body = parse_error_body(&resp.body);
        let status = resp.status;
        if let Some(err) = body {
            return Some(classify_number(status, err, retry_after));
        }
        match status {
            200..=299 => None,
            401 => Some(AppleError::TokenInvalid { number: None }),
            429 => Some(AppleError::RateLimited { retry_after }),
            500..=599 => Some(AppleError::Unavailable {
                status,
                number: None,
                retry_after,
            }),
            _ => Some(AppleError::Validation {
                status,
                number: None,
                message: body_excerpt(&resp.body),
                info: None,
            }),
        }
    }
}

fn classify_number(status: u16, err: ErrorResponse, retry_after: Option<Duration>) -> AppleError {
    let number = err.error_number;
    match number {
        9621 => AppleError::TokenExpired,
        9625 => AppleError::TokenRevoked,
        9601 | 9622 | 9722 => AppleError::TokenInvalid {
            number: Some(number),
        },
        9646 => AppleError::RateLimited { retry_after },
        9603 | 9729 | 9644 => AppleError::Unavailable {
            status,
            number: Some(number),
            retry_after,
        },
        _ => match status {
            401 => AppleError::TokenInvalid {
                number: Some(number),
            },
            429 => AppleError::RateLimited { retry_after },
            500..=599 => AppleError::Unavailable {
                status,
                number: Some(number),
                retry_after,
            },
            _ => AppleError::Validation {
                status,
                number: Some(number),
                message: err.error_message.unwrap_or_default(),
                info: err.error_info,
            },
        },
    }
}

/// The body's `ErrorResponse`, if it is a JSON object carrying a numeric `errorNumber`.
fn parse_error_body(body: &[u8]) -> Option<ErrorResponse> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object()?;
    let number = match obj.get("errorNumber")? {
        serde_json::Value::Number(n) => n.as_i64()?,
        serde_json::Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    let message = obj
        .get("errorMessage")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    let info = obj
        .get("errorInfo")
        .and_then(|i| serde_json::from_value::<ResponseErrorInfo>(i.clone()).ok());
    Some(ErrorResponse {
        error_number: number,
        error_message: message,
        error_info: info,
    })
}

fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// `Retry-After` as delay-seconds or an HTTP-date (past dates mean "now").
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs));
        }
    }
    let when = DateTime::parse_from_rfc2822(v)
        .ok()
        .map(|d| d.with_timezone(&Utc))
        .or_else(|| crate::token::parse_apple_date(v))?;
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

impl fmt::Display for AppleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppleError::TokenExpired => write!(f, "Apple: the content token has expired (9621)"),
            AppleError::TokenRevoked => write!(f, "Apple: the content token was revoked (9625)"),
            AppleError::TokenInvalid { number: Some(n) } => {
                write!(f, "Apple: the content token is invalid ({n})")
            }
            AppleError::TokenInvalid { number: None } => {
                write!(f, "Apple: the content token is invalid (HTTP 401)")
            }
            AppleError::RateLimited { retry_after } => match retry_after {
                Some(d) => write!(f, "Apple: too many requests; retry after {}s", d.as_secs()),
                None => write!(f, "Apple: too many requests"),
            },
            AppleError::Unavailable {
                status,
                number,
                retry_after,
            } => {
                write!(f, "Apple is unavailable (HTTP {status}")?;
                if let Some(n) = number {
                    write!(f, ", {n}")?;
                }
                write!(f, ")")?;
                if let Some(d) = retry_after {
                    write!(f, "; retry after {}s", d.as_secs())?;
                }
                Ok(())
            }
            AppleError::Validation {
                status,
                number,
                message,
                ..
            } => match number {
                Some(n) => write!(
                    f,
                    "Apple rejected the request ({n}, HTTP {status}): {message}"
                ),
                None => write!(f, "Apple rejected the request (HTTP {status}): {message}"),
            },
            AppleError::Transport(e) => write!(f, "could not reach Apple: {e}"),
            AppleError::Decode(e) => write!(f, "unexpected answer from Apple: {e}"),
        }
    }
}

impl std::error::Error for AppleError {}
