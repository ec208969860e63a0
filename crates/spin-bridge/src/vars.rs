//! Spin variables, read in one place.

use vpp_licensing::auth::Keys;
use vpp_licensing::{ApiError, ErrorCode};

/// A variable, or `None` when it is undefined or empty.
pub fn optional(name: &str) -> Option<String> {
    spin_sdk::variables::get(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A variable the component cannot work without.
pub fn required(name: &str) -> Result<String, ApiError> {
    optional(name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Misconfigured,
            format!("the Spin variable {name} is not set"),
        )
    })
}

/// The API keys this deployment accepts.
pub fn api_keys() -> Result<Keys, ApiError> {
    Ok(Keys {
        admin: required("admin_api_key")?,
        reader: optional("reader_api_key"),
    })
}
