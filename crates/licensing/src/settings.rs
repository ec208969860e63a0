//! License settings: the removal-notice switch, the low-license threshold and the notice webhook.
//!
//! One value (`keys::settings()`). The webhook secret is write-only: it signs deliveries and is
//! never returned, only whether it is set.

use crate::error::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vpp_store::{get_json, keys, update, Kv, StoreError};

pub const DEFAULT_LOW_LICENSE_THRESHOLD: i64 = 5;
const MAX_URL_LEN: usize = 2048;
const MIN_SECRET_LEN: usize = 16;
const MAX_SECRET_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    #[serde(default)]
    pub license_removal_notification: bool,
    #[serde(default = "default_threshold")]
    pub low_license_threshold: i64,
    #[serde(default)]
    pub notice_webhook_url: Option<String>,
    /// HMAC-SHA256 key of the `X-VPP-Signature` header. Stored, never shown.
    #[serde(default)]
    pub notice_webhook_secret: Option<String>,
}

fn default_threshold() -> i64 {
    DEFAULT_LOW_LICENSE_THRESHOLD
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            license_removal_notification: false,
            low_license_threshold: DEFAULT_LOW_LICENSE_THRESHOLD,
            notice_webhook_url: None,
            notice_webhook_secret: None,
        }
    }
}

impl Settings {
    /// What the API shows: everything but the secret.
    pub fn view(&self) -> Value {
        json!({
            "licenseRemovalNotification": self.license_removal_notification,
            "lowLicenseThreshold": self.low_license_threshold,
            "noticeWebhookUrl": self.notice_webhook_url,
            "noticeWebhookSecretSet": self.notice_webhook_secret.is_some(),
        })
    }
}

pub fn load(kv: &impl Kv) -> Result<Settings, StoreError> {
    Ok(get_json(kv, &keys::settings())?.unwrap_or_default())
}

/// Apply a `PUT /api/settings` body. Fields left out keep their value; `noticeWebhookUrl: null`
/// removes the webhook. Every field is checked before anything is written.
pub fn put(kv: &impl Kv, body: &[u8]) -> Result<Settings, ApiError> {
    let v: Value = crate::error::parse_json(body)?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("the settings body must be a JSON object"))?;
    const KNOWN: [&str; 4] = [
        "licenseRemovalNotification",
        "lowLicenseThreshold",
        "noticeWebhookUrl",
        "noticeWebhookSecret",
    ];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::invalid_field(
            k,
            format!("unknown setting {k}; known: {}", KNOWN.join(", ")),
        ));
    }
    let notify = match obj.get("licenseRemovalNotification") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "licenseRemovalNotification",
                "licenseRemovalNotification must be true or false",
            ))
        }
    };
    let threshold = match obj.get("lowLicenseThreshold") {
        None => None,
        Some(t) => match t.as_i64() {
            Some(n) if (0..=1_000_000).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::invalid_field(
                    "lowLicenseThreshold",
                    "lowLicenseThreshold must be a whole number from 0 to 1000000",
                ))
            }
        },
    };
    let url = match obj.get("noticeWebhookUrl") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) if s.trim().is_empty() => Some(None),
        Some(Value::String(s)) => Some(Some(validate_url(s.trim())?)),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "noticeWebhookUrl",
                "noticeWebhookUrl must be an http(s) URL or null",
            ))
        }
    };
    let secret = match obj.get("noticeWebhookSecret") {
        None => None,
        Some(Value::String(s))
            if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&s.chars().count())
                && !s.chars().any(char::is_control) =>
        {
            Some(s.clone())
        }
        Some(_) => {
            return Err(ApiError::invalid_field(
                "noticeWebhookSecret",
                format!(
                    "noticeWebhookSecret must be a string of {MIN_SECRET_LEN} to {MAX_SECRET_LEN} characters"
                ),
            ))
        }
    };
    let current = load(kv)?;
    let mut next = current.clone();
    if let Some(b) = notify {
        next.license_removal_notification = b;
    }
    if let Some(t) = threshold {
        next.low_license_threshold = t;
    }
    if let Some(u) = url {
        next.notice_webhook_url = u;
    }
    if let Some(s) = secret {
        next.notice_webhook_secret = Some(s);
    }
    if next.notice_webhook_url.is_some() && next.notice_webhook_secret.is_none() {
        // Well-formed, but the stored settings have no secret to sign with: 422, not 400.
        return Err(ApiError::new(
            ErrorCode::Unprocessable,
            format!("a webhook needs noticeWebhookSecret ({MIN_SECRET_LEN}+ characters) to sign deliveries"),
        )
        .with_details(json!({"field": "noticeWebhookSecret"})));
    }
    update::<Settings, ()>(kv, &keys::settings(), |_| Ok((Some(next.clone()), ())))?;
    Ok(next)
}

fn validate_url(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid_field(
            "noticeWebhookUrl",
            "noticeWebhookUrl must be an absolute http:// or https:// URL",
        )
    };
    if s.len() > MAX_URL_LEN || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(bad());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpp_store::MemoryKv;

    #[test]
    fn defaults_merge_and_validation() {
        let kv = MemoryKv::default();
        assert_eq!(load(&kv).unwrap(), Settings::default());
        let s = put(&kv, br#"{"licenseRemovalNotification": true}"#).unwrap();
        assert!(s.license_removal_notification);
        assert_eq!(s.low_license_threshold, DEFAULT_LOW_LICENSE_THRESHOLD);
        let s = put(&kv, br#"{"lowLicenseThreshold": 2}"#).unwrap();
        assert!(s.license_removal_notification, "kept");
        assert_eq!(s.low_license_threshold, 2);
        for bad in [
            &br#"{"lowLicenseThreshold": -1}"#[..],
            br#"{"licenseRemovalNotification": "yes"}"#,
            br#"{"noticeWebhookUrl": "ftp://x"}"#,
            br#"{"noticeWebhookUrl": "https://hook.example"}"#,
            br#"{"noticeWebhookSecret": "short"}"#,
            br#"{"other": 1}"#,
            br#"[]"#,
            b"",
        ] {
            assert!(put(&kv, bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(load(&kv).unwrap().low_license_threshold, 2, "unchanged");
        let s = put(
            &kv,
            br#"{"noticeWebhookUrl": "https://hook.example/x", "noticeWebhookSecret": "0123456789abcdef"}"#,
        )
        .unwrap();
        assert_eq!(
            s.notice_webhook_url.as_deref(),
            Some("https://hook.example/x")
        );
        assert_eq!(s.view()["noticeWebhookSecretSet"], true);
        assert!(s.view().get("noticeWebhookSecret").is_none());
        let s = put(&kv, br#"{"noticeWebhookUrl": null}"#).unwrap();
        assert!(s.notice_webhook_url.is_none());
    }
}
