//! Jobs: long work (refresh, clean up, reconcile, the daily run) as resumable state machines in
//! the key-value store. Each invocation does a bounded slice, checkpoints, and returns; the next
//! invocation continues from the checkpoint, so a crash at any point loses nothing.

use crate::model::Failure;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use vpp_store::{get_json, keys, set_json, update, Kv, StoreError};

/// Finished jobs kept in the index (running jobs are never dropped): see `keys::KEPT_JOBS`.
pub use vpp_store::keys::KEPT_JOBS;
/// A lease not renewed for this long is free again (its holder crashed).
pub const LEASE_SECONDS: i64 = 90;
/// The longest slice one invocation may spend on a job: well under the managed platforms' 30 s
/// per request (an Apple call in flight at the deadline still has to finish) and the lease.
pub const MAX_SLICE_SECONDS: i64 = 20;
/// The slice when `job_slice_seconds` is not set.
pub const DEFAULT_SLICE_SECONDS: i64 = 20;
// A slice ends long before its lease expires, so no second holder can start meanwhile.
const _: () = assert!(MAX_SLICE_SECONDS * 3 < LEASE_SECONDS);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// What the job is doing now, e.g. `assignments`.
    pub phase: String,
    pub done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    /// `refresh`, `cleanup`, `reconcile` or `daily`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub state: JobState,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub progress: Progress,
    /// Invocations that worked on this job.
    pub slices: u32,
    /// Where to continue: the job kind's own state.
    #[serde(default)]
    pub checkpoint: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
}

impl Job {
    pub fn new(
        id: &str,
        kind: &str,
        account_id: Option<&str>,
        requested_by: &str,
        now: DateTime<Utc>,
    ) -> Job {
        Job {
            id: id.to_string(),
            kind: kind.to_string(),
            account_id: account_id.map(str::to_string),
            state: JobState::Running,
            requested_by: requested_by.to_string(),
            created_at: now,
            updated_at: now,
            finished_at: None,
            progress: Progress::default(),
            slices: 0,
            checkpoint: Value::Null,
            result: None,
            error: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.state == JobState::Running
    }

    pub fn succeed(&mut self, result: Value, now: DateTime<Utc>) {
        self.state = JobState::Succeeded;
        self.result = Some(result);
        self.finished_at = Some(now);
        self.updated_at = now;
    }

    pub fn fail(&mut self, failure: Failure, now: DateTime<Utc>) {
        self.state = JobState::Failed;
        self.error = Some(failure);
        self.finished_at = Some(now);
        self.updated_at = now;
    }
}

/// The short form kept in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSummary {
    pub id: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A job's record: a running job (or one of the previous layout) under `job/{id}`, a finished
/// one in its page of finished jobs (`keys::jobs_done_page`). Two reads at most.
pub fn load(kv: &impl Kv, id: &str) -> Result<Option<Job>, StoreError> {
    if let Some(j) = get_json(kv, &keys::job(id))? {
        return Ok(Some(j));
    }
    let page: Option<DonePage> = get_json(kv, &keys::jobs_done_page(done_page_of(id)))?;
    Ok(page.and_then(|mut p| p.remove(id)))
}

/// Finished jobs of one page: id → record.
type DonePage = BTreeMap<String, Job>;

fn done_page_of(id: &str) -> u32 {
    keys::shard_of(id, keys::JOB_DONE_PAGES)
}

/// Save a job's state (one writer at a time: the lease holder or the request that created it).
/// A running job has a key of its own; a finished one moves into its page of finished jobs (a
/// ring of [`keys::JOB_DONE_PAGE`] records and [`keys::RING_PAGE_BYTES`], oldest out first) and
/// its own key goes, so finished jobs cost [`keys::JOB_DONE_PAGES`] keys however many are kept.
pub fn save(kv: &impl Kv, job: &Job) -> Result<(), StoreError> {
    if job.is_running() {
        return set_json(kv, &keys::job(&job.id), job);
    }
    update::<DonePage, ()>(kv, &keys::jobs_done_page(done_page_of(&job.id)), |cur| {
        let mut page = cur.unwrap_or_default();
        page.insert(job.id.clone(), job.clone());
        trim_done_page(&mut page, &job.id);
        Ok((Some(page), ()))
    })?;
    kv.delete(&keys::job(&job.id))?;
    Ok(())
}

/// Drop the oldest finished records of a page (never `keep`, the one just written) until it
/// holds at most [`keys::JOB_DONE_PAGE`] records and [`keys::RING_PAGE_BYTES`] bytes.
fn trim_done_page(page: &mut DonePage, keep: &str) {
    let bytes = |j: &Job| serde_json::to_vec(j).map(|v| v.len()).unwrap_or(0);
    let mut total: usize = page.values().map(bytes).sum();
    while page.len() > 1 && (page.len() > keys::JOB_DONE_PAGE || total > keys::RING_PAGE_BYTES) {
        let oldest = page
            .values()
            .filter(|j| j.id != keep)
            .min_by_key(|j| (j.finished_at.unwrap_or(j.updated_at), j.id.clone()))
            .map(|j| j.id.clone());
        let Some(id) = oldest else { break };
        if let Some(j) = page.remove(&id) {
            total = total.saturating_sub(bytes(&j));
        }
    }
}

/// Delete a job's record wherever it is (its own key and its page of finished jobs).
pub fn forget(kv: &impl Kv, id: &str) -> Result<(), StoreError> {
    kv.delete(&keys::job(id))?;
    update::<DonePage, ()>(kv, &keys::jobs_done_page(done_page_of(id)), |cur| {
        let Some(mut page) = cur else {
            return Ok((None, ()));
        };
        if page.remove(id).is_none() {
            return Ok((None, ()));
        }
        Ok((Some(page), ()))
    })
}

/// Store a new job and list it. Beyond [`KEPT_JOBS`], the oldest *finished* jobs are dropped
/// with their records; a running job is never dropped (a daily run over hundreds of accounts
/// lists a child job per account while it runs).
pub fn create(kv: &impl Kv, job: &Job) -> Result<(), StoreError> {
    save(kv, job)?;
    let dropped = update::<Vec<JobSummary>, Vec<String>>(kv, &keys::jobs(), |cur| {
        let mut list = cur.unwrap_or_default();
        list.push(summary_of(job));
        let dropped = trim(kv, &mut list)?;
        Ok((Some(list), dropped))
    })?;
    for d in dropped {
        forget(kv, &d)?;
    }
    Ok(())
}

/// What [`start`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Started {
    /// The new job is stored and listed.
    Created(Job),
    /// A job of the same kind and scope was already running: that one, the new one is discarded.
    Joined(Job),
}

impl Started {
    pub fn job(&self) -> &Job {
        match self {
            Started::Created(j) | Started::Joined(j) => j,
        }
    }
    pub fn into_job(self) -> Job {
        match self {
            Started::Created(j) | Started::Joined(j) => j,
        }
    }
    pub fn created(&self) -> bool {
        matches!(self, Started::Created(_))
    }
}

/// Start `job` unless a job of its kind for its account (or, without an account, of its kind) is
/// running already: at most one running job per scope and kind. The check and the listing are
/// one compare-and-swap on the index, so of two concurrent starts exactly one creates the job
/// and the other joins it (no check-then-create race).
pub fn start(kv: &impl Kv, job: &Job) -> Result<Started, StoreError> {
    // The record first: whoever finds the id in the index must be able to read it.
    save(kv, job)?;
    let outcome = update::<Vec<JobSummary>, Result<Vec<String>, Job>>(kv, &keys::jobs(), |cur| {
        let mut list = cur.unwrap_or_default();
        for s in list.iter().rev() {
            if s.id == job.id || s.kind != job.kind || s.account_id != job.account_id {
                continue;
            }
            if let Some(j) = load(kv, &s.id)? {
                if j.is_running() {
                    return Ok((None, Err(j)));
                }
            }
        }
        if list.iter().any(|s| s.id == job.id) {
            return Ok((None, Ok(Vec::new())));
        }
        list.push(summary_of(job));
        let dropped = trim(kv, &mut list)?;
        Ok((Some(list), Ok(dropped)))
    })?;
    match outcome {
        Ok(dropped) => {
            for d in dropped {
                forget(kv, &d)?;
            }
            Ok(Started::Created(job.clone()))
        }
        Err(existing) => {
            kv.delete(&keys::job(&job.id))?;
            Ok(Started::Joined(existing))
        }
    }
}

fn summary_of(job: &Job) -> JobSummary {
    JobSummary {
        id: job.id.clone(),
        kind: job.kind.clone(),
        account_id: job.account_id.clone(),
        created_at: job.created_at,
    }
}

/// Drop the oldest finished jobs until at most [`KEPT_JOBS`] are listed (or only running ones
/// are left); returns the ids dropped. Reads the records it considers.
fn trim(kv: &impl Kv, list: &mut Vec<JobSummary>) -> Result<Vec<String>, StoreError> {
    let mut excess = list.len().saturating_sub(KEPT_JOBS);
    let mut dropped = Vec::new();
    let mut i = 0;
    while excess > 0 && i < list.len() {
        let running = load(kv, &list[i].id)?.is_some_and(|j| j.is_running());
        if running {
            i += 1;
        } else {
            dropped.push(list.remove(i).id);
            excess -= 1;
        }
    }
    Ok(dropped)
}

/// The slice length from `job_slice_seconds`: unset means [`DEFAULT_SLICE_SECONDS`]; a value
/// outside 1..=[`MAX_SLICE_SECONDS`] is clamped into it (a slice longer than a request may run
/// would be cut off mid-write). Text that is not a whole number is a configuration error.
pub fn slice_seconds(raw: Option<&str>) -> Result<i64, String> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(DEFAULT_SLICE_SECONDS);
    };
    let n: i64 = raw
        .parse()
        .map_err(|_| format!("job_slice_seconds must be a whole number of seconds, not {raw:?}"))?;
    Ok(n.clamp(1, MAX_SLICE_SECONDS))
}

/// Recent jobs, newest first, as full records.
pub fn recent(kv: &impl Kv, limit: usize) -> Result<Vec<Job>, StoreError> {
    let list: Vec<JobSummary> = get_json(kv, &keys::jobs())?.unwrap_or_default();
    let mut out = Vec::new();
    // Each page of finished jobs is read once however many of its jobs are listed.
    let mut pages: BTreeMap<u32, DonePage> = BTreeMap::new();
    for s in list.iter().rev().take(limit) {
        if let Some(j) = get_json::<Job>(kv, &keys::job(&s.id))? {
            out.push(j);
            continue;
        }
        let n = done_page_of(&s.id);
        if let std::collections::btree_map::Entry::Vacant(e) = pages.entry(n) {
            e.insert(get_json(kv, &keys::jobs_done_page(n))?.unwrap_or_default());
        }
        if let Some(j) = pages.get_mut(&n).and_then(|p| p.remove(&s.id)) {
            out.push(j);
        }
    }
    Ok(out)
}

/// The running job of `kind` for `account`, if any (newest first).
pub fn running(kv: &impl Kv, kind: &str, account: Option<&str>) -> Result<Option<Job>, StoreError> {
    running_of(kv, &[kind], account)
}

/// The newest running job of any of `kinds` for `account`: one read of the index.
pub fn running_of(
    kv: &impl Kv,
    kinds: &[&str],
    account: Option<&str>,
) -> Result<Option<Job>, StoreError> {
    let list: Vec<JobSummary> = get_json(kv, &keys::jobs())?.unwrap_or_default();
    for s in list.iter().rev() {
        if kinds.contains(&s.kind.as_str()) && s.account_id.as_deref() == account {
            if let Some(j) = load(kv, &s.id)? {
                if j.is_running() {
                    return Ok(Some(j));
                }
            }
        }
    }
    Ok(None)
}

/// Every running job, oldest first.
pub fn all_running(kv: &impl Kv) -> Result<Vec<Job>, StoreError> {
    let list: Vec<JobSummary> = get_json(kv, &keys::jobs())?.unwrap_or_default();
    let mut out = Vec::new();
    for s in &list {
        if let Some(j) = load(kv, &s.id)? {
            if j.is_running() {
                out.push(j);
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub holder: String,
    pub until: DateTime<Utc>,
}

/// A lease holder for one invocation's work on `job_id`: the job id with a fresh random part.
/// Two invocations working on one job (two instances resuming it, or joining it, at once) are
/// two holders, so only one of them gets the lease; with the job id alone as the holder, both
/// did, and both ran the job at once from the same checkpoint.
fn invocation_holder(job_id: &str) -> String {
    format!("{job_id}@{:016x}", vpp_store::mark::new_revision())
}

/// What [`take_lease`] found.
#[derive(Debug)]
pub enum Leased {
    /// Another invocation holds the scope's lease: the job is being worked on elsewhere.
    Busy,
    /// The job ended (or its record is gone) before the lease was ours; the lease went back.
    Ended(Option<Job>),
    /// The lease is this invocation's (`holder`, for [`release_lease`]), and `job` is the
    /// running job as stored now.
    Held { holder: String, job: Job },
}

/// Take the lease on `scope` for one invocation's slice of `job_id`, and read the job again
/// under it: another invocation may have moved it on (or ended it) since the caller read it,
/// and a slice from the older checkpoint would redo its work.
pub fn take_lease(
    kv: &impl Kv,
    scope: &str,
    job_id: &str,
    now: DateTime<Utc>,
) -> Result<Leased, StoreError> {
    let holder = invocation_holder(job_id);
    if !acquire_lease(kv, scope, &holder, now)? {
        return Ok(Leased::Busy);
    }
    match load(kv, job_id) {
        Ok(Some(job)) if job.is_running() => Ok(Leased::Held { holder, job }),
        other => {
            release_lease(kv, scope, &holder)?;
            Ok(Leased::Ended(other?))
        }
    }
}

/// Take (or renew) the lease on `scope` (usually an account id) for `holder`. Returns false when
/// another holder has it and it has not expired: that work is going on elsewhere right now.
pub fn acquire_lease(
    kv: &impl Kv,
    scope: &str,
    holder: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    update::<Lease, bool>(kv, &keys::lease(scope), |cur| match cur {
        Some(l) if l.holder != holder && l.until > now => Ok((None, false)),
        _ => Ok((
            Some(Lease {
                holder: holder.to_string(),
                until: now + Duration::seconds(LEASE_SECONDS),
            }),
            true,
        )),
    })
}

/// Give the lease back, if we still hold it.
pub fn release_lease(kv: &impl Kv, scope: &str, holder: &str) -> Result<(), StoreError> {
    let current: Option<Lease> = get_json(kv, &keys::lease(scope))?;
    if current.map(|l| l.holder == holder).unwrap_or(false) {
        kv.delete(&keys::lease(scope))?;
    }
    Ok(())
}

/// What one invocation may spend.
#[derive(Debug, Clone)]
pub struct Budget {
    pub deadline: DateTime<Utc>,
    pub apple_calls: u32,
}

impl Budget {
    pub fn new(now: DateTime<Utc>, seconds: i64, apple_calls: u32) -> Budget {
        Budget {
            deadline: now + Duration::seconds(seconds),
            apple_calls,
        }
    }

    /// Take one Apple call from the budget; false when the slice should stop.
    pub fn take_call(&mut self, now: DateTime<Utc>) -> bool {
        if self.apple_calls == 0 || now >= self.deadline {
            return false;
        }
        self.apple_calls -= 1;
        true
    }

    pub fn exhausted(&self, now: DateTime<Utc>) -> bool {
        self.apple_calls == 0 || now >= self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpp_store::MemoryKv;

    #[test]
    fn lease_excludes_others_until_expiry() {
        let kv = MemoryKv::default();
        let t = Utc::now();
        assert!(acquire_lease(&kv, "a", "run-1", t).unwrap());
        assert!(!acquire_lease(&kv, "a", "run-2", t).unwrap());
        assert!(
            acquire_lease(&kv, "a", "run-1", t).unwrap(),
            "holder renews"
        );
        let later = t + Duration::seconds(LEASE_SECONDS + 1);
        assert!(
            acquire_lease(&kv, "a", "run-2", later).unwrap(),
            "expired lease is free"
        );
        release_lease(&kv, "a", "run-1").unwrap();
        assert!(kv.exists(&keys::lease("a")).unwrap(), "not ours to release");
        release_lease(&kv, "a", "run-2").unwrap();
        assert!(!kv.exists(&keys::lease("a")).unwrap());
    }

    #[test]
    fn index_keeps_recent_jobs() {
        let kv = MemoryKv::default();
        let t = Utc::now();
        for i in 0..(KEPT_JOBS + 3) {
            let mut j = Job::new(&format!("j{i}"), "refresh", Some("a"), "admin", t);
            if i + 1 < KEPT_JOBS + 3 {
                j.succeed(Value::Null, t);
            }
            create(&kv, &j).unwrap();
        }
        assert!(load(&kv, "j0").unwrap().is_none());
        assert!(load(&kv, "j3").unwrap().is_some());
        let recent = recent(&kv, 2).unwrap();
        assert_eq!(recent[0].id, format!("j{}", KEPT_JOBS + 2));
        let r = running(&kv, "refresh", Some("a")).unwrap().unwrap();
        assert_eq!(r.id, format!("j{}", KEPT_JOBS + 2));
        assert!(running(&kv, "cleanup", Some("a")).unwrap().is_none());
    }

    #[test]
    fn finished_jobs_are_packed_in_a_few_pages_and_stay_readable() {
        let kv = MemoryKv::default();
        let t = Utc::now();
        let many = KEPT_JOBS * 3;
        for i in 0..many {
            let mut j = Job::new(&format!("j{i}"), "refresh", Some("a"), "admin", t);
            j.checkpoint = serde_json::json!({"pad": "x".repeat(500)});
            create(&kv, &j).unwrap();
            j.succeed(serde_json::json!({"n": i}), t + Duration::seconds(i as i64));
            save(&kv, &j).unwrap();
        }
        // A job of the previous layout (its own key, finished) still reads.
        let mut legacy = Job::new("legacy", "cleanup", Some("a"), "admin", t);
        legacy.succeed(serde_json::json!("old"), t);
        set_json(&kv, &keys::job("legacy"), &legacy).unwrap();
        assert_eq!(load(&kv, "legacy").unwrap(), Some(legacy));
        kv.delete(&keys::job("legacy")).unwrap();
        let stored = kv.keys();
        assert!(stored.iter().all(|k| !k.starts_with("job/")), "{stored:?}");
        let pages = stored
            .iter()
            .filter(|k| k.starts_with("jobs/done/"))
            .count();
        assert!(pages <= keys::JOB_DONE_PAGES as usize, "{pages} pages");
        assert_eq!(
            stored.len(),
            pages + 1,
            "the pages and the index: {stored:?}"
        );
        for k in &stored {
            let v = kv.get(k).unwrap().unwrap();
            assert!(
                v.len() <= keys::RING_PAGE_BYTES + 2_000,
                "{k}: {} bytes",
                v.len()
            );
        }
        // The newest finished jobs read back whole, newest first.
        let newest = recent(&kv, 20).unwrap();
        assert_eq!(newest.len(), 20);
        assert_eq!(newest[0].id, format!("j{}", many - 1));
        assert_eq!(newest[0].result, Some(serde_json::json!({"n": many - 1})));
        assert!(load(&kv, "j0").unwrap().is_none());
        // A running job has its own key until it ends.
        let r = Job::new("run", "refresh", Some("b"), "admin", t);
        create(&kv, &r).unwrap();
        assert!(kv.exists(&keys::job("run")).unwrap());
        forget(&kv, "run").unwrap();
        assert!(load(&kv, "run").unwrap().is_none());
    }

    #[test]
    fn a_running_job_is_never_dropped_from_the_index() {
        // A daily run lists a child job per account while it runs: with more accounts than the
        // index keeps, the daily job itself (the oldest) must stay.
        let kv = MemoryKv::default();
        let t = Utc::now();
        create(&kv, &Job::new("daily-1", "daily", None, "scheduler", t)).unwrap();
        for i in 0..(KEPT_JOBS + 50) {
            let mut c = Job::new(
                &format!("r{i}"),
                "refresh",
                Some(&format!("acc{i}")),
                "d",
                t,
            );
            if i % 2 == 0 {
                c.succeed(Value::Null, t);
            }
            create(&kv, &c).unwrap();
        }
        assert!(load(&kv, "daily-1").unwrap().is_some());
        assert_eq!(running(&kv, "daily", None).unwrap().unwrap().id, "daily-1");
        let list: Vec<JobSummary> = get_json(&kv, &keys::jobs()).unwrap().unwrap();
        assert_eq!(list.len(), KEPT_JOBS);
        assert!(list.iter().any(|s| s.id == "r1"), "old running child kept");
        assert!(
            !list.iter().any(|s| s.id == "r0"),
            "old finished child dropped"
        );
        // Only running jobs left beyond the bound: the index grows rather than drop one.
        let kv = MemoryKv::default();
        for i in 0..(KEPT_JOBS + 5) {
            create(
                &kv,
                &Job::new(&format!("x{i}"), "refresh", Some(&format!("a{i}")), "d", t),
            )
            .unwrap();
        }
        assert!(load(&kv, "x0").unwrap().is_some());
    }

    /// A store where another request starts the same job between our read of the index and our
    /// write of it, once.
    struct Racing<'a> {
        inner: &'a MemoryKv,
        rival: std::cell::Cell<Option<Job>>,
    }

    impl Kv for Racing<'_> {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, vpp_store::KvError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8]) -> Result<(), vpp_store::KvError> {
            self.inner.set(key, value)
        }
        fn delete(&self, key: &str) -> Result<(), vpp_store::KvError> {
            self.inner.delete(key)
        }
        fn swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            new: &[u8],
        ) -> Result<bool, vpp_store::KvError> {
            if key == keys::jobs() {
                if let Some(rival) = self.rival.take() {
                    assert!(start(self.inner, &rival).unwrap().created());
                }
            }
            self.inner.swap(key, expected, new)
        }
    }

    #[test]
    fn two_starts_at_once_make_one_job() {
        let kv = MemoryKv::default();
        let t = Utc::now();
        let racing = Racing {
            inner: &kv,
            rival: std::cell::Cell::new(Some(Job::new("first", "refresh", Some("a"), "x", t))),
        };
        let second = start(&racing, &Job::new("second", "refresh", Some("a"), "y", t)).unwrap();
        assert_eq!(
            second,
            Started::Joined(load(&kv, "first").unwrap().unwrap())
        );
        assert!(
            load(&kv, "second").unwrap().is_none(),
            "the loser leaves no record"
        );
        let list: Vec<JobSummary> = get_json(&kv, &keys::jobs()).unwrap().unwrap();
        assert_eq!(list.len(), 1);
        // Another kind or another account is its own job; a finished one does not block.
        assert!(start(&kv, &Job::new("c", "cleanup", Some("a"), "x", t))
            .unwrap()
            .created());
        assert!(start(&kv, &Job::new("b", "refresh", Some("b"), "x", t))
            .unwrap()
            .created());
        let mut first = load(&kv, "first").unwrap().unwrap();
        first.succeed(Value::Null, t);
        save(&kv, &first).unwrap();
        assert!(start(&kv, &Job::new("third", "refresh", Some("a"), "x", t))
            .unwrap()
            .created());
    }

    #[test]
    fn slice_seconds_are_bounded() {
        assert_eq!(slice_seconds(None), Ok(DEFAULT_SLICE_SECONDS));
        assert_eq!(slice_seconds(Some(" ")), Ok(DEFAULT_SLICE_SECONDS));
        assert_eq!(slice_seconds(Some("5")), Ok(5));
        assert_eq!(slice_seconds(Some("3600")), Ok(MAX_SLICE_SECONDS));
        assert_eq!(slice_seconds(Some("0")), Ok(1));
        assert_eq!(slice_seconds(Some("-4")), Ok(1));
        assert!(slice_seconds(Some("twenty")).is_err());
        const { assert!(MAX_SLICE_SECONDS < 30 && MAX_SLICE_SECONDS * 3 < LEASE_SECONDS) };
    }

    #[test]
    fn budget() {
        let t = Utc::now();
        let mut b = Budget::new(t, 10, 2);
        assert!(b.take_call(t));
        assert!(b.take_call(t));
        assert!(!b.take_call(t));
        let mut b = Budget::new(t, 10, 5);
        assert!(!b.take_call(t + Duration::seconds(11)));
    }
}
