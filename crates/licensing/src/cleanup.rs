//! Clean up: give back the licenses of an account that this instance did not assign (foreign
//! assignments, typically left by another MDM), so they become available here. Our own
//! assignments are never touched: it disassociates exactly the foreign (asset, subject) pairs,
//! asset by asset, never `revoke` (which would take every revocable asset of a device).
//! A resumable job; each Apple request is tracked as an event.

use crate::apple_state::Owner;
use crate::error::{ApiError, ErrorCode};
use crate::job::{Budget, Job, Progress};
use crate::model::{AssetsDoc, EventKind, EventRecord, EventState, Failure, MadeBy, Subject};
use crate::refresh::SliceEnd;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeSet;
use vpp_apple::{
    split_manage, AssetRef, Client, Clock, ManageAssetsRequest, PricingParam, Transport,
};
use vpp_store::Kv;

/// The checkpoint of a clean-up job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupState {
    /// The copy generation being cleaned (a refresh switching copies restarts the scan).
    pub generation: u64,
    pub asset_index: usize,
    pub shard: u32,
    pub released: u64,
    pub events: Vec<String>,
    pub skipped_not_revocable: u64,
}

/// Refuse while another MDM owns the location: its licenses are not ours to take.
pub fn check_allowed(kv: &impl Kv, account_id: &str) -> Result<(), ApiError> {
    let st = crate::account::apple_state(kv, account_id)?;
    if let Owner::Foreign { id, name } = st.owner {
        return Err(ApiError::new(
            ErrorCode::OwnedByAnotherMdm,
            format!(
                "another MDM ({name}) manages this location; reclaim ownership before cleaning up"
            ),
        )
        .with_details(json!({"mdmId": id, "mdmName": name})));
    }
    Ok(())
}

pub fn initial_state(kv: &impl Kv, account_id: &str) -> Result<CleanupState, ApiError> {
    let ix = crate::copy::index(kv, account_id)?;
    Ok(CleanupState {
        generation: ix.generation,
        ..CleanupState::default()
    })
}

/// Run one slice; the caller saves `job` afterwards.
pub async fn run_slice<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    job: &mut Job,
    budget: &mut Budget,
) -> Result<SliceEnd, ApiError> {
    let account_id = job
        .account_id
        .clone()
        .ok_or_else(|| ApiError::internal("clean-up job without an account"))?;
    let mut st: CleanupState = serde_json::from_value(job.checkpoint.clone())
        .map_err(|e| ApiError::internal(format!("clean-up checkpoint: {e}")))?;
    if let Err(e) = check_allowed(kv, &account_id) {
        let f = Failure {
            code: e.code.as_str().into(),
            message: e.message.clone(),
        };
        job.fail(f.clone(), client.clock().now());
        return Ok(SliceEnd::Failed(f));
    }
    // A job's slices read every asset page once (the list of what to clean).
    let doc: AssetsDoc = crate::copy::all_assets(kv, &account_id)?;
    if doc.generation != st.generation {
        st = CleanupState {
            generation: doc.generation,
            ..st
        };
        st.asset_index = 0;
        st.shard = 0;
    }
    let limits = match client.limits().await {
        Ok(l) => l,
        Err(e) if e.is_retryable() => return Ok(SliceEnd::Paused),
        Err(e) => {
            let f = Failure {
                code: e.code().into(),
                message: e.to_string(),
            };
            job.fail(f.clone(), client.clock().now());
            return Ok(SliceEnd::Failed(f));
        }
    };
    let asking = asked_already(kv, &account_id)?;
    let end = loop {
        let Some(asset) = doc.assets.get(st.asset_index) else {
            break SliceEnd::Done;
        };
        if st.shard >= asset.shards.max(1) {
            st.asset_index += 1;
            st.shard = 0;
            continue;
        }
        let foreign: Vec<Subject> =
            crate::copy::asset_assignments(kv, &account_id, &doc, asset, st.shard)?
                .into_iter()
                .filter(|(_, by)| *by == MadeBy::Foreign)
                .filter(|(tag, _)| !asking.contains(&(asset.key(), tag.clone())))
                .filter_map(|(tag, _)| Subject::from_tag(&tag))
                .collect();
        if !asset.revocable && !foreign.is_empty() {
            // Apple cannot take these back (9706); say so rather than fail the rest.
            st.skipped_not_revocable += foreign.len() as u64;
            st.shard += 1;
            continue;
        }
        let aref = AssetRef::new(
            asset.adam_id.clone(),
            PricingParam::from(asset.pricing_param.clone()),
        );
        let serials: Vec<String> = foreign
            .iter()
            .filter_map(|s| match s {
                Subject::SerialNumber(x) => Some(x.clone()),
                _ => None,
            })
            .collect();
        let users: Vec<String> = foreign
            .iter()
            .filter_map(|s| match s {
                Subject::ClientUserId(x) => Some(x.clone()),
                _ => None,
            })
            .collect();
        let mut batches = Vec::new();
        for (serial_numbers, client_user_ids) in [(serials, Vec::new()), (Vec::new(), users)] {
            if serial_numbers.is_empty() && client_user_ids.is_empty() {
                continue;
            }
            batches.extend(split_manage(
                &ManageAssetsRequest {
                    assets: vec![aref.clone()],
                    serial_numbers,
                    client_user_ids,
                },
                &limits,
            ));
        }
        if batches.len() as u32 > budget.apple_calls || budget.exhausted(client.clock().now()) {
            break SliceEnd::Paused;
        }
        if !crate::event::has_room(kv, &account_id)? {
            // As many events pending as an account may have (one key each): end what Apple
            // finished; a batch that still finds no room waits for the next slice.
            let mut polled = crate::event::PollReport::default();
            let now = client.clock().now();
            crate::event::poll_account(kv, client, &account_id, now, budget, &mut polled).await?;
        }
        let mut paused = false;
        for batch in batches {
            if !crate::event::has_room(kv, &account_id)? {
                paused = true;
                break;
            }
            budget.take_call(client.clock().now());
            let events = match client.disassociate(&batch).await {
                Ok(ev) => ev,
                Err(be) if be.error.is_retryable() && be.submitted.is_empty() => {
                    paused = true;
                    break;
                }
                Err(be) => {
                    let f = Failure {
                        code: be.error.code().into(),
                        message: be.error.to_string(),
                    };
                    let now = client.clock().now();
                    job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
                    job.fail(f.clone(), now);
                    return Ok(SliceEnd::Failed(f));
                }
            };
            let now = client.clock().now();
            let mut subjects: Vec<Subject> = batch
                .serial_numbers
                .iter()
                .cloned()
                .map(Subject::SerialNumber)
                .collect();
            subjects.extend(
                batch
                    .client_user_ids
                    .iter()
                    .cloned()
                    .map(Subject::ClientUserId),
            );
            for ev in events {
                crate::event::track(
                    kv,
                    &EventRecord {
                        id: ev.event_id.clone(),
                        account_id: account_id.clone(),
                        kind: EventKind::Disassociate,
                        source: "cleanup".into(),
                        assets: batch.assets.clone(),
                        subjects: subjects.clone(),
                        state: EventState::Pending,
                        created_at: now,
                        updated_at: now,
                        polled_at: None,
                        num_requested: Some(subjects.len() as i64),
                        num_completed: None,
                        failures: Vec::new(),
                        applied: false,
                        resent_as: None,
                        copy_generation: Some(doc.generation),
                        owed_notices: Vec::new(),
                    },
                )?;
                st.events.push(ev.event_id);
            }
            st.released += subjects.len() as u64;
        }
        if paused {
            break SliceEnd::Paused;
        }
        st.shard += 1;
        job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
        job.progress = progress(&st, &doc);
        crate::job::save(kv, job)?;
    };
    let now = client.clock().now();
    job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
    job.progress = progress(&st, &doc);
    job.slices += 1;
    job.updated_at = now;
    if end == SliceEnd::Done {
        job.succeed(
            json!({"released": st.released, "events": st.events, "skippedNotRevocable": st.skipped_not_revocable}),
            now,
        );
    }
    Ok(end)
}

/// (asset, subject tag) a clean up's disassociate still pending already asks Apple to take: not
/// asked twice, so the one outcome that takes it sends its notice.
fn asked_already(
    kv: &impl Kv,
    account_id: &str,
) -> Result<BTreeSet<(String, String)>, vpp_store::StoreError> {
    let ids: Vec<String> =
        vpp_store::get_json(kv, &vpp_store::keys::account_events(account_id))?.unwrap_or_default();
    let mut out = BTreeSet::new();
    for id in ids {
        let Some(r) = crate::event::load(kv, &id)? else {
            continue;
        };
        if r.source != "cleanup" || r.state != EventState::Pending || r.applied {
            continue;
        }
        for a in &r.assets {
            let ak = crate::event::asset_ref_key(a);
            for s in &r.subjects {
                out.insert((ak.clone(), s.tag()));
            }
        }
    }
    Ok(out)
}

fn progress(st: &CleanupState, doc: &AssetsDoc) -> Progress {
    Progress {
        phase: "disassociate".into(),
        done: st.asset_index.min(doc.assets.len()) as u64,
        total: Some(doc.assets.len() as u64),
    }
}
