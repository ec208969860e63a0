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

/// Apple's notifications reach `public_url` only over HTTPS (Apple rejects anything else with
/// 9712). `apple_notifications`: `auto` (default: on when public_url is https), `on`, `off`.
pub fn notifications_enabled() -> bool {
    match optional("apple_notifications").as_deref() {
        Some("on") | Some("true") => true,
        Some("off") | Some("false") => false,
        _ => public_url()
            .map(|u| u.starts_with("https://"))
            .unwrap_or(false),
    }
}

pub fn public_url() -> Option<String> {
    optional("public_url").map(|u| u.trim_end_matches('/').to_string())
}

/// A whole-number variable, or its default when unset or unreadable.
pub fn number(name: &str, default: i64) -> i64 {
    optional(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one invocation may spend on a job: `job_slice_seconds` (clamped to
/// 1..=`job::MAX_SLICE_SECONDS`, so a slice ends well within the platform's 30 s and its lease),
/// `job_slice_apple_calls`.
pub fn job_budget(
    now: chrono::DateTime<chrono::Utc>,
) -> Result<vpp_licensing::job::Budget, ApiError> {
    let raw = optional("job_slice_seconds");
    let seconds = vpp_licensing::job::slice_seconds(raw.as_deref())
        .map_err(|m| ApiError::new(ErrorCode::Misconfigured, m))?;
    if let Some(r) = raw.as_deref() {
        if r.parse::<i64>().ok() != Some(seconds) {
            eprintln!("job_slice_seconds {r} is out of range; using {seconds}");
        }
    }
    Ok(vpp_licensing::job::Budget::new(
        now,
        seconds,
        number("job_slice_apple_calls", 300).clamp(1, 100_000) as u32,
    ))
}
