//! Apple's notifications (`POST /api/apple/notifications/{accountId}`), authenticated by the
//! account's notification secret (Apple sends it as the bearer; we keep only its SHA-256).
//!
//! A wrong bearer gets 401 and changes nothing. Each `notificationId` is applied once: it is
//! remembered in `notified/{account}` (compare-and-swap) only after applying it has finished,
//! and a notification already remembered is answered as a duplicate. An invocation killed at
//! any point before that leaves it unremembered, so Apple's retry applies it again: applying
//! is safe to repeat (an outcome is a set of per-(asset, subject) state transitions, each made
//! once, and an event's notices are recorded once per event; see [`crate::event`]), as it
//! already is for an outcome read both by a status poll and by a notification. The one
//! exception is `ASSET_COUNT`, a delta: it is remembered before it is applied (at most once; a
//! count a kill lost is put right by the next refresh, which reads Apple's counts).

use crate::auth::constant_time_eq;
use crate::error::{ApiError, ErrorCode};
use crate::event::{self, Item};
use crate::model::{Account, EventKind, Failure, Subject};
use crate::users;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use vpp_apple::{EventType, Notification, NotificationEnvelope, NotificationResult};
use vpp_store::{get_json, keys, update, Kv, StoreError};

/// Notification ids remembered per account (Apple retries within minutes): a ring whose size is
/// written in the layout (`keys::NOTIFIED_IDS`).
pub const REMEMBERED_IDS: usize = keys::NOTIFIED_IDS;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Seen {
    ids: VecDeque<String>,
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Check Apple's bearer against the account's notification secret.
pub fn authenticate(
    kv: &impl Kv,
    account_id: &str,
    authorization: Option<&str>,
) -> Result<Account, ApiError> {
    let unauthorized = || {
        ApiError::new(
            ErrorCode::Unauthorized,
            "notification rejected: the bearer is not this account's notification token",
        )
    };
    let presented = authorization
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(unauthorized)?;
    let account = get_json::<Account>(kv, &keys::account(account_id))?.ok_or_else(unauthorized)?;
    // The current secret, or the one a reclaim is handing Apple right now.
    let presented = sha256_hex(presented);
    let matches = [
        account.notification_secret_sha256.as_deref(),
        account.next_notification_secret_sha256.as_deref(),
    ]
    .into_iter()
    .flatten()
    .fold(false, |ok, expected| {
        constant_time_eq(presented.as_bytes(), expected.as_bytes()) | ok
    });
    if !matches {
        return Err(unauthorized());
    }
    Ok(account)
}

/// Was this notification applied to its end already?
fn seen(kv: &impl Kv, account_id: &str, id: &str) -> Result<bool, StoreError> {
    Ok(get_json::<Seen>(kv, &keys::notified(account_id))?
        .is_some_and(|s| s.ids.iter().any(|x| x == id)))
}

/// Remember a notification applied to its end (the last write of its handling).
fn remember(kv: &impl Kv, account_id: &str, id: &str) -> Result<(), StoreError> {
    update::<Seen, ()>(kv, &keys::notified(account_id), |cur| {
        let mut s = cur.unwrap_or_default();
        if s.ids.iter().any(|x| x == id) {
            return Ok((None, ()));
        }
        s.ids.push_back(id.to_string());
        while s.ids.len() > REMEMBERED_IDS {
            s.ids.pop_front();
        }
        Ok((Some(s), ()))
    })
}

/// Handle one notification: authenticate, dedupe, apply. Answers what was done.
pub fn handle(
    kv: &impl Kv,
    account_id: &str,
    authorization: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    let account = authenticate(kv, account_id, authorization)?;
    let env: NotificationEnvelope = crate::error::parse_json(body)?;
    if env.notification_id.trim().is_empty() {
        return Err(ApiError::invalid_field(
            "notificationId",
            "notificationId is required",
        ));
    }
    let payload = env.payload().map_err(|e| {
        ApiError::invalid_field(
            "notification",
            format!("{} payload is not valid: {e}", env.notification_type),
        )
    })?;
    if matches!(payload, Notification::Test) {
        return Ok(json!({"received": env.notification_id, "type": "TEST_NOTIFICATION"}));
    }
    if seen(kv, &account.id, &env.notification_id)? {
        return Ok(json!({"received": env.notification_id, "duplicate": true}));
    }
    let summary = if matches!(payload, Notification::AssetCount(_)) {
        // A count change is a delta, not a state: applied twice it would count twice. It is
        // remembered first (at most once: a kill between the two loses it, and the next
        // refresh, which reads Apple's counts, puts them right).
        remember(kv, &account.id, &env.notification_id).map_err(ApiError::store)?;
        apply(kv, &account, &payload, now).map_err(ApiError::store)?
    } else {
        // Applied first, remembered after: a failure or a kill anywhere in between leaves it
        // unremembered, and Apple's retry (we answer an error) applies it again.
        let summary = apply(kv, &account, &payload, now).map_err(ApiError::store)?;
        remember(kv, &account.id, &env.notification_id).map_err(ApiError::store)?;
        summary
    };
    Ok(json!({
        "received": env.notification_id,
        "type": env.notification_type.as_str(),
        "applied": summary,
    }))
}

fn subject_of(a: &vpp_apple::Assignment) -> Option<Subject> {
    match (&a.serial_number, &a.client_user_id) {
        (Some(s), _) => Some(Subject::SerialNumber(s.clone())),
        (None, Some(u)) => Some(Subject::ClientUserId(u.clone())),
        _ => None,
    }
}

fn apply(
    kv: &impl Kv,
    account: &Account,
    payload: &Notification,
    now: DateTime<Utc>,
) -> Result<Value, StoreError> {
    match payload {
        Notification::AssetManagement(n) => {
            let record = match &n.event_id {
                Some(id) => event::load(kv, id)?.filter(|r| r.account_id == account.id),
                None => None,
            };
            let kind = match (&n.kind, &record) {
                (Some(EventType::Associate), _) => EventKind::Associate,
                (Some(EventType::Disassociate), _) => EventKind::Disassociate,
                (Some(EventType::Revoke), _) => EventKind::Revoke,
                (_, Some(r)) => r.kind,
                _ => return Ok(json!({"ignored": "unknown event type"})),
            };
            let failure = (n.result == Some(NotificationResult::Failure)).then(|| match &n.error {
                Some(e) => Failure {
                    code: e.error_number.to_string(),
                    message: e
                        .error_message
                        .clone()
                        .unwrap_or_else(|| format!("Apple error {}", e.error_number)),
                },
                None => Failure {
                    code: "failed".into(),
                    message: "Apple reported a failure".into(),
                },
            });
            let items: Vec<Item> = n
                .assignments
                .iter()
                .filter_map(|a| {
                    Some(Item {
                        asset_key: crate::model::asset_key(&a.adam_id, a.pricing_param.as_str()),
                        subject: subject_of(a)?,
                        failure: failure.clone(),
                    })
                })
                .collect();
            let ours = record.as_ref().map(|r| r.id.as_str());
            let r = event::apply_outcome(kv, &account.id, kind, ours, &items, None, now)?;
            Ok(json!({
                "assignments": items.len(),
                "eventId": n.event_id,
                "tracked": r.is_some(),
                "eventState": r.map(|r| r.state),
            }))
        }
        Notification::AssetCount(n) => {
            let ak = crate::model::asset_key(&n.adam_id, n.pricing_param.as_str());
            let found =
                !crate::copy::update_assets(kv, &account.id, std::slice::from_ref(&ak), |a| {
                    if a.total != vpp_apple::Asset::UNLIMITED_TOTAL {
                        a.total = (a.total + n.count_delta).max(0);
                        a.available = (a.available + n.count_delta).max(0);
                    }
                })?
                .is_empty();
            Ok(json!({"asset": ak, "countDelta": n.count_delta, "known": found}))
        }
        Notification::UserManagement(n) => {
            let failed = n.result == Some(NotificationResult::Failure);
            let retire = n.kind == Some(EventType::Retire);
            let error = n.error.as_ref().map(|e| Failure {
                code: e.error_number.to_string(),
                message: e.error_message.clone().unwrap_or_default(),
            });
            let count =
                users::apply_from_apple(kv, &account.id, &n.users, failed, retire, error, now)?;
            Ok(json!({"users": count}))
        }
        Notification::UserAssociated(n) => {
            let count = users::apply_from_apple(
                kv,
                &account.id,
                &n.associated_users,
                false,
                false,
                None,
                now,
            )?;
            Ok(json!({"users": count}))
        }
        Notification::Test => Ok(json!({})),
        Notification::Other {
            notification_type, ..
        } => Ok(json!({"ignored": notification_type})),
    }
}
