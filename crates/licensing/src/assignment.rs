//! Assigning and revoking licenses, ledger first: every assignment we ask Apple for is in our
//! ledger (state `Pending`, its license reserved) before the request leaves, so a crash after
//! Apple accepted it never leaves an assignment we cannot account for.

use crate::error::{apple_error, ApiError, ErrorCode};
use crate::event;
use crate::model::{
    copy_shard_of, ledger_shard_of, Account, AssetRecord, AssetsDoc, AssignmentShard, EventKind,
    EventRecord, LedgerEntry, LedgerShard, LedgerState, Subject,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use vpp_apple::{
    split_manage, AssetRef, Client, Clock, ManageAssetsRequest, PricingParam, Transport,
};
use vpp_store::{get_json, keys, update, Kv, StoreError};

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
    pub generation: u64,
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
    let doc: AssetsDoc = get_json(kv, &keys::assets(&account.id))?.unwrap_or_default();
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
        generation: doc.generation,
        asset,
        subjects,
    })
}

/// Which of `subjects` already hold `asset` (in Apple's copy, or ours in flight/confirmed).
pub fn already_assigned(
    kv: &impl Kv,
    account_id: &str,
    generation: u64,
    asset: &AssetRecord,
    subjects: &[Subject],
) -> Result<BTreeSet<String>, StoreError> {
    let ak = asset.key();
    let mut out = BTreeSet::new();
    let mut copy_shards: BTreeMap<u32, Vec<&Subject>> = BTreeMap::new();
    let mut ledger_shards: BTreeMap<u32, Vec<&Subject>> = BTreeMap::new();
    for s in subjects {
        copy_shards
            .entry(copy_shard_of(s, asset.shards))
            .or_default()
            .push(s);
        ledger_shards
            .entry(ledger_shard_of(&ak, s))
            .or_default()
            .push(s);
    }
    for (shard, list) in copy_shards {
        let copy: AssignmentShard = get_json(
            kv,
            &keys::assignment_shard(account_id, generation, &ak, shard),
        )?
        .unwrap_or_default();
        for s in list {
            if copy.contains_key(&s.tag()) {
                out.insert(s.tag());
            }
        }
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
    Ok(out)
}

/// Licenses that can be assigned now: Apple's available count less our pending reservations.
/// `None`: unlimited.
pub fn available_now(
    kv: &impl Kv,
    account_id: &str,
    asset: &AssetRecord,
) -> Result<Option<i64>, StoreError> {
    if asset.total == vpp_apple::Asset::UNLIMITED_TOTAL {
        return Ok(None);
    }
    let reserved = event::reservations(kv, account_id)?
        .get(&asset.key())
        .copied()
        .unwrap_or(0);
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
}

fn partition(subjects: &[Subject]) -> (Vec<String>, Vec<String>) {
    let mut serials = Vec::new();
    let mut users = Vec::new();
    for s in subjects {
        match s {
            Subject::SerialNumber(x) => serials.push(x.clone()),
            Subject::ClientUserId(x) => users.push(x.clone()),
        }
    }
    (serials, users)
}

fn subjects_of(req: &ManageAssetsRequest) -> Vec<Subject> {
    req.serial_numbers
        .iter()
        .map(|s| Subject::SerialNumber(s.clone()))
        .chain(
            req.client_user_ids
                .iter()
                .map(|u| Subject::ClientUserId(u.clone())),
        )
        .collect()
}

/// Events Apple accepted for one request: tracked, and named on the ledger entries that wait
/// for them (state `waiting`, no event yet).
struct Accepted<'a> {
    account_id: &'a str,
    kind: EventKind,
    source: &'a str,
    asset_ref: &'a AssetRef,
    asset_key: &'a str,
    waiting: LedgerState,
    now: DateTime<Utc>,
}

impl Accepted<'_> {
    fn record(
        &self,
        kv: &impl Kv,
        part: &[Subject],
        events: Vec<vpp_apple::EventResponse>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut out = Vec::new();
        for ev in events {
            let rec = event::new_record(
                &ev.event_id,
                self.account_id,
                self.kind,
                self.source,
                vec![self.asset_ref.clone()],
                part.to_vec(),
                self.now,
            );
            event::track(kv, &rec)?;
            let eid = ev.event_id.clone();
            ledger_write(kv, self.account_id, self.asset_key, part, |cur| match cur {
                Some(e) if e.state == self.waiting && e.event_id.is_none() => {
                    Some(Some(LedgerEntry {
                        event_id: Some(eid.clone()),
                        ..e.clone()
                    }))
                }
                _ => None,
            })?;
            out.push(rec);
        }
        Ok(out)
    }
}

/// Write ledger entries for (asset, subjects): `f` maps the current entry to the new one.
pub fn ledger_write(
    kv: &impl Kv,
    account_id: &str,
    asset_key: &str,
    subjects: &[Subject],
    f: impl Fn(Option<&LedgerEntry>) -> Option<Option<LedgerEntry>>,
) -> Result<(), StoreError> {
    let mut by_shard: BTreeMap<u32, Vec<&Subject>> = BTreeMap::new();
    for s in subjects {
        by_shard
            .entry(ledger_shard_of(asset_key, s))
            .or_default()
            .push(s);
    }
    for (shard, list) in by_shard {
        update::<LedgerShard, ()>(kv, &keys::ledger_shard(account_id, shard), |cur| {
            let mut l = cur.unwrap_or_default();
            let mut changed = false;
            let m = l.entry(asset_key.to_string()).or_default();
            for s in &list {
                let tag = s.tag();
                if let Some(next) = f(m.get(&tag)) {
                    changed = true;
                    match next {
                        Some(e) => {
                            m.insert(tag, e);
                        }
                        None => {
                            m.remove(&tag);
                        }
                    }
                }
            }
            if m.is_empty() {
                l.remove(asset_key);
            }
            Ok((changed.then_some(l), ()))
        })?;
    }
    Ok(())
}

/// Associate `asset` with `subjects` (already filtered to what is missing and fits), ledger
/// first. One event per Apple request (split to Apple's limits).
pub async fn associate<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    asset: &AssetRecord,
    subjects: &[Subject],
    source: &str,
    now: DateTime<Utc>,
) -> Result<Submitted, ApiError> {
    let mut out = Submitted::default();
    if subjects.is_empty() {
        return Ok(out);
    }
    let ak = asset.key();
    let asset_ref = AssetRef::new(
        asset.adam_id.clone(),
        PricingParam::from(asset.pricing_param.as_str()),
    );
    // 1. The ledger and the reservation, before Apple hears of it.
    ledger_write(kv, account_id, &ak, subjects, |cur| match cur {
        Some(e) if matches!(e.state, LedgerState::Pending | LedgerState::Confirmed) => None,
        _ => Some(Some(LedgerEntry {
            state: LedgerState::Pending,
            event_id: None,
            at: now,
            error: None,
        })),
    })?;
    event::reserve(
        kv,
        account_id,
        &BTreeMap::from([(ak.clone(), subjects.len() as i64)]),
    )?;
    // 2. Apple, one request at a time so each event knows its subjects.
    let limits = match client.limits().await {
        Ok(l) => l,
        Err(e) => {
            undo_pending(kv, account_id, &ak, subjects)?;
            return Err(apple_error(&e));
        }
    };
    let (serials, users) = partition(subjects);
    let requests = split_manage(
        &ManageAssetsRequest {
            assets: vec![asset_ref.clone()],
            client_user_ids: users,
            serial_numbers: serials,
        },
        &limits,
    );
    let mut failed_at: Option<(usize, vpp_apple::AppleError)> = None;
    for (i, req) in requests.iter().enumerate() {
        let part = subjects_of(req);
        match client.associate(req).await {
            Ok(events) => {
                let ctx = Accepted {
                    account_id,
                    kind: EventKind::Associate,
                    source,
                    asset_ref: &asset_ref,
                    asset_key: &ak,
                    waiting: LedgerState::Pending,
                    now,
                };
                out.events.extend(ctx.record(kv, &part, events)?);
            }
            Err(e) => {
                failed_at = Some((i, e.error));
                break;
            }
        }
    }
    if let Some((i, err)) = failed_at {
        // A synchronous failure means Apple did nothing for these: take them back out.
        let rest: Vec<Subject> = requests[i..].iter().flat_map(subjects_of).collect();
        undo_pending(kv, account_id, &ak, &rest)?;
        let api = apple_error(&err);
        if out.events.is_empty() {
            return Err(api);
        }
        out.rejected = rest.iter().map(event::subject_json).collect();
        out.error = Some(api.body()["error"].clone());
    }
    Ok(out)
}

fn undo_pending(
    kv: &impl Kv,
    account_id: &str,
    ak: &str,
    subjects: &[Subject],
) -> Result<(), StoreError> {
    ledger_write(kv, account_id, ak, subjects, |cur| match cur {
        Some(e) if e.state == LedgerState::Pending && e.event_id.is_none() => Some(None),
        _ => None,
    })?;
    event::reserve(
        kv,
        account_id,
        &BTreeMap::from([(ak.to_string(), -(subjects.len() as i64))]),
    )
}

/// `POST /api/assignments`: every named subject that lacks the license gets it, or nothing
/// happens (409 `no_licenses_available` when they do not all fit).
pub async fn assign<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    body: &AssignBody,
    now: DateTime<Utc>,
) -> Result<Submitted, ApiError> {
    let t = resolve(kv, body)?;
    let have = already_assigned(kv, &t.account.id, t.generation, &t.asset, &t.subjects)?;
    let missing: Vec<Subject> = t
        .subjects
        .iter()
        .filter(|s| !have.contains(&s.tag()))
        .cloned()
        .collect();
    let already: Vec<serde_json::Value> = t
        .subjects
        .iter()
        .filter(|s| have.contains(&s.tag()))
        .map(event::subject_json)
        .collect();
    if let Some(avail) = available_now(kv, &t.account.id, &t.asset)? {
        if (missing.len() as i64) > avail {
            return Err(ApiError::new(
                ErrorCode::NoLicensesAvailable,
                format!(
                    "{} license(s) needed for asset {}, {} available",
                    missing.len(),
                    t.asset.adam_id,
                    avail
                ),
            )
            .with_details(json!({
                "accountId": t.account.id,
                "adamId": t.asset.adam_id,
                "pricingParam": t.asset.pricing_param,
                "needed": missing.len(),
                "available": avail,
            })));
        }
    }
    let mut out = associate(kv, client, &t.account.id, &t.asset, &missing, "api", now).await?;
    out.already_assigned = already;
    Ok(out)
}

/// `POST /api/assignments/revoke`: take `asset` from the named subjects (Apple's disassociate,
/// so their other licenses stay). Ledger entries move to `Revoking` first.
pub async fn revoke<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    body: &AssignBody,
    now: DateTime<Utc>,
) -> Result<Submitted, ApiError> {
    let t = resolve(kv, body)?;
    disassociate(kv, client, &t.account.id, &t.asset, &t.subjects, "api", now).await
}

/// Disassociate `asset` from `subjects`, one event per Apple request.
pub async fn disassociate<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    asset: &AssetRecord,
    subjects: &[Subject],
    source: &str,
    now: DateTime<Utc>,
) -> Result<Submitted, ApiError> {
    let mut out = Submitted::default();
    if subjects.is_empty() {
        return Ok(out);
    }
    let ak = asset.key();
    let asset_ref = AssetRef::new(
        asset.adam_id.clone(),
        PricingParam::from(asset.pricing_param.as_str()),
    );
    ledger_write(kv, account_id, &ak, subjects, |cur| match cur {
        Some(e)
            if e.state == LedgerState::Confirmed
                || (e.state == LedgerState::Revoking && e.event_id.is_none()) =>
        {
            Some(Some(LedgerEntry {
                state: LedgerState::Revoking,
                event_id: None,
                at: now,
                error: None,
            }))
        }
        Some(e) if e.state == LedgerState::Failed => Some(None),
        _ => None,
    })?;
    let limits = match client.limits().await {
        Ok(l) => l,
        Err(e) => {
            undo_revoking(kv, account_id, &ak, subjects)?;
            return Err(apple_error(&e));
        }
    };
    let (serials, users) = partition(subjects);
    let requests = split_manage(
        &ManageAssetsRequest {
            assets: vec![asset_ref.clone()],
            client_user_ids: users,
            serial_numbers: serials,
        },
        &limits,
    );
    for (i, req) in requests.iter().enumerate() {
        let part = subjects_of(req);
        match client.disassociate(req).await {
            Ok(events) => {
                let ctx = Accepted {
                    account_id,
                    kind: EventKind::Disassociate,
                    source,
                    asset_ref: &asset_ref,
                    asset_key: &ak,
                    waiting: LedgerState::Revoking,
                    now,
                };
                out.events.extend(ctx.record(kv, &part, events)?);
            }
            Err(e) => {
                let rest: Vec<Subject> = requests[i..].iter().flat_map(subjects_of).collect();
                undo_revoking(kv, account_id, &ak, &rest)?;
                let api = apple_error(&e.error);
                if out.events.is_empty() {
                    return Err(api);
                }
                out.rejected = rest.iter().map(event::subject_json).collect();
                out.error = Some(api.body()["error"].clone());
                break;
            }
        }
    }
    Ok(out)
}

fn undo_revoking(
    kv: &impl Kv,
    account_id: &str,
    ak: &str,
    subjects: &[Subject],
) -> Result<(), StoreError> {
    ledger_write(kv, account_id, ak, subjects, |cur| match cur {
        Some(e) if e.state == LedgerState::Revoking && e.event_id.is_none() => {
            Some(Some(LedgerEntry {
                state: LedgerState::Confirmed,
                ..e.clone()
            }))
        }
        _ => None,
    })
}
