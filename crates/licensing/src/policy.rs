//! App policies: the desired state. A policy names assets of one account and the devices or
//! users that should hold them. Putting a policy assigns what is missing (as far as licenses
//! allow, reporting the shortfall); a device or user taken out of every policy keeps its license
//! until reconcile takes it back.
//!
//! Layout: `policies` (index of summaries, one read for the list and for "which policies use
//! this account") and `policy/{id}` (the full policy, at most [`MAX_POLICY_SUBJECTS`] subjects).

use crate::assignment::{self, validate_adam_id, validate_pricing, validate_subjects};
use crate::error::ApiError;
use crate::model::{asset_key, AssetsDoc, Subject};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use vpp_apple::{Client, Clock, Transport};
use vpp_store::{get_json, keys, set_json, update, Kv, StoreError};

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
}

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

pub fn load(kv: &impl Kv, id: &str) -> Result<Option<Policy>, StoreError> {
    get_json(kv, &keys::policy(id))
}

/// Every policy, in index order.
pub fn list(kv: &impl Kv) -> Result<Vec<Policy>, StoreError> {
    let mut out = Vec::new();
    for s in index(kv)? {
        if let Some(p) = load(kv, &s.id)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// Names of the policies that use `account_id` (account deletion refuses while any does).
pub fn names_using_account(kv: &impl Kv, account_id: &str) -> Result<Vec<String>, ApiError> {
    Ok(index(kv)?
        .into_iter()
        .filter(|s| s.account_id == account_id)
        .map(|s| s.name)
        .collect())
}

/// What all policies of an account want: asset key → subject tags.
pub fn desired(
    kv: &impl Kv,
    account_id: &str,
) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in index(kv)?
        .into_iter()
        .filter(|s| s.account_id == account_id)
    {
        if let Some(p) = load(kv, &s.id)? {
            let tags: Vec<String> = p.subjects().iter().map(Subject::tag).collect();
            for a in &p.assets {
                out.entry(asset_key(&a.adam_id, &a.pricing_param))
                    .or_default()
                    .extend(tags.iter().cloned());
            }
        }
    }
    Ok(out)
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
    Ok((
        Policy {
            id: id.to_string(),
            name: name.to_string(),
            account_id: account.id,
            assets,
            serial_numbers: strip(serials),
            client_user_ids: strip(users),
            created_at: now,
            updated_at: now,
        },
        doc,
    ))
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
    let summary = PolicySummary {
        id: policy.id.clone(),
        name: policy.name.clone(),
        account_id: policy.account_id.clone(),
    };
    let too_many = update::<Vec<PolicySummary>, bool>(kv, &keys::policies(), |cur| {
        let mut list = cur.unwrap_or_default();
        let full = list.len() >= MAX_POLICIES;
        match list.iter_mut().find(|s| s.id == summary.id) {
            Some(s) => *s = summary.clone(),
            None if full => return Ok((None, true)),
            None => list.push(summary.clone()),
        }
        Ok((Some(list), false))
    })?;
    if too_many {
        return Err(ApiError::new(
            crate::ErrorCode::Conflict,
            format!("at most {MAX_POLICIES} policies"),
        ));
    }
    set_json(kv, &keys::policy(id), &policy)?;
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
    if load(kv, id)?.is_none() {
        return Err(ApiError::not_found(format!("policy {id}")));
    }
    update::<Vec<PolicySummary>, ()>(kv, &keys::policies(), |cur| {
        let mut list = cur.unwrap_or_default();
        list.retain(|s| s.id != id);
        Ok((Some(list), ()))
    })?;
    kv.delete(&keys::policy(id))?;
    Ok(())
}
