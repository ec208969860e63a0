//! Runs jobs a slice at a time under a per-account lease, so two invocations never work on
//! the same account at once and a crashed holder's lease simply expires.

use crate::account::Gateway;
use crate::error::ApiError;
use crate::job::{self, Budget, Job};
use crate::refresh::SliceEnd;
use chrono::{DateTime, Utc};
use vpp_store::Kv;

/// What became of the job this time.
#[derive(Debug, Clone)]
pub struct Ran {
    pub job: Job,
    /// False when another invocation holds the lease: nothing was done here.
    pub worked: bool,
}

/// The lease scope of a job: its account, or the job kind for jobs over all accounts.
pub fn scope(job: &Job) -> String {
    job.account_id
        .clone()
        .unwrap_or_else(|| format!("job-kind-{}", job.kind))
}

/// Run slices of `job_id` until it ends or `budget` is spent.
pub async fn run<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    job_id: &str,
    our_id: &str,
    budget: &mut Budget,
    now: DateTime<Utc>,
) -> Result<Ran, ApiError> {
    let job = job::load(kv, job_id)?.ok_or_else(|| ApiError::not_found(format!("job {job_id}")))?;
    if !job.is_running() {
        return Ok(Ran { job, worked: false });
    }
    let scope = scope(&job);
    let (holder, mut job) = match job::take_lease(kv, &scope, job_id, now)? {
        job::Leased::Held { holder, job } => (holder, job),
        job::Leased::Busy => return Ok(Ran { job, worked: false }),
        job::Leased::Ended(Some(job)) => return Ok(Ran { job, worked: false }),
        job::Leased::Ended(None) => return Err(ApiError::not_found(format!("job {job_id}"))),
    };
    let result = run_held(kv, gw, &mut job, our_id, budget).await;
    // Save what was done even when the slice failed midway, then let the lease go.
    let saved = job::save(kv, &job);
    job::release_lease(kv, &scope, &holder)?;
    result?;
    saved?;
    Ok(Ran { job, worked: true })
}

async fn run_held<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    job: &mut Job,
    our_id: &str,
    budget: &mut Budget,
) -> Result<(), ApiError> {
    let account = job.account_id.clone().unwrap_or_default();
    let client = gw.client(&account);
    // Each kind runs until it ends, its budget is spent, or Apple asks to wait.
    let _end: SliceEnd = match job.kind.as_str() {
        "refresh" => crate::refresh::run_slice(kv, &client, job, our_id, budget).await?,
        "cleanup" => crate::cleanup::run_slice(kv, &client, job, budget).await?,
        crate::ledger::JOB_KIND => crate::ledger::run_slice(kv, &client, job, budget).await?,
        other => return Err(ApiError::internal(format!("unknown job kind {other}"))),
    };
    Ok(())
}
