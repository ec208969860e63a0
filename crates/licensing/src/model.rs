//! The records vpp-spin keeps in the key-value store (layout: `vpp_store::keys`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An App Store License account: one Apple location bound to its server token. The token itself
/// is sealed under `keys::token(id)`; this record never holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub id: String,
    pub name: String,
    /// `orgName` from the token file.
    pub organization: String,
    /// `locationName` from Apple's client config.
    pub location: Option<String>,
    /// Apple's `uId`: one account per location.
    pub location_id: Option<String>,
    pub country: Option<String>,
    pub default_platform: Option<String>,
    pub website_url: Option<String>,
    pub token_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Last successful synchronization with Apple.
    #[serde(default)]
    pub last_synchronized: Option<DateTime<Utc>>,
    /// Last full refresh (incremental reads cannot see removals).
    #[serde(default)]
    pub last_full_refresh: Option<DateTime<Utc>>,
    /// How the last synchronization ended.
    #[serde(default)]
    pub last_sync: Option<SyncOutcome>,
    /// SHA-256 (hex) of the secret Apple sends with notifications for this account.
    #[serde(default)]
    pub notification_secret_sha256: Option<String>,
    /// SHA-256 (hex) of the secret a reclaim is handing Apple: accepted as well while Apple may
    /// already use it (its test notification arrives before Apple answers the reclaim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_notification_secret_sha256: Option<String>,
    /// Apple's `versionId` of the assignments and users this copy reflects.
    #[serde(default)]
    pub assignments_version: Option<String>,
    #[serde(default)]
    pub users_version: Option<String>,
    /// Set when this instance wrote its `mdmInfo` to Apple.
    #[serde(default)]
    pub claimed_at: Option<DateTime<Utc>>,
    /// `adding` until the account is complete and listed.
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum Lifecycle {
    Adding,
    #[default]
    Active,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncOutcome {
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub full: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
}

/// A stable error code with a message for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// One licensed product of an account, with Apple's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetRecord {
    pub adam_id: String,
    pub pricing_param: String,
    pub product_type: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub icon_url: Option<String>,
    pub total: i64,
    pub available: i64,
    pub in_use: i64,
    pub retired: i64,
    #[serde(default)]
    pub device_assignable: bool,
    #[serde(default)]
    pub revocable: bool,
    #[serde(default)]
    pub supported_platforms: Vec<String>,
    /// Copy shards this asset's assignments are spread over (its pages of assignments).
    #[serde(default = "one")]
    pub shards: u32,
}

fn one() -> u32 {
    1
}

impl AssetRecord {
    pub fn key(&self) -> String {
        asset_key(&self.adam_id, &self.pricing_param)
    }
}

/// `adamId:pricingParam`, how an asset is named inside keys and maps.
pub fn asset_key(adam_id: &str, pricing_param: &str) -> String {
    format!("{adam_id}:{pricing_param}")
}

/// Some or all of an account's assets as read from its copy (`crate::copy`), with what is
/// needed to find their assignment shards. Not stored as one value: the copy keeps assets in
/// pages (`vpp_store::keys`); `copy::assets_for` and `copy::all_assets` build this view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AssetsDoc {
    pub generation: u64,
    pub synced_at: Option<DateTime<Utc>>,
    /// Copy shards of the generation (see `vpp_store::keys::copy_shard_of`).
    #[serde(default = "one")]
    pub copy_shards: u32,
    pub assets: Vec<AssetRecord>,
}

impl AssetsDoc {
    pub fn find(&self, adam_id: &str, pricing_param: &str) -> Option<&AssetRecord> {
        self.assets
            .iter()
            .find(|a| a.adam_id == adam_id && a.pricing_param == pricing_param)
    }
}

/// Who is licensed: a device (serial number) or a user (`clientUserId`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Subject {
    SerialNumber(String),
    ClientUserId(String),
}

impl Subject {
    /// `s:<serial>` or `u:<clientUserId>`: map key and shard input.
    pub fn tag(&self) -> String {
        match self {
            Subject::SerialNumber(s) => format!("s:{s}"),
            Subject::ClientUserId(u) => format!("u:{u}"),
        }
    }

    pub fn from_tag(tag: &str) -> Option<Subject> {
        match tag.split_once(':') {
            Some(("s", s)) => Some(Subject::SerialNumber(s.to_string())),
            Some(("u", u)) => Some(Subject::ClientUserId(u.to_string())),
            _ => None,
        }
    }
}

/// Who made an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "by")]
pub enum MadeBy {
    /// This instance (it is in our ledger).
    #[serde(rename = "thisInstance", rename_all = "camelCase")]
    Ours {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<DateTime<Utc>>,
    },
    /// Found at Apple, not made here.
    Foreign,
}

/// What this instance asked Apple to do for one (asset, subject), kept until revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub state: LedgerState,
    pub event_id: Option<String>,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// When Apple accepted the request this entry reflects (its event's creation): Apple applies
    /// events in the order it accepts them, so a removal asked later comes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LedgerState {
    /// Recorded before Apple was asked; awaiting Apple's event or notification.
    Pending,
    Confirmed,
    /// Apple refused it for this subject.
    Failed,
    /// Asked Apple to take it back.
    Revoking,
}

/// One ledger shard: `asset key` → `subject tag` → entry.
pub type LedgerShard = BTreeMap<String, BTreeMap<String, LedgerEntry>>;

/// How many ledger shards an account has (fixed, so every writer agrees).
pub const LEDGER_SHARDS: u32 = vpp_store::keys::LEDGER_SHARDS;

/// The ledger shard that holds (asset, subject).
pub fn ledger_shard_of(asset_key: &str, subject: &Subject) -> u32 {
    vpp_store::keys::shard_of(&format!("{asset_key}|{}", subject.tag()), LEDGER_SHARDS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    Associate,
    Disassociate,
    Revoke,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventState {
    Pending,
    Complete,
    Failed,
}

/// A failure Apple reported for some subjects of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventFailure {
    /// Subject tags (`s:<serial>`, `u:<clientUserId>`) it names; empty when Apple named none.
    pub subjects: Vec<String>,
    pub error_number: Option<i64>,
    pub message: String,
}

/// An asynchronous Apple operation we asked for, tracked to completion (`keys::event(id)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// Apple's eventId.
    pub id: String,
    pub account_id: String,
    pub kind: EventKind,
    /// What asked for it: `api`, `policy`, `reconcile`, `cleanup`.
    pub source: String,
    /// Assets of an associate/disassociate (empty for revoke: Apple revokes all revocable ones).
    pub assets: Vec<vpp_apple::AssetRef>,
    pub subjects: Vec<Subject>,
    pub state: EventState,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub polled_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub num_requested: Option<i64>,
    #[serde(default)]
    pub num_completed: Option<i64>,
    #[serde(default)]
    pub failures: Vec<EventFailure>,
    /// Its outcome has been applied to the ledger, copy and counts (exactly once).
    #[serde(default)]
    pub applied: bool,
    /// Still pending after 10 minutes, it was sent again as this event (both stay tracked:
    /// Apple may apply either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resent_as: Option<String>,
    /// A clean up's disassociate: the copy generation its foreign licenses were read from.
    /// When a full refresh replaced that copy before the outcome is read, the outcome still
    /// owns the notice of what it took (the refresh sends none for foreign licenses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_generation: Option<u64>,
    /// A removal's outcome, written before it moves the ledger or the copy: the (asset key,
    /// subject) pairs it found held, whose notices it owes. An invocation killed between its
    /// writes finds them here when the outcome is read again (the notices are keyed by event, so
    /// none is sent twice). Also written before the outcome is read, when a newer request of
    /// ours takes over the entry this revoke was asked for (see `ledger::confirm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owed_notices: Vec<(String, Subject)>,
}
