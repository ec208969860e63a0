//! Assigning and revoking licenses, ledger first: every assignment we ask Apple for is in our
//! ledger (queued, its license set aside by [`ledger::admit`]) before the request leaves, so a
//! crash after Apple accepted it never leaves an assignment we cannot account for. The states
//! and their moves are [`crate::ledger`]'s; this module checks requests and reports.

use crate::error::{apple_error, ApiError, ErrorCode};
use crate::job::Budget;
use crate::model::{
    asset_key, ledger_shard_of, Account, AssetRecord, AssetsDoc, EventKind, EventRecord,
    LedgerShard, LedgerState, Subject,
};
use crate::{event, ledger};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use vpp_apple::{split_manage, Client, Clock, ManageAssetsRequest, Transport};
use vpp_store::{get_json, keys, Kv, StoreError};

/// Subjects one API call may name.
pub const MAX_SUBJECTS: usize = 10_000;
const MAX_ID_LEN: usize = 128;

/// `POST /api/assignments` and `/api/assignments/revoke`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignBody {
    pub account_id: String,
    pub adam_id: String,
    #[serde(default)]
    pub pricing_param: Option<String>,
    #[serde(default)]
    pub serial_numbers: Vec<String>,
    #[serde(default)]
    pub client_user_ids: Vec<String>,
}

/// A checked request: the account and asset exist, the subjects are well formed and unique.
#[derive(Debug, Clone)]
pub struct Target {
    pub account: Account,
    pub asset: AssetRecord,
    /// The copy the asset was read from (its generation and shard count).
    pub copy: AssetsDoc,
    pub subjects: Vec<Subject>,
}

pub fn validate_adam_id(adam_id: &str) -> Result<(), ApiError> {
    if adam_id.is_empty() || adam_id.len() > 32 || !adam_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid_field(
            "adamId",
            "adamId must be Apple's numeric product id, e.g. \"408709785\"",
        ));
    }
    Ok(())
}

pub fn validate_pricing(p: Option<&str>) -> Result<String, ApiError> {
    match p.unwrap_or("STDQ") {
        "STDQ" => Ok("STDQ".into()),
        "PLUS" => Ok("PLUS".into()),
        _ => Err(ApiError::invalid_field(
            "pricingParam",
            "pricingParam must be STDQ or PLUS",
        )),
    }
}

/// Check serial numbers / clientUserIds: non-empty, no control characters, bounded; duplicates
/// dropped, order kept.
pub fn validate_subjects(
    serials: &[String],
    users: &[String],
    max: usize,
) -> Result<Vec<Subject>, ApiError> {
    if serials.len() + users.len() > max {
        // Each list is within its documented size; only together are they too many, which a
        // JSON schema cannot state: 422, not 400.
        return Err(ApiError::new(
            ErrorCode::Unprocessable,
            format!("at most {max} serial numbers and clientUserIds per request"),
        )
        .with_details(json!({"limit": max})));
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (field, list, make) in [
        (
            "serialNumbers",
            serials,
            Subject::SerialNumber as fn(String) -> Subject,
        ),
        ("clientUserIds", users, Subject::ClientUserId),
    ] {
        for v in list {
            let v = v.trim();
            if v.is_empty() || v.chars().count() > MAX_ID_LEN || v.chars().any(char::is_control) {
                return Err(ApiError::invalid_field(
                    field,
                    format!("{field} entries must be 1 to {MAX_ID_LEN} printable characters"),
                ));
            }
            let s = make(v.to_string());
            if seen.insert(s.tag()) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

pub fn load_account(kv: &impl Kv, id: &str) -> Result<Account, ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid_field(
            "accountId",
            "accountId is required",
        ));
    }
    get_json::<Account>(kv, &keys::account(id))?
        .ok_or_else(|| ApiError::not_found(format!("account {id}")))
}

/// Find the asset in the account's copy, with a clear 404.
pub fn find_asset(
    doc: &AssetsDoc,
    account_id: &str,
    adam_id: &str,
    pricing: &str,
) -> Result<AssetRecord, ApiError> {
    doc.find(adam_id, pricing).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "asset {adam_id} ({pricing}) in account {account_id} (refresh the account if it was just bought)"
        ))
        .with_details(json!({"accountId": account_id, "adamId": adam_id, "pricingParam": pricing}))
    })
}

pub fn resolve(kv: &impl Kv, body: &AssignBody) -> Result<Target, ApiError> {
    validate_adam_id(&body.adam_id)?;
    let pricing = validate_pricing(body.pricing_param.as_deref())?;
    let subjects = validate_subjects(&body.serial_numbers, &body.client_user_ids, MAX_SUBJECTS)?;
    if subjects.is_empty() {
        return Err(ApiError::invalid(
            "name at least one device (serialNumbers) or user (clientUserIds)",
        ));
    }
    let account = load_account(kv, &body.account_id)?;
    let doc: AssetsDoc =
        crate::copy::assets_for(kv, &account.id, &[asset_key(&body.adam_id, &pricing)])?;
    let asset = find_asset(&doc, &account.id, &body.adam_id, &pricing)?;
    if !asset.device_assignable
        && subjects
            .iter()
            .any(|s| matches!(s, Subject::SerialNumber(_)))
    {
        return Err(ApiError::new(
            ErrorCode::Unprocessable,
            format!(
                "asset {} cannot be assigned to devices (books never can); assign it to users",
                asset.adam_id
            ),
        )
        .with_details(json!({"field": "serialNumbers"})));
    }
    Ok(Target {
        account,
        copy: doc,
        asset,
        subjects,
    })
}

/// Which of `subjects` already hold `asset` (in Apple's copy, or ours in flight/confirmed).
pub fn already_assigned(
    kv: &impl Kv,
    account_id: &str,
    copy: &AssetsDoc,
    asset: &AssetRecord,
    subjects: &[Subject],
) -> Result<BTreeSet<String>, StoreError> {
    let ak = asset.key();
    let mut out: BTreeSet<String> = crate::copy::held(kv, account_id, copy, asset, subjects)?
        .into_keys()
        .collect();
    let mut ledger_shards: BTreeMap<u32, Vec<&Subject>> = BTreeMap::new();
    for s in subjects {
        ledger_shards
            .entry(ledger_shard_of(&ak, s))
            .or_default()
            .push(s);
    }
    for (shard, list) in ledger_shards {
        let ledger: LedgerShard =
            get_json(kv, &keys::ledger_shard(account_id, shard))?.unwrap_or_default();
        if let Some(m) = ledger.get(&ak) {
            for s in list {
                if m.get(&s.tag()).is_some_and(|e| {
                    matches!(e.state, LedgerState::Pending | LedgerState::Confirmed)
                }) {
                    out.insert(s.tag());
                }
            }
        }
    }
    let open = ledger::open_subjects(kv, account_id, &ak)?;
    for s in subjects {
        if open.contains(&s.tag()) {
            out.insert(s.tag());
        }
    }
    Ok(out)
}

/// Licenses that can be assigned now: Apple's available count less the licenses our open
/// ledger entries hold. `None`: unlimited. (A hint for reports: [`ledger::admit`] decides.)
pub fn available_now(
    kv: &impl Kv,
    account_id: &str,
    asset: &AssetRecord,
) -> Result<Option<i64>, StoreError> {
    if asset.total == vpp_apple::Asset::UNLIMITED_TOTAL {
        return Ok(None);
    }
    let reserved = ledger::reserved(kv, account_id, &asset.key())?;
    Ok(Some((asset.available - reserved).max(0)))
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Submitted {
    pub events: Vec<EventRecord>,
    /// Subjects that already held the license (nothing asked).
    pub already_assigned: Vec<serde_json::Value>,
    /// Subjects left out for lack of licenses (policies only).
    pub shortfall: Vec<serde_json::Value>,
    /// Subjects Apple refused at once (nothing happened for them).
    pub rejected: Vec<serde_json::Value>,
    /// Sent, but Apple's answer was lost: the ledger holds them as `unknown` until Apple's
    /// assignments show what happened (reconcile and the daily run look).
    pub unknown: Vec<serde_json::Value>,
    /// Admitted, not sent within this request: a job (or the daily run) sends them.
    pub queued: usize,
    /// Revoke only: not sent, because the answer to their assignment's request was lost and
    /// Apple does not hold it yet (it may still apply it). Revoke them again once the ledger
    /// settles that assignment (the entry is `confirmed`, or gone as never applied).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
}

/// Associate `asset` with `subjects` (already filtered to what is missing), ledger first:
/// [`ledger::admit`] sets the licenses aside (all of them or, unless `all_or_nothing`, as many
/// as fit: the rest is the shortfall), then they are sent within `budget`.
#[allow(clippy::too_many_arguments)]
pub async fn associate<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    asset: &AssetRecord,
    subjects: &[Subject],
    source: &str,
    all_or_nothing: bool,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<Submitted, ApiError> {
    let mut out = Submitted::default();
    if subjects.is_empty() {
        return Ok(out);
    }
    let ak = asset.key();
    let admitted = match ledger::admit(kv, account_id, &ak, subjects, all_or_nothing, now)? {
        ledger::Admission::NoRoom { needed, available } => {
            return Err(no_licenses(account_id, asset, needed, available))
        }
        ledger::Admission::Admitted {
            admitted,
            already_open,
            shortfall,
        } => {
            out.already_assigned = already_open.iter().map(event::subject_json).collect();
            out.shortfall = shortfall.iter().map(event::subject_json).collect();
            admitted
        }
    };
    let sent = ledger::send_associate(
        kv, client, account_id, &ak, &admitted, source, false, budget,
    )
    .await?;
    out.events = sent.events;
    out.unknown = sent.unknown.iter().map(event::subject_json).collect();
    out.queued = sent.queued.len();
    if let Some(err) = sent.error {
        let api = apple_error(&err);
        if out.events.is_empty() && out.unknown.is_empty() {
            return Err(api);
        }
        out.rejected = sent.refused.iter().map(event::subject_json).collect();
        out.error = Some(api.body()["error"].clone());
    }
    Ok(out)
}

fn no_licenses(account_id: &str, asset: &AssetRecord, needed: usize, available: i64) -> ApiError {
    ApiError::new(
        ErrorCode::NoLicensesAvailable,
        format!(
            "{needed} license(s) needed for asset {}, {available} available",
            asset.adam_id
        ),
    )
    .with_details(json!({
        "accountId": account_id,
        "adamId": asset.adam_id,
        "pricingParam": asset.pricing_param,
        "needed": needed,
        "available": available,
    }))
}

/// `POST /api/assignments`: every named subject that lacks the license gets it, or nothing
/// happens (409 `no_licenses_available` when they do not all fit; checked and set aside in one
/// atomic step, so concurrent requests never take more than there is).
pub async fn assign<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    body: &AssignBody,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<Submitted, ApiError> {
    let t = resolve(kv, body)?;
    let have = already_assigned(kv, &t.account.id, &t.copy, &t.asset, &t.subjects)?;
    let missing: Vec<Subject> = t
        .subjects
        .iter()
        .filter(|s| !have.contains(&s.tag()))
        .cloned()
        .collect();
    let mut already: Vec<serde_json::Value> = t
        .subjects
        .iter()
        .filter(|s| have.contains(&s.tag()))
        .map(event::subject_json)
        .collect();
    let mut out = associate(
        kv,
        client,
        &t.account.id,
        &t.asset,
        &missing,
        "api",
        true,
        now,
        budget,
    )
    .await?;
    already.append(&mut out.already_assigned);
    out.already_assigned = already;
    Ok(out)
}

/// `POST /api/assignments/revoke`: take `asset` from the named subjects (Apple's disassociate,
/// so their other licenses stay). Ledger entries move to `revoking` first.
pub async fn revoke<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    body: &AssignBody,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<Submitted, ApiError> {
    let t = resolve(kv, body)?;
    disassociate(
        kv,
        client,
        &t.account.id,
        &t.asset,
        &t.subjects,
        "api",
        now,
        budget,
    )
    .await
}

/// Disassociate `asset` from `subjects`, one event per Apple request, within `budget`. What is
/// not sent stays `revoking` without an event: reconcile sends it again. An unclear answer
/// leaves it so as well (sending a disassociate twice does no harm). A subject whose
/// assignment of ours has an unknown outcome that Apple does not show yet is not sent
/// ([`Submitted::waiting`], see [`ledger::verify_before_removal`]).
#[allow(clippy::too_many_arguments)]
pub async fn disassociate<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    asset: &AssetRecord,
    subjects: &[Subject],
    source: &str,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<Submitted, ApiError> {
    let mut out = Submitted::default();
    if subjects.is_empty() {
        return Ok(out);
    }
    let ak = asset.key();
    let aref = ledger::asset_ref(&ak);
    let verified =
        ledger::verify_before_removal(kv, client, account_id, asset, subjects, now, budget).await?;
    // An assignment of ours whose outcome is unknown: the removal waits for it.
    out.waiting = verified.waiting.iter().map(event::subject_json).collect();
    let subjects: Vec<Subject> = subjects
        .iter()
        .filter(|s| !verified.waiting.contains(s))
        .cloned()
        .collect();
    if subjects.is_empty() {
        return Ok(out);
    }
    let subjects = subjects.as_slice();
    ledger::begin_revoke(kv, account_id, &ak, subjects, now)?;
    let limits = match client.limits().await {
        Ok(l) => l,
        Err(e) => {
            ledger::revoke_refused(kv, account_id, &ak, subjects, None, now)?;
            return Err(apple_error(&e));
        }
    };
    let (serials, users): (Vec<Subject>, Vec<Subject>) = subjects
        .iter()
        .cloned()
        .partition(|s| matches!(s, Subject::SerialNumber(_)));
    let plain = |v: Vec<Subject>| -> Vec<String> {
        v.into_iter()
            .map(|s| match s {
                Subject::SerialNumber(x) | Subject::ClientUserId(x) => x,
            })
            .collect()
    };
    let requests = split_manage(
        &ManageAssetsRequest {
            assets: vec![aref.clone()],
            client_user_ids: plain(users),
            serial_numbers: plain(serials),
        },
        &limits,
    );
    for (i, req) in requests.iter().enumerate() {
        let part = ledger::subjects_of(req);
        let now = client.clock().now();
        // Too many of the account's events pending: the rest stays `revoking`, sent later.
        if !event::has_room(kv, account_id)? || !budget.take_call(now) {
            out.queued += requests[i..]
                .iter()
                .map(|r| ledger::subjects_of(r).len())
                .sum::<usize>();
            break;
        }
        match client.disassociate(req).await {
            Ok(events) => {
                for ev in events {
                    ledger::revoke_accepted(kv, account_id, &ak, &part, &ev.event_id, now)?;
                    let rec = event::new_record(
                        &ev.event_id,
                        account_id,
                        EventKind::Disassociate,
                        source,
                        vec![aref.clone()],
                        part.clone(),
                        now,
                    );
                    event::track(kv, &rec)?;
                    out.events.push(rec);
                }
            }
            Err(e) => {
                let rest: Vec<Subject> =
                    requests[i..].iter().flat_map(ledger::subjects_of).collect();
                let api = apple_error(&e.error);
                if ledger::definite_no(&e.error) {
                    ledger::revoke_refused(kv, account_id, &ak, &rest, None, now)?;
                    if out.events.is_empty() {
                        return Err(api);
                    }
                    out.rejected = rest.iter().map(event::subject_json).collect();
                } else {
                    // Maybe applied: the first part is unknown, the rest was never sent.
                    out.unknown = part.iter().map(event::subject_json).collect();
                    let unsent: Vec<Subject> = requests[i + 1..]
                        .iter()
                        .flat_map(ledger::subjects_of)
                        .collect();
                    ledger::revoke_refused(kv, account_id, &ak, &unsent, None, now)?;
                    out.rejected = unsent.iter().map(event::subject_json).collect();
                }
                out.error = Some(api.body()["error"].clone());
                break;
            }
        }
    }
    Ok(out)
}

/// The events of a submission.
pub fn event_ids(events: &[EventRecord]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}
