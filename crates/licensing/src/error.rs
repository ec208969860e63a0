//! The one error shape of the API and the one list of its error codes.
//!
//! Every error leaves as `{"error": {"code": "...", "message": "...", "details": {...}}}`.

use serde_json::{json, Value};
use std::fmt;

/// Stable error codes. Clients match on these strings; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    InvalidJson,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    Conflict,
    Unprocessable,
    TokenMalformed,
    TokenExpired,
    DuplicateLocation,
    LocationMismatch,
    AccountInUse,
    OwnedByAnotherMdm,
    NoLicensesAvailable,
    AppleTokenExpired,
    AppleTokenRevoked,
    AppleTokenInvalid,
    AppleRateLimited,
    AppleUnavailable,
    AppleRejected,
    StoreUnavailable,
    Misconfigured,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Unauthorized => "unauthorized",
            Forbidden => "forbidden",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            InvalidJson => "invalid_json",
            InvalidRequest => "invalid_request",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            Conflict => "conflict",
            Unprocessable => "unprocessable",
            TokenMalformed => "token_malformed",
            TokenExpired => "token_expired",
            DuplicateLocation => "duplicate_location",
            LocationMismatch => "location_mismatch",
            AccountInUse => "account_in_use",
            OwnedByAnotherMdm => "owned_by_another_mdm",
            NoLicensesAvailable => "no_licenses_available",
            AppleTokenExpired => "apple_token_expired",
            AppleTokenRevoked => "apple_token_revoked",
            AppleTokenInvalid => "apple_token_invalid",
            AppleRateLimited => "apple_rate_limited",
            AppleUnavailable => "apple_unavailable",
            AppleRejected => "apple_rejected",
            StoreUnavailable => "store_unavailable",
            Misconfigured => "misconfigured",
            Internal => "internal",
        }
    }

    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            Unauthorized => 401,
            Forbidden => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            InvalidJson | InvalidRequest => 400,
            PayloadTooLarge => 413,
            UnsupportedMediaType => 415,
            Conflict | DuplicateLocation | AccountInUse | OwnedByAnotherMdm
            | NoLicensesAvailable => 409,
            Unprocessable | TokenMalformed | TokenExpired | LocationMismatch => 422,
            AppleTokenExpired | AppleTokenRevoked | AppleTokenInvalid | AppleRejected => 422,
            AppleRateLimited => 429,
            AppleUnavailable => 502,
            StoreUnavailable | Misconfigured => 503,
            Internal => 500,
        }
    }
}

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
    /// Seconds a client should wait before trying again (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: json!({}),
            retry_after: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code.as_str(), "message": self.message, "details": self.details}})
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            ErrorCode::Unauthorized,
            "missing or invalid API key: send Authorization: Bearer <key>",
        )
    }

    pub fn forbidden(what: &str) -> Self {
        ApiError::new(ErrorCode::Forbidden, format!("this API key may not {what}"))
    }

    pub fn not_found(what: impl fmt::Display) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    pub fn no_route(method: &str, path: &str) -> Self {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no such route: {method} {path}"),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &[&str]) -> Self {
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        )
        .with_details(json!({"allowed": allowed}))
    }

    /// The `Allow` header value a 405 must carry (RFC 9110 15.5.6), from the methods
    /// [`ApiError::method_not_allowed`] recorded; `None` for every other error.
    pub fn allow_header(&self) -> Option<String> {
        if self.code != ErrorCode::MethodNotAllowed {
            return None;
        }
        let methods: Vec<&str> = self.details["allowed"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        Some(methods.join(", "))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message).with_details(json!({"field": field}))
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        )
        .with_details(json!({"limitBytes": limit}))
    }

    pub fn store(e: impl fmt::Display) -> Self {
        ApiError::new(ErrorCode::StoreUnavailable, format!("{e}"))
    }

    pub fn internal(e: impl fmt::Display) -> Self {
        ApiError::new(ErrorCode::Internal, format!("{e}"))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<vpp_store::StoreError> for ApiError {
    fn from(e: vpp_store::StoreError) -> Self {
        ApiError::store(e)
    }
}

impl From<vpp_store::KvError> for ApiError {
    fn from(e: vpp_store::KvError) -> Self {
        ApiError::store(e)
    }
}

/// Parse a JSON request body into `T`, with a clear error naming what is wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "request body is empty; a JSON object is expected",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("request body is not valid: {e}"),
        )
        .with_details(json!({"line": e.line(), "column": e.column()}))
    })
}

impl From<vpp_apple::AppleError> for ApiError {
    fn from(e: vpp_apple::AppleError) -> Self {
        apple_error(&e)
    }
}

/// How an Apple failure reaches our API: a stable code, Apple's number and message, and a
/// Retry-After when Apple asked for one.
pub fn apple_error(e: &vpp_apple::AppleError) -> ApiError {
    use vpp_apple::AppleError as A;
    let code = match e {
        A::TokenExpired => ErrorCode::AppleTokenExpired,
        A::TokenRevoked => ErrorCode::AppleTokenRevoked,
        A::TokenInvalid { .. } => ErrorCode::AppleTokenInvalid,
        A::RateLimited { .. } => ErrorCode::AppleRateLimited,
        A::Unavailable { .. } | A::Transport(_) | A::Decode(_) => ErrorCode::AppleUnavailable,
        A::Validation { .. } => ErrorCode::AppleRejected,
    };
    let number = match e {
        A::TokenInvalid { number } => *number,
        A::Unavailable { number, .. } | A::Validation { number, .. } => *number,
        A::TokenExpired => Some(9621),
        A::TokenRevoked => Some(9625),
        _ => None,
    };
    let mut err = ApiError::new(code, format!("Apple: {e}"))
        .with_details(json!({"appleErrorNumber": number, "appleCode": e.code()}));
    if let Some(ra) = e.retry_after() {
        err = err.with_retry_after(ra.as_secs().max(1));
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_not_allowed_carries_the_allow_value() {
        let e = ApiError::method_not_allowed("PATCH", "/api/x", &["GET", "PUT"]);
        assert_eq!(e.status(), 405);
        assert_eq!(e.allow_header().as_deref(), Some("GET, PUT"));
        assert_eq!(ApiError::unauthorized().allow_header(), None);
    }

    #[test]
    fn shape_is_stable() {
        let e = ApiError::unauthorized();
        assert_eq!(e.status(), 401);
        assert_eq!(e.body()["error"]["code"], "unauthorized");
        assert!(e.body()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Bearer"));
        assert!(e.body()["error"]["details"].is_object());
    }

    #[test]
    fn parse_json_reports_position() {
        #[derive(serde::Deserialize, Debug)]
        struct T {
            #[allow(dead_code)]
            a: u32,
        }
        let e = parse_json::<T>(b"{\"a\": \"x\"}").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert_eq!(e.body()["error"]["details"]["line"], 1);
        assert_eq!(
            parse_json::<T>(b"").unwrap_err().code,
            ErrorCode::InvalidJson
        );
    }
}
