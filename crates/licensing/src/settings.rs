//! License settings: the removal-notice switch, the low-license threshold and the notice webhook.
//!
//! One value (`keys::settings()`). The webhook secret is write-only: it signs deliveries and is
//! never returned, only whether it is set. A `PUT` changes only the fields it names, merged into
//! the stored value by compare-and-swap, so concurrent `PUT`s of different fields all stick.
//!
//! The webhook is a destination an API caller chooses, so it may not point inside the platform:
//! it must be `https://` to a public host name or address, never loopback, private, link-local,
//! `localhost`, `*.local`, `*.internal` (which covers Spin's `*.spin.internal`) or a bare name.
//! Hosts the operator lists in [`WebhookRules::http_hosts`] (the Spin variable
//! `notice_webhook_http_hosts`) are trusted: they may use `http://` and private addresses.
//! Names that resolve to private addresses are the outbound allow-list's job
//! (`notice_webhook_hosts`).

use crate::error::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr};
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

/// What the operator allows for the notice webhook beyond public `https://` hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookRules {
    /// Hosts (`name`, `*.suffix`, or an address) the webhook may reach over `http://` and even
    /// at a private address: from `notice_webhook_http_hosts`, comma-separated.
    pub http_hosts: Vec<String>,
}

impl WebhookRules {
    /// From the variable's text: comma- or space-separated hosts.
    pub fn from_var(v: Option<&str>) -> WebhookRules {
        WebhookRules {
            http_hosts: v
                .unwrap_or("")
                .split([',', ' '])
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        }
    }

    fn trusts(&self, host: &str) -> bool {
        self.http_hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => h == host,
        })
    }
}

/// Apply a `PUT /api/settings` body with no http hosts allowed.
pub fn put(kv: &impl Kv, body: &[u8]) -> Result<Settings, ApiError> {
    put_with(kv, body, &WebhookRules::default())
}

/// Apply a `PUT /api/settings` body. Fields left out keep their value; `noticeWebhookUrl: null`
/// removes the webhook. Every field is checked before anything is written; the change is merged
/// into the stored settings by compare-and-swap (a concurrent `PUT` of other fields is kept).
pub fn put_with(kv: &impl Kv, body: &[u8], rules: &WebhookRules) -> Result<Settings, ApiError> {
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
        // JSON has one number type: 253.0 is the whole number 253.
        Some(t) => match t
            .as_i64()
            .or_else(|| t.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        {
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
        Some(Value::String(s)) => Some(Some(validate_url(s.trim(), rules)?)),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "noticeWebhookUrl",
                "noticeWebhookUrl must be an https:// URL or null",
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
    let merged = update::<Settings, Result<Settings, ApiError>>(kv, &keys::settings(), |cur| {
        let mut next = cur.unwrap_or_default();
        if let Some(b) = notify {
            next.license_removal_notification = b;
        }
        if let Some(t) = threshold {
            next.low_license_threshold = t;
        }
        if let Some(u) = &url {
            next.notice_webhook_url = u.clone();
        }
        if let Some(s) = &secret {
            next.notice_webhook_secret = Some(s.clone());
        }
        if next.notice_webhook_url.is_some() && next.notice_webhook_secret.is_none() {
            let e = ApiError::new(
                ErrorCode::Unprocessable,
                format!("a webhook needs noticeWebhookSecret ({MIN_SECRET_LEN}+ characters) to sign deliveries"),
            )
            .with_details(json!({"field": "noticeWebhookSecret"}));
            return Ok((None, Err(e)));
        }
        Ok((Some(next.clone()), Ok(next)))
    })?;
    merged
}

/// Check a webhook URL: absolute `https://` (or `http://` to a host the operator allows), no
/// credentials in it, and a host outside the platform (see the module documentation).
///
/// What the OpenAPI document's pattern states (length, no spaces, `http(s)://` and a first
/// host character) is 400; a URL of that form this app will not call (its host, port,
/// credentials, or plain http to a host the operator did not list) is 422.
pub fn validate_url(s: &str, rules: &WebhookRules) -> Result<String, ApiError> {
    let malformed = |why: &str| {
        ApiError::invalid_field(
            "noticeWebhookUrl",
            format!("noticeWebhookUrl is refused: {why}"),
        )
    };
    let bad = |why: &str| {
        ApiError::new(
            ErrorCode::Unprocessable,
            format!("noticeWebhookUrl is refused: {why}"),
        )
        .with_details(json!({"field": "noticeWebhookUrl"}))
    };
    if s.chars().count() > MAX_URL_LEN || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(malformed(
            "it must be an absolute URL of at most 2048 characters without spaces",
        ));
    }
    let lower = s.to_ascii_lowercase();
    let (https, rest) = match (
        lower.strip_prefix("https://"),
        lower.strip_prefix("http://"),
    ) {
        (Some(r), _) => (true, r),
        (None, Some(r)) => (false, r),
        _ => return Err(malformed("it must start with https://")),
    };
    if rest.starts_with(['/', '?', '#', ':']) {
        return Err(malformed("it has no host"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(bad(
            "credentials do not belong in the URL; the secret signs deliveries",
        ));
    }
    let host = webhook_host(authority).ok_or_else(|| bad("it has no valid host and port"))?;
    if host == "spin.internal" || host.ends_with(".spin.internal") {
        return Err(bad("it points at a component of this app"));
    }
    let trusted = rules.trusts(&host);
    if !https && !trusted {
        return Err(bad(&format!(
            "it must use https:// (an operator can allow http for {host} in notice_webhook_http_hosts)"
        )));
    }
    if !trusted {
        if let Some(why) = internal_host(&host) {
            return Err(bad(&format!("{host} is {why}")));
        }
    }
    Ok(s.to_string())
}

/// The host of `host[:port]` or `[v6][:port]`, lower case without a trailing dot; `None` when
/// it is empty or the port is not a port.
fn webhook_host(authority: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if !(1..=65535).contains(&p.parse::<u32>().ok()?) {
            return None;
        }
    }
    let host = host.trim_end_matches('.').to_string();
    (!host.is_empty()).then_some(host)
}

/// Why `host` is inside the platform, or `None` for a public host.
fn internal_host(host: &str) -> Option<&'static str> {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<Ipv6Addr>() {
            Ok(a) => internal_v6(a),
            Err(_) => Some("not a valid IPv6 address"),
        };
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    if last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x") {
        // Only the plain dotted form: 2130706433, 0x7f.1 or 017.0.0.1 are other ways to write
        // internal addresses.
        return match host.parse::<Ipv4Addr>() {
            Ok(a) if a.to_string() == host => internal_v4(a),
            _ => Some("not a valid host name or IPv4 address"),
        };
    }
    if host == "localhost" || host.ends_with(".localhost") {
        return Some("a loopback name");
    }
    if host.ends_with(".internal") || host.ends_with(".local") || host.ends_with(".home.arpa") {
        return Some("an internal name");
    }
    if !host.contains('.') {
        return Some("not a fully qualified name");
    }
    None
}

fn internal_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o1, o2, _, _] = a.octets();
    if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_private() || (o1 == 100 && (64..128).contains(&o2)) {
        Some("a private address")
    } else if a.is_link_local() {
        Some("a link-local address")
    } else if o1 == 0
        || a.is_broadcast()
        || a.is_multicast()
        || o1 >= 240
        || (o1 == 198 && (o2 == 18 || o2 == 19))
        || (o1 == 192 && o2 == 0)
    {
        Some("not a public address")
    } else {
        None
    }
}

fn internal_v6(a: Ipv6Addr) -> Option<&'static str> {
    let seg = a.segments();
    if let Some(v4) = a.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    // NAT64 (64:ff9b::/96) and the deprecated IPv4-compatible form (::a.b.c.d) embed IPv4.
    if (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0])
        || (seg[0..6] == [0, 0, 0, 0, 0, 0] && !a.is_loopback() && !a.is_unspecified())
    {
        let [a1, a2] = seg[6].to_be_bytes();
        let [a3, a4] = seg[7].to_be_bytes();
        return internal_v4(Ipv4Addr::new(a1, a2, a3, a4));
    }
    if a.is_loopback() {
        Some("a loopback address")
    } else if a.is_unspecified() || a.is_multicast() {
        Some("not a public address")
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some("a private address")
    } else if seg[0] & 0xffc0 == 0xfe80 || seg[0] & 0xffc0 == 0xfec0 {
        Some("a link-local address")
    } else {
        None
    }
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
        // JSON has one number type: 3.0 is the whole number 3.
        let s = put(&kv, br#"{"lowLicenseThreshold": 3.0}"#).unwrap();
        assert_eq!(s.low_license_threshold, 3);
        let s = put(&kv, br#"{"lowLicenseThreshold": 2}"#).unwrap();
        assert!(s.license_removal_notification, "kept");
        assert_eq!(s.low_license_threshold, 2);
        for bad in [
            &br#"{"lowLicenseThreshold": -1}"#[..],
            br#"{"lowLicenseThreshold": 2.5}"#,
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

    /// A store where another `PUT` lands between our read and our write, once.
    struct Racing<'a> {
        inner: &'a MemoryKv,
        other: std::cell::Cell<Option<&'static [u8]>>,
    }

    impl vpp_store::Kv for Racing<'_> {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, vpp_store::KvError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8]) -> Result<(), vpp_store::KvError> {
            self.inner.set(key, value)
        }
        fn delete(&self, key: &str) -> Result<(), vpp_store::KvError> {
            self.inner.delete(key)
        }
        fn swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            new: &[u8],
        ) -> Result<bool, vpp_store::KvError> {
            if let Some(body) = self.other.take() {
                put(self.inner, body).unwrap();
            }
            self.inner.swap(key, expected, new)
        }
    }

    #[test]
    fn concurrent_puts_of_different_fields_both_stick() {
        let kv = MemoryKv::default();
        let racing = Racing {
            inner: &kv,
            other: std::cell::Cell::new(Some(br#"{"lowLicenseThreshold": 9}"#)),
        };
        let s = put(&racing, br#"{"licenseRemovalNotification": true}"#).unwrap();
        assert!(s.license_removal_notification);
        assert_eq!(s.low_license_threshold, 9, "the other PUT's field is kept");
        let stored = load(&kv).unwrap();
        assert!(stored.license_removal_notification);
        assert_eq!(stored.low_license_threshold, 9);
    }

    #[test]
    fn webhook_must_be_public_https_unless_the_operator_allows_the_host() {
        let none = WebhookRules::default();
        for ok in [
            "https://hooks.example.com/vpp",
            "https://hooks.example.com:8443/vpp?x=1",
            "https://93.184.216.34/n",
            "https://[2606:2800:220:1::1]/n",
            "HTTPS://Hooks.Example.COM./n",
        ] {
            assert!(validate_url(ok, &none).is_ok(), "{ok}");
        }
        for bad in [
            "http://hooks.example.com/n",
            "https://127.0.0.1/n",
            "https://127.1.2.3:9000/n",
            "https://localhost/n",
            "https://api.localhost/n",
            "https://10.1.2.3/n",
            "https://172.16.0.1/n",
            "https://192.168.1.10/n",
            "https://100.64.0.1/n",
            "https://169.254.169.254/latest/meta-data",
            "https://0.0.0.0/n",
            "https://2130706433/n",
            "https://0x7f.0.0.1/n",
            "https://017.0.0.1/n",
            "https://[::1]/n",
            "https://[::ffff:127.0.0.1]/n",
            "https://[::ffff:10.0.0.1]/n",
            "https://[fd00::1]/n",
            "https://[fe80::1]/n",
            "https://[64:ff9b::a00:1]/n",
            "https://apple.spin.internal/accounts",
            "https://metadata.google.internal/n",
            "https://redis/n",
            "https://svc.cluster.local/n",
            "https://user:pw@hooks.example.com/n",
            "https://hooks.example.com:0/n",
            "https://hooks.example.com:99999/n",
            "http://hooks.example.com/n",
        ] {
            // Of the OpenAPI pattern's form, but not a URL this app calls.
            let e = validate_url(bad, &none).unwrap_err();
            assert_eq!(e.status(), 422, "{bad}");
            assert_eq!(e.details["field"], "noticeWebhookUrl");
        }
        for malformed in [
            "https://:443/n",
            "https:///n",
            "ftp://hooks.example.com/n",
            "https://a b",
        ] {
            let e = validate_url(malformed, &none).unwrap_err();
            assert_eq!(e.status(), 400, "{malformed}");
        }
        let rules = WebhookRules::from_var(Some("127.0.0.1, *.corp.example ,mdm-hook"));
        assert!(validate_url("http://127.0.0.1:8080/n", &rules).is_ok());
        assert!(validate_url("http://mdm-hook/n", &rules).is_ok());
        assert!(validate_url("http://a.corp.example/n", &rules).is_ok());
        assert!(validate_url("http://corp.example/n", &rules).is_err());
        assert!(validate_url("http://10.0.0.1/n", &rules).is_err());
        let internal = WebhookRules::from_var(Some("apple.spin.internal"));
        assert!(validate_url("http://apple.spin.internal/x", &internal).is_err());
        // Through the API: refused and nothing written.
        let kv = MemoryKv::default();
        let e = put(
            &kv,
            br#"{"noticeWebhookUrl": "https://169.254.169.254/", "noticeWebhookSecret": "0123456789abcdef"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unprocessable);
        assert!(e.message.contains("link-local"), "{}", e.message);
        assert!(kv.keys().is_empty());
    }
}
