//! Refresh: replace an account's local copy of Apple's state (assets with counts, every
//! assignment marked ours or foreign) with what Apple has now. The copy's layout is
//! `crate::copy`'s (size-bounded pages and shards, `vpp_store::keys`).
//!
//! A resumable job. A full refresh reads one client config, every asset page (kept as read, then
//! packed into the new generation's asset pages), every assignment page (buffered in memory and
//! merged into the new generation's copy shards at most every [`FLUSH_ENTRIES`] entries, each
//! shard written once per flush), every users page and the name lookups, and switches to the new
//! generation with the single write of the copy's index: the previous complete copy stays
//! readable until then and a failure anywhere leaves it untouched. The checkpoint only moves past
//! pages whose entries are written, so a crash re-reads at most one buffer's pages; shards are
//! maps, so reading a page twice changes nothing.
//!
//! An incremental refresh (`sinceVersionId`) makes at most three Apple calls for up to a page of
//! changes: the assets (only for accounts of at most [`INCREMENTAL_ASSETS_MAX`] assets, one
//! page; larger accounts' counts follow the changes and `ASSET_COUNT` notifications), the
//! assignments and the users since the versions the copy reflects. It rewrites only the copy
//! shards and asset pages those changes touch.
//!
//! When Apple's data changes while a full refresh pages through it (a page's `versionId` differs
//! from the first page's), entries may have shifted between pages: the refresh then does not
//! judge any license "gone" (the next full refresh will), so our own licenses are never dropped
//! on a partial read.

use crate::apple_state::{owner_from, Owner};
use crate::copy::{self, CopyIndex, CopyShard, ReadEntry};
use crate::error::{ApiError, ErrorCode};
use crate::job::{Budget, Job, Progress};
use crate::model::{
    asset_key, Account, AssetRecord, Failure, LedgerShard, LedgerState, MadeBy, Subject,
    SyncOutcome,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use vpp_apple::{AppleError, AssetFilter, AssignmentFilter, Client, Clock, Transport, UserFilter};
use vpp_store::{get_json, keys, set_json, update, Kv};

/// Assignments a full refresh buffers before merging them into the copy shards.
pub const FLUSH_ENTRIES: usize = 100_000;
/// Accounts with at most this many assets re-read them (one page) on an incremental refresh.
pub const INCREMENTAL_ASSETS_MAX: u64 = 1_000;

/// Where a refresh being built keeps its index.
pub fn staging_key(account: &str) -> String {
    keys::assets_staging(account)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    ClientConfig,
    Assets,
    /// Full refresh: pack the asset pages as read into the new generation (no Apple call).
    Pack,
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
    /// The first assets page's versionId (a full read compares every later page with it).
    #[serde(default)]
    pub assets_version: Option<String>,
    /// Apple's data changed while this refresh paged through it: nothing is judged gone.
    #[serde(default)]
    pub data_changed: bool,
    /// An incremental refresh that re-read the assets (their counts are Apple's).
    #[serde(default)]
    pub read_assets: bool,
    /// Assets this refresh added to the copy (an incremental refresh looks up only their names).
    #[serde(default)]
    pub assets_added: u64,
    /// Name lookups made, and the last asset key the names phase looked at.
    #[serde(default)]
    pub lookups: u64,
    #[serde(default)]
    pub names_after: String,
    /// Full refresh: the generation the new one replaces (deleted once switched), noted when
    /// the new one is packed so a commit cut off after the switch still finds it.
    #[serde(default)]
    pub replaces: Option<CopyIndex>,
    /// What the name lookups need of the client config this refresh read (platform and
    /// storefront only, nothing secret), so later slices do not read it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_config: Option<LookupConfig>,
}

/// The metadata lookup's platform and storefront, from Apple's client config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LookupConfig {
    pub default_platform: Option<String>,
    pub country_iso2a_code: Option<String>,
}

impl LookupConfig {
    fn of(cfg: &vpp_apple::ClientConfig) -> LookupConfig {
        LookupConfig {
            default_platform: cfg.default_platform.clone(),
            country_iso2a_code: cfg.country_iso2a_code.clone(),
        }
    }

    fn client_config(&self) -> vpp_apple::ClientConfig {
        vpp_apple::ClientConfig {
            default_platform: self.default_platform.clone(),
            country_iso2a_code: self.country_iso2a_code.clone(),
            ..Default::default()
        }
    }
}

/// The checkpoint a new refresh job starts from, created at `now` (the caller's clock).
pub fn initial_state(
    kv: &impl Kv,
    account: &Account,
    full: bool,
    now: DateTime<Utc>,
) -> Result<RefreshState, ApiError> {
    let ix = copy::index(kv, &account.id)?;
    // Without a version marker (or copy) there is nothing to be incremental on.
    let full = full || account.assignments_version.is_none() || ix.synced_at.is_none();
    let read_assets = !full && ix.assets <= INCREMENTAL_ASSETS_MAX;
    Ok(RefreshState {
        full,
        phase: if full {
            Phase::ClientConfig
        } else if read_assets {
            Phase::Assets
        } else {
            Phase::Assignments
        },
        generation: if full {
            ix.generation + 1
        } else {
            ix.generation
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
        started_at: Some(now),
        users_since: if full {
            None
        } else {
            account.users_version.clone()
        },
        new_users_version: None,
        assets_version: None,
        data_changed: false,
        read_assets,
        assets_added: 0,
        lookups: 0,
        names_after: String::new(),
        replaces: None,
        lookup_config: None,
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

/// What one invocation keeps between pages: the target generation's index and asset shard
/// counts (read once per slice), our ledger shards, and the assignments read but not yet merged.
#[derive(Default)]
struct SliceCache {
    ledger: LedgerCache,
    target: Option<(CopyIndex, HashMap<String, u32>)>,
    buffer: Vec<ReadEntry>,
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
    let mut cache = SliceCache::default();
    if let Some(c) = &st.lookup_config {
        client.remember_client_config(c.client_config());
    }
    let end = loop {
        let now = client.clock().now();
        let free = matches!(st.phase, Phase::Commit | Phase::Pack);
        if !free && !budget.take_call(now) {
            break SliceEnd::Paused;
        }
        let step = step(kv, client, &account_id, our_id, &mut st, &mut cache).await;
        // Merge what was read when the buffer is full, the phase ended, or the slice stops.
        let stopping = !matches!(step, Ok(false));
        if !cache.buffer.is_empty()
            && (stopping
                || st.phase != Phase::Assignments
                || cache.buffer.len() >= FLUSH_ENTRIES
                || budget.exhausted(client.clock().now()))
        {
            let entries = std::mem::take(&mut cache.buffer);
            copy::merge_entries(kv, &account_id, st.generation, entries)?;
        }
        if cache.buffer.is_empty() {
            job.progress = progress(&st);
            job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
        }
        match step {
            Ok(true) => break SliceEnd::Done,
            Ok(false) => {
                // A slice that may be cut off at any moment: checkpoint after every page whose
                // entries are written (a crash re-reads the buffered pages).
                if cache.buffer.is_empty() {
                    crate::job::save(kv, job)?;
                }
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
                json!({"full": st.full, "assets": st.assets_read, "assignments": st.assignments_read, "pages": st.pages_read, "lookups": st.lookups, "dataChangedDuringRead": st.data_changed}),
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
            Phase::Pack => "pack",
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

/// Apple's asset as our record (name and icon are filled in later).
fn record_of(a: &vpp_apple::Asset) -> AssetRecord {
    AssetRecord {
        adam_id: a.adam_id.clone(),
        pricing_param: a.pricing_param.as_str().to_string(),
        product_type: a
            .product_type
            .as_ref()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "App".into()),
        name: None,
        icon_url: None,
        total: a.total_count.unwrap_or(0),
        available: a.available_count.unwrap_or(0),
        in_use: a.assigned_count.unwrap_or(0),
        retired: a.retired_count.unwrap_or(0),
        device_assignable: a.device_assignable.unwrap_or(false),
        revocable: a.revocable.unwrap_or(false),
        supported_platforms: a.supported_platforms.clone(),
        shards: 1,
    }
}

/// An asset Apple assigned but did not list (it changed between pages): keep it findable.
fn unlisted(adam_id: &str, pricing: &str) -> AssetRecord {
    AssetRecord {
        adam_id: adam_id.to_string(),
        pricing_param: pricing.to_string(),
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
    }
}

/// The index of the generation this refresh writes.
fn target_index(kv: &impl Kv, account_id: &str, st: &RefreshState) -> Result<CopyIndex, StepError> {
    if st.full {
        Ok(copy::staging(kv, account_id)?.unwrap_or(CopyIndex {
            generation: st.generation,
            packed: false,
            ..CopyIndex::default()
        }))
    } else {
        Ok(copy::index(kv, account_id)?)
    }
}

/// The target generation's index and each asset's copy-shard count, read once per slice.
fn target<'c>(
    kv: &impl Kv,
    account_id: &str,
    st: &RefreshState,
    cache: &'c mut SliceCache,
) -> Result<&'c mut (CopyIndex, HashMap<String, u32>), StepError> {
    if cache.target.is_none() {
        let ix = target_index(kv, account_id, st)?;
        let mut shards = HashMap::new();
        for p in 0..ix.asset_pages {
            for (k, r) in copy::page(kv, account_id, &ix, p)? {
                shards.insert(k, r.shards);
            }
        }
        cache.target = Some((ix, shards));
    }
    cache
        .target
        .as_mut()
        .ok_or_else(|| StepError::Api(ApiError::internal("refresh target")))
}

/// Note Apple's data changing between the pages of one full read.
fn compare_version(seen: &mut Option<String>, page: u32, now: Option<&String>, changed: &mut bool) {
    if page == 0 || seen.is_none() {
        if page == 0 {
            *seen = now.cloned();
        }
        return;
    }
    if now.is_some() && now != seen.as_ref() {
        *changed = true;
    }
}

/// One Apple call (or the pack or commit). `Ok(true)` when the refresh is complete.
async fn step<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    our_id: &str,
    st: &mut RefreshState,
    cache: &mut SliceCache,
) -> Result<bool, StepError> {
    match st.phase {
        Phase::ClientConfig => {
            let cfg = client.client_config().await.map_err(StepError::Apple)?;
            st.lookup_config = Some(LookupConfig::of(&cfg));
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
                // A generation a failed run left behind is dropped before this one is built.
                if let Some(old) = copy::staging(kv, account_id)? {
                    if old.generation != copy::index(kv, account_id)?.generation {
                        copy::delete_generation(kv, account_id, &old)?;
                    }
                }
                set_json(
                    kv,
                    &staging_key(account_id),
                    &CopyIndex {
                        generation: st.generation,
                        asset_pages: 0,
                        copy_shards: 0,
                        packed: false,
                        ..CopyIndex::default()
                    },
                )?;
                cache.target = None;
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
            compare_version(
                &mut st.assets_version,
                st.next_page,
                page.version_id.as_ref(),
                &mut st.data_changed,
            );
            let records: Vec<AssetRecord> = page.assets.iter().map(record_of).collect();
            if st.full {
                // Kept as read; packed into pages once every page is in.
                set_json(
                    kv,
                    &keys::asset_raw_page(account_id, st.generation, st.next_page),
                    &records,
                )?;
                let n = st.next_page;
                update::<CopyIndex, ()>(kv, &staging_key(account_id), |cur| {
                    let mut ix = cur.unwrap_or(CopyIndex {
                        generation: st.generation,
                        asset_pages: 0,
                        copy_shards: 0,
                        packed: false,
                        ..CopyIndex::default()
                    });
                    if ix.raw_pages > n {
                        return Ok((None, ()));
                    }
                    ix.raw_pages = n + 1;
                    Ok((Some(ix), ()))
                })?;
                advance(st, page.next_page_index, Phase::Pack);
            } else {
                // Incremental (small account): Apple's counts in place, new assets added.
                let keys: Vec<String> = records.iter().map(AssetRecord::key).collect();
                let by_key: HashMap<String, &AssetRecord> =
                    records.iter().map(|r| (r.key(), r)).collect();
                let found = copy::update_assets(kv, account_id, &keys, |cur| {
                    if let Some(r) = by_key.get(&cur.key()) {
                        let (name, icon, shards) =
                            (cur.name.take(), cur.icon_url.take(), cur.shards);
                        *cur = (*r).clone();
                        cur.name = name;
                        cur.icon_url = icon;
                        cur.shards = shards;
                    }
                })?;
                let new: Vec<AssetRecord> = records
                    .iter()
                    .filter(|r| !found.contains(&r.key()))
                    .cloned()
                    .collect();
                if !new.is_empty() {
                    st.assets_added += new.len() as u64;
                    let ix = copy::index(kv, account_id)?;
                    // The ledger's open values exist before they become assignable.
                    crate::ledger::prepare(kv, account_id)?;
                    copy::insert_assets(kv, account_id, &ix, new)?;
                    cache.target = None;
                }
                advance(st, page.next_page_index, Phase::Assignments);
            }
            Ok(false)
        }
        Phase::Pack => {
            let current = copy::index(kv, account_id)?;
            if current.generation != st.generation {
                st.replaces = Some(current);
            }
            pack(kv, account_id, st)?;
            cache.target = None;
            st.phase = Phase::Assignments;
            st.next_page = 0;
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
            } else if st.full && page.version_id.is_some() && page.version_id != st.new_version {
                st.data_changed = true;
            }
            st.assignments_read += page.assignments.len() as u64;
            let mut read: Vec<(AssetRecord, Subject, MadeBy)> = Vec::new();
            let mut unknown: Vec<AssetRecord> = Vec::new();
            {
                let (_, shards) = target(kv, account_id, st, cache)?;
                for a in &page.assignments {
                    let subject = match (&a.serial_number, &a.client_user_id) {
                        (Some(s), _) => Subject::SerialNumber(s.clone()),
                        (None, Some(u)) => Subject::ClientUserId(u.clone()),
                        (None, None) => continue,
                    };
                    let pricing = a.pricing_param.as_str().to_string();
                    let ak = asset_key(&a.adam_id, &pricing);
                    if !shards.contains_key(&ak) {
                        shards.insert(ak.clone(), 1);
                        unknown.push(unlisted(&a.adam_id, &pricing));
                    }
                    let mut rec = unlisted(&a.adam_id, &pricing);
                    rec.shards = shards.get(&ak).copied().unwrap_or(1);
                    read.push((rec, subject, MadeBy::Foreign));
                }
            }
            let ix = target(kv, account_id, st, cache)?.0.clone();
            if !unknown.is_empty() {
                st.assets_added += unknown.len() as u64;
                crate::ledger::prepare(kv, account_id)?;
                copy::insert_assets(kv, account_id, &ix, unknown)?;
            }
            for (rec, subject, by) in read.iter_mut() {
                *by = cache.ledger.made_by(kv, account_id, &rec.key(), subject)?;
            }
            if st.full {
                for (rec, subject, by) in read {
                    let tag = subject.tag();
                    let n = keys::copy_shard_of(&rec.key(), &tag, rec.shards, ix.copy_shards);
                    cache.buffer.push((n, rec.key(), tag, by));
                }
            } else {
                if apply_changes(kv, account_id, st, &ix, read)? {
                    // Assets were spread over more shards: re-read their counts next page.
                    cache.target = None;
                }
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
            if st.phase == Phase::Names && !st.full && st.assets_added == 0 {
                // Nothing new to name.
                st.phase = Phase::Commit;
            }
            Ok(false)
        }
        Phase::Names => {
            // Names and icons from Apple's content lookup: each step looks up the next (up to)
            // 100 unnamed assets in the copy's order, so the lookups are the fewest possible. A
            // failed lookup leaves names empty (the next refresh asks again).
            let ix = target_index(kv, account_id, st)?;
            let mut batch: Vec<(u32, String, String)> = Vec::new();
            while st.next_page < ix.asset_pages
                && batch.len() < vpp_apple::client::METADATA_IDS_PER_REQUEST
            {
                let records = copy::page(kv, account_id, &ix, st.next_page)?;
                let mut exhausted = true;
                for (k, a) in records.range::<String, _>((
                    std::ops::Bound::Excluded(st.names_after.clone()),
                    std::ops::Bound::Unbounded,
                )) {
                    if batch.len() >= vpp_apple::client::METADATA_IDS_PER_REQUEST {
                        exhausted = false;
                        break;
                    }
                    st.names_after = k.clone();
                    if a.name.is_none() {
                        batch.push((st.next_page, k.clone(), a.adam_id.clone()));
                    }
                }
                if exhausted {
                    st.next_page += 1;
                    st.names_after.clear();
                }
            }
            if batch.is_empty() {
                st.phase = Phase::Commit;
                st.next_page = 0;
                return Ok(false);
            }
            let ids: Vec<String> = batch.iter().map(|b| b.2.clone()).collect();
            st.lookups += 1;
            if let Ok(found) = client.metadata(&ids).await {
                let names: HashMap<String, (Option<String>, Option<String>)> = found
                    .into_iter()
                    .map(|m| (m.adam_id.clone(), (m.name, m.icon_url)))
                    .collect();
                let mut by_page: BTreeMap<u32, Vec<String>> = BTreeMap::new();
                for (p, k, _) in batch {
                    by_page.entry(p).or_default().push(k);
                }
                for (p, wanted) in by_page {
                    update::<copy::AssetPage, ()>(
                        kv,
                        &keys::asset_page(account_id, ix.generation, p),
                        |cur| {
                            let Some(mut page) = cur else {
                                return Ok((None, ()));
                            };
                            let mut changed = false;
                            for k in &wanted {
                                if let Some(a) = page.get_mut(k) {
                                    if let Some((name, icon)) = names.get(&a.adam_id) {
                                        a.name = name.clone();
                                        a.icon_url = icon.clone();
                                        changed = true;
                                    }
                                }
                            }
                            Ok((changed.then_some(page), ()))
                        },
                    )?;
                }
            }
            Ok(false)
        }
        Phase::Commit => {
            commit(kv, account_id, st, client.clock().now())?;
            Ok(true)
        }
    }
}

/// Full refresh: turn the asset pages as read into the new generation's pages, sized for what
/// Apple reported (names and icons carried over from the current copy), then drop them.
fn pack(kv: &impl Kv, account_id: &str, st: &RefreshState) -> Result<(), StepError> {
    let Some(mut ix) = copy::staging(kv, account_id)? else {
        return Err(StepError::Api(ApiError::internal(
            "refresh: the new generation's index is missing",
        )));
    };
    if ix.packed {
        for n in 0..ix.raw_pages {
            kv.delete(&keys::asset_raw_page(account_id, ix.generation, n))?;
        }
        return Ok(());
    }
    let mut records: BTreeMap<String, AssetRecord> = BTreeMap::new();
    for n in 0..ix.raw_pages {
        let page: Vec<AssetRecord> =
            get_json(kv, &keys::asset_raw_page(account_id, ix.generation, n))?.unwrap_or_default();
        for r in page {
            records.insert(r.key(), r);
        }
    }
    let current = copy::index(kv, account_id)?;
    if current.generation != ix.generation {
        for p in 0..current.asset_pages {
            for (k, old) in copy::page(kv, account_id, &current, p)? {
                if let Some(r) = records.get_mut(&k) {
                    r.name = old.name;
                    r.icon_url = old.icon_url;
                }
            }
        }
    }
    let assignments: u64 = records.values().map(|r| r.in_use.max(0) as u64).sum();
    ix.generation = st.generation;
    ix.assets = records.len() as u64;
    ix.assignments = assignments;
    // The current copy's base kept where it can be, so a walk of the licenses list by cursor
    // goes on across the switch (`keys::asset_layout_for`).
    let copied = (current.generation != 0 && current.generation != ix.generation)
        .then_some((current.asset_pages, current.base_pages));
    (ix.asset_pages, ix.base_pages) = keys::asset_layout_for(records.len(), copied);
    ix.copy_shards = keys::copy_shards_for(assignments as usize);
    for r in records.values_mut() {
        r.shards = keys::asset_copy_pages_for(r.in_use.max(0) as usize, ix.copy_shards);
    }
    // The ledger's open values exist before the commit makes the assets assignable.
    crate::ledger::prepare(kv, account_id)?;
    copy::write_pages(kv, account_id, &ix, records.into_values().collect())?;
    ix.packed = true;
    set_json(kv, &staging_key(account_id), &ix)?;
    for n in 0..ix.raw_pages {
        kv.delete(&keys::asset_raw_page(account_id, ix.generation, n))?;
    }
    Ok(())
}

/// Incremental: write what Apple reported changed into the current copy (only the shards it
/// touches) and, where the assets were not re-read, count new assignments into in-use.
fn apply_changes(
    kv: &impl Kv,
    account_id: &str,
    st: &RefreshState,
    ix: &CopyIndex,
    mut read: Vec<(AssetRecord, Subject, MadeBy)>,
) -> Result<bool, StepError> {
    // The shard-size guard: an asset about to hold more entries than its copy shards are sized
    // for is spread over more of them first, so no shard grows past its bound.
    let mut added: BTreeMap<String, usize> = BTreeMap::new();
    for (rec, _, _) in &read {
        *added.entry(rec.key()).or_default() += 1;
    }
    let asset_keys: Vec<String> = added.keys().cloned().collect();
    let mut spread: HashMap<String, u32> = HashMap::new();
    for rec in copy::assets_in(kv, account_id, ix, &asset_keys)?.assets {
        let k = rec.key();
        let upper = rec.in_use.max(0) as usize + added.get(&k).copied().unwrap_or(0);
        let want = keys::asset_copy_pages_for(upper, ix.copy_shards);
        if want > rec.shards.max(1) {
            spread.insert(k.clone(), copy::respread(kv, account_id, ix, &k, want)?);
        }
    }
    for (rec, _, _) in read.iter_mut() {
        if let Some(n) = spread.get(&rec.key()) {
            rec.shards = *n;
        }
    }
    let doc = crate::model::AssetsDoc {
        generation: ix.generation,
        synced_at: ix.synced_at,
        copy_shards: ix.copy_shards,
        assets: Vec::new(),
    };
    let entries: Vec<(&AssetRecord, &Subject)> = read.iter().map(|(r, s, _)| (r, s)).collect();
    copy::edit_assignments(kv, account_id, &doc, &entries, |i, cur| {
        let by = &read[i].2;
        match cur {
            Some(c) if c == by => copy::Edit::Keep,
            _ => copy::Edit::Put(by.clone()),
        }
    })?;
    if !st.read_assets {
        // Counted from the copy's entries (not a difference), so a slice killed between the
        // copy's write and the counts' is put right when the job reads the page again.
        let touched: Vec<String> = read
            .iter()
            .map(|(rec, _, _)| rec.key())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        copy::recount(kv, account_id, ix.generation, &touched)?;
    }
    Ok(!spread.is_empty())
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
fn commit(
    kv: &impl Kv,
    account_id: &str,
    st: &RefreshState,
    now: DateTime<Utc>,
) -> Result<(), StepError> {
    let old = copy::index(kv, account_id)?;
    let gone = if st.full {
        let Some(mut ix) = copy::staging(kv, account_id)? else {
            // Already switched (a commit cut off after its index write): finish the clean-up.
            if let Some(old) = st
                .replaces
                .as_ref()
                .filter(|o| o.generation != old.generation)
            {
                copy::delete_generation(kv, account_id, old)?;
            }
            return finish_commit(kv, account_id, st);
        };
        ix.synced_at = Some(now);
        // Our licenses Apple no longer lists (only a complete, unchanged full read can tell),
        // judged before switching.
        let gone = if st.data_changed {
            Vec::new()
        } else {
            gone_from_copy(kv, account_id, &ix, st.started_at)?
        };
        set_json(kv, &keys::assets(account_id), &ix)?;
        if let Some(old) = st
            .replaces
            .as_ref()
            .filter(|o| o.generation != ix.generation)
        {
            copy::delete_generation(kv, account_id, old)?;
        }
        kv.delete(&staging_key(account_id))?;
        gone
    } else {
        update::<CopyIndex, ()>(kv, &keys::assets(account_id), |cur| {
            let mut ix = cur.unwrap_or_default();
            ix.synced_at = Some(now);
            Ok((Some(ix), ()))
        })?;
        Vec::new()
    };
    if !gone.is_empty() {
        forget_gone(kv, account_id, &gone, now)?;
        crate::notice::record_removals(kv, account_id, &gone, "refresh", now)?;
    }
    finish_commit(kv, account_id, st)
}

fn finish_commit(kv: &impl Kv, account_id: &str, st: &RefreshState) -> Result<(), StepError> {
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

/// Confirmed ledger entries (older than the refresh) whose license is not in the new copy:
/// the candidates are grouped by copy shard so each shard is read once.
fn gone_from_copy(
    kv: &impl Kv,
    account_id: &str,
    ix: &CopyIndex,
    started_at: Option<DateTime<Utc>>,
) -> Result<Vec<(String, Subject)>, vpp_store::StoreError> {
    let mut shards_of: HashMap<String, u32> = HashMap::new();
    for p in 0..ix.asset_pages {
        for (k, r) in copy::page(kv, account_id, ix, p)? {
            shards_of.insert(k, r.shards);
        }
    }
    let mut gone = Vec::new();
    let mut by_shard: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
    for n in 0..crate::model::LEDGER_SHARDS {
        let ledger: LedgerShard =
            get_json(kv, &keys::ledger_shard(account_id, n))?.unwrap_or_default();
        for (ak, subjects) in ledger {
            let asset_shards = shards_of.get(&ak).copied();
            for (tag, entry) in subjects {
                if entry.state != LedgerState::Confirmed
                    || started_at.is_some_and(|t| entry.at >= t)
                {
                    continue;
                }
                match asset_shards {
                    None => {
                        if let Some(s) = Subject::from_tag(&tag) {
                            gone.push((ak.clone(), s));
                        }
                    }
                    Some(n) => {
                        let shard = keys::copy_shard_of(&ak, &tag, n, ix.copy_shards);
                        by_shard.entry(shard).or_default().push((ak.clone(), tag));
                    }
                }
            }
        }
    }
    for (n, candidates) in by_shard {
        let shard: CopyShard =
            get_json(kv, &keys::copy_shard(account_id, ix.generation, n))?.unwrap_or_default();
        for (ak, tag) in candidates {
            if !shard.get(&ak).is_some_and(|m| m.contains_key(&tag)) {
                if let Some(s) = Subject::from_tag(&tag) {
                    gone.push((ak, s));
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
    now: DateTime<Utc>,
) -> Result<(), vpp_store::StoreError> {
    crate::ledger::forget_confirmed(kv, account_id, gone, now)
}

/// Drop a half-built new generation (full refresh) so no orphan keys remain.
fn abandon(kv: &impl Kv, account_id: &str, st: &RefreshState) -> Result<(), ApiError> {
    if !st.full {
        return Ok(());
    }
    let current = copy::index(kv, account_id)?;
    if let Some(staging) = copy::staging(kv, account_id)? {
        if staging.generation != current.generation {
            copy::delete_generation(kv, account_id, &staging)?;
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
