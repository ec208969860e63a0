//! What the apple component saw of Apple for one account: who owns the location, the last
//! error, and any backoff Apple asked for. Written only by the apple component; read by the
//! others to derive an account's status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
