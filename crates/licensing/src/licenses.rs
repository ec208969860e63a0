//! The licenses list (one row per asset, with counts and a low-license flag), its CSV export,
//! and the paged assignments of one asset. Reads: the account index, then per account its record,
//! its assets and its reservations; an assignments page is one copy shard.

use crate::error::ApiError;
use crate::model::{Account, AssetRecord, AssetsDoc, AssignmentShard, MadeBy, Subject};
use crate::{event, settings};
use serde::Serialize;
use serde_json::{json, Value};
use vpp_store::{get_json, keys, Kv};

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LicenseRow {
    pub account_id: String,
    pub account_name: String,
    pub adam_id: String,
    pub pricing_param: String,
    pub name: Option<String>,
    /// Apple's artwork for the asset, when Apple gave one.
    pub icon_url: Option<String>,
    pub product_type: String,
    pub total: i64,
    pub available: i64,
    pub in_use: i64,
    pub retired: i64,
    /// Licenses held by our associations Apple has not confirmed yet.
    pub pending: i64,
    pub unlimited: bool,
    pub low_licenses: bool,
    pub device_assignable: bool,
    pub revocable: bool,
    pub synced_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub account_id: Option<String>,
    /// Case-insensitive substring of the name (or the adamId).
    pub search: Option<String>,
    pub low_only: bool,
}

fn row(
    account: &Account,
    doc: &AssetsDoc,
    a: &AssetRecord,
    pending: i64,
    threshold: i64,
) -> LicenseRow {
    let unlimited = a.total == vpp_apple::Asset::UNLIMITED_TOTAL;
    LicenseRow {
        account_id: account.id.clone(),
        account_name: account.name.clone(),
        adam_id: a.adam_id.clone(),
        pricing_param: a.pricing_param.clone(),
        name: a.name.clone(),
        icon_url: a.icon_url.clone(),
        product_type: a.product_type.clone(),
        total: a.total,
        available: a.available,
        in_use: a.in_use,
        retired: a.retired,
        pending,
        unlimited,
        low_licenses: !unlimited && a.available - pending <= threshold,
        device_assignable: a.device_assignable,
        revocable: a.revocable,
        synced_at: doc.synced_at,
    }
}

pub fn list(kv: &impl Kv, filter: &Filter) -> Result<Vec<LicenseRow>, ApiError> {
    let threshold = settings::load(kv)?.low_license_threshold;
    let ids: Vec<String> = match &filter.account_id {
        Some(id) => {
            if get_json::<Account>(kv, &keys::account(id))?.is_none() {
                return Err(ApiError::not_found(format!("account {id}")));
            }
            vec![id.clone()]
        }
        None => get_json(kv, &keys::accounts())?.unwrap_or_default(),
    };
    let needle = filter.search.as_ref().map(|s| s.to_lowercase());
    let mut out = Vec::new();
    for id in ids {
        let Some(account) = get_json::<Account>(kv, &keys::account(&id))? else {
            continue;
        };
        let doc: AssetsDoc = get_json(kv, &keys::assets(&id))?.unwrap_or_default();
        let reserved = crate::ledger::reservations(kv, &id, &doc)?;
        for a in &doc.assets {
            if let Some(n) = &needle {
                let name = a.name.as_deref().unwrap_or("").to_lowercase();
                if !name.contains(n.as_str()) && !a.adam_id.contains(n.as_str()) {
                    continue;
                }
            }
            let r = row(
                &account,
                &doc,
                a,
                reserved.get(&a.key()).copied().unwrap_or(0),
                threshold,
            );
            if filter.low_only && !r.low_licenses {
                continue;
            }
            out.push(r);
        }
    }
    Ok(out)
}

/// Characters that make a spreadsheet read a cell as a formula when they lead it (a leading tab
/// or carriage return is skipped by some spreadsheets before they look).
const FORMULA_LEADS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

fn csv_field(s: &str) -> String {
    let formula = s.starts_with(FORMULA_LEADS);
    if formula || s.contains([',', '"', '\n', '\r', '\t']) || s.starts_with(' ') {
        // Quote, and neutralise spreadsheet formulas with a leading apostrophe.
        let body = if formula {
            format!("'{s}")
        } else {
            s.to_string()
        };
        format!("\"{}\"", body.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub const CSV_HEADER: &str = "accountId,accountName,adamId,pricingParam,name,productType,total,available,inUse,retired,pending,unlimited,lowLicenses";

pub fn to_csv(rows: &[LicenseRow]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    for r in rows {
        let fields = [
            csv_field(&r.account_id),
            csv_field(&r.account_name),
            csv_field(&r.adam_id),
            csv_field(&r.pricing_param),
            csv_field(r.name.as_deref().unwrap_or("")),
            csv_field(&r.product_type),
            r.total.to_string(),
            r.available.to_string(),
            r.in_use.to_string(),
            r.retired.to_string(),
            r.pending.to_string(),
            r.unlimited.to_string(),
            r.low_licenses.to_string(),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// One page of an asset's assignments: page `n` is copy shard `n`.
pub fn assignments(
    kv: &impl Kv,
    account_id: &str,
    adam_id: &str,
    pricing: Option<&str>,
    page: Option<u64>,
) -> Result<Value, ApiError> {
    crate::assignment::validate_adam_id(adam_id)?;
    let account = crate::assignment::load_account(kv, account_id)?;
    let doc: AssetsDoc = get_json(kv, &keys::assets(&account.id))?.unwrap_or_default();
    let asset = match pricing {
        Some(p) => {
            let p = crate::assignment::validate_pricing(Some(p))?;
            crate::assignment::find_asset(&doc, account_id, adam_id, &p)?
        }
        None => match doc.find(adam_id, "STDQ") {
            Some(a) => a.clone(),
            None => doc
                .assets
                .iter()
                .find(|a| a.adam_id == adam_id)
                .cloned()
                .ok_or_else(|| {
                    ApiError::not_found(format!("asset {adam_id} in account {account_id}"))
                })?,
        },
    };
    let page = page.unwrap_or(0);
    if page >= u64::from(asset.shards) {
        return Err(ApiError::not_found(format!(
            "page {page} (the asset's assignments have {} pages)",
            asset.shards
        ))
        .with_details(json!({"field": "page"})));
    }
    let shard: AssignmentShard = get_json(
        kv,
        &keys::assignment_shard(&account.id, doc.generation, &asset.key(), page as u32),
    )?
    .unwrap_or_default();
    let list: Vec<Value> = shard
        .iter()
        .filter_map(|(tag, by)| {
            let subject = Subject::from_tag(tag)?;
            let mut v = event::subject_json(&subject);
            match by {
                MadeBy::Ours { event_id, at } => {
                    v["madeBy"] = "thisInstance".into();
                    v["eventId"] = json!(event_id);
                    v["at"] = json!(at);
                }
                MadeBy::Foreign => v["madeBy"] = "foreign".into(),
            }
            Some(v)
        })
        .collect();
    // Our open entries (not yet in Apple's copy): shown with their state, on the first page.
    let mut pending = Vec::new();
    if page == 0 {
        let open = crate::ledger::open_doc(kv, &account.id, &asset.key())?;
        for (tag, o) in &open.entries {
            let Some(subject) = Subject::from_tag(tag) else {
                continue;
            };
            let mut v = event::subject_json(&subject);
            v["madeBy"] = "thisInstance".into();
            v["state"] = o.state.name().into();
            v["eventIds"] = json!(open.event_ids(o));
            v["since"] = json!(chrono::DateTime::from_timestamp(o.since, 0));
            pending.push(v);
        }
    }
    let next = page + 1;
    Ok(json!({
        "pending": pending,
        "accountId": account.id,
        "adamId": asset.adam_id,
        "pricingParam": asset.pricing_param,
        "inUse": asset.in_use,
        "page": page,
        "pages": asset.shards,
        "nextPage": (next < u64::from(asset.shards)).then_some(next),
        "assignments": list,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_neutralises() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=1+1"), "\"'=1+1\"");
    }

    #[test]
    fn csv_formula_guard_covers_every_leading_trigger() {
        for (raw, want) in [
            ("+SUM(A1)", "\"'+SUM(A1)\""),
            ("-2+3", "\"'-2+3\""),
            ("@cmd", "\"'@cmd\""),
            ("\t=1+1", "\"'\t=1+1\""),
            ("\r=1+1", "\"'\r=1+1\""),
            ("a\tb", "\"a\tb\""),
        ] {
            assert_eq!(csv_field(raw), want, "{raw:?}");
        }
    }
}
