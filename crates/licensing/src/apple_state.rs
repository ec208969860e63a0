//! What the apple component saw of Apple for one account: who owns the location, the last
//! error, and any backoff Apple asked for. Written only by the apple component; read by the
//! others to derive an account's status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Owner {
    /// Not yet seen on any response.
    #[default]
    Unknown,
    /// No MDM has written `mdmInfo`.
    Unclaimed,
    Ours,
    /// Another MDM's `mdmInfo` came back.
    Foreign {
        id: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppleFailure {
    /// `vpp_apple::AppleError::code()`, e.g. `apple_token_revoked`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AppleState {
    #[serde(default)]
    pub owner: Owner,
    #[serde(default)]
    pub owner_seen_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_ok_at: Option<DateTime<Utc>>,
    /// Cleared by the next success.
    #[serde(default)]
    pub last_error: Option<AppleFailure>,
    /// No call to Apple for this account before this time (Apple's Retry-After).
    #[serde(default)]
    pub backoff_until: Option<DateTime<Utc>>,
    #[serde(default)]
    pub token_expires_at: Option<DateTime<Utc>>,
    /// Calls to Apple and their errors, per endpoint, since the account was added: counted in
    /// the same write that records the outcome, so they cost no extra key-value operation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub calls: BTreeMap<String, EndpointCalls>,
}

/// Apple's endpoints as counted: anything else is counted as `other`, so the map stays small.
pub const ENDPOINTS: [&str; 13] = [
    "assets",
    "assets/associate",
    "assets/disassociate",
    "assets/revoke",
    "assignments",
    "client/config",
    "service/config",
    "status",
    "users",
    "users/create",
    "users/update",
    "users/retire",
    "other",
];

/// Distinct error kinds kept per endpoint; rarer ones are added up under `other`.
pub const MAX_ERROR_KINDS: usize = 16;

/// One endpoint's requests to Apple (`calls`, retries included) and failed calls (`errors`, once
/// per call that failed after its retries). `errors` is keyed by Apple's `errorNumber` (e.g. `9632`), or
/// by our error code when Apple gave no number (e.g. `apple_unavailable` for a lost answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCalls {
    pub calls: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
}

/// The counted endpoint of an Apple path such as `/assets/associate?x=1` or `status`.
pub fn endpoint_of(path: &str) -> &'static str {
    let p = path.split('?').next().unwrap_or("").trim_matches('/');
    ENDPOINTS
        .iter()
        .find(|e| **e == p)
        .copied()
        .unwrap_or("other")
}

impl AppleState {
    /// Count a call to Apple's `path` that took `requests` HTTP requests (retries included);
    /// `error` (Apple's `errorNumber`, or our code) when it failed in the end.
    pub fn count_call(&mut self, path: &str, requests: u32, error: Option<&str>) {
        let counts = self.calls.entry(endpoint_of(path).to_string()).or_default();
        counts.calls += u64::from(requests);
        if let Some(e) = error {
            let key = if counts.errors.contains_key(e) || counts.errors.len() < MAX_ERROR_KINDS - 1
            {
                e
            } else {
                "other"
            };
            *counts.errors.entry(key.to_string()).or_default() += 1;
        }
    }
}

impl AppleState {
    pub fn backing_off(&self, now: DateTime<Utc>) -> Option<i64> {
        self.backoff_until
            .filter(|t| *t > now)
            .map(|t| (t - now).num_seconds().max(1))
    }
}

/// Who owns a location, from the `mdmInfo` Apple echoed (`None`: the response had none).
pub fn owner_from(our_id: &str, mdm_info: Option<&vpp_apple::MdmInfo>) -> Owner {
    match mdm_info {
        None => Owner::Unclaimed,
        Some(m) if m.id.is_empty() => Owner::Unclaimed,
        Some(m) if m.id == our_id => Owner::Ours,
        Some(m) => Owner::Foreign {
            id: m.id.clone(),
            name: m.name.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_per_endpoint_and_error_and_stay_bounded() {
        let mut st = AppleState::default();
        st.count_call("/assets/associate", 1, None);
        st.count_call("assets/associate", 3, Some("9632"));
        st.count_call("status?eventId=1", 1, Some("apple_unavailable"));
        st.count_call("something/new", 1, None);
        assert_eq!(st.calls["assets/associate"].calls, 4);
        assert_eq!(st.calls["assets/associate"].errors["9632"], 1);
        assert_eq!(st.calls["status"].errors["apple_unavailable"], 1);
        assert_eq!(st.calls["other"].calls, 1);
        for n in 0..100 {
            st.count_call("assets", 1, Some(&format!("{}", 9000 + n)));
        }
        let assets = &st.calls["assets"];
        assert_eq!(assets.calls, 100);
        assert_eq!(assets.errors.len(), MAX_ERROR_KINDS);
        assert_eq!(assets.errors.values().sum::<u64>(), 100);
        assert_eq!(assets.errors["other"], 100 - (MAX_ERROR_KINDS as u64 - 1));
        assert!(st.calls.len() <= ENDPOINTS.len());
    }
}
