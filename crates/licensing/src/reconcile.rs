//! Reconcile: take back every license this instance assigned that no app policy wants any more,
//! across all accounts. Each account is settled first (due events polled, open entries a
//! refresh saw at Apple confirmed, unknown outcomes looked up), so fresh assignments count. A resumable job (kind `reconcile`): each slice continues at the account
//! in its checkpoint; the ledger's `Revoking` state makes a repeated slice harmless.
//!
//! It reads only our ledger, so foreign assignments are never touched, and it uses Apple's
//! disassociate per asset (never revoke, which would take every license of the device). An
//! account owned by another MDM is skipped and reported.

use crate::apple_state::{AppleState, Owner};
use crate::assignment;
use crate::error::ApiError;
use crate::job::{self, Budget, Job};
use crate::model::{AssetRecord, AssetsDoc, LedgerShard, LedgerState, Subject, LEDGER_SHARDS};
use crate::{event, ledger, policy};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use vpp_apple::{Client, Clock, Transport};
use vpp_store::{get_json, keys, Kv};

pub const KIND: &str = "reconcile";
const LEASE_SCOPE: &str = "reconcile";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub accounts: Vec<String>,
    pub index: usize,
    pub revoked: u64,
    /// Open ledger entries confirmed before deciding (a refresh saw them at Apple).
    #[serde(default)]
    pub settled: u64,
    pub events: Vec<String>,
    pub skipped: Vec<Value>,
    pub errors: Vec<Value>,
}

/// Start a reconcile job, or return the one already running.
pub fn start(
    kv: &impl Kv,
    job_id: &str,
    requested_by: &str,
    now: DateTime<Utc>,
) -> Result<(Job, bool), ApiError> {
    let mut j = Job::new(job_id, KIND, None, requested_by, now);
    let st = State {
        accounts: get_json(kv, &keys::accounts())?.unwrap_or_default(),
        ..State::default()
    };
    j.progress.phase = "accounts".into();
    j.progress.total = Some(st.accounts.len() as u64);
    j.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
    // One reconcile at a time: the check and the listing are one compare-and-swap.
    let started = job::start(kv, &j)?;
    let created = started.created();
    Ok((started.into_job(), created))
}

/// What reconcile would take back in one account: asset key → subjects.
pub fn unwanted(
    kv: &impl Kv,
    account_id: &str,
) -> Result<BTreeMap<String, Vec<Subject>>, ApiError> {
    let desired = policy::desired(kv, account_id)?;
    let mut out: BTreeMap<String, Vec<Subject>> = BTreeMap::new();
    for shard in 0..LEDGER_SHARDS {
        let l: LedgerShard =
            get_json(kv, &keys::ledger_shard(account_id, shard))?.unwrap_or_default();
        for (ak, entries) in l {
            let want = desired.get(&ak);
            for (tag, e) in entries {
                let candidate = e.state == LedgerState::Confirmed
                    || (e.state == LedgerState::Revoking && e.event_id.is_none());
                if !candidate || want.is_some_and(|w| w.contains(&tag)) {
                    continue;
                }
                if let Some(s) = Subject::from_tag(&tag) {
                    out.entry(ak.clone()).or_default().push(s);
                }
            }
        }
    }
    Ok(out)
}

/// Run one slice; saves the job. Returns true when the job finished.
pub async fn run_slice<T: Transport, C: Clock>(
    kv: &impl Kv,
    job: &mut Job,
    client_for_account: impl Fn(&str) -> Client<T, C>,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<bool, ApiError> {
    if !job.is_running() {
        return Ok(true);
    }
    let holder = match job::take_lease(kv, LEASE_SCOPE, &job.id, now)? {
        job::Leased::Held {
            holder,
            job: current,
        } => {
            *job = current;
            holder
        }
        job::Leased::Busy => return Ok(false),
        job::Leased::Ended(current) => {
            if let Some(current) = current {
                *job = current;
            }
            return Ok(true);
        }
    };
    let result = run_held(kv, job, client_for_account, now, budget).await;
    // The lease goes back whatever happened: a slice that failed midway leaves its work to
    // the next call, not to the lease's expiry.
    job::release_lease(kv, LEASE_SCOPE, &holder)?;
    result
}

/// One slice under the lease.
async fn run_held<T: Transport, C: Clock>(
    kv: &impl Kv,
    job: &mut Job,
    client_for_account: impl Fn(&str) -> Client<T, C>,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<bool, ApiError> {
    let mut st: State = serde_json::from_value(job.checkpoint.clone()).unwrap_or_default();
    job.slices += 1;
    let mut paused = false;
    while st.index < st.accounts.len() {
        let account_id = st.accounts[st.index].clone();
        let apple: AppleState = get_json(kv, &keys::apple_state(&account_id))?.unwrap_or_default();
        if let Owner::Foreign { id, name } = &apple.owner {
            st.skipped.push(json!({
                "accountId": account_id,
                "reason": "owned_by_another_mdm",
                "mdmId": id,
                "mdmName": name,
            }));
            st.index += 1;
            continue;
        }
        let client = client_for_account(&account_id);
        // Settle first: due events, entries a refresh saw at Apple, unknown outcomes.
        let mut polled = event::PollReport::default();
        event::poll_account(kv, &client, &account_id, now, budget, &mut polled).await?;
        let settled = ledger::settle_account(kv, &client, &account_id, now, budget).await?;
        st.settled += u64::from(settled.confirmed);
        let todo = unwanted(kv, &account_id)?;
        let wanted: Vec<String> = todo.keys().cloned().collect();
        let doc: AssetsDoc = crate::copy::assets_for(kv, &account_id, &wanted)?;
        for (ak, subjects) in todo {
            if budget.exhausted(now) {
                paused = true;
                break;
            }
            let asset = doc
                .assets
                .iter()
                .find(|a| a.key() == ak)
                .cloned()
                .unwrap_or_else(|| {
                    let (adam, pricing) = ak.split_once(':').unwrap_or((&ak, "STDQ"));
                    AssetRecord {
                        adam_id: adam.to_string(),
                        pricing_param: pricing.to_string(),
                        product_type: String::new(),
                        name: None,
                        icon_url: None,
                        total: 0,
                        available: 0,
                        in_use: 0,
                        retired: 0,
                        device_assignable: true,
                        revocable: true,
                        supported_platforms: Vec::new(),
                        shards: 1,
                    }
                });
            match assignment::disassociate(
                kv,
                &client,
                &account_id,
                &asset,
                &subjects,
                "reconcile",
                now,
                budget,
            )
            .await
            {
                Ok(sub) => {
                    st.revoked += sub
                        .events
                        .iter()
                        .map(|e| e.subjects.len() as u64)
                        .sum::<u64>();
                    st.events.extend(sub.events.iter().map(|e| e.id.clone()));
                    if let Some(e) = sub.error {
                        st.errors
                            .push(json!({"accountId": account_id, "asset": ak, "error": e}));
                    }
                }
                Err(e) => {
                    st.errors.push(
                        json!({"accountId": account_id, "asset": ak, "error": e.body()["error"]}),
                    );
                    if e.retry_after.is_some() {
                        paused = true;
                        break;
                    }
                }
            }
        }
        if paused {
            break;
        }
        st.index += 1;
        job.progress.done = st.index as u64;
        job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
        job.updated_at = now;
        job::save(kv, job)?;
    }
    job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
    job.progress.done = st.index as u64;
    job.updated_at = now;
    let finished = !paused && st.index >= st.accounts.len();
    if finished {
        job.succeed(
            json!({
                "revoked": st.revoked,
                "settled": st.settled,
                "events": st.events,
                "skipped": st.skipped,
                "errors": st.errors,
                "accounts": st.accounts.len(),
            }),
            now,
        );
    }
    job::save(kv, job)?;
    Ok(finished)
}
