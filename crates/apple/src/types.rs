//! Apple's request and response objects (camelCase JSON). Unknown fields are ignored; fields
//! Apple may omit are `Option`s or default to empty lists.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// An enum over Apple's documented string values that keeps unknown values verbatim, so every
/// value round-trips.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($variant,)+
            /// A value this crate does not know, kept as Apple sent it.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Other(s) => s.as_str(),
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text => $name::$variant,)+
                    _ => $name::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                match v {
                    $name::Other(s) => s,
                    other => other.as_str().to_string(),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// `STDQ` (standard quantity) or `PLUS`.
    PricingParam { Stdq => "STDQ", Plus => "PLUS" }
);

impl Default for PricingParam {
    /// Apple's examples omit `pricingParam`, which suggests STDQ (UNCONFIRMED).
    fn default() -> Self {
        PricingParam::Stdq
    }
}

string_enum!(
    /// `App` or `Book`.
    ProductType { App => "App", Book => "Book" }
);

string_enum!(
    /// `PENDING`, `COMPLETE` or `FAILED`.
    EventStatusKind { Pending => "PENDING", Complete => "COMPLETE", Failed => "FAILED" }
);

string_enum!(
    /// The kind of asynchronous job an event or notification reports.
    EventType {
        Associate => "ASSOCIATE",
        Disassociate => "DISASSOCIATE",
        Revoke => "REVOKE",
        Create => "CREATE",
        Update => "UPDATE",
        Retire => "RETIRE",
    }
);

string_enum!(
    /// Notification types accepted in `ClientConfigRequest.notificationTypes`.
    NotificationType {
        TestNotification => "TEST_NOTIFICATION",
        AssetManagement => "ASSET_MANAGEMENT",
        UserManagement => "USER_MANAGEMENT",
        UserAssociated => "USER_ASSOCIATED",
        AssetCount => "ASSET_COUNT",
        SubscriptionManagement => "SUBSCRIPTION_MANAGEMENT",
        SubscriptionCount => "SUBSCRIPTION_COUNT",
        UnlimitedAsset => "UNLIMITED_ASSET",
    }
);

string_enum!(
    /// `Registered`, `Associated` or `Retired`.
    UserStatus { Registered => "Registered", Associated => "Associated", Retired => "Retired" }
);

string_enum!(
    /// `SUCCESS` or `FAILURE` in asynchronous notifications.
    NotificationResult { Success => "SUCCESS", Failure => "FAILURE" }
);

/// Apple documents `adamId` as a string; subscription notifications send an integer.
fn de_string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or a number, got {other}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Apple's `ErrorResponse`, found in failing bodies, `status.failures[]` and notifications.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    pub error_number: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ResponseErrorInfo>,
}

/// What an error is about. Field names come from Fleet's client and Apple's examples.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseErrorInfo {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assets: Vec<AssetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serial_numbers: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Service config

/// `GET /service/config`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub urls: ServiceUrls,
    #[serde(default)]
    pub notification_types: Vec<NotificationType>,
    /// Kept loosely typed: Apple's list has used placeholder entries in examples.
    #[serde(default)]
    pub error_codes: Vec<Value>,
}

impl ServiceConfig {
    /// The documented `errorCodes` entries that parse as `{errorNumber, errorMessage}`.
    pub fn known_errors(&self) -> Vec<ErrorResponse> {
        self.error_codes
            .iter()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }
}

/// Apple's limits. Missing fields take the values Apple's documentation shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Limits {
    pub max_assets: u32,
    pub max_users: u32,
    pub max_notification_length: u32,
    pub max_revoke_client_user_ids: u32,
    pub max_client_user_ids: u32,
    pub max_serial_numbers: u32,
    pub max_revoke_serial_numbers: u32,
    pub max_request_per_second: u32,
    pub max_subscriptions: u32,
    pub max_subscription_client_user_ids: u32,
    pub max_mdm_name_length: u32,
    pub max_mdm_metadata_length: u32,
    pub max_mdm_id_length: u32,
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

/// `urls` from the service config. Every entry is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceUrls {
    pub invitation_email: Option<String>,
    pub client_config: Option<String>,
    pub create_users: Option<String>,
    pub get_assignments: Option<String>,
    pub revoke_assets: Option<String>,
    pub content_metadata_lookup: Option<String>,
    pub get_users: Option<String>,
    pub event_status: Option<String>,
    pub associate_assets: Option<String>,
    pub disassociate_assets: Option<String>,
    pub update_users: Option<String>,
    pub get_assets: Option<String>,
    pub retire_users: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Client config and ownership

/// `{id, name, metadata}`: who manages a location.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MdmInfo {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub metadata: String,
}

/// `POST /client/config` body.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfigRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdm_info: Option<MdmInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_auth_token: Option<String>,
    /// The complete set: each POST replaces the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_types: Option<Vec<NotificationType>>,
}

/// `GET`/`POST /client/config` response.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    #[serde(rename = "countryISO2ACode")]
    pub country_iso2a_code: Option<String>,
    pub default_platform: Option<String>,
    pub location_name: Option<String>,
    pub mdm_info: Option<MdmInfo>,
    pub notification_auth_token: Option<String>,
    pub notification_url: Option<String>,
    #[serde(default)]
    pub subscribed_notification_types: Vec<NotificationType>,
    pub token_expiration_date: Option<String>,
    pub u_id: Option<String>,
    #[serde(rename = "websiteURL")]
    pub website_url: Option<String>,
}

impl ClientConfig {
    pub fn token_expires_at(&self) -> Option<DateTime<Utc>> {
        self.token_expiration_date
            .as_deref()
            .and_then(crate::token::parse_apple_date)
    }
}

// ---------------------------------------------------------------------------------------------
// Assets and assignments

/// `{adamId, pricingParam}`: how requests name an asset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetRef {
    #[serde(deserialize_with = "de_string_or_number")]
    pub adam_id: String,
    #[serde(default)]
    pub pricing_param: PricingParam,
}

impl AssetRef {
    pub fn new(adam_id: impl Into<String>, pricing_param: PricingParam) -> Self {
        AssetRef {
            adam_id: adam_id.into(),
            pricing_param,
        }
    }
}

/// `ResponseAsset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Asset {
    #[serde(deserialize_with = "de_string_or_number")]
    pub adam_id: String,
    #[serde(default)]
    pub pricing_param: PricingParam,
    pub product_type: Option<ProductType>,
    pub assigned_count: Option<i64>,
    pub available_count: Option<i64>,
    pub retired_count: Option<i64>,
    pub total_count: Option<i64>,
    pub device_assignable: Option<bool>,
    pub revocable: Option<bool>,
    #[serde(default)]
    pub supported_platforms: Vec<String>,
}

impl Asset {
    /// Without the `unlimited` filter Apple lists unlimited assets here with this total.
    pub const UNLIMITED_TOTAL: i64 = 2_147_483_647;

    pub fn asset_ref(&self) -> AssetRef {
        AssetRef::new(self.adam_id.clone(), self.pricing_param.clone())
    }

    pub fn is_unlimited(&self) -> bool {
        self.total_count == Some(Self::UNLIMITED_TOTAL)
    }
}

/// `UnlimitedResponseAsset`: no available, total or retired counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnlimitedAsset {
    #[serde(deserialize_with = "de_string_or_number")]
    pub adam_id: String,
    #[serde(default)]
    pub pricing_param: PricingParam,
    pub product_type: Option<ProductType>,
    pub assigned_count: Option<i64>,
    pub device_assignable: Option<bool>,
    pub revocable: Option<bool>,
    #[serde(default)]
    pub supported_platforms: Vec<String>,
}

/// `GetAssetsResponse`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetsPage {
    #[serde(default)]
    pub assets: Vec<Asset>,
    #[serde(default)]
    pub unlimited_assets: Vec<UnlimitedAsset>,
    pub current_page_index: Option<u32>,
    pub next_page_index: Option<u32>,
    pub size: Option<u32>,
    pub total_pages: Option<u32>,
    pub version_id: Option<String>,
    pub mdm_info: Option<MdmInfo>,
    pub token_expiration_date: Option<String>,
    pub u_id: Option<String>,
}

/// One license assignment: `adamId` with either `clientUserId` or `serialNumber`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    #[serde(deserialize_with = "de_string_or_number")]
    pub adam_id: String,
    #[serde(default)]
    pub pricing_param: PricingParam,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    /// Fields this crate does not model (e.g. what `includeUserState` adds; UNCONFIRMED).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// `GetAssignmentsResponse`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentsPage {
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    pub current_page_index: Option<u32>,
    pub next_page_index: Option<u32>,
    pub size: Option<u32>,
    pub total_pages: Option<u32>,
    pub version_id: Option<String>,
    pub mdm_info: Option<MdmInfo>,
    pub token_expiration_date: Option<String>,
    pub u_id: Option<String>,
}

/// `POST /assets/associate` and `/assets/disassociate` body. Empty lists are not sent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManageAssetsRequest {
    pub assets: Vec<AssetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serial_numbers: Vec<String>,
}

/// `POST /assets/revoke` body: frees every revocable asset of these users and devices.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeAssetsRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serial_numbers: Vec<String>,
}

/// The immediate answer of every asynchronous write.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventResponse {
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdm_info: Option<MdmInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiration_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub u_id: Option<String>,
}

/// `GET /status?eventId=…` (`StatusResponse`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventStatus {
    pub event_status: EventStatusKind,
    pub event_type: Option<EventType>,
    pub num_completed: Option<i64>,
    pub num_requested: Option<i64>,
    #[serde(default)]
    pub failures: Vec<ErrorResponse>,
    pub mdm_info: Option<MdmInfo>,
    pub token_expiration_date: Option<String>,
    pub u_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Users

/// `ResponseUser`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub client_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<UserStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_apple_id: Option<String>,
}

/// `GetUsersResponse`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsersPage {
    #[serde(default)]
    pub users: Vec<User>,
    pub current_page_index: Option<u32>,
    pub next_page_index: Option<u32>,
    pub size: Option<u32>,
    pub total_pages: Option<u32>,
    pub version_id: Option<String>,
    pub mdm_info: Option<MdmInfo>,
    pub token_expiration_date: Option<String>,
    pub u_id: Option<String>,
}

/// `RequestUser`: `users/retire` needs only `clientUserId`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestUser {
    pub client_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_apple_id: Option<String>,
}

impl RequestUser {
    pub fn id(client_user_id: impl Into<String>) -> Self {
        RequestUser {
            client_user_id: client_user_id.into(),
            ..Default::default()
        }
    }
}

/// `POST /users/create | update | retire` body.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManageUsersRequest {
    pub users: Vec<RequestUser>,
}

// ---------------------------------------------------------------------------------------------
// Notifications

/// What Apple POSTs to `notificationUrl`. `notification` stays raw until [`payload`] types it.
///
/// [`payload`]: NotificationEnvelope::payload
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationEnvelope {
    #[serde(default)]
    pub notification: Value,
    pub notification_id: String,
    pub notification_type: NotificationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub u_id: Option<String>,
}

/// A typed notification payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Notification {
    AssetManagement(AssetManagementNotification),
    AssetCount(AssetCountNotification),
    UserManagement(UserManagementNotification),
    UserAssociated(UserAssociatedNotification),
    Test,
    /// A type this crate does not model; the payload as Apple sent it.
    Other {
        notification_type: String,
        raw: Value,
    },
}

impl NotificationEnvelope {
    pub fn payload(&self) -> Result<Notification, serde_json::Error> {
        let raw = self.notification.clone();
        Ok(match &self.notification_type {
            NotificationType::AssetManagement => {
                Notification::AssetManagement(serde_json::from_value(raw)?)
            }
            NotificationType::AssetCount => Notification::AssetCount(serde_json::from_value(raw)?),
            NotificationType::UserManagement => {
                Notification::UserManagement(serde_json::from_value(raw)?)
            }
            NotificationType::UserAssociated => {
                Notification::UserAssociated(serde_json::from_value(raw)?)
            }
            NotificationType::TestNotification => Notification::Test,
            other => Notification::Other {
                notification_type: other.as_str().to_string(),
                raw,
            },
        })
    }
}

/// `ASSET_MANAGEMENT`: the result of associate, disassociate or revoke.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetManagementNotification {
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    pub event_id: Option<String>,
    pub result: Option<NotificationResult>,
    #[serde(rename = "type")]
    pub kind: Option<EventType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorResponse>,
}

/// `ASSET_COUNT`: a purchase, transfer or refund changed the count by `countDelta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetCountNotification {
    #[serde(deserialize_with = "de_string_or_number")]
    pub adam_id: String,
    pub count_delta: i64,
    #[serde(default)]
    pub pricing_param: PricingParam,
}

/// `USER_MANAGEMENT`: the result of create, update or retire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserManagementNotification {
    pub event_id: Option<String>,
    pub result: Option<NotificationResult>,
    #[serde(rename = "type")]
    pub kind: Option<EventType>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorResponse>,
}

/// `USER_ASSOCIATED`: users accepted their invitation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserAssociatedNotification {
    #[serde(default)]
    pub associated_users: Vec<User>,
}

// ---------------------------------------------------------------------------------------------
// Metadata

/// Name and icon of an app or book, from the content metadata lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetMetadata {
    pub adam_id: String,
    pub name: Option<String>,
    pub icon_url: Option<String>,
    /// `iosSoftware`, `desktopApp`, `epubBook`, …
    pub kind: Option<String>,
    pub bundle_id: Option<String>,
}
