//! App policies: the desired state. A policy names assets of one account and the devices or
//! users that should hold them. Putting a policy assigns what is missing (as far as licenses
//! allow, reporting the shortfall); a device or user taken out of every policy keeps its license
//! until reconcile takes it back.
//!
//! Layout (`keys.rs`): `policies`, the index (one summary per policy: its page and size), and
//! `policies/page/{n}`, pages of whole policies packed first-fit up to
//! [`keys::POLICY_PAGE_BYTES`], so the number of keys grows with the policies' bytes, not their
//! number. A policy is at most [`keys::POLICY_MAX_BYTES`] (413 otherwise). The pages are the
//! truth for a policy's content; the index says which page holds it.
//!
//! A put writes the policy on a page (its own page when it still fits, else the first with room),
//! then points the index at it, then removes it from the page it left. A kill in between leaves
//! the old policy in force (index unchanged) or the new one (index moved) plus a stale copy no
//! index entry points at; stale copies older than [`STALE_AFTER_MINUTES`] are dropped by the next
//! write of their page. `policy/{id}` values of earlier versions are read until the policy is
//! next put or deleted.

use crate::assignment::{self, validate_adam_id, validate_pricing, validate_subjects};
use crate::error::ApiError;
use crate::model::{asset_key, AssetsDoc, Subject};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use vpp_apple::{Client, Clock, Transport};
use vpp_store::{get_json, keys, update, Kv, StoreError};

pub const MAX_POLICY_SUBJECTS: usize = 20_000;
pub const MAX_POLICY_ASSETS: usize = 200;
pub const MAX_POLICIES: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAsset {
    pub adam_id: String,
    #[serde(default = "stdq")]
    pub pricing_param: String,
}

fn stdq() -> String {
    "STDQ".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub account_id: String,
    pub assets: Vec<PolicyAsset>,
    #[serde(default)]
    pub serial_numbers: Vec<String>,
    #[serde(default)]
    pub client_user_ids: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Policy {
    pub fn subjects(&self) -> Vec<Subject> {
        self.serial_numbers
            .iter()
            .map(|s| Subject::SerialNumber(s.clone()))
            .chain(
                self.client_user_ids
                    .iter()
                    .map(|u| Subject::ClientUserId(u.clone())),
            )
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    pub id: String,
    pub name: String,
    pub account_id: String,
    /// The page holding the policy; absent: the `policy/{id}` value of an earlier version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// The policy's stored size (bytes of JSON), for choosing a page with room.
    #[serde(default)]
    pub bytes: usize,
}

/// A page of policies: id → the policy's JSON, kept as text so that writing one policy does not
/// decode (or re-encode) the others.
type PolicyPage = BTreeMap<String, Box<RawValue>>;

/// What a page write needs of a policy it keeps: when it was last put.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stamp {
    updated_at: DateTime<Utc>,
}

fn stamp(raw: &RawValue) -> Option<DateTime<Utc>> {
    serde_json::from_str::<Stamp>(raw.get())
        .ok()
        .map(|s| s.updated_at)
}

fn decode(n: u32, raw: &RawValue) -> Result<Policy, StoreError> {
    serde_json::from_str(raw.get()).map_err(|e| StoreError::Corrupt {
        key: keys::policy_page(n),
        reason: e.to_string(),
    })
}

/// A copy of a policy that no index entry points at (a put or delete killed halfway) is dropped
/// when its page is next written, once it is this old (a put takes seconds).
pub const STALE_AFTER_MINUTES: i64 = 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyBody {
    pub name: String,
    pub account_id: String,
    pub assets: Vec<PolicyAsset>,
    #[serde(default)]
    pub serial_numbers: Vec<String>,
    #[serde(default)]
    pub client_user_ids: Vec<String>,
}

pub fn validate_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(ApiError::invalid_field(
            "id",
            "a policy id is 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(())
}

pub fn index(kv: &impl Kv) -> Result<Vec<PolicySummary>, StoreError> {
    Ok(get_json(kv, &keys::policies())?.unwrap_or_default())
}

fn page(kv: &impl Kv, n: u32) -> Result<PolicyPage, StoreError> {
    Ok(get_json(kv, &keys::policy_page(n))?.unwrap_or_default())
}

/// The policy a summary points at, its page read once into `pages`.
fn take(
    kv: &impl Kv,
    pages: &mut BTreeMap<u32, PolicyPage>,
    s: &PolicySummary,
) -> Result<Option<Policy>, StoreError> {
    let Some(n) = s.page else {
        return get_json(kv, &keys::policy(&s.id));
    };
    let pg = match pages.entry(n) {
        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::btree_map::Entry::Vacant(e) => e.insert(page(kv, n)?),
    };
    pg.remove(&s.id).map(|raw| decode(n, &raw)).transpose()
}

pub fn load(kv: &impl Kv, id: &str) -> Result<Option<Policy>, StoreError> {
    match index(kv)?.into_iter().find(|s| s.id == id) {
        Some(s) => take(kv, &mut BTreeMap::new(), &s),
        None => Ok(None),
    }
}

/// Every policy, in index order (each page read once).
pub fn list(kv: &impl Kv) -> Result<Vec<Policy>, StoreError> {
    let mut pages = BTreeMap::new();
    let mut out = Vec::new();
    for s in index(kv)? {
        out.extend(take(kv, &mut pages, &s)?);
    }
    Ok(out)
}

/// Names of the policies that use `account_id` (account deletion refuses while any does).
pub fn names_using_account(kv: &impl Kv, account_id: &str) -> Result<Vec<String>, ApiError> {
    Ok(list(kv)?
        .into_iter()
        .filter(|p| p.account_id == account_id)
        .map(|p| p.name)
        .collect())
}

/// What all policies of an account want: asset key → subject tags.
pub fn desired(
    kv: &impl Kv,
    account_id: &str,
) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in list(kv)?.into_iter().filter(|p| p.account_id == account_id) {
        let tags: Vec<String> = p.subjects().iter().map(Subject::tag).collect();
        for a in &p.assets {
            out.entry(asset_key(&a.adam_id, &a.pricing_param))
                .or_default()
                .extend(tags.iter().cloned());
        }
    }
    Ok(out)
}

fn too_many() -> ApiError {
    ApiError::new(
        crate::ErrorCode::Conflict,
        format!("at most {MAX_POLICIES} policies"),
    )
}

/// Write `policy` on page `n` if it fits there, dropping stale copies (see the module doc) the
/// page holds. Returns whether it was written.
fn write_on_page(
    kv: &impl Kv,
    n: u32,
    policy: &Policy,
    raw: &RawValue,
    summaries: &[PolicySummary],
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let stale_before = now - chrono::Duration::minutes(STALE_AFTER_MINUTES);
    update::<PolicyPage, bool>(kv, &keys::policy_page(n), |cur| {
        let mut pg = cur.unwrap_or_default();
        pg.retain(|id, p| {
            id == &policy.id
                || summaries.iter().any(|s| &s.id == id && s.page == Some(n))
                || stamp(p).is_none_or(|at| at >= stale_before)
        });
        pg.insert(policy.id.clone(), raw.to_owned());
        // The page's JSON: `{`, `"id":policy` joined by `,`, `}` (ids need no escapes).
        let bytes = 2 + pg
            .iter()
            .map(|(k, v)| k.len() + 4 + v.get().len())
            .sum::<usize>();
        if bytes > keys::POLICY_PAGE_BYTES {
            return Ok((None, false));
        }
        Ok((Some(pg), true))
    })
}

/// Remove policy `id` from page `n` if the copy there is not newer than `until`.
fn remove_from_page(
    kv: &impl Kv,
    n: u32,
    id: &str,
    until: DateTime<Utc>,
) -> Result<(), StoreError> {
    update::<PolicyPage, ()>(kv, &keys::policy_page(n), |cur| {
        let Some(mut pg) = cur else {
            return Ok((None, ()));
        };
        match pg.get(id).and_then(|p| stamp(p)) {
            Some(at) if at <= until => {
                pg.remove(id);
                Ok((Some(pg), ()))
            }
            _ => Ok((None, ())),
        }
    })
}

/// Store `policy` (already validated, at most [`keys::POLICY_MAX_BYTES`]): on a page, then in
/// the index, then off the page it left.
pub fn store(kv: &impl Kv, policy: &Policy, now: DateTime<Utc>) -> Result<(), ApiError> {
    // Serialized once: its size chooses the page, its text goes on it.
    let raw = to_raw_value(policy).map_err(ApiError::internal)?;
    let bytes = raw.get().len();
    let summaries = index(kv)?;
    let current = summaries.iter().find(|s| s.id == policy.id).cloned();
    if current.is_none() && summaries.len() >= MAX_POLICIES {
        return Err(too_many());
    }
    let home = current.as_ref().and_then(|s| s.page);
    // Its own page first; then pages by the room the index says they have, lowest first; then
    // new pages (a page may hold stale copies the index does not count).
    let mut used: BTreeMap<u32, usize> = BTreeMap::new();
    for s in &summaries {
        if let Some(n) = s.page {
            *used.entry(n).or_default() += s.bytes;
        }
    }
    let next = used.keys().next_back().map_or(0, |n| n + 1);
    let mut candidates: Vec<u32> = home.into_iter().collect();
    candidates.extend((0..next).filter(|n| {
        Some(*n) != home && used.get(n).copied().unwrap_or(0) + bytes <= keys::POLICY_PAGE_BYTES
    }));
    candidates.extend(next..next + 4);
    let mut placed = None;
    for n in candidates {
        if write_on_page(kv, n, policy, &raw, &summaries, now)? {
            placed = Some(n);
            break;
        }
    }
    let Some(page_no) = placed else {
        return Err(ApiError::store("no policy page has room"));
    };
    let summary = PolicySummary {
        id: policy.id.clone(),
        name: policy.name.clone(),
        account_id: policy.account_id.clone(),
        page: Some(page_no),
        bytes,
    };
    let left = update::<Vec<PolicySummary>, Result<Option<PolicySummary>, ()>>(
        kv,
        &keys::policies(),
        |cur| {
            let mut list = cur.unwrap_or_default();
            let full = list.len() >= MAX_POLICIES;
            match list.iter_mut().find(|s| s.id == summary.id) {
                Some(s) => {
                    let old = std::mem::replace(s, summary.clone());
                    Ok((Some(list), Ok(Some(old))))
                }
                None if full => Ok((None, Err(()))),
                None => {
                    list.push(summary.clone());
                    Ok((Some(list), Ok(None)))
                }
            }
        },
    )?;
    match left {
        Err(()) => {
            remove_from_page(kv, page_no, &policy.id, policy.updated_at)?;
            Err(too_many())
        }
        Ok(Some(old)) if old.page != Some(page_no) => {
            // Only copies older than this put: a newer put of the same policy may have landed
            // there meanwhile.
            let older = policy.updated_at - chrono::Duration::nanoseconds(1);
            match old.page {
                Some(n) => remove_from_page(kv, n, &policy.id, older)?,
                None => kv.delete(&keys::policy(&policy.id))?,
            }
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

/// Check a body against the account's assets; nothing is written. The policy returned is
/// stamped `now` (`put` keeps the first creation time).
pub fn validate(
    kv: &impl Kv,
    id: &str,
    body: &PolicyBody,
    now: DateTime<Utc>,
) -> Result<(Policy, AssetsDoc), ApiError> {
    validate_id(id)?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid_field(
            "name",
            "name must be 1 to 200 characters",
        ));
    }
    let account = assignment::load_account(kv, &body.account_id)?;
    if body.assets.is_empty() || body.assets.len() > MAX_POLICY_ASSETS {
        return Err(ApiError::invalid_field(
            "assets",
            format!("a policy names 1 to {MAX_POLICY_ASSETS} assets"),
        ));
    }
    let subjects = validate_subjects(
        &body.serial_numbers,
        &body.client_user_ids,
        MAX_POLICY_SUBJECTS,
    )?;
    let wanted: Vec<String> = body
        .assets
        .iter()
        .map(|a| asset_key(&a.adam_id, &a.pricing_param))
        .collect();
    let doc: AssetsDoc = crate::copy::assets_for(kv, &account.id, &wanted)?;
    let mut assets = Vec::new();
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    for a in &body.assets {
        validate_adam_id(&a.adam_id)?;
        let p = validate_pricing(Some(&a.pricing_param))?;
        if !seen.insert(asset_key(&a.adam_id, &p)) {
            continue;
        }
        match doc.find(&a.adam_id, &p) {
            None => missing.push(json!({"adamId": a.adam_id, "pricingParam": p})),
            Some(rec) => {
                if !rec.device_assignable && !body.serial_numbers.is_empty() {
                    return Err(ApiError::new(
                        crate::ErrorCode::Unprocessable,
                        format!(
                            "asset {} cannot be assigned to devices; use clientUserIds",
                            a.adam_id
                        ),
                    )
                    .with_details(json!({"field": "serialNumbers", "adamId": a.adam_id})));
                }
            }
        }
        assets.push(PolicyAsset {
            adam_id: a.adam_id.clone(),
            pricing_param: p,
        });
    }
    if !missing.is_empty() {
        return Err(ApiError::new(
            crate::ErrorCode::Unprocessable,
            format!(
                "{} asset(s) are not in account {}",
                missing.len(),
                account.id
            ),
        )
        .with_details(json!({"field": "assets", "missing": missing})));
    }
    let (serials, users): (Vec<Subject>, Vec<Subject>) = subjects
        .into_iter()
        .partition(|s| matches!(s, Subject::SerialNumber(_)));
    let strip = |v: Vec<Subject>| -> Vec<String> {
        v.into_iter()
            .map(|s| match s {
                Subject::SerialNumber(x) | Subject::ClientUserId(x) => x,
            })
            .collect()
    };
    let policy = Policy {
        id: id.to_string(),
        name: name.to_string(),
        account_id: account.id,
        assets,
        serial_numbers: strip(serials),
        client_user_ids: strip(users),
        created_at: now,
        updated_at: now,
    };
    let bytes = serde_json::to_vec(&policy)
        .map_err(ApiError::internal)?
        .len();
    if bytes > keys::POLICY_MAX_BYTES {
        return Err(ApiError::new(
            crate::ErrorCode::PayloadTooLarge,
            format!(
                "the policy takes {bytes} bytes stored; at most {} (split it into several policies)",
                keys::POLICY_MAX_BYTES
            ),
        )
        .with_details(json!({"field": "serialNumbers", "bytes": bytes, "limitBytes": keys::POLICY_MAX_BYTES})));
    }
    Ok((policy, doc))
}

/// `PUT /api/policies/{id}`: store the policy, then assign what is missing, as far as licenses
/// allow. Every missing license is admitted to the ledger first (the resume point); what is not
/// sent within `budget` stays queued (`queued` > 0: a ledger job or the daily run sends it).
pub async fn put<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    id: &str,
    body: &PolicyBody,
    now: DateTime<Utc>,
    budget: &mut crate::job::Budget,
) -> Result<(bool, Value), ApiError> {
    let (mut policy, doc) = validate(kv, id, body, now)?;
    let existing = load(kv, id)?;
    policy.created_at = existing.as_ref().map(|p| p.created_at).unwrap_or(now);
    policy.updated_at = now;
    store(kv, &policy, now)?;
    let subjects = policy.subjects();
    let mut report = Vec::new();
    let mut queued = 0usize;
    for pa in &policy.assets {
        let Some(asset) = doc.find(&pa.adam_id, &pa.pricing_param).cloned() else {
            continue;
        };
        let have = assignment::already_assigned(kv, &policy.account_id, &doc, &asset, &subjects)?;
        let missing: Vec<Subject> = subjects
            .iter()
            .filter(|s| !have.contains(&s.tag()))
            .cloned()
            .collect();
        let mut entry = json!({
            "adamId": asset.adam_id,
            "pricingParam": asset.pricing_param,
            "wanted": subjects.len(),
            "alreadyAssigned": have.len(),
        });
        match assignment::associate(
            kv,
            client,
            &policy.account_id,
            &asset,
            &missing,
            "policy",
            false,
            now,
            budget,
        )
        .await
        {
            Ok(sub) => {
                let shortfall = sub.shortfall.len();
                entry["requested"] = json!(missing.len() - shortfall - sub.already_assigned.len());
                entry["shortfall"] = json!(shortfall);
                entry["shortfallSubjects"] = json!(sub.shortfall);
                entry["alreadyAssigned"] = json!(have.len() + sub.already_assigned.len());
                entry["eventIds"] = json!(assignment::event_ids(&sub.events));
                entry["unknown"] = json!(sub.unknown);
                entry["queued"] = json!(sub.queued);
                queued += sub.queued;
                if let Some(e) = sub.error {
                    entry["error"] = e;
                }
            }
            Err(e) => {
                entry["requested"] = json!(0);
                entry["shortfall"] = json!(0);
                entry["error"] = e.body()["error"].clone();
            }
        }
        report.push(entry);
    }
    let created = existing.is_none();
    Ok((
        created,
        json!({"policy": policy, "assignments": report, "queued": queued}),
    ))
}

pub fn delete(kv: &impl Kv, id: &str) -> Result<(), ApiError> {
    validate_id(id)?;
    let Some(gone) = load(kv, id)? else {
        return Err(ApiError::not_found(format!("policy {id}")));
    };
    let removed =
        update::<Vec<PolicySummary>, Option<PolicySummary>>(kv, &keys::policies(), |cur| {
            let mut list = cur.unwrap_or_default();
            let Some(at) = list.iter().position(|s| s.id == id) else {
                return Ok((None, None));
            };
            let s = list.remove(at);
            Ok((Some(list), Some(s)))
        })?;
    match removed.and_then(|s| s.page) {
        Some(n) => remove_from_page(kv, n, id, gone.updated_at)?,
        None => kv.delete(&keys::policy(id))?,
    }
    Ok(())
}
