//! The simulator's state and all of its protocol logic, as plain functions over a [`Model`].
//!
//! Nothing here does I/O: the HTTP layer (`server.rs`) turns requests into [`ApiRequest`]s, calls
//! [`Model::handle_api`], and runs the returned [`Effect`]s (delayed event application,
//! notification delivery). That keeps every behaviour unit-testable without sockets.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Apple's timestamp layout: `2030-11-08T22:33:22+0000`.
pub const APPLE_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%z";

/// Formats a time the way Apple does (`tokenExpirationDate`, `expDate`).
pub fn apple_time(t: &DateTime<Utc>) -> String {
    t.format(APPLE_TIME_FORMAT).to_string()
}

/// The path of the legacy content metadata lookup, served on the simulator's own origin.
pub const LOOKUP_PATH: &str = "/WebObjects/MZStorePlatform.woa/wa/lookup";

/// The message Apple sends with an error number.
pub fn error_message(n: u32) -> &'static str {
    match n {
        9600 => "Missing required argument",
        9601 => "Login required.",
        9602 => "Invalid argument.",
        9603 => "Internal error.",
        9609 => "Unable to find the registered user.",
        9610 => "License not found.",
        9621 => "The token has expired. You need to generate a new token online using your organization's account at https://business.apple.com or https://school.apple.com.",
        9622 => "Invalid authentication token",
        9625 => "The server has revoked the sToken.",
        9646 => "Too many requests.",
        9650 => "The page index must be greater than 0, and less than the total number of pages.",
        9700 => "Too many assets in the request.",
        9701 => "Too many clientUserIds in the request.",
        9702 => "Too many serialNumbers in the request.",
        9703 => "Duplicate assets in the request.",
        9704 => "Duplicate clientUserIds in the request.",
        9705 => "Duplicate serialNumbers in the request.",
        9706 => "The asset isn't revocable.",
        9707 => "The asset isn't device assignable.",
        9708 => "Unable to find eventId.",
        9709 => "There aren't enough assets available to complete this association.",
        9710 => "Notification URL and notification auth token must be provided together.",
        9711 => "Notification URL or notification auth token is too long.",
        9712 => "Notification URL must be a valid HTTPS URL.",
        9713 => "mdmInfo metadata is too long.",
        9714 => "Too many users in the request.",
        9715 => "Duplicate users in the request.",
        9716 => "clientUserId already exists.",
        9717 => "Invalid email.",
        9718 => "At least one asset is required.",
        9719 => "Either clientUserIds or serialNumbers are required.",
        9720 => "Users are required.",
        9721 => "Invalid versionId.",
        9722 => "Invalid authorization header. The header must match the format 'Bearer {sToken}'.",
        9723 => "mdmInfo requires name, id and metadata.",
        9724 => "mdmInfo id is too long.",
        9725 => "mdmInfo name is too long.",
        9726 => "Unsupported HTTP method.",
        9727 => "Unsupported Content-Type.",
        9728 => "Unable to reach the notification URL.",
        9729 => "Service temporarily unavailable.",
        _ => "Error.",
    }
}

/// All the error codes listed in service config.
const SERVICE_CONFIG_ERRORS: &[u32] = &[
    9601, 9602, 9603, 9609, 9621, 9625, 9646, 9650, 9700, 9701, 9702, 9703, 9704, 9705, 9706, 9707,
    9708, 9709, 9710, 9711, 9712, 9713, 9714, 9715, 9716, 9717, 9718, 9719, 9720, 9721, 9722, 9723,
    9724, 9725, 9726, 9727, 9728, 9729,
];

/// `{errorNumber, errorMessage}`.
pub fn error_body(n: u32) -> Value {
    json!({"errorNumber": n, "errorMessage": error_message(n)})
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The limits reported by `GET service/config` (and enforced by the simulator).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Limits {
    pub max_assets: usize,
    pub max_users: usize,
    pub max_notification_length: usize,
    pub max_revoke_client_user_ids: usize,
    pub max_client_user_ids: usize,
    pub max_serial_numbers: usize,
    pub max_revoke_serial_numbers: usize,
    pub max_request_per_second: usize,
    pub max_subscriptions: usize,
    pub max_subscription_client_user_ids: usize,
    pub max_mdm_name_length: usize,
    pub max_mdm_metadata_length: usize,
    pub max_mdm_id_length: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_assets: 25,
            max_users: 100,
            max_notification_length: 512,
            max_revoke_client_user_ids: 100,
            max_client_user_ids: 1000,
            max_serial_numbers: 1000,
            max_revoke_serial_numbers: 100,
            max_request_per_second: 15,
            max_subscriptions: 25,
            max_subscription_client_user_ids: 1000,
            max_mdm_name_length: 100,
            max_mdm_metadata_length: 255,
            max_mdm_id_length: 100,
        }
    }
}

/// Simulator knobs. Settable from Rust and through `POST /control/config` (partial JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct SimConfig {
    /// Records per page on assets, assignments and users.
    pub page_size: usize,
    /// Delay before an asynchronous event (associate, users/create, ...) is applied. 0 applies it
    /// before the write's response is sent.
    pub event_delay_ms: u64,
    /// Events wait on the simulator's own clock, moved only by [`Model::advance_clock`] (a
    /// test's clock), instead of timers on the machine's: a seeded test then replays exactly.
    pub manual_clock: bool,
    /// Probability (0.0..=1.0) that a notification is delivered twice with the same notificationId.
    pub duplicate_notification_chance: f64,
    /// Attempts per notification delivery (Apple: up to 3).
    pub notification_attempts: u32,
    /// Pause between notification attempts.
    pub notification_retry_delay_ms: u64,
    /// Enforce `limits.maxRequestPerSecond` per token (sliding one-second window).
    pub rate_limit_enabled: bool,
    /// An unknown token gets HTTP 200 + 9622 (the legacy answer Fleet sees) instead of 401 + 9601.
    pub unknown_token_http200: bool,
    /// Reject `http://` notification URLs with 9712 (Apple requires HTTPS; the simulator cannot
    /// deliver over TLS, so this is off by default).
    pub require_https_notification_url: bool,
    /// The limits reported by service config and enforced on requests.
    pub limits: Limits,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            page_size: 100,
            event_delay_ms: 200,
            manual_clock: false,
            duplicate_notification_chance: 0.0,
            notification_attempts: 3,
            notification_retry_delay_ms: 200,
            rate_limit_enabled: true,
            unknown_token_http200: false,
            require_https_notification_url: false,
            limits: Limits::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seed specs (Rust API and control API)
// ---------------------------------------------------------------------------------------------

/// A location to create. Every field has a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocationSpec {
    pub org_name: String,
    pub location_name: String,
    /// `countryISO2ACode`.
    pub country: String,
    /// `volumestore` or `enterprisestore`.
    pub default_platform: String,
    pub website_url: String,
    /// Token expiry; defaults to one year from now. A past date makes every call answer 9621.
    pub exp_date: Option<DateTime<Utc>>,
    /// The inner opaque `token` field; random when absent.
    pub token: Option<String>,
    /// The location's `uId`; generated when absent.
    pub uid: Option<String>,
    /// An already-set `mdmInfo`.
    pub mdm_info: Option<MdmInfo>,
}

impl Default for LocationSpec {
    fn default() -> Self {
        LocationSpec {
            org_name: "Simulated Org".into(),
            location_name: "Simulated Location".into(),
            country: "US".into(),
            default_platform: "enterprisestore".into(),
            website_url: "https://business.apple.com".into(),
            exp_date: None,
            token: None,
            uid: None,
            mdm_info: None,
        }
    }
}

impl LocationSpec {
    pub fn named(location_name: &str) -> Self {
        LocationSpec {
            location_name: location_name.into(),
            ..Default::default()
        }
    }
}

/// An asset (an adamId + pricingParam pair) with its license counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AssetSpec {
    pub adam_id: String,
    pub pricing_param: String,
    /// `App` or `Book`.
    pub product_type: String,
    /// Licenses purchased (ignored when `unlimited`).
    pub total_count: u64,
    pub retired_count: u64,
    pub revocable: bool,
    /// Defaults to true for apps and false for books when absent.
    pub device_assignable: Option<bool>,
    pub supported_platforms: Vec<String>,
    /// A free asset: unlimited assignment (`totalCount` 2147483647).
    pub unlimited: bool,
    /// Name for the metadata lookup.
    pub name: Option<String>,
    pub bundle_id: Option<String>,
}

impl Default for AssetSpec {
    fn default() -> Self {
        AssetSpec {
            adam_id: String::new(),
            pricing_param: "STDQ".into(),
            product_type: "App".into(),
            total_count: 10,
            retired_count: 0,
            revocable: true,
            device_assignable: None,
            supported_platforms: Vec::new(),
            unlimited: false,
            name: None,
            bundle_id: None,
        }
    }
}

impl AssetSpec {
    pub fn app(adam_id: &str, total_count: u64) -> Self {
        AssetSpec {
            adam_id: adam_id.into(),
            total_count,
            ..Default::default()
        }
    }
    pub fn book(adam_id: &str, total_count: u64) -> Self {
        AssetSpec {
            adam_id: adam_id.into(),
            product_type: "Book".into(),
            total_count,
            revocable: false,
            ..Default::default()
        }
    }
}

/// An assignment to seed. Exactly one of `serial_number` / `client_user_id`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct AssignmentSpec {
    pub adam_id: String,
    pub pricing_param: Option<String>,
    pub serial_number: Option<String>,
    pub client_user_id: Option<String>,
}

impl AssignmentSpec {
    pub fn device(adam_id: &str, serial: &str) -> Self {
        AssignmentSpec {
            adam_id: adam_id.into(),
            serial_number: Some(serial.into()),
            ..Default::default()
        }
    }
    pub fn user(adam_id: &str, client_user_id: &str) -> Self {
        AssignmentSpec {
            adam_id: adam_id.into(),
            client_user_id: Some(client_user_id.into()),
            ..Default::default()
        }
    }
}

/// A user to seed.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct UserSpec {
    pub client_user_id: String,
    pub email: Option<String>,
    pub managed_apple_id: Option<String>,
    /// `Registered` (default), `Associated` or `Retired`.
    pub status: Option<String>,
}

/// Another MDM takes the location over.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TakeOver {
    pub mdm_info: MdmInfo,
    /// The other MDM's notification settings (default: none, so ours stop).
    pub notification_url: Option<String>,
    pub notification_auth_token: Option<String>,
    /// Assignments the other MDM makes.
    pub assignments: Vec<AssignmentSpec>,
}

impl Default for TakeOver {
    fn default() -> Self {
        TakeOver {
            mdm_info: MdmInfo {
                id: "other-mdm-0000".into(),
                name: "Other MDM".into(),
                metadata: "9.9".into(),
            },
            notification_url: None,
            notification_auth_token: None,
            assignments: Vec::new(),
        }
    }
}

/// `mdmInfo`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MdmInfo {
    pub id: String,
    pub name: String,
    pub metadata: String,
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// What an injected fault answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 + Retry-After, errorNumber 9646.
    RateLimited,
    /// 503 + Retry-After, errorNumber 9729.
    Unavailable,
    /// 500, errorNumber 9603 (Retry-After only when `retryAfterSecs` is set).
    InternalError,
    /// 401, 9621.
    Expired,
    /// 401, 9625.
    Revoked,
    /// 401, 9601.
    Invalid,
    /// HTTP 200 with body errorNumber 9622.
    Invalid200,
    /// No error: delays the answer by `latencyMs`.
    Latency,
    /// The request is applied, then the answer is a bare 500 without an `errorNumber` (a
    /// gateway that timed out after Apple accepted the request).
    AppliedThenError,
}

/// A fault to inject, for the next `count` matching requests or until cleared.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// `assets`, `assets/associate`, `client/config`, ... (the path after `/mdm/v2/`), optionally
    /// prefixed by a method: `POST client/config`. Absent: every endpoint.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Number of requests it applies to; absent: until cleared.
    #[serde(default)]
    pub count: Option<u32>,
    /// Retry-After seconds (429 and 503 default to 1).
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
    /// For `latency`.
    #[serde(default)]
    pub latency_ms: Option<u64>,
}

impl FaultSpec {
    pub fn new(kind: FaultKind) -> Self {
        FaultSpec {
            kind,
            endpoint: None,
            count: None,
            retry_after_secs: None,
            latency_ms: None,
        }
    }
    pub fn latency(ms: u64) -> Self {
        FaultSpec {
            latency_ms: Some(ms),
            ..FaultSpec::new(FaultKind::Latency)
        }
    }
    /// Only for this endpoint (`assets`, `POST client/config`, ...).
    pub fn on(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }
    /// Only for the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.count = Some(n);
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        match &self.endpoint {
            None => true,
            Some(e) => {
                let e = e.trim();
                match e.split_once(' ') {
                    Some((m, p)) => {
                        m.eq_ignore_ascii_case(method) && p.trim().trim_matches('/') == path
                    }
                    None => e.trim_matches('/') == path,
                }
            }
        }
    }
}

/// Consumes matching faults: latency faults add up, the first error fault is returned.
fn take_fault(
    faults: &mut Vec<FaultSpec>,
    method: &str,
    path: &str,
    latency: &mut u64,
) -> Option<FaultSpec> {
    let mut hit = None;
    for f in faults.iter_mut() {
        if !f.matches(method, path) || f.count == Some(0) {
            continue;
        }
        if f.kind == FaultKind::Latency {
            *latency += f.latency_ms.unwrap_or(0);
        } else if hit.is_some() {
            continue;
        } else {
            hit = Some(f.clone());
        }
        if let Some(c) = f.count.as_mut() {
            *c -= 1;
        }
    }
    faults.retain(|f| f.count != Some(0));
    hit
}

fn fault_response(f: &FaultSpec) -> ApiResponse {
    match f.kind {
        FaultKind::RateLimited => ApiResponse::error(429, 9646)
            .with_header("Retry-After", &f.retry_after_secs.unwrap_or(1).to_string()),
        FaultKind::Unavailable => ApiResponse::error(503, 9729)
            .with_header("Retry-After", &f.retry_after_secs.unwrap_or(1).to_string()),
        FaultKind::InternalError => {
            let r = ApiResponse::error(500, 9603);
            match f.retry_after_secs {
                Some(s) => r.with_header("Retry-After", &s.to_string()),
                None => r,
            }
        }
        FaultKind::Expired => ApiResponse::error(401, 9621),
        FaultKind::Revoked => ApiResponse::error(401, 9625),
        FaultKind::Invalid => ApiResponse::error(401, 9601),
        FaultKind::Invalid200 => ApiResponse::error(200, 9622),
        FaultKind::Latency => ApiResponse::ok(json!({})),
        FaultKind::AppliedThenError => ApiResponse {
            status: 500,
            headers: Vec::new(),
            body: json!({}),
        },
    }
}

/// Sliding one-second window: at most `max` accepted requests in any second.
/// Returns the Retry-After seconds when the request must be refused.
pub fn rate_check(window: &mut VecDeque<Instant>, now: Instant, max: usize) -> Result<(), u64> {
    while let Some(front) = window.front() {
        if now.saturating_duration_since(*front) >= Duration::from_secs(1) {
            window.pop_front();
        } else {
            break;
        }
    }
    if window.len() >= max {
        return Err(1);
    }
    window.push_back(now);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// A tiny xorshift generator (ids, invite codes, duplicate-notification rolls).
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        Rng(h.finish() | 1)
    }
    /// A reproducible generator (model-based tests replay a run from its seed).
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
    pub fn hex(&mut self, len: usize) -> String {
        let mut s = String::new();
        while s.len() < len {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(len);
        s
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Asset {
    pub adam_id: String,
    pub pricing_param: String,
    pub product_type: String,
    pub total_count: u64,
    pub retired_count: u64,
    pub revocable: bool,
    pub device_assignable: bool,
    pub supported_platforms: Vec<String>,
    pub unlimited: bool,
    pub name: Option<String>,
    pub bundle_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub adam_id: String,
    pub pricing_param: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_user_id: Option<String>,
    /// Change sequence of the last write (for sinceVersionId).
    #[serde(skip)]
    pub modified: u64,
}

impl Assignment {
    fn api(&self) -> Value {
        let mut m = Map::new();
        m.insert("adamId".into(), json!(self.adam_id));
        m.insert("pricingParam".into(), json!(self.pricing_param));
        if let Some(s) = &self.serial_number {
            m.insert("serialNumber".into(), json!(s));
        }
        if let Some(u) = &self.client_user_id {
            m.insert("clientUserId".into(), json!(u));
        }
        Value::Object(m)
    }
    fn target_is(&self, serial: Option<&str>, user: Option<&str>) -> bool {
        self.serial_number.as_deref() == serial && self.client_user_id.as_deref() == user
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub client_user_id: String,
    pub email: Option<String>,
    pub managed_apple_id: Option<String>,
    /// `Registered`, `Associated` or `Retired`.
    pub status: String,
    pub invite_code: Option<String>,
    pub id_hash: Option<String>,
    #[serde(skip)]
    pub modified: u64,
}

impl User {
    fn api(&self) -> Value {
        let mut m = Map::new();
        m.insert("clientUserId".into(), json!(self.client_user_id));
        if let Some(e) = &self.email {
            m.insert("email".into(), json!(e));
        }
        if let Some(i) = &self.invite_code {
            if self.status == "Registered" {
                m.insert("inviteCode".into(), json!(i));
            }
        }
        if let Some(h) = &self.id_hash {
            m.insert("idHash".into(), json!(h));
        }
        m.insert("status".into(), json!(self.status));
        Value::Object(m)
    }
}

/// One location (one token).
#[derive(Debug)]
pub struct Location {
    pub uid: String,
    /// The whole token file content (base64), sent as the bearer.
    pub token: String,
    pub inner_token: String,
    pub org_name: String,
    pub location_name: String,
    pub country: String,
    pub default_platform: String,
    pub website_url: String,
    pub exp_date: DateTime<Utc>,
    pub revoked: bool,
    pub mdm_info: Option<MdmInfo>,
    pub notification_url: Option<String>,
    pub notification_auth_token: Option<String>,
    pub notification_types: Vec<String>,
    pub assets: Vec<Asset>,
    pub assignments: Vec<Assignment>,
    pub users: Vec<User>,
    pub faults: Vec<FaultSpec>,
    seq: u64,
    versions: HashMap<String, u64>,
    pub assets_version: String,
    pub assignments_version: String,
    pub users_version: String,
    rate_window: VecDeque<Instant>,
}

impl Location {
    fn touch(&mut self, rng: &mut Rng, assets: bool, assignments: bool, users: bool) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        let mut issue = |cur: &mut String, versions: &mut HashMap<String, u64>| {
            let id = rng.uuid();
            versions.insert(id.clone(), seq);
            *cur = id;
        };
        if assets {
            issue(&mut self.assets_version, &mut self.versions);
        }
        if assignments {
            issue(&mut self.assignments_version, &mut self.versions);
        }
        if users {
            issue(&mut self.users_version, &mut self.versions);
        }
        seq
    }

    fn asset_index(&self, adam_id: &str, pricing: &str) -> Option<usize> {
        self.assets
            .iter()
            .position(|a| a.adam_id == adam_id && a.pricing_param == pricing)
    }

    fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.client_user_id == id)
    }

    fn wants(&self, notification_type: &str) -> bool {
        self.notification_url.is_some()
            && self
                .notification_types
                .iter()
                .any(|t| t == notification_type)
    }

    /// Assignments per (adamId, pricingParam), counted in one pass (a million assignments and
    /// ten thousand assets stay fast).
    fn assigned_counts(&self) -> HashMap<(&str, &str), u64> {
        let mut counts: HashMap<(&str, &str), u64> = HashMap::new();
        for a in &self.assignments {
            *counts
                .entry((a.adam_id.as_str(), a.pricing_param.as_str()))
                .or_default() += 1;
        }
        counts
    }

    fn asset_view_counted(&self, a: &Asset, assigned: u64) -> AssetView {
        let total = if a.unlimited {
            i32::MAX as u64
        } else {
            a.total_count
        };
        AssetView {
            adam_id: a.adam_id.clone(),
            pricing_param: a.pricing_param.clone(),
            product_type: a.product_type.clone(),
            assigned_count: assigned,
            available_count: total
                .saturating_sub(assigned)
                .saturating_sub(a.retired_count),
            retired_count: a.retired_count,
            total_count: total,
            device_assignable: a.device_assignable,
            revocable: a.revocable,
            supported_platforms: a.supported_platforms.clone(),
            unlimited: a.unlimited,
        }
    }

    /// `uId`, `tokenExpirationDate` and `mdmInfo` (once set): the fields every response carries.
    fn common(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("uId".into(), json!(self.uid));
        m.insert(
            "tokenExpirationDate".into(),
            json!(apple_time(&self.exp_date)),
        );
        if let Some(i) = &self.mdm_info {
            m.insert("mdmInfo".into(), json!(i));
        }
        m
    }

    fn client_config(&self) -> Value {
        let mut m = self.common();
        m.insert("countryISO2ACode".into(), json!(self.country));
        m.insert("defaultPlatform".into(), json!(self.default_platform));
        m.insert("locationName".into(), json!(self.location_name));
        if let Some(u) = &self.notification_url {
            m.insert("notificationUrl".into(), json!(u));
        }
        if let Some(t) = &self.notification_auth_token {
            m.insert("notificationAuthToken".into(), json!(t));
        }
        m.insert(
            "subscribedNotificationTypes".into(),
            json!(self.notification_types),
        );
        m.insert("websiteURL".into(), json!(self.website_url));
        Value::Object(m)
    }
}

/// An asset with its computed counts (what `GET assets` returns).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AssetView {
    pub adam_id: String,
    pub pricing_param: String,
    pub product_type: String,
    pub assigned_count: u64,
    pub available_count: u64,
    pub retired_count: u64,
    pub total_count: u64,
    pub device_assignable: bool,
    pub revocable: bool,
    pub supported_platforms: Vec<String>,
    pub unlimited: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    Associate,
    Disassociate,
    Revoke,
    Create,
    Update,
    Retire,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Associate => "ASSOCIATE",
            EventType::Disassociate => "DISASSOCIATE",
            EventType::Revoke => "REVOKE",
            EventType::Create => "CREATE",
            EventType::Update => "UPDATE",
            EventType::Retire => "RETIRE",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventStatus {
    Pending,
    Complete,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAsset {
    pub adam_id: String,
    #[serde(default)]
    pub pricing_param: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RequestUser {
    #[serde(default)]
    pub client_user_id: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub managed_apple_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum EventPayload {
    Manage {
        assets: Vec<(String, String)>,
        serial_numbers: Vec<String>,
        client_user_ids: Vec<String>,
    },
    Revoke {
        serial_numbers: Vec<String>,
        client_user_ids: Vec<String>,
    },
    Users {
        users: Vec<RequestUser>,
    },
}

/// An asynchronous write and its outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub event_id: String,
    pub location_uid: String,
    pub event_type: EventType,
    pub event_status: EventStatus,
    pub num_requested: u64,
    pub num_completed: u64,
    pub failures: Vec<Value>,
    pub created: DateTime<Utc>,
    pub payload: EventPayload,
}

/// One received call (the call log).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    /// When the request was received.
    pub time: DateTime<Utc>,
    pub method: String,
    pub path: String,
    pub query: String,
    /// The bearer as sent.
    pub token: Option<String>,
    /// The location's uId when the token was known.
    pub location_uid: Option<String>,
    pub status: u16,
    pub error_number: Option<u32>,
    pub body: Option<Value>,
}

/// A notification to deliver.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outgoing {
    pub url: String,
    pub auth_token: String,
    pub location_uid: String,
    pub notification_id: String,
    pub notification_type: String,
    pub envelope: Value,
    /// 2 when this notification is delivered twice.
    pub copies: u32,
}

/// One delivery of a notification (the notification log). A duplicated notification shows
/// twice with the same `notificationId`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRecord {
    pub time: DateTime<Utc>,
    pub url: String,
    pub location_uid: String,
    pub notification_id: String,
    pub notification_type: String,
    pub envelope: Value,
    pub attempts: u32,
    pub delivered: bool,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// A location's whole state (control API and Rust API).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocationState {
    #[serde(rename = "uId")]
    pub uid: String,
    pub token: String,
    pub org_name: String,
    pub location_name: String,
    pub exp_date: String,
    pub revoked: bool,
    pub mdm_info: Option<MdmInfo>,
    pub client_config: Value,
    pub assets: Vec<AssetView>,
    pub assignments: Vec<Assignment>,
    pub users: Vec<User>,
    pub assets_version_id: String,
    pub assignments_version_id: String,
    pub users_version_id: String,
    pub faults: Vec<FaultSpec>,
    pub events: Vec<Event>,
}

// ---------------------------------------------------------------------------------------------
// Requests and responses
// ---------------------------------------------------------------------------------------------

/// An API request, already taken apart by the HTTP layer.
#[derive(Clone, Debug, Default)]
pub struct ApiRequest {
    pub method: String,
    /// The path after `/mdm/v2/` (`assets`, `assets/associate`, ...).
    pub path: String,
    pub query: Vec<(String, String)>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl ApiRequest {
    pub fn get(path: &str, token: &str, query: &[(&str, &str)]) -> Self {
        ApiRequest {
            method: "GET".into(),
            path: path.into(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            authorization: Some(format!("Bearer {token}")),
            ..Default::default()
        }
    }
    pub fn post(path: &str, token: &str, body: Value) -> Self {
        ApiRequest {
            method: "POST".into(),
            path: path.into(),
            authorization: Some(format!("Bearer {token}")),
            content_type: Some("application/json".into()),
            body: body.to_string().into_bytes(),
            ..Default::default()
        }
    }
    fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl ApiResponse {
    pub fn ok(body: Value) -> Self {
        ApiResponse {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }
    pub fn error(status: u16, n: u32) -> Self {
        ApiResponse {
            status,
            headers: Vec::new(),
            body: error_body(n),
        }
    }
    pub fn error_info(status: u16, n: u32, info: Value) -> Self {
        let mut r = Self::error(status, n);
        if let Value::Object(m) = &mut r.body {
            m.insert("errorInfo".into(), info);
        }
        r
    }
    pub fn with_header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn error_number(&self) -> Option<u32> {
        self.body.get("errorNumber")?.as_u64().map(|v| v as u32)
    }
}

/// Work for the HTTP layer after a request.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Apply this event after the delay.
    Schedule { event_id: String, delay_ms: u64 },
    /// Deliver these notifications.
    Notify(Vec<Outgoing>),
}

/// A `POST client/config` with a notification URL, waiting for its TEST_NOTIFICATION.
#[derive(Clone, Debug)]
pub struct PendingConfig {
    pub location_uid: String,
    pub request: ClientConfigRequest,
    pub test: Outgoing,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MdmInfoRequest {
    pub id: Option<String>,
    pub name: Option<String>,
    pub metadata: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfigRequest {
    #[serde(default)]
    pub mdm_info: Option<MdmInfoRequest>,
    #[serde(default)]
    pub notification_url: Option<String>,
    #[serde(default)]
    pub notification_auth_token: Option<String>,
    #[serde(default)]
    pub notification_types: Option<Vec<String>>,
}

/// What [`Model::handle_api`] decided.
#[derive(Clone, Debug)]
pub struct ApiOutcome {
    pub response: ApiResponse,
    pub latency_ms: u64,
    pub location_uid: Option<String>,
    pub effects: Vec<Effect>,
    /// Set when the answer waits on a TEST_NOTIFICATION delivery: call
    /// [`Model::finish_client_config`] with the delivery result.
    pub pending_config: Option<PendingConfig>,
}

impl ApiOutcome {
    fn reply(response: ApiResponse) -> Self {
        ApiOutcome {
            response,
            latency_ms: 0,
            location_uid: None,
            effects: Vec::new(),
            pending_config: None,
        }
    }
}

const NOTIFICATION_TYPES: &[&str] = &[
    "TEST_NOTIFICATION",
    "ASSET_MANAGEMENT",
    "USER_MANAGEMENT",
    "USER_ASSOCIATED",
    "ASSET_COUNT",
    "SUBSCRIPTION_MANAGEMENT",
    "SUBSCRIPTION_COUNT",
    "UNLIMITED_ASSET",
];

/// (errorNumber, adamId, pricingParam): how per-item failures are grouped.
type FailureKey = (u32, String, String);

/// Max elements per notification.
pub const MAX_NOTIFICATION_ITEMS: usize = 100;

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn bool_param(req: &ApiRequest, name: &str) -> Result<Option<bool>, ApiResponse> {
    match req.q(name) {
        None | Some("") => Ok(None),
        Some(v) => parse_bool(v)
            .map(Some)
            .ok_or_else(|| ApiResponse::error(400, 9602)),
    }
}

fn int_param(req: &ApiRequest, name: &str) -> Result<Option<i64>, ApiResponse> {
    match req.q(name) {
        None | Some("") => Ok(None),
        Some(v) => v
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiResponse::error(400, 9602)),
    }
}

fn str_param<'a>(req: &'a ApiRequest, name: &str) -> Option<&'a str> {
    req.q(name).filter(|v| !v.is_empty())
}

/// Cuts one page out of `items`; adds the paging fields to `out`.
fn paginate<T>(
    items: Vec<T>,
    page_size: usize,
    req: &ApiRequest,
    out: &mut Map<String, Value>,
) -> Result<Vec<T>, ApiResponse> {
    let size = page_size.max(1);
    let total_pages = items.len().div_ceil(size).max(1);
    let index = match req.q("pageIndex") {
        None | Some("") => 0usize,
        Some(v) => match v.trim().parse::<i64>() {
            Ok(i) if i >= 0 && (i as usize) < total_pages => i as usize,
            _ => return Err(ApiResponse::error(400, 9650)),
        },
    };
    let page: Vec<T> = items.into_iter().skip(index * size).take(size).collect();
    out.insert("currentPageIndex".into(), json!(index));
    if index + 1 < total_pages {
        out.insert("nextPageIndex".into(), json!(index + 1));
    }
    out.insert("size".into(), json!(page.len()));
    out.insert("totalPages".into(), json!(total_pages));
    Ok(page)
}

fn parse_body<T: serde::de::DeserializeOwned>(req: &ApiRequest) -> Result<T, ApiResponse> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        return serde_json::from_str("{}").map_err(|_| ApiResponse::error(400, 9602));
    }
    serde_json::from_slice(&req.body).map_err(|_| ApiResponse::error(400, 9602))
}

fn has_duplicates<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> bool {
    let mut seen = HashSet::new();
    items.into_iter().any(|i| !seen.insert(i))
}

fn chunks_of(items: Vec<Value>) -> Vec<Vec<Value>> {
    if items.is_empty() {
        return Vec::new();
    }
    items
        .chunks(MAX_NOTIFICATION_ITEMS)
        .map(|c| c.to_vec())
        .collect()
}

fn valid_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((a, b)) => {
            !a.is_empty()
                && b.contains('.')
                && !b.starts_with('.')
                && !b.ends_with('.')
                && !e.contains(char::is_whitespace)
        }
        None => false,
    }
}

fn valid_notification_url(u: &str, require_https: bool) -> bool {
    let rest = if let Some(r) = u.strip_prefix("https://") {
        r
    } else if let Some(r) = u.strip_prefix("http://") {
        if require_https {
            return false;
        }
        r
    } else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    !host.is_empty() && !host.contains(char::is_whitespace)
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// The whole simulator state.
#[derive(Debug)]
pub struct Model {
    pub config: SimConfig,
    /// `http://host:port`, used in service config URLs.
    pub origin: String,
    pub locations: Vec<Location>,
    pub events: BTreeMap<String, Event>,
    pub calls: Vec<CallRecord>,
    pub notifications: Vec<NotificationRecord>,
    /// Faults on every request (including service config and unknown tokens).
    pub global_faults: Vec<FaultSpec>,
    pub rng: Rng,
    uid_counter: u64,
    /// Every license an applied event took away, in order: (location uId, adamId, serial
    /// number, client user id). Tests count these against the removal notices owed.
    pub removed: Vec<(String, String, Option<String>, Option<String>)>,
    /// With [`SimConfig::manual_clock`]: time moved so far, and the events waiting on it (due
    /// time, event id), in the order they were accepted.
    pub clock: Duration,
    due: Vec<(Duration, String)>,
}

impl Model {
    pub fn new(origin: &str) -> Self {
        Model {
            config: SimConfig::default(),
            origin: origin.trim_end_matches('/').to_string(),
            locations: Vec::new(),
            events: BTreeMap::new(),
            calls: Vec::new(),
            notifications: Vec::new(),
            global_faults: Vec::new(),
            rng: Rng::seeded(),
            uid_counter: 0,
            removed: Vec::new(),
            clock: Duration::ZERO,
            due: Vec::new(),
        }
    }

    /// Move the simulator's clock on (with [`SimConfig::manual_clock`]) and apply the events now
    /// due, in the order Apple accepted them; returns their notifications, in order.
    pub fn advance_clock(&mut self, d: Duration) -> Vec<Outgoing> {
        self.clock += d;
        let now = self.clock;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.due)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.due = later;
        let mut out = Vec::new();
        for (_, id) in due {
            out.extend(self.apply_event(&id));
        }
        out
    }

    /// Drops every location, event, fault and log (the config stays).
    pub fn reset(&mut self) {
        self.locations.clear();
        self.events.clear();
        self.due.clear();
        self.calls.clear();
        self.notifications.clear();
        self.global_faults.clear();
        self.removed.clear();
    }

    // ----- locations and seeding ------------------------------------------------------------

    /// Creates a location; returns its token file content (base64).
    pub fn add_location(&mut self, spec: LocationSpec) -> String {
        self.uid_counter += 1;
        let uid = spec.uid.clone().unwrap_or_else(|| {
            format!(
                "20490250{:08}",
                (self.rng.next_u64() % 90_000_000) + self.uid_counter
            )
        });
        let inner = spec.token.clone().unwrap_or_else(|| {
            base64::engine::general_purpose::STANDARD.encode(format!("sim-{}", self.rng.hex(40)))
        });
        let exp = spec
            .exp_date
            .unwrap_or_else(|| Utc::now() + chrono::Duration::days(365));
        // Apple's format has no sub-second part.
        let exp = DateTime::<Utc>::from_timestamp(exp.timestamp(), 0).unwrap_or(exp);
        let file = json!({"token": inner, "expDate": apple_time(&exp), "orgName": spec.org_name});
        let token = base64::engine::general_purpose::STANDARD.encode(file.to_string());
        let mut loc = Location {
            uid,
            token: token.clone(),
            inner_token: inner,
            org_name: spec.org_name,
            location_name: spec.location_name,
            country: spec.country,
            default_platform: spec.default_platform,
            website_url: spec.website_url,
            exp_date: exp,
            revoked: false,
            mdm_info: spec.mdm_info,
            notification_url: None,
            notification_auth_token: None,
            notification_types: Vec::new(),
            assets: Vec::new(),
            assignments: Vec::new(),
            users: Vec::new(),
            faults: Vec::new(),
            seq: 0,
            versions: HashMap::new(),
            assets_version: String::new(),
            assignments_version: String::new(),
            users_version: String::new(),
            rate_window: VecDeque::new(),
        };
        loc.touch(&mut self.rng, true, true, true);
        self.locations.push(loc);
        token
    }

    /// Finds a location by token (whole file content), uId or inner token.
    pub fn location_index(&self, key: &str) -> Option<usize> {
        let key = key.trim();
        self.locations
            .iter()
            .position(|l| l.token == key)
            .or_else(|| self.locations.iter().position(|l| l.uid == key))
            .or_else(|| self.locations.iter().position(|l| l.inner_token == key))
    }

    fn loc_idx(&self, key: &str) -> anyhow::Result<usize> {
        self.location_index(key)
            .ok_or_else(|| anyhow::anyhow!("unknown location {key:?}"))
    }

    pub fn location(&self, key: &str) -> Option<&Location> {
        self.location_index(key).map(|i| &self.locations[i])
    }

    /// Adds assets, or replaces the ones with the same adamId + pricingParam.
    pub fn add_assets(&mut self, key: &str, specs: Vec<AssetSpec>) -> anyhow::Result<()> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        for s in specs {
            anyhow::ensure!(!s.adam_id.is_empty(), "asset without adamId");
            let is_book = s.product_type.eq_ignore_ascii_case("book");
            let asset = Asset {
                adam_id: s.adam_id.clone(),
                pricing_param: s.pricing_param.clone(),
                product_type: if is_book { "Book".into() } else { "App".into() },
                total_count: s.total_count,
                retired_count: s.retired_count,
                revocable: s.revocable,
                device_assignable: s.device_assignable.unwrap_or(!is_book),
                supported_platforms: if s.supported_platforms.is_empty() {
                    if is_book {
                        vec!["iOS".into(), "macOS".into()]
                    } else {
                        vec!["iOS".into()]
                    }
                } else {
                    s.supported_platforms
                },
                unlimited: s.unlimited,
                name: s.name,
                bundle_id: s.bundle_id,
            };
            match loc.asset_index(&s.adam_id, &s.pricing_param) {
                Some(i) => loc.assets[i] = asset,
                None => loc.assets.push(asset),
            }
        }
        loc.touch(&mut self.rng, true, false, false);
        Ok(())
    }

    /// Adds assignments directly (no event, no notification, no license check). Users named by
    /// `clientUserId` are created (Associated) when missing.
    pub fn add_assignments(&mut self, key: &str, specs: Vec<AssignmentSpec>) -> anyhow::Result<()> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        let next = loc.seq + 1;
        let mut new_users = false;
        // Indexes built once per call: seeding a million assignments stays linear.
        let known_assets: HashSet<(String, String)> = loc
            .assets
            .iter()
            .map(|a| (a.adam_id.clone(), a.pricing_param.clone()))
            .collect();
        let mut existing: HashSet<(String, String, Option<String>, Option<String>)> = loc
            .assignments
            .iter()
            .map(|a| {
                (
                    a.adam_id.clone(),
                    a.pricing_param.clone(),
                    a.serial_number.clone(),
                    a.client_user_id.clone(),
                )
            })
            .collect();
        for s in specs {
            let pricing = s.pricing_param.clone().unwrap_or_else(|| "STDQ".into());
            anyhow::ensure!(
                known_assets.contains(&(s.adam_id.clone(), pricing.clone())),
                "unknown asset {} {}",
                s.adam_id,
                pricing
            );
            anyhow::ensure!(
                s.serial_number.is_some() != s.client_user_id.is_some(),
                "an assignment needs exactly one of serialNumber / clientUserId"
            );
            if let Some(u) = &s.client_user_id {
                if loc.user(u).is_none() {
                    new_users = true;
                    loc.users.push(User {
                        client_user_id: u.clone(),
                        email: Some(format!("{u}@example.com")),
                        managed_apple_id: None,
                        status: "Associated".into(),
                        invite_code: Some(self.rng.hex(32)),
                        id_hash: Some(self.rng.hex(24)),
                        modified: next,
                    });
                }
            }
            if existing.insert((
                s.adam_id.clone(),
                pricing.clone(),
                s.serial_number.clone(),
                s.client_user_id.clone(),
            )) {
                loc.assignments.push(Assignment {
                    adam_id: s.adam_id,
                    pricing_param: pricing,
                    serial_number: s.serial_number,
                    client_user_id: s.client_user_id,
                    modified: next,
                });
            }
        }
        loc.touch(&mut self.rng, true, true, new_users);
        Ok(())
    }

    /// Removes assignments directly (no event, no notification).
    pub fn remove_assignments(
        &mut self,
        key: &str,
        specs: Vec<AssignmentSpec>,
    ) -> anyhow::Result<()> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        for s in specs {
            let pricing = s.pricing_param.clone().unwrap_or_else(|| "STDQ".into());
            loc.assignments.retain(|a| {
                !(a.adam_id == s.adam_id
                    && a.pricing_param == pricing
                    && a.target_is(s.serial_number.as_deref(), s.client_user_id.as_deref()))
            });
        }
        loc.touch(&mut self.rng, true, true, false);
        Ok(())
    }

    /// Adds or replaces users directly.
    pub fn add_users(&mut self, key: &str, specs: Vec<UserSpec>) -> anyhow::Result<()> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        let next = loc.seq + 1;
        for s in specs {
            anyhow::ensure!(!s.client_user_id.is_empty(), "user without clientUserId");
            let status = s.status.clone().unwrap_or_else(|| "Registered".into());
            let user = User {
                client_user_id: s.client_user_id.clone(),
                email: s.email,
                managed_apple_id: s.managed_apple_id,
                id_hash: (status == "Associated").then(|| self.rng.hex(24)),
                invite_code: Some(self.rng.hex(32)),
                status,
                modified: next,
            };
            match loc
                .users
                .iter()
                .position(|u| u.client_user_id == s.client_user_id)
            {
                Some(i) => loc.users[i] = user,
                None => loc.users.push(user),
            }
        }
        loc.touch(&mut self.rng, false, false, true);
        Ok(())
    }

    /// A user accepts their invitation: status Associated and a USER_ASSOCIATED notification.
    pub fn associate_user(
        &mut self,
        key: &str,
        client_user_id: &str,
    ) -> anyhow::Result<Vec<Outgoing>> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        let next = loc.seq + 1;
        let rng = &mut self.rng;
        let user = loc
            .users
            .iter_mut()
            .find(|u| u.client_user_id == client_user_id)
            .ok_or_else(|| anyhow::anyhow!("unknown user {client_user_id}"))?;
        user.status = "Associated".into();
        if user.id_hash.is_none() {
            user.id_hash = Some(rng.hex(24));
        }
        user.modified = next;
        let mut api = user.api();
        if let (Value::Object(m), Some(code)) = (&mut api, &user.invite_code) {
            m.insert("inviteCode".into(), json!(code));
        }
        loc.touch(&mut self.rng, false, false, true);
        Ok(self.notifications_for(
            idx,
            "USER_ASSOCIATED",
            vec![json!({"associatedUsers": [api]})],
        ))
    }

    /// A purchase, transfer or refund: changes the total and sends ASSET_COUNT.
    pub fn change_asset_count(
        &mut self,
        key: &str,
        adam_id: &str,
        pricing: &str,
        delta: i64,
    ) -> anyhow::Result<Vec<Outgoing>> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        let ai = loc
            .asset_index(adam_id, pricing)
            .ok_or_else(|| anyhow::anyhow!("unknown asset {adam_id} {pricing}"))?;
        let a = &mut loc.assets[ai];
        a.total_count = (a.total_count as i64 + delta).max(0) as u64;
        loc.touch(&mut self.rng, true, false, false);
        Ok(self.notifications_for(
            idx,
            "ASSET_COUNT",
            vec![json!({"adamId": adam_id, "countDelta": delta, "pricingParam": pricing})],
        ))
    }

    /// Another MDM claims the location.
    pub fn take_over(&mut self, key: &str, t: TakeOver) -> anyhow::Result<()> {
        let idx = self.loc_idx(key)?;
        {
            let loc = &mut self.locations[idx];
            loc.mdm_info = Some(t.mdm_info);
            loc.notification_url = t.notification_url;
            loc.notification_auth_token = t.notification_auth_token;
            if loc.notification_url.is_none() {
                loc.notification_types.clear();
            }
        }
        if !t.assignments.is_empty() {
            let key = self.locations[idx].token.clone();
            self.add_assignments(&key, t.assignments)?;
        }
        Ok(())
    }

    /// Sets the token's expiry and/or revoked flag.
    pub fn set_token_state(
        &mut self,
        key: &str,
        exp_date: Option<DateTime<Utc>>,
        revoked: Option<bool>,
    ) -> anyhow::Result<()> {
        let idx = self.loc_idx(key)?;
        let loc = &mut self.locations[idx];
        if let Some(e) = exp_date {
            loc.exp_date = e;
        }
        if let Some(r) = revoked {
            loc.revoked = r;
        }
        Ok(())
    }

    pub fn add_fault(&mut self, key: Option<&str>, f: FaultSpec) -> anyhow::Result<()> {
        match key {
            None => self.global_faults.push(f),
            Some(k) => {
                let idx = self.loc_idx(k)?;
                self.locations[idx].faults.push(f);
            }
        }
        Ok(())
    }

    /// Clears a location's faults, or (None) the global faults and every location's.
    pub fn clear_faults(&mut self, key: Option<&str>) -> anyhow::Result<()> {
        match key {
            None => {
                self.global_faults.clear();
                for l in &mut self.locations {
                    l.faults.clear();
                }
            }
            Some(k) => {
                let idx = self.loc_idx(k)?;
                self.locations[idx].faults.clear();
            }
        }
        Ok(())
    }

    pub fn location_state(&self, key: &str) -> anyhow::Result<LocationState> {
        let idx = self.loc_idx(key)?;
        let loc = &self.locations[idx];
        Ok(LocationState {
            uid: loc.uid.clone(),
            token: loc.token.clone(),
            org_name: loc.org_name.clone(),
            location_name: loc.location_name.clone(),
            exp_date: apple_time(&loc.exp_date),
            revoked: loc.revoked,
            mdm_info: loc.mdm_info.clone(),
            client_config: loc.client_config(),
            assets: {
                let counts = loc.assigned_counts();
                loc.assets
                    .iter()
                    .map(|a| {
                        let n = counts
                            .get(&(a.adam_id.as_str(), a.pricing_param.as_str()))
                            .copied()
                            .unwrap_or(0);
                        loc.asset_view_counted(a, n)
                    })
                    .collect()
            },
            assignments: loc.assignments.clone(),
            users: loc.users.clone(),
            assets_version_id: loc.assets_version.clone(),
            assignments_version_id: loc.assignments_version.clone(),
            users_version_id: loc.users_version.clone(),
            faults: loc.faults.clone(),
            events: self
                .events
                .values()
                .filter(|e| e.location_uid == loc.uid)
                .cloned()
                .collect(),
        })
    }

    pub fn pending_events(&self) -> Vec<String> {
        self.events
            .values()
            .filter(|e| e.event_status == EventStatus::Pending)
            .map(|e| e.event_id.clone())
            .collect()
    }

    /// Records a call; the log stays ordered by receipt time even when answers finish out of order.
    pub fn log_call(&mut self, rec: CallRecord) {
        let pos = self.calls.partition_point(|c| c.time <= rec.time);
        self.calls.insert(pos, rec);
    }

    // ----- notifications --------------------------------------------------------------------

    /// Builds notifications of one type for a location (none when it is not subscribed).
    fn notifications_for(&mut self, idx: usize, ty: &str, payloads: Vec<Value>) -> Vec<Outgoing> {
        let loc = &self.locations[idx];
        if !loc.wants(ty) {
            return Vec::new();
        }
        let (Some(url), Some(auth)) = (
            loc.notification_url.clone(),
            loc.notification_auth_token.clone(),
        ) else {
            return Vec::new();
        };
        let uid = loc.uid.clone();
        payloads
            .into_iter()
            .map(|p| self.outgoing(&url, &auth, &uid, ty, p))
            .collect()
    }

    fn outgoing(
        &mut self,
        url: &str,
        auth: &str,
        uid: &str,
        ty: &str,
        notification: Value,
    ) -> Outgoing {
        let id = self.rng.uuid();
        let dup = self.config.duplicate_notification_chance > 0.0
            && self.rng.unit() < self.config.duplicate_notification_chance;
        Outgoing {
            url: url.into(),
            auth_token: auth.into(),
            location_uid: uid.into(),
            notification_id: id.clone(),
            notification_type: ty.into(),
            envelope: json!({
                "notification": notification,
                "notificationId": id,
                "notificationType": ty,
                "uId": uid,
            }),
            copies: if dup { 2 } else { 1 },
        }
    }

    pub fn record_notification(&mut self, rec: NotificationRecord) {
        self.notifications.push(rec);
    }

    // ----- the API --------------------------------------------------------------------------

    /// Handles one `/mdm/v2/...` request.
    pub fn handle_api(&mut self, req: &ApiRequest, now: Instant) -> ApiOutcome {
        let path = req.path.trim_matches('/').to_string();
        let method = req.method.to_ascii_uppercase();
        let mut latency = 0;
        if let Some(f) = take_fault(&mut self.global_faults, &method, &path, &mut latency) {
            let mut o = ApiOutcome::reply(fault_response(&f));
            o.latency_ms = latency;
            return o;
        }
        if path == "service/config" {
            let mut o = ApiOutcome::reply(if method == "GET" {
                ApiResponse::ok(self.service_config())
            } else {
                ApiResponse::error(405, 9726)
            });
            o.latency_ms = latency;
            return o;
        }
        let token = match req.authorization.as_deref().map(str::trim) {
            Some(h) if h.len() > 7 && h[..7].eq_ignore_ascii_case("bearer ") => {
                h[7..].trim().to_string()
            }
            _ => {
                let mut o = ApiOutcome::reply(ApiResponse::error(401, 9722));
                o.latency_ms = latency;
                return o;
            }
        };
        let Some(idx) = self.locations.iter().position(|l| l.token == token) else {
            let mut o = ApiOutcome::reply(if self.config.unknown_token_http200 {
                ApiResponse::error(200, 9622)
            } else {
                ApiResponse::error(401, 9601)
            });
            o.latency_ms = latency;
            return o;
        };
        let uid = self.locations[idx].uid.clone();
        let fault = take_fault(
            &mut self.locations[idx].faults,
            &method,
            &path,
            &mut latency,
        );
        let mut out = self.route(idx, req, &method, &path, fault, now);
        out.latency_ms += latency;
        out.location_uid = Some(uid);
        out
    }

    fn route(
        &mut self,
        idx: usize,
        req: &ApiRequest,
        method: &str,
        path: &str,
        fault: Option<FaultSpec>,
        now: Instant,
    ) -> ApiOutcome {
        let applied_then_error = fault
            .as_ref()
            .is_some_and(|f| f.kind == FaultKind::AppliedThenError);
        if let Some(f) = fault.filter(|f| f.kind != FaultKind::AppliedThenError) {
            return ApiOutcome::reply(fault_response(&f));
        }
        if applied_then_error {
            let mut out = self.route(idx, req, method, path, None, now);
            out.response = fault_response(&FaultSpec::new(FaultKind::AppliedThenError));
            return out;
        }
        if self.config.rate_limit_enabled {
            let max = self.config.limits.max_request_per_second.max(1);
            if let Err(secs) = rate_check(&mut self.locations[idx].rate_window, now, max) {
                return ApiOutcome::reply(
                    ApiResponse::error(429, 9646).with_header("Retry-After", &secs.to_string()),
                );
            }
        }
        {
            let loc = &self.locations[idx];
            if loc.revoked {
                return ApiOutcome::reply(ApiResponse::error(401, 9625));
            }
            if loc.exp_date < Utc::now() {
                return ApiOutcome::reply(ApiResponse::error(401, 9621));
            }
        }
        let expected = match path {
            "client/config" => None,
            "assets" | "assignments" | "status" | "users" => Some("GET"),
            "assets/associate"
            | "assets/disassociate"
            | "assets/revoke"
            | "users/create"
            | "users/update"
            | "users/retire" => Some("POST"),
            _ => return ApiOutcome::reply(ApiResponse::error(404, 9602)),
        };
        match expected {
            Some(m) if m != method => return ApiOutcome::reply(ApiResponse::error(405, 9726)),
            None if method != "GET" && method != "POST" => {
                return ApiOutcome::reply(ApiResponse::error(405, 9726))
            }
            _ => {}
        }
        if method == "POST" {
            if let Some(ct) = &req.content_type {
                if !ct.to_ascii_lowercase().contains("json") {
                    return ApiOutcome::reply(ApiResponse::error(415, 9727));
                }
            }
        }
        let result: Result<ApiOutcome, ApiResponse> = match (method, path) {
            ("GET", "client/config") => Ok(ApiOutcome::reply(ApiResponse::ok(
                self.locations[idx].client_config(),
            ))),
            ("POST", "client/config") => self.post_client_config(idx, req),
            ("GET", "assets") => self.get_assets(idx, req).map(ApiOutcome::reply),
            ("GET", "assignments") => self.get_assignments(idx, req).map(ApiOutcome::reply),
            ("GET", "users") => self.get_users(idx, req).map(ApiOutcome::reply),
            ("GET", "status") => self.get_status(idx, req).map(ApiOutcome::reply),
            ("POST", "assets/associate") => self.manage_assets(idx, req, EventType::Associate),
            ("POST", "assets/disassociate") => {
                self.manage_assets(idx, req, EventType::Disassociate)
            }
            ("POST", "assets/revoke") => self.revoke_assets(idx, req),
            ("POST", "users/create") => self.manage_users(idx, req, EventType::Create),
            ("POST", "users/update") => self.manage_users(idx, req, EventType::Update),
            ("POST", "users/retire") => self.manage_users(idx, req, EventType::Retire),
            _ => Err(ApiResponse::error(404, 9602)),
        };
        result.unwrap_or_else(ApiOutcome::reply)
    }

    /// `GET service/config`.
    pub fn service_config(&self) -> Value {
        let base = format!("{}/mdm/v2", self.origin);
        json!({
            "limits": self.config.limits,
            "notificationTypes": ["ASSET_MANAGEMENT", "USER_MANAGEMENT", "USER_ASSOCIATED", "ASSET_COUNT"],
            "urls": {
                "invitationEmail": format!("{}/invite?inviteCode=%25inviteCode%25&mt=8", self.origin),
                "clientConfig": format!("{base}/client/config"),
                "createUsers": format!("{base}/users/create"),
                "getAssignments": format!("{base}/assignments"),
                "revokeAssets": format!("{base}/assets/revoke"),
                "contentMetadataLookup": format!("{}{}", self.origin, LOOKUP_PATH),
                "getUsers": format!("{base}/users"),
                "eventStatus": format!("{base}/status"),
                "associateAssets": format!("{base}/assets/associate"),
                "disassociateAssets": format!("{base}/assets/disassociate"),
                "updateUsers": format!("{base}/users/update"),
                "getAssets": format!("{base}/assets"),
                "retireUsers": format!("{base}/users/retire"),
            },
            "errorCodes": SERVICE_CONFIG_ERRORS.iter().map(|n| error_body(*n)).collect::<Vec<_>>(),
        })
    }

    fn post_client_config(
        &mut self,
        idx: usize,
        req: &ApiRequest,
    ) -> Result<ApiOutcome, ApiResponse> {
        let body: ClientConfigRequest = parse_body(req)?;
        let limits = &self.config.limits;
        if let Some(m) = &body.mdm_info {
            let (Some(id), Some(name), Some(meta)) = (&m.id, &m.name, &m.metadata) else {
                return Err(ApiResponse::error(400, 9723));
            };
            if id.is_empty() || name.is_empty() {
                return Err(ApiResponse::error(400, 9723));
            }
            if id.chars().count() > limits.max_mdm_id_length {
                return Err(ApiResponse::error(400, 9724));
            }
            if name.chars().count() > limits.max_mdm_name_length {
                return Err(ApiResponse::error(400, 9725));
            }
            if meta.chars().count() > limits.max_mdm_metadata_length {
                return Err(ApiResponse::error(400, 9713));
            }
        }
        let url = body.notification_url.as_deref().unwrap_or("");
        let auth = body.notification_auth_token.as_deref().unwrap_or("");
        if url.is_empty() != auth.is_empty() {
            return Err(ApiResponse::error(400, 9710));
        }
        if url.chars().count() > limits.max_notification_length
            || auth.chars().count() > limits.max_notification_length
        {
            return Err(ApiResponse::error(400, 9711));
        }
        if !url.is_empty()
            && !valid_notification_url(url, self.config.require_https_notification_url)
        {
            return Err(ApiResponse::error(400, 9712));
        }
        if let Some(types) = &body.notification_types {
            if types
                .iter()
                .any(|t| !NOTIFICATION_TYPES.contains(&t.as_str()))
            {
                return Err(ApiResponse::error(400, 9602));
            }
        }
        if url.is_empty() {
            let response = self.apply_client_config(idx, &body);
            return Ok(ApiOutcome::reply(response));
        }
        let uid = self.locations[idx].uid.clone();
        let test = self.outgoing(url, auth, &uid, "TEST_NOTIFICATION", json!({}));
        let mut o = ApiOutcome::reply(ApiResponse::ok(json!({})));
        o.pending_config = Some(PendingConfig {
            location_uid: uid,
            request: body,
            test,
        });
        Ok(o)
    }

    fn apply_client_config(&mut self, idx: usize, body: &ClientConfigRequest) -> ApiResponse {
        let loc = &mut self.locations[idx];
        if let Some(m) = &body.mdm_info {
            loc.mdm_info = Some(MdmInfo {
                id: m.id.clone().unwrap_or_default(),
                name: m.name.clone().unwrap_or_default(),
                metadata: m.metadata.clone().unwrap_or_default(),
            });
        }
        match (&body.notification_url, &body.notification_auth_token) {
            (Some(u), Some(t)) if !u.is_empty() => {
                loc.notification_url = Some(u.clone());
                loc.notification_auth_token = Some(t.clone());
            }
            (Some(_), _) | (_, Some(_)) => {
                loc.notification_url = None;
                loc.notification_auth_token = None;
            }
            _ => {}
        }
        if let Some(t) = &body.notification_types {
            let mut types: Vec<String> = Vec::new();
            for ty in t {
                if ty != "TEST_NOTIFICATION" && !types.contains(ty) {
                    types.push(ty.clone());
                }
            }
            loc.notification_types = types;
        }
        ApiResponse::ok(loc.client_config())
    }

    /// Completes a `POST client/config` after its TEST_NOTIFICATION: stores the configuration if
    /// it was delivered, else answers 9728 and keeps the old one.
    pub fn finish_client_config(
        &mut self,
        pending: &PendingConfig,
        delivered: bool,
    ) -> ApiResponse {
        if !delivered {
            return ApiResponse::error(400, 9728);
        }
        match self
            .locations
            .iter()
            .position(|l| l.uid == pending.location_uid)
        {
            Some(idx) => self.apply_client_config(idx, &pending.request),
            None => ApiResponse::error(401, 9601),
        }
    }

    fn get_assets(&mut self, idx: usize, req: &ApiRequest) -> Result<ApiResponse, ApiResponse> {
        let product_type = str_param(req, "productType");
        let pricing = str_param(req, "pricingParam");
        let adam_id = str_param(req, "adamId");
        let revocable = bool_param(req, "revocable")?;
        let device_assignable = bool_param(req, "deviceAssignable")?;
        let unlimited = bool_param(req, "unlimited")?;
        let max_avail = int_param(req, "maxAvailableCount")?;
        let min_avail = int_param(req, "minAvailableCount")?;
        let max_assigned = int_param(req, "maxAssignedCount")?;
        let min_assigned = int_param(req, "minAssignedCount")?;
        if let Some(p) = product_type {
            if p != "App" && p != "Book" {
                return Err(ApiResponse::error(400, 9602));
            }
        }
        if let Some(p) = pricing {
            if p != "STDQ" && p != "PLUS" {
                return Err(ApiResponse::error(400, 9602));
            }
        }
        let loc = &self.locations[idx];
        let counts = loc.assigned_counts();
        let views: Vec<AssetView> = loc
            .assets
            .iter()
            .map(|a| {
                let n = counts
                    .get(&(a.adam_id.as_str(), a.pricing_param.as_str()))
                    .copied()
                    .unwrap_or(0);
                loc.asset_view_counted(a, n)
            })
            .filter(|a| product_type.is_none_or(|p| a.product_type == p))
            .filter(|a| pricing.is_none_or(|p| a.pricing_param == p))
            .filter(|a| adam_id.is_none_or(|p| a.adam_id == p))
            .filter(|a| revocable.is_none_or(|v| a.revocable == v))
            .filter(|a| device_assignable.is_none_or(|v| a.device_assignable == v))
            .filter(|a| unlimited.is_none_or(|v| a.unlimited == v))
            .filter(|a| max_avail.is_none_or(|v| (a.available_count as i64) <= v))
            .filter(|a| min_avail.is_none_or(|v| (a.available_count as i64) >= v))
            .filter(|a| max_assigned.is_none_or(|v| (a.assigned_count as i64) <= v))
            .filter(|a| min_assigned.is_none_or(|v| (a.assigned_count as i64) >= v))
            .collect();
        let mut out = loc.common();
        let page = paginate(views, self.config.page_size, req, &mut out)?;
        let items: Vec<Value> = page
            .into_iter()
            .map(|a| {
                if unlimited == Some(true) {
                    json!({"adamId": a.adam_id, "assignedCount": a.assigned_count,
                        "deviceAssignable": a.device_assignable, "pricingParam": a.pricing_param,
                        "productType": a.product_type, "revocable": a.revocable,
                        "supportedPlatforms": a.supported_platforms})
                } else {
                    json!({"adamId": a.adam_id, "assignedCount": a.assigned_count,
                        "availableCount": a.available_count, "deviceAssignable": a.device_assignable,
                        "pricingParam": a.pricing_param, "productType": a.product_type,
                        "retiredCount": a.retired_count, "revocable": a.revocable,
                        "supportedPlatforms": a.supported_platforms, "totalCount": a.total_count})
                }
            })
            .collect();
        if unlimited == Some(true) {
            out.insert("unlimitedAssets".into(), json!(items));
            out.insert("assets".into(), json!([]));
        } else {
            out.insert("assets".into(), json!(items));
        }
        out.insert("versionId".into(), json!(loc.assets_version));
        Ok(ApiResponse::ok(Value::Object(out)))
    }

    fn since(&self, idx: usize, req: &ApiRequest) -> Result<Option<u64>, ApiResponse> {
        match str_param(req, "sinceVersionId") {
            None => Ok(None),
            Some(v) => self.locations[idx]
                .versions
                .get(v)
                .copied()
                .map(Some)
                .ok_or_else(|| ApiResponse::error(400, 9721)),
        }
    }

    fn get_assignments(
        &mut self,
        idx: usize,
        req: &ApiRequest,
    ) -> Result<ApiResponse, ApiResponse> {
        let since = self.since(idx, req)?;
        let adam_id = str_param(req, "adamId");
        let user = str_param(req, "clientUserId");
        let serial = str_param(req, "serialNumber");
        let pricing = str_param(req, "pricingParam");
        let exclude_inactive = bool_param(req, "excludeInactiveUsers")?.unwrap_or(false);
        let _include_user_state = bool_param(req, "includeUserState")?;
        let loc = &self.locations[idx];
        let items: Vec<&Assignment> = loc
            .assignments
            .iter()
            .filter(|a| since.is_none_or(|s| a.modified > s))
            .filter(|a| adam_id.is_none_or(|v| a.adam_id == v))
            .filter(|a| pricing.is_none_or(|v| a.pricing_param == v))
            .filter(|a| user.is_none_or(|v| a.client_user_id.as_deref() == Some(v)))
            .filter(|a| serial.is_none_or(|v| a.serial_number.as_deref() == Some(v)))
            .filter(|a| {
                !exclude_inactive
                    || a.client_user_id
                        .as_deref()
                        .is_none_or(|u| loc.user(u).is_some_and(|u| u.status != "Retired"))
            })
            .collect();
        let mut out = loc.common();
        let page = paginate(items, self.config.page_size, req, &mut out)?;
        out.insert(
            "assignments".into(),
            json!(page.iter().map(|a| a.api()).collect::<Vec<_>>()),
        );
        out.insert("versionId".into(), json!(loc.assignments_version));
        Ok(ApiResponse::ok(Value::Object(out)))
    }

    fn get_users(&mut self, idx: usize, req: &ApiRequest) -> Result<ApiResponse, ApiResponse> {
        let since = self.since(idx, req)?;
        let active_only = bool_param(req, "activeOnly")?.unwrap_or(false);
        let retired_only = bool_param(req, "retiredOnly")?.unwrap_or(false);
        let include_retired = bool_param(req, "includeRetired")?;
        let client_user_id = str_param(req, "clientUserId");
        let managed_apple_id = str_param(req, "managedAppleId");
        let loc = &self.locations[idx];
        let items: Vec<&User> = loc
            .users
            .iter()
            .filter(|u| since.is_none_or(|s| u.modified > s))
            .filter(|u| !(active_only || include_retired == Some(false)) || u.status != "Retired")
            .filter(|u| !retired_only || u.status == "Retired")
            .filter(|u| client_user_id.is_none_or(|v| u.client_user_id == v))
            .filter(|u| managed_apple_id.is_none_or(|v| u.managed_apple_id.as_deref() == Some(v)))
            .collect();
        let mut out = loc.common();
        let page = paginate(items, self.config.page_size, req, &mut out)?;
        out.insert(
            "users".into(),
            json!(page.iter().map(|u| u.api()).collect::<Vec<_>>()),
        );
        out.insert("versionId".into(), json!(loc.users_version));
        Ok(ApiResponse::ok(Value::Object(out)))
    }

    fn get_status(&mut self, idx: usize, req: &ApiRequest) -> Result<ApiResponse, ApiResponse> {
        let loc = &self.locations[idx];
        let Some(id) = str_param(req, "eventId") else {
            return Err(ApiResponse::error(400, 9602));
        };
        let Some(ev) = self.events.get(id).filter(|e| e.location_uid == loc.uid) else {
            return Err(ApiResponse::error(400, 9708));
        };
        let mut out = loc.common();
        out.insert("eventStatus".into(), json!(ev.event_status));
        out.insert("eventType".into(), json!(ev.event_type));
        out.insert("numCompleted".into(), json!(ev.num_completed));
        out.insert("numRequested".into(), json!(ev.num_requested));
        if !ev.failures.is_empty() {
            out.insert("failures".into(), json!(ev.failures));
        }
        Ok(ApiResponse::ok(Value::Object(out)))
    }

    fn manage_assets(
        &mut self,
        idx: usize,
        req: &ApiRequest,
        kind: EventType,
    ) -> Result<ApiOutcome, ApiResponse> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            #[serde(default)]
            assets: Option<Vec<RequestAsset>>,
            #[serde(default)]
            client_user_ids: Option<Vec<String>>,
            #[serde(default)]
            serial_numbers: Option<Vec<String>>,
        }
        let body: Body = parse_body(req)?;
        let limits = &self.config.limits;
        let assets: Vec<(String, String)> = body
            .assets
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.adam_id, a.pricing_param.unwrap_or_else(|| "STDQ".into())))
            .collect();
        let users = body.client_user_ids.unwrap_or_default();
        let serials = body.serial_numbers.unwrap_or_default();
        if assets.is_empty() {
            return Err(ApiResponse::error(400, 9718));
        }
        if users.is_empty() && serials.is_empty() {
            return Err(ApiResponse::error(400, 9719));
        }
        if assets.len() > limits.max_assets {
            return Err(ApiResponse::error(400, 9700));
        }
        if users.len() > limits.max_client_user_ids {
            return Err(ApiResponse::error(400, 9701));
        }
        if serials.len() > limits.max_serial_numbers {
            return Err(ApiResponse::error(400, 9702));
        }
        if has_duplicates(assets.iter()) {
            return Err(ApiResponse::error(400, 9703));
        }
        if has_duplicates(users.iter()) {
            return Err(ApiResponse::error(400, 9704));
        }
        if has_duplicates(serials.iter()) {
            return Err(ApiResponse::error(400, 9705));
        }
        if assets.iter().any(|(a, _)| a.is_empty())
            || users.iter().chain(&serials).any(|s| s.trim().is_empty())
        {
            return Err(ApiResponse::error(400, 9602));
        }
        let loc = &self.locations[idx];
        let unknown: Vec<Value> = assets
            .iter()
            .filter(|(a, p)| loc.asset_index(a, p).is_none())
            .map(|(a, p)| json!({"adamId": a, "pricingParam": p}))
            .collect();
        if !unknown.is_empty() {
            return Err(ApiResponse::error_info(
                400,
                9602,
                json!({"assets": unknown}),
            ));
        }
        if kind == EventType::Associate && !serials.is_empty() {
            let not_device: Vec<Value> = assets
                .iter()
                .filter(|(a, p)| {
                    loc.asset_index(a, p)
                        .is_some_and(|i| !loc.assets[i].device_assignable)
                })
                .map(|(a, p)| json!({"adamId": a, "pricingParam": p}))
                .collect();
            if !not_device.is_empty() {
                return Err(ApiResponse::error_info(
                    400,
                    9707,
                    json!({"assets": not_device}),
                ));
            }
        }
        let requested = (assets.len() * (users.len() + serials.len())) as u64;
        Ok(self.create_event(
            idx,
            kind,
            requested,
            EventPayload::Manage {
                assets,
                serial_numbers: serials,
                client_user_ids: users,
            },
        ))
    }

    fn revoke_assets(&mut self, idx: usize, req: &ApiRequest) -> Result<ApiOutcome, ApiResponse> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            #[serde(default)]
            client_user_ids: Option<Vec<String>>,
            #[serde(default)]
            serial_numbers: Option<Vec<String>>,
        }
        let body: Body = parse_body(req)?;
        let users = body.client_user_ids.unwrap_or_default();
        let serials = body.serial_numbers.unwrap_or_default();
        let limits = &self.config.limits;
        if users.is_empty() && serials.is_empty() {
            return Err(ApiResponse::error(400, 9719));
        }
        if users.len() > limits.max_revoke_client_user_ids {
            return Err(ApiResponse::error(400, 9701));
        }
        if serials.len() > limits.max_revoke_serial_numbers {
            return Err(ApiResponse::error(400, 9702));
        }
        if has_duplicates(users.iter()) {
            return Err(ApiResponse::error(400, 9704));
        }
        if has_duplicates(serials.iter()) {
            return Err(ApiResponse::error(400, 9705));
        }
        let requested = (users.len() + serials.len()) as u64;
        Ok(self.create_event(
            idx,
            EventType::Revoke,
            requested,
            EventPayload::Revoke {
                serial_numbers: serials,
                client_user_ids: users,
            },
        ))
    }

    fn manage_users(
        &mut self,
        idx: usize,
        req: &ApiRequest,
        kind: EventType,
    ) -> Result<ApiOutcome, ApiResponse> {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            users: Option<Vec<RequestUser>>,
        }
        let body: Body = parse_body(req)?;
        let users = body.users.unwrap_or_default();
        if users.is_empty() {
            return Err(ApiResponse::error(400, 9720));
        }
        if users.len() > self.config.limits.max_users {
            return Err(ApiResponse::error(400, 9714));
        }
        if users.iter().any(|u| {
            u.client_user_id
                .as_deref()
                .is_none_or(|c| c.trim().is_empty())
        }) {
            return Err(ApiResponse::error(400, 9602));
        }
        if has_duplicates(users.iter().map(|u| u.client_user_id.clone())) {
            return Err(ApiResponse::error(400, 9715));
        }
        if kind != EventType::Retire {
            let bad: Vec<Value> = users
                .iter()
                .filter(|u| u.email.as_deref().is_some_and(|e| !valid_email(e)))
                .map(|u| json!(u.client_user_id))
                .collect();
            if !bad.is_empty() {
                return Err(ApiResponse::error_info(
                    400,
                    9717,
                    json!({"clientUserIds": bad}),
                ));
            }
        }
        let requested = users.len() as u64;
        Ok(self.create_event(idx, kind, requested, EventPayload::Users { users }))
    }

    fn create_event(
        &mut self,
        idx: usize,
        kind: EventType,
        requested: u64,
        payload: EventPayload,
    ) -> ApiOutcome {
        let id = self.rng.uuid();
        let loc = &self.locations[idx];
        self.events.insert(
            id.clone(),
            Event {
                event_id: id.clone(),
                location_uid: loc.uid.clone(),
                event_type: kind,
                event_status: EventStatus::Pending,
                num_requested: requested,
                num_completed: 0,
                failures: Vec::new(),
                created: Utc::now(),
                payload,
            },
        );
        let mut body = loc.common();
        body.insert("eventId".into(), json!(id));
        let mut out = ApiOutcome::reply(ApiResponse::ok(Value::Object(body)));
        if self.config.event_delay_ms == 0 {
            let n = self.apply_event(&id);
            if !n.is_empty() {
                out.effects.push(Effect::Notify(n));
            }
        } else if self.config.manual_clock {
            let at = self.clock + Duration::from_millis(self.config.event_delay_ms);
            self.due.push((at, id));
        } else {
            out.effects.push(Effect::Schedule {
                event_id: id,
                delay_ms: self.config.event_delay_ms,
            });
        }
        out
    }

    /// Applies all pending events now; returns the notifications to deliver.
    pub fn flush_events(&mut self) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for id in self.pending_events() {
            out.extend(self.apply_event(&id));
        }
        out
    }

    /// Applies a pending event (no-op for an unknown or finished one); returns the notifications.
    pub fn apply_event(&mut self, event_id: &str) -> Vec<Outgoing> {
        let Some(ev) = self.events.get(event_id).cloned() else {
            return Vec::new();
        };
        if ev.event_status != EventStatus::Pending {
            return Vec::new();
        }
        let Some(idx) = self.locations.iter().position(|l| l.uid == ev.location_uid) else {
            return Vec::new();
        };
        let (completed, failures, notes) = match &ev.payload {
            EventPayload::Manage {
                assets,
                serial_numbers,
                client_user_ids,
            } => self.apply_manage(idx, &ev, assets, serial_numbers, client_user_ids),
            EventPayload::Revoke {
                serial_numbers,
                client_user_ids,
            } => self.apply_revoke(idx, &ev, serial_numbers, client_user_ids),
            EventPayload::Users { users } => self.apply_users(idx, &ev, users),
        };
        if let Some(e) = self.events.get_mut(event_id) {
            e.num_completed = completed;
            e.event_status = if failures.is_empty() {
                EventStatus::Complete
            } else {
                EventStatus::Failed
            };
            e.failures = failures;
        }
        notes
    }

    fn apply_manage(
        &mut self,
        idx: usize,
        ev: &Event,
        assets: &[(String, String)],
        serials: &[String],
        users: &[String],
    ) -> (u64, Vec<Value>, Vec<Outgoing>) {
        let associate = ev.event_type == EventType::Associate;
        let loc = &mut self.locations[idx];
        let next = loc.seq + 1;
        let mut changed = false;
        let mut completed = 0u64;
        let mut done: Vec<Value> = Vec::new();
        // (errorNumber, adamId, pricingParam) -> (serials, users)
        let mut failed: BTreeMap<FailureKey, (Vec<String>, Vec<String>)> = BTreeMap::new();
        let targets: Vec<(Option<&str>, Option<&str>)> = serials
            .iter()
            .map(|s| (Some(s.as_str()), None))
            .chain(users.iter().map(|u| (None, Some(u.as_str()))))
            .collect();
        for (adam, pricing) in assets {
            // This asset's holders and count, read once (a million assignments stay fast).
            let mut holders: HashSet<(Option<String>, Option<String>)> = loc
                .assignments
                .iter()
                .filter(|a| a.adam_id == *adam && a.pricing_param == *pricing)
                .map(|a| (a.serial_number.clone(), a.client_user_id.clone()))
                .collect();
            let mut assigned = holders.len() as u64;
            let mut removing: HashSet<(Option<String>, Option<String>)> = HashSet::new();
            // The removals in the order the request named them (the log must not depend on
            // hashing: a seeded test compares it between runs).
            let mut removing_in_order: Vec<(Option<String>, Option<String>)> = Vec::new();
            for (serial, user) in &targets {
                let mut fail = |n: u32| {
                    let e = failed
                        .entry((n, adam.clone(), pricing.clone()))
                        .or_default();
                    if let Some(s) = serial {
                        e.0.push(s.to_string());
                    }
                    if let Some(u) = user {
                        e.1.push(u.to_string());
                    }
                };
                let Some(ai) = loc.asset_index(adam, pricing) else {
                    fail(9610);
                    continue;
                };
                if associate {
                    if let Some(u) = user {
                        if loc.user(u).is_none_or(|u| u.status == "Retired") {
                            fail(9609);
                            continue;
                        }
                    }
                    let key = (serial.map(str::to_string), user.map(str::to_string));
                    if !holders.contains(&key) {
                        let asset = &loc.assets[ai];
                        let available = if asset.unlimited {
                            u64::MAX
                        } else {
                            asset
                                .total_count
                                .saturating_sub(assigned)
                                .saturating_sub(asset.retired_count)
                        };
                        if available == 0 {
                            fail(9709);
                            continue;
                        }
                        holders.insert(key);
                        assigned += 1;
                        loc.assignments.push(Assignment {
                            adam_id: adam.clone(),
                            pricing_param: pricing.clone(),
                            serial_number: serial.map(str::to_string),
                            client_user_id: user.map(str::to_string),
                            modified: next,
                        });
                        changed = true;
                    }
                } else {
                    let key = (serial.map(str::to_string), user.map(str::to_string));
                    if holders.remove(&key) {
                        removing.insert(key.clone());
                        removing_in_order.push(key);
                    }
                }
                completed += 1;
                let mut item = json!({"adamId": adam, "pricingParam": pricing});
                if let Value::Object(m) = &mut item {
                    if let Some(s) = serial {
                        m.insert("serialNumber".into(), json!(s));
                    }
                    if let Some(u) = user {
                        m.insert("clientUserId".into(), json!(u));
                    }
                }
                done.push(item);
            }
            if !removing.is_empty() {
                loc.assignments.retain(|a| {
                    !(a.adam_id == *adam
                        && a.pricing_param == *pricing
                        && removing.contains(&(a.serial_number.clone(), a.client_user_id.clone())))
                });
                for (s, u) in &removing_in_order {
                    self.removed
                        .push((loc.uid.clone(), adam.clone(), s.clone(), u.clone()));
                }
                changed = true;
            }
        }
        if changed {
            loc.touch(&mut self.rng, true, true, false);
        }
        let mut failures = Vec::new();
        let mut payloads = Vec::new();
        let ty = ev.event_type.as_str();
        for chunk in chunks_of(done) {
            payloads.push(json!({"assignments": chunk, "eventId": ev.event_id, "result": "SUCCESS", "type": ty}));
        }
        for ((n, adam, pricing), (s, u)) in failed {
            let mut info = Map::new();
            info.insert(
                "assets".into(),
                json!([{"adamId": adam, "pricingParam": pricing}]),
            );
            if !s.is_empty() {
                info.insert("serialNumbers".into(), json!(s));
            }
            if !u.is_empty() {
                info.insert("clientUserIds".into(), json!(u));
            }
            let mut f = error_body(n);
            if let Value::Object(m) = &mut f {
                m.insert("errorInfo".into(), Value::Object(info));
            }
            failures.push(f);
            let items: Vec<Value> =
                s.iter()
                    .map(|s| json!({"adamId": adam, "pricingParam": pricing, "serialNumber": s}))
                    .chain(u.iter().map(
                        |u| json!({"adamId": adam, "pricingParam": pricing, "clientUserId": u}),
                    ))
                    .collect();
            for chunk in chunks_of(items) {
                payloads.push(
                    json!({"assignments": chunk, "error": error_body(n), "eventId": ev.event_id,
                    "result": "FAILURE", "type": ty}),
                );
            }
        }
        let notes = self.notifications_for(idx, "ASSET_MANAGEMENT", payloads);
        (completed, failures, notes)
    }

    fn apply_revoke(
        &mut self,
        idx: usize,
        ev: &Event,
        serials: &[String],
        users: &[String],
    ) -> (u64, Vec<Value>, Vec<Outgoing>) {
        let loc = &mut self.locations[idx];
        let revocable: HashSet<(String, String)> = loc
            .assets
            .iter()
            .filter(|a| a.revocable)
            .map(|a| (a.adam_id.clone(), a.pricing_param.clone()))
            .collect();
        let mut removed = Vec::new();
        loc.assignments.retain(|a| {
            let target = a
                .serial_number
                .as_ref()
                .is_some_and(|s| serials.contains(s))
                || a.client_user_id.as_ref().is_some_and(|u| users.contains(u));
            let hit = target && revocable.contains(&(a.adam_id.clone(), a.pricing_param.clone()));
            if hit {
                removed.push(a.api());
                self.removed.push((
                    loc.uid.clone(),
                    a.adam_id.clone(),
                    a.serial_number.clone(),
                    a.client_user_id.clone(),
                ));
            }
            !hit
        });
        if !removed.is_empty() {
            loc.touch(&mut self.rng, true, true, false);
        }
        let completed = (serials.len() + users.len()) as u64;
        let payloads: Vec<Value> = chunks_of(removed)
            .into_iter()
            .map(|c| json!({"assignments": c, "eventId": ev.event_id, "result": "SUCCESS", "type": "REVOKE"}))
            .collect();
        let notes = self.notifications_for(idx, "ASSET_MANAGEMENT", payloads);
        (completed, Vec::new(), notes)
    }

    fn apply_users(
        &mut self,
        idx: usize,
        ev: &Event,
        users: &[RequestUser],
    ) -> (u64, Vec<Value>, Vec<Outgoing>) {
        let loc = &mut self.locations[idx];
        let next = loc.seq + 1;
        let mut done = Vec::new();
        let mut failed: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut users_changed = false;
        let mut assignments_changed = false;
        for ru in users {
            let id = ru.client_user_id.clone().unwrap_or_default();
            let pos = loc.users.iter().position(|u| u.client_user_id == id);
            match ev.event_type {
                EventType::Create => {
                    if pos.is_some() {
                        failed.entry(9716).or_default().push(id);
                        continue;
                    }
                    let associated = ru.managed_apple_id.is_some();
                    let u = User {
                        client_user_id: id,
                        email: ru.email.clone(),
                        managed_apple_id: ru.managed_apple_id.clone(),
                        status: if associated {
                            "Associated"
                        } else {
                            "Registered"
                        }
                        .into(),
                        invite_code: Some(self.rng.hex(32)),
                        id_hash: associated.then(|| self.rng.hex(24)),
                        modified: next,
                    };
                    done.push(u.api());
                    loc.users.push(u);
                    users_changed = true;
                }
                EventType::Update => {
                    let Some(p) = pos else {
                        failed.entry(9609).or_default().push(id);
                        continue;
                    };
                    let u = &mut loc.users[p];
                    if ru.email.is_some() {
                        u.email = ru.email.clone();
                    }
                    if ru.managed_apple_id.is_some() {
                        u.managed_apple_id = ru.managed_apple_id.clone();
                        if u.status == "Registered" {
                            u.status = "Associated".into();
                            u.id_hash = Some(self.rng.hex(24));
                        }
                    }
                    u.modified = next;
                    users_changed = true;
                    done.push(u.api());
                }
                _ => {
                    let Some(p) = pos else {
                        failed.entry(9609).or_default().push(id);
                        continue;
                    };
                    let u = &mut loc.users[p];
                    if u.status != "Retired" {
                        u.status = "Retired".into();
                        u.modified = next;
                        users_changed = true;
                    }
                    done.push(u.api());
                    let before = loc.assignments.len();
                    loc.assignments
                        .retain(|a| a.client_user_id.as_deref() != Some(id.as_str()));
                    assignments_changed |= before != loc.assignments.len();
                }
            }
        }
        if users_changed || assignments_changed {
            loc.touch(
                &mut self.rng,
                assignments_changed,
                assignments_changed,
                users_changed,
            );
            // Keep `modified` equal to the new sequence even if only some sets changed.
        }
        let completed = done.len() as u64;
        let ty = ev.event_type.as_str();
        let mut payloads: Vec<Value> = chunks_of(done)
            .into_iter()
            .map(|c| json!({"eventId": ev.event_id, "result": "SUCCESS", "type": ty, "users": c}))
            .collect();
        let mut failures = Vec::new();
        for (n, ids) in failed {
            let mut f = error_body(n);
            if let Value::Object(m) = &mut f {
                m.insert("errorInfo".into(), json!({"clientUserIds": ids}));
            }
            failures.push(f);
            let items: Vec<Value> = ids.iter().map(|i| json!({"clientUserId": i})).collect();
            for chunk in chunks_of(items) {
                payloads.push(
                    json!({"error": error_body(n), "eventId": ev.event_id, "result": "FAILURE",
                    "type": ty, "users": chunk}),
                );
            }
        }
        let notes = self.notifications_for(idx, "USER_MANAGEMENT", payloads);
        (completed, failures, notes)
    }

    // ----- content metadata lookup ----------------------------------------------------------

    /// The legacy lookup: `?id=1,2&...` → `{results: {"<adamId>": {...}}}`.
    pub fn lookup(&self, query: &[(String, String)]) -> Value {
        let ids: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "id" || k == "ids")
            .flat_map(|(_, v)| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .filter(|s| !s.is_empty())
            .collect();
        let cc = query
            .iter()
            .find(|(k, _)| k == "cc")
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_else(|| "us".into());
        let mut results = Map::new();
        for id in ids {
            let Some(a) = self
                .locations
                .iter()
                .flat_map(|l| l.assets.iter())
                .find(|a| a.adam_id == id)
            else {
                continue;
            };
            let book = a.product_type == "Book";
            let name = a
                .name
                .clone()
                .unwrap_or_else(|| format!("{} {}", if book { "Book" } else { "App" }, a.adam_id));
            let art = format!("{}/artwork/{}/{{w}}x{{h}}bb.{{f}}", self.origin, a.adam_id);
            let mut item = json!({
                "id": a.adam_id,
                "name": name,
                "artistName": "Simulated Publisher",
                "kind": if book { "epubBook" } else { "iosSoftware" },
                "deviceFamilies": if book { json!(["iphone", "ipad", "mac"]) } else { json!(["iphone", "ipad"]) },
                "artwork": {"url": art, "width": 512, "height": 512},
                "isVppDeviceBasedLicensingEnabled": a.device_assignable,
                "isB2BCustomApp": false,
                "url": format!("{}/app/id{}", self.origin, a.adam_id),
                "offers": [{"version": {"display": "1.0.0", "externalId": 800000000u64}}],
            });
            if let Value::Object(m) = &mut item {
                if !book {
                    m.insert(
                        "bundleId".into(),
                        json!(a
                            .bundle_id
                            .clone()
                            .unwrap_or_else(|| format!("com.example.app{}", a.adam_id))),
                    );
                    m.insert("minimumOSVersion".into(), json!("15.0"));
                }
            }
            results.insert(a.adam_id.clone(), item);
        }
        json!({
            "results": results,
            "version": 2,
            "isAuthenticated": false,
            "meta": {"storefront": {"cc": cc, "id": "143441"}, "language": {"tag": "en-us"}},
        })
    }
}
