//! Refresh: replace an account's local copy of Apple's state (assets with counts, every
//! assignment marked ours or foreign) with what Apple has now.
//!
//! A resumable job. Each slice reads some Apple pages and checkpoints after every page. A full
//! refresh builds the new copy under a new generation beside the old one and switches to it with
//! a single write of the assets document, so the previous complete copy stays readable until
//! then and a failure anywhere leaves it untouched. An incremental refresh (`sinceVersionId`)
//! merges the changes Apple reports into the current copy; copy shards are maps, so reading a
//! page twice after a crash changes nothing.

use crate::apple_state::{owner_from, Owner};
use crate::error::{ApiError, ErrorCode};
use crate::job::{Budget, Job, Progress};
use crate::model::{
    asset_key, copy_shard_of, Account, AssetRecord, AssetsDoc, AssignmentShard, Failure,
    LedgerShard, LedgerState, MadeBy, Subject, SyncOutcome,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use vpp_apple::{AppleError, AssetFilter, AssignmentFilter, Client, Clock, Transport, UserFilter};
use vpp_store::{get_json, keys, set_json, update, Kv};

/// Names looked up per refresh at most (the rest follow in later refreshes).
const NAMES_PER_REFRESH: usize = 200;

/// Where a refresh being built keeps its assets document.
pub fn staging_key(account: &str) -> String {
    format!("{}/staging", keys::assets(account))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    ClientConfig,
    Assets,
    Assignments,
    Users,
    Names,
    Commit,
}

/// The checkpoint of a refresh job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshState {
    pub full: bool,
    pub phase: Phase,
    /// The generation being written (full: the next one; incremental: the current one).
    pub generation: u64,
    pub next_page: u32,
    /// `sinceVersionId` of an incremental read.
    pub since_version: Option<String>,
    /// The first assignments page's versionId: what the copy will reflect.
    pub new_version: Option<String>,
    pub assets_read: u64,
    pub assignments_read: u64,
    #[serde(default)]
    pub users_read: u64,
    pub pages_read: u64,
    /// When the refresh began: ledger entries newer than this are not judged by its copy.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// `sinceVersionId` for users, and the users versionId this refresh will record.
    #[serde(default)]
    pub users_since: Option<String>,
    #[serde(default)]
    pub new_users_version: Option<String>,
}

/// The checkpoint a new refresh job starts from.
pub fn initial_state(
    kv: &impl Kv,
    account: &Account,
    full: bool,
) -> Result<RefreshState, ApiError> {
    let doc: AssetsDoc = get_json(kv, &keys::assets(&account.id))?.unwrap_or_default();
    // Without a version marker (or copy) there is nothing to be incremental on.
    let full = full || account.assignments_version.is_none() || doc.synced_at.is_none();
    Ok(RefreshState {
        full,
        phase: Phase::ClientConfig,
        generation: if full {
            doc.generation + 1
        } else {
            doc.generation
        },
        next_page: 0,
        since_version: if full {
            None
        } else {
            account.assignments_version.clone()
        },
        new_version: None,
        assets_read: 0,
        assignments_read: 0,
        users_read: 0,
        pages_read: 0,
        started_at: Some(Utc::now()),
        users_since: if full {
            None
        } else {
            account.users_version.clone()
        },
        new_users_version: None,
    })
}

/// How a slice ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SliceEnd {
    /// Budget spent or Apple asked to wait: the job continues in a later invocation.
    Paused,
    Done,
    Failed(Failure),
}

fn failure(code: &str, message: impl Into<String>) -> Failure {
    Failure {
        code: code.to_string(),
        message: message.into(),
    }
}

fn from_apple(e: &AppleError) -> Failure {
    failure(e.code(), e.to_string())
}

/// Run one slice of a refresh job; the caller saves `job` afterwards.
pub async fn run_slice<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    job: &mut Job,
    our_id: &str,
    budget: &mut Budget,
) -> Result<SliceEnd, ApiError> {
    let account_id = job
        .account_id
        .clone()
        .ok_or_else(|| ApiError::internal("refresh job without an account"))?;
    let mut st: RefreshState = serde_json::from_value(job.checkpoint.clone())
        .map_err(|e| ApiError::internal(format!("refresh checkpoint: {e}")))?;
    let mut ledger = LedgerCache::default();
    let end = loop {
        let now = client.clock().now();
        if st.phase != Phase::Commit && !budget.take_call(now) {
            break SliceEnd::Paused;
        }
        let step = step(kv, client, &account_id, our_id, &mut st, &mut ledger).await;
        job.progress = progress(&st);
        job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
        match step {
            Ok(true) => break SliceEnd::Done,
            Ok(false) => {
                // A slice that may be cut off at any moment: checkpoint after every page.
                crate::job::save(kv, job)?;
            }
            Err(StepError::Apple(e)) if e.is_retryable() => break SliceEnd::Paused,
            Err(StepError::Apple(e)) => break SliceEnd::Failed(from_apple(&e)),
            Err(StepError::Foreign(f)) => break SliceEnd::Failed(f),
            Err(StepError::Api(e)) => return Err(e),
        }
    };
    let now = client.clock().now();
    match &end {
        SliceEnd::Done => {
            finish(kv, &account_id, &st, None, now)?;
            job.succeed(
                json!({"full": st.full, "assets": st.assets_read, "assignments": st.assignments_read, "pages": st.pages_read}),
                now,
            );
        }
        SliceEnd::Failed(f) => {
            abandon(kv, &account_id, &st)?;
            finish(kv, &account_id, &st, Some(f.clone()), now)?;
            job.fail(f.clone(), now);
        }
        SliceEnd::Paused => {}
    }
    job.updated_at = now;
    job.slices += 1;
    Ok(end)
}

fn progress(st: &RefreshState) -> Progress {
    Progress {
        phase: match st.phase {
            Phase::ClientConfig => "clientConfig",
            Phase::Assets => "assets",
            Phase::Assignments => "assignments",
            Phase::Users => "users",
            Phase::Names => "names",
            Phase::Commit => "commit",
        }
        .to_string(),
        done: st.pages_read,
        total: None,
    }
}

enum StepError {
    Apple(AppleError),
    Foreign(Failure),
    Api(ApiError),
}

impl From<ApiError> for StepError {
    fn from(e: ApiError) -> Self {
        StepError::Api(e)
    }
}

impl From<vpp_store::KvError> for StepError {
    fn from(e: vpp_store::KvError) -> Self {
        StepError::Api(e.into())
    }
}

impl From<vpp_store::StoreError> for StepError {
    fn from(e: vpp_store::StoreError) -> Self {
        StepError::Api(e.into())
    }
}

/// Stop at once when another MDM took the location (Apple echoes its mdmInfo).
fn check_owner<T: Transport, C: Clock>(
    client: &Client<T, C>,
    our_id: &str,
) -> Result<(), StepError> {
    if let Owner::Foreign { id, name } = owner_from(our_id, client.last_mdm_info().as_ref()) {
        if client.last_mdm_info().is_some() {
            return Err(StepError::Foreign(failure(
                ErrorCode::OwnedByAnotherMdm.as_str(),
                format!("another MDM ({name} {id}) took this location; refresh stopped"),
            )));
        }
    }
    Ok(())
}

/// One Apple call (or the commit). `Ok(true)` when the refresh is complete.
async fn step<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    our_id: &str,
    st: &mut RefreshState,
    ledger: &mut LedgerCache,
) -> Result<bool, StepError> {
    match st.phase {
        Phase::ClientConfig => {
            let cfg = client.client_config().await.map_err(StepError::Apple)?;
            check_owner(client, our_id)?;
            update::<Account, ()>(kv, &keys::account(account_id), |cur| {
                let Some(mut a) = cur else {
                    return Ok((None, ()));
                };
                if let Some(l) = cfg.location_name.clone() {
                    a.location = Some(l);
                }
                if let Some(exp) = cfg.token_expires_at() {
                    a.token_expires_at = exp;
                }
                Ok((Some(a), ()))
            })?;
            if st.full {
                kv.delete(&staging_key(account_id))?;
            }
            st.phase = Phase::Assets;
            st.next_page = 0;
            st.pages_read += 1;
            Ok(false)
        }
        Phase::Assets => {
            let page = client
                .assets_page(&AssetFilter::default(), st.next_page)
                .await
                .map_err(StepError::Apple)?;
            check_owner(client, our_id)?;
            st.pages_read += 1;
            st.assets_read += page.assets.len() as u64;
            let current: AssetsDoc = get_json(kv, &keys::assets(account_id))?.unwrap_or_default();
            let staging_key = staging_key(account_id);
            let mut staging: AssetsDoc = if st.next_page == 0 {
                AssetsDoc {
                    generation: st.generation,
                    ..AssetsDoc::default()
                }
            } else {
                get_json(kv, &staging_key)?.unwrap_or_default()
            };
            staging.generation = st.generation;
            for a in &page.assets {
                let pricing = a.pricing_param.as_str().to_string();
                let in_use = a.assigned_count.unwrap_or(0);
                let previous = current.find(&a.adam_id, &pricing);
                let shards = match (st.full, previous) {
                    // An incremental read writes into the current shards: keep their number.
                    (false, Some(p)) => p.shards,
                    _ => vpp_store::keys::shards_for(in_use.max(0) as usize),
                };
                let rec = AssetRecord {
                    adam_id: a.adam_id.clone(),
                    pricing_param: pricing.clone(),
                    product_type: a
                        .product_type
                        .as_ref()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "App".into()),
                    name: previous.and_then(|p| p.name.clone()),
                    icon_url: previous.and_then(|p| p.icon_url.clone()),
                    total: a.total_count.unwrap_or(0),
                    available: a.available_count.unwrap_or(0),
                    in_use,
                    retired: a.retired_count.unwrap_or(0),
                    device_assignable: a.device_assignable.unwrap_or(false),
                    revocable: a.revocable.unwrap_or(false),
                    supported_platforms: a.supported_platforms.clone(),
                    shards,
                };
                staging.assets.retain(|x| x.key() != rec.key());
                staging.assets.push(rec);
            }
            set_json(kv, &staging_key, &staging)?;
            advance(st, page.next_page_index, Phase::Assignments);
            Ok(false)
        }
        Phase::Assignments => {
            let page = client
                .assignments_page(
                    &AssignmentFilter::default(),
                    st.since_version.as_deref(),
                    st.next_page,
                )
                .await
                .map_err(StepError::Apple)?;
            check_owner(client, our_id)?;
            st.pages_read += 1;
            if st.next_page == 0 {
                st.new_version = page.version_id.clone();
            }
            st.assignments_read += page.assignments.len() as u64;
            let mut staging: AssetsDoc =
                get_json(kv, &staging_key(account_id))?.unwrap_or_default();
            // Group the page by (asset, shard) so each shard is written once per page.
            let mut groups: BTreeMap<(String, u32), Vec<(String, MadeBy)>> = BTreeMap::new();
            let mut staging_changed = false;
            for a in &page.assignments {
                let subject = match (&a.serial_number, &a.client_user_id) {
                    (Some(s), _) => Subject::SerialNumber(s.clone()),
                    (None, Some(u)) => Subject::ClientUserId(u.clone()),
                    (None, None) => continue,
                };
                let pricing = a.pricing_param.as_str().to_string();
                let ak = asset_key(&a.adam_id, &pricing);
                if staging.find(&a.adam_id, &pricing).is_none() {
                    // Assigned but not listed (Apple changed between pages): keep it findable.
                    staging.assets.push(AssetRecord {
                        adam_id: a.adam_id.clone(),
                        pricing_param: pricing.clone(),
                        product_type: "App".into(),
                        name: None,
                        icon_url: None,
                        total: 0,
                        available: 0,
                        in_use: 0,
                        retired: 0,
                        device_assignable: false,
                        revocable: false,
                        supported_platforms: Vec::new(),
                        shards: 1,
                    });
                    staging_changed = true;
                }
                let shards = staging
                    .find(&a.adam_id, &pricing)
                    .map(|r| r.shards)
                    .unwrap_or(1);
                let made_by = ledger.made_by(kv, account_id, &ak, &subject)?;
                groups
                    .entry((ak, copy_shard_of(&subject, shards)))
                    .or_default()
                    .push((subject.tag(), made_by));
            }
            if staging_changed {
                set_json(kv, &staging_key(account_id), &staging)?;
            }
            for ((ak, shard), entries) in groups {
                update::<AssignmentShard, ()>(
                    kv,
                    &keys::assignment_shard(account_id, st.generation, &ak, shard),
                    |cur| {
                        let mut map = cur.unwrap_or_default();
                        for (tag, by) in &entries {
                            map.insert(tag.clone(), by.clone());
                        }
                        Ok((Some(map), ()))
                    },
                )?;
            }
            advance(st, page.next_page_index, Phase::Users);
            Ok(false)
        }
        Phase::Users => {
            let page = client
                .users_page(
                    &UserFilter::default(),
                    st.users_since.as_deref(),
                    st.next_page,
                )
                .await
                .map_err(StepError::Apple)?;
            check_owner(client, our_id)?;
            st.pages_read += 1;
            if st.next_page == 0 {
                st.new_users_version = page.version_id.clone();
            }
            st.users_read += page.users.len() as u64;
            crate::users::apply_from_apple(
                kv,
                account_id,
                &page.users,
                false,
                false,
                None,
                client.clock().now(),
            )?;
            advance(st, page.next_page_index, Phase::Names);
            Ok(false)
        }
        Phase::Names => {
            // Names and icons from Apple's content lookup; a failed lookup leaves names empty.
            let mut staging: AssetsDoc =
                get_json(kv, &staging_key(account_id))?.unwrap_or_default();
            let missing: Vec<String> = staging
                .assets
                .iter()
                .filter(|a| a.name.is_none())
                .map(|a| a.adam_id.clone())
                .take(NAMES_PER_REFRESH)
                .collect();
            if !missing.is_empty() {
                if let Ok(found) = client.metadata(&missing).await {
                    for m in found {
                        for a in staging.assets.iter_mut().filter(|a| a.adam_id == m.adam_id) {
                            a.name = m.name.clone();
                            a.icon_url = m.icon_url.clone();
                        }
                    }
                    set_json(kv, &staging_key(account_id), &staging)?;
                }
            }
            st.phase = Phase::Commit;
            Ok(false)
        }
        Phase::Commit => {
            commit(kv, account_id, st)?;
            Ok(true)
        }
    }
}

/// Follow Apple's `nextPageIndex` (only forward), or move on to `then` after the last page.
fn advance(st: &mut RefreshState, next: Option<u32>, then: Phase) {
    match next {
        Some(n) if n > st.next_page => st.next_page = n,
        _ => {
            st.phase = then;
            st.next_page = 0;
        }
    }
}

/// Switch to the new copy with one write, then drop what the old one used.
fn commit(kv: &impl Kv, account_id: &str, st: &RefreshState) -> Result<(), StepError> {
    let staging: AssetsDoc = get_json(kv, &staging_key(account_id))?.unwrap_or_default();
    let old: AssetsDoc = get_json(kv, &keys::assets(account_id))?.unwrap_or_default();
    let mut doc = staging;
    doc.generation = st.generation;
    doc.synced_at = Some(Utc::now());
    // Our licenses Apple no longer lists (only a full read can tell), judged before switching.
    let gone = if st.full {
        gone_from_copy(kv, account_id, &doc, st.started_at)?
    } else {
        Vec::new()
    };
    crate::ledger::prepare(kv, account_id, &doc)?;
    set_json(kv, &keys::assets(account_id), &doc)?;
    if !gone.is_empty() {
        forget_gone(kv, account_id, &gone)?;
        crate::notice::record_removals(kv, account_id, &gone, "refresh", Utc::now())?;
    }
    if st.full && old.generation != st.generation {
        crate::account::delete_copy(kv, account_id, &old)?;
    }
    kv.delete(&staging_key(account_id))?;
    update::<Account, ()>(kv, &keys::account(account_id), |cur| {
        let Some(mut a) = cur else {
            return Ok((None, ()));
        };
        if st.new_version.is_some() {
            a.assignments_version = st.new_version.clone();
        }
        if st.new_users_version.is_some() {
            a.users_version = st.new_users_version.clone();
        }
        Ok((Some(a), ()))
    })?;
    Ok(())
}

/// Confirmed ledger entries (older than the refresh) whose license is not in the new copy.
fn gone_from_copy(
    kv: &impl Kv,
    account_id: &str,
    doc: &AssetsDoc,
    started_at: Option<DateTime<Utc>>,
) -> Result<Vec<(String, Subject)>, vpp_store::StoreError> {
    let mut gone = Vec::new();
    let mut shards: HashMap<String, AssignmentShard> = HashMap::new();
    for n in 0..crate::model::LEDGER_SHARDS {
        let ledger: LedgerShard =
            get_json(kv, &keys::ledger_shard(account_id, n))?.unwrap_or_default();
        for (ak, subjects) in &ledger {
            let shard_count = doc.assets.iter().find(|a| &a.key() == ak).map(|a| a.shards);
            for (tag, entry) in subjects {
                if entry.state != LedgerState::Confirmed
                    || started_at.is_some_and(|t| entry.at >= t)
                {
                    continue;
                }
                let Some(subject) = Subject::from_tag(tag) else {
                    continue;
                };
                let present = match shard_count {
                    None => false,
                    Some(count) => {
                        let key = keys::assignment_shard(
                            account_id,
                            doc.generation,
                            ak,
                            copy_shard_of(&subject, count),
                        );
                        let shard = match shards.entry(key) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                let s: AssignmentShard = get_json(kv, e.key())?.unwrap_or_default();
                                e.insert(s)
                            }
                        };
                        shard.contains_key(tag)
                    }
                };
                if !present {
                    gone.push((ak.clone(), subject));
                }
            }
        }
    }
    Ok(gone)
}

/// Take licenses Apple no longer has out of our ledger (reconcile must not revoke them).
fn forget_gone(
    kv: &impl Kv,
    account_id: &str,
    gone: &[(String, Subject)],
) -> Result<(), vpp_store::StoreError> {
    crate::ledger::forget_confirmed(kv, account_id, gone, Utc::now())
}

/// Drop a half-built new generation (full refresh) so no orphan keys remain.
fn abandon(kv: &impl Kv, account_id: &str, st: &RefreshState) -> Result<(), ApiError> {
    if !st.full {
        return Ok(());
    }
    let current: AssetsDoc = get_json(kv, &keys::assets(account_id))?.unwrap_or_default();
    if let Some(staging) = get_json::<AssetsDoc>(kv, &staging_key(account_id))? {
        if staging.generation != current.generation {
            crate::account::delete_copy(kv, account_id, &staging)?;
        }
    }
    kv.delete(&staging_key(account_id))?;
    Ok(())
}

/// Record how the synchronization ended on the account.
fn finish(
    kv: &impl Kv,
    account_id: &str,
    st: &RefreshState,
    error: Option<Failure>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    update::<Account, ()>(kv, &keys::account(account_id), |cur| {
        let Some(mut a) = cur else {
            return Ok((None, ()));
        };
        let ok = error.is_none();
        a.last_sync = Some(SyncOutcome {
            at: now,
            ok,
            full: st.full,
            error: error.clone(),
        });
        if ok {
            a.last_synchronized = Some(now);
            if st.full {
                a.last_full_refresh = Some(now);
            }
        }
        Ok((Some(a), ()))
    })?;
    Ok(())
}

/// Ledger values read once per slice ([`crate::ledger::Cache`]).
type LedgerCache = crate::ledger::Cache;
