//! Jobs: long work (refresh, clean up, reconcile, the daily run) as resumable state machines in
//! the key-value store. Each invocation does a bounded slice, checkpoints, and returns; the next
//! invocation continues from the checkpoint, so a crash at any point loses nothing.

use crate::model::Failure;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vpp_store::{get_json, keys, set_json, update, Kv, StoreError};

/// Jobs kept in the index; older finished ones are dropped with their records.
pub const KEPT_JOBS: usize = 200;
/// A lease not renewed for this long is free again (its holder crashed).
pub const LEASE_SECONDS: i64 = 90;

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

pub fn load(kv: &impl Kv, id: &str) -> Result<Option<Job>, StoreError> {
    get_json(kv, &keys::job(id))
}

/// Save a job's state (one writer at a time: the lease holder or the request that created it).
pub fn save(kv: &impl Kv, job: &Job) -> Result<(), StoreError> {
    set_json(kv, &keys::job(&job.id), job)
}

/// Store a new job and list it; the oldest jobs beyond [`KEPT_JOBS`] are dropped.
pub fn create(kv: &impl Kv, job: &Job) -> Result<(), StoreError> {
    save(kv, job)?;
    let summary = JobSummary {
        id: job.id.clone(),
        kind: job.kind.clone(),
        account_id: job.account_id.clone(),
        created_at: job.created_at,
    };
    let dropped = update::<Vec<JobSummary>, Vec<JobSummary>>(kv, &keys::jobs(), |cur| {
        let mut list = cur.unwrap_or_default();
        list.push(summary.clone());
        let excess = list.len().saturating_sub(KEPT_JOBS);
        let dropped: Vec<JobSummary> = list.drain(..excess).collect();
        Ok((Some(list), dropped))
    })?;
    for d in dropped {
        kv.delete(&keys::job(&d.id))?;
    }
    Ok(())
}

/// Recent jobs, newest first, as full records.
pub fn recent(kv: &impl Kv, limit: usize) -> Result<Vec<Job>, StoreError> {
    let list: Vec<JobSummary> = get_json(kv, &keys::jobs())?.unwrap_or_default();
    let mut out = Vec::new();
    for s in list.iter().rev().take(limit) {
        if let Some(j) = load(kv, &s.id)? {
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
            create(
                &kv,
                &Job::new(&format!("j{i}"), "refresh", Some("a"), "admin", t),
            )
            .unwrap();
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
