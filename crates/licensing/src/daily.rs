//! The daily work: for every account a refresh (incremental, full every `full_refresh_days`),
//! then the pending Apple events, then reconcile, then the pending notices.
//!
//! One resumable job of kind `daily` whose checkpoint is a [`State`]. Each invocation (a tick of
//! the scheduler, or `POST /api/daily`) takes the `daily` lease, does a bounded slice within its
//! [`Budget`], checkpoints and returns; the next tick continues. The refresh and reconcile work
//! runs in child jobs (`refresh` per account, `reconcile`) that checkpoint themselves, so a crash
//! at any point loses nothing: the child job is adopted again by the next slice.
//!
//! One slow or failing account never stops the others: an account whose lease is held elsewhere
//! or that Apple asked to wait is moved to the end of the list, at most [`MAX_DEFERRALS`] times;
//! a failed refresh is recorded in the result (the account's status says why).
//!
//! A new run starts when none is running and the last one started before the most recent
//! scheduled time (`daily_at_utc`, HH:MM UTC), or when forced; `daily/last` remembers it.

use crate::account::{self, Gateway};
use crate::error::{ApiError, ErrorCode};
use crate::event;
use crate::job::{self, Budget, Job, JobState};
use crate::model::{Account, Failure};
use crate::notice::{self, WebhookSender};
use crate::reconcile;
use crate::runner;
use chrono::{DateTime, Duration, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use vpp_store::{get_json, keys, set_json, Kv};

pub const KIND: &str = "daily";
/// The lease every invocation holds for its whole slice.
pub const LEASE_SCOPE: &str = "daily";
/// How often one run moves an account (or reconcile) to the back before it gives up on it for
/// this run (the unfinished child job is adopted by the next run).
pub const MAX_DEFERRALS: u32 = 5;
/// Webhook POSTs one slice may make.
pub const NOTICE_BATCHES: usize = 10;
/// Errors kept per phase in the result (the rest are counted).
const KEPT_ERRORS: usize = 20;

/// When and how the daily work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The scheduled time of day, UTC.
    pub daily_at: NaiveTime,
    /// A full refresh when the last one is this many calendar days old (or never ran).
    pub full_refresh_days: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            daily_at: NaiveTime::from_hms_opt(2, 0, 0).unwrap_or(NaiveTime::MIN),
            full_refresh_days: 7,
        }
    }
}

impl Config {
    /// From the variables `daily_at_utc` (`HH:MM`) and `full_refresh_days` (unset: defaults).
    pub fn from_vars(
        daily_at_utc: Option<&str>,
        full_refresh_days: Option<&str>,
    ) -> Result<Config, ApiError> {
        let mut c = Config::default();
        if let Some(s) = daily_at_utc.map(str::trim).filter(|s| !s.is_empty()) {
            c.daily_at = parse_daily_at(s)?;
        }
        if let Some(s) = full_refresh_days.map(str::trim).filter(|s| !s.is_empty()) {
            c.full_refresh_days = s
                .parse::<i64>()
                .ok()
                .filter(|d| (0..=3650).contains(d))
                .ok_or_else(|| {
                    misconfigured(format!(
                        "full_refresh_days must be a number of days, not {s:?}"
                    ))
                })?;
        }
        Ok(c)
    }
}

fn misconfigured(message: String) -> ApiError {
    ApiError::new(ErrorCode::Misconfigured, message)
}

/// `HH:MM` (24 h, UTC).
pub fn parse_daily_at(s: &str) -> Result<NaiveTime, ApiError> {
    NaiveTime::parse_from_str(s.trim(), "%H:%M")
        .map_err(|_| misconfigured(format!("daily_at_utc must be HH:MM (UTC), not {s:?}")))
}

/// The most recent scheduled time at or before `now`.
pub fn last_scheduled(now: DateTime<Utc>, at: NaiveTime) -> DateTime<Utc> {
    let today = now.date_naive().and_time(at).and_utc();
    if today <= now {
        today
    } else {
        today - Duration::days(1)
    }
}

/// The first scheduled time after `now`.
pub fn next_scheduled(now: DateTime<Utc>, at: NaiveTime) -> DateTime<Utc> {
    last_scheduled(now, at) + Duration::days(1)
}

/// What `daily/last` remembers: the newest run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Last {
    pub job_id: String,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub state: JobState,
}

/// Is a new run due at `now` (none running is the caller's check)?
pub fn is_due(last: Option<&Last>, now: DateTime<Utc>, at: NaiveTime) -> bool {
    match last {
        None => true,
        Some(l) => l.started_at < last_scheduled(now, at),
    }
}

/// Should this account's refresh be full?
pub fn wants_full(account: &Account, now: DateTime<Utc>, days: i64) -> bool {
    match account.last_full_refresh {
        None => true,
        // Calendar days (UTC), so a run at the same time each day does not slip a day.
        Some(t) => (now.date_naive() - t.date_naive()).num_days() >= days,
    }
}

pub fn last(kv: &impl Kv) -> Result<Option<Last>, ApiError> {
    Ok(get_json(kv, &keys::daily_last())?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    #[default]
    Refresh,
    Events,
    Reconcile,
    Notices,
}

/// What became of one account's refresh in this run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountOutcome {
    pub account_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `succeeded`, `failed`, `deferred` (gave up for this run; the job continues next run) or
    /// `skipped` (deleted meanwhile).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
}

/// The checkpoint of a daily job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub phase: Phase,
    /// Accounts still to refresh, the next first (the list taken when the run started).
    pub queue: Vec<String>,
    pub total_accounts: usize,
    /// The refresh job of each account this run works on.
    pub children: BTreeMap<String, String>,
    pub deferrals: BTreeMap<String, u32>,
    pub accounts: Vec<AccountOutcome>,
    #[serde(default)]
    pub events: EventTotals,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_job: Option<String>,
    #[serde(default)]
    pub reconcile_deferrals: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notices: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventTotals {
    pub polled: u32,
    pub completed: u32,
    pub resent: u32,
    pub errors: Vec<String>,
    pub more_errors: u32,
}

/// What an invocation did.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    /// Another invocation holds the `daily` lease: nothing was done here.
    Busy,
    /// No run is due and none is running.
    Idle { next_run_at: DateTime<Utc> },
    /// A slice ran; the job tells whether the run finished.
    Ran {
        job: Box<Job>,
        started: bool,
        next_run_at: DateTime<Utc>,
    },
}

/// Everything a slice needs from its host.
pub struct Ctx<'a, K: Kv, G: Gateway, S: WebhookSender> {
    pub kv: &'a K,
    pub gw: &'a G,
    pub sender: &'a S,
    pub config: Config,
    /// This instance's `mdmInfo` id.
    pub our_id: &'a str,
    /// Who asked (`scheduler`, `admin:..`).
    pub requested_by: &'a str,
    /// The time now (read again as the slice goes on).
    pub clock: &'a dyn Fn() -> DateTime<Utc>,
    /// New job ids.
    pub new_id: &'a dyn Fn() -> Result<String, ApiError>,
}

/// One invocation: take the `daily` lease, continue the running run or start one when due (or
/// `force`), do a slice within `budget`, checkpoint, let the lease go.
pub async fn tick<K: Kv, G: Gateway, S: WebhookSender>(
    ctx: &Ctx<'_, K, G, S>,
    force: bool,
    budget: &mut Budget,
) -> Result<Tick, ApiError> {
    let now = (ctx.clock)();
    let holder = (ctx.new_id)()?;
    if !job::acquire_lease(ctx.kv, LEASE_SCOPE, &holder, now)? {
        return Ok(Tick::Busy);
    }
    let result = tick_held(ctx, force, budget, &holder, now).await;
    job::release_lease(ctx.kv, LEASE_SCOPE, &holder)?;
    result
}

async fn tick_held<K: Kv, G: Gateway, S: WebhookSender>(
    ctx: &Ctx<'_, K, G, S>,
    force: bool,
    budget: &mut Budget,
    holder: &str,
    now: DateTime<Utc>,
) -> Result<Tick, ApiError> {
    let at = ctx.config.daily_at;
    let (mut job, started) = match job::running(ctx.kv, KIND, None)? {
        Some(j) => (j, false),
        None => {
            let last = last(ctx.kv)?;
            if !force && !is_due(last.as_ref(), now, at) {
                return Ok(Tick::Idle {
                    next_run_at: next_scheduled(now, at),
                });
            }
            (start(ctx, now)?, true)
        }
    };
    run_slice(ctx, &mut job, holder, budget).await?;
    Ok(Tick::Ran {
        job: Box::new(job),
        started,
        next_run_at: next_scheduled((ctx.clock)(), at),
    })
}

/// Create a new daily job over the accounts there are now and remember it in `daily/last`.
fn start<K: Kv, G: Gateway, S: WebhookSender>(
    ctx: &Ctx<'_, K, G, S>,
    now: DateTime<Utc>,
) -> Result<Job, ApiError> {
    let accounts = account::ids(ctx.kv)?;
    let st = State {
        total_accounts: accounts.len(),
        queue: accounts,
        ..State::default()
    };
    let mut j = Job::new(&(ctx.new_id)()?, KIND, None, ctx.requested_by, now);
    set_checkpoint(&mut j, &st)?;
    job::create(ctx.kv, &j)?;
    set_json(
        ctx.kv,
        &keys::daily_last(),
        &Last {
            job_id: j.id.clone(),
            started_at: now,
            finished_at: None,
            state: JobState::Running,
        },
    )?;
    Ok(j)
}

fn set_checkpoint(job: &mut Job, st: &State) -> Result<(), ApiError> {
    job.progress.phase = match st.phase {
        Phase::Refresh => "refresh",
        Phase::Events => "events",
        Phase::Reconcile => "reconcile",
        Phase::Notices => "notices",
    }
    .to_string();
    job.progress.done = st.accounts.len() as u64;
    job.progress.total = Some(st.total_accounts as u64);
    job.checkpoint = serde_json::to_value(st).map_err(ApiError::internal)?;
    Ok(())
}

fn checkpoint(kv: &impl Kv, job: &mut Job, st: &State, now: DateTime<Utc>) -> Result<(), ApiError> {
    set_checkpoint(job, st)?;
    job.updated_at = now;
    job::save(kv, job)?;
    Ok(())
}

/// Run one slice of a daily job (the caller holds the `daily` lease as `holder`); saves it.
pub async fn run_slice<K: Kv, G: Gateway, S: WebhookSender>(
    ctx: &Ctx<'_, K, G, S>,
    job: &mut Job,
    holder: &str,
    budget: &mut Budget,
) -> Result<(), ApiError> {
    if !job.is_running() {
        return Ok(());
    }
    let kv = ctx.kv;
    let mut st: State = serde_json::from_value(job.checkpoint.clone())
        .map_err(|e| ApiError::internal(format!("daily checkpoint: {e}")))?;
    job.slices += 1;
    // Accounts that had to wait in this slice: meeting one again means every account left is
    // waiting, so the slice ends and a later tick tries again.
    let mut waiting: BTreeSet<String> = BTreeSet::new();
    loop {
        let now = (ctx.clock)();
        if budget.exhausted(now) || !job::acquire_lease(kv, LEASE_SCOPE, holder, now)? {
            break;
        }
        let more = match st.phase {
            Phase::Refresh => refresh_step(ctx, job, &mut st, &mut waiting, budget).await?,
            Phase::Events => {
                let report = event::poll_due(kv, |a| ctx.gw.client(a), now, budget).await?;
                let t = &mut st.events;
                t.polled += report.polled;
                t.completed += report.completed;
                t.resent += report.resent;
                for e in report.errors {
                    if t.errors.len() < KEPT_ERRORS {
                        t.errors.push(e);
                    } else {
                        t.more_errors += 1;
                    }
                }
                // Out of budget: some due events may be left; the next slice polls them.
                if budget.exhausted((ctx.clock)()) {
                    false
                } else {
                    st.phase = Phase::Reconcile;
                    true
                }
            }
            Phase::Reconcile => reconcile_step(ctx, job, &mut st, budget).await?,
            Phase::Notices => {
                let report =
                    notice::deliver_due(kv, ctx.sender, now, NOTICE_BATCHES, false).await?;
                st.notices = Some(serde_json::to_value(&report).map_err(ApiError::internal)?);
                let now = (ctx.clock)();
                set_checkpoint(job, &st)?;
                job.succeed(result(&st), now);
                job::save(kv, job)?;
                set_json(
                    kv,
                    &keys::daily_last(),
                    &Last {
                        job_id: job.id.clone(),
                        started_at: job.created_at,
                        finished_at: Some(now),
                        state: JobState::Succeeded,
                    },
                )?;
                return Ok(());
            }
        };
        checkpoint(kv, job, &st, (ctx.clock)())?;
        if !more {
            break;
        }
    }
    checkpoint(kv, job, &st, (ctx.clock)())
}

/// Work on the account at the front of the queue. `Ok(false)` ends the slice.
async fn refresh_step<K: Kv, G: Gateway, S: WebhookSender>(
    ctx: &Ctx<'_, K, G, S>,
    job: &mut Job,
    st: &mut State,
    waiting: &mut BTreeSet<String>,
    budget: &mut Budget,
) -> Result<bool, ApiError> {
    let kv = ctx.kv;
    let Some(account_id) = st.queue.first().cloned() else {
        st.phase = Phase::Events;
        return Ok(true);
    };
    if waiting.contains(&account_id) {
        return Ok(false);
    }
    let now = (ctx.clock)();
    // The refresh job of this account: ours from the checkpoint, one already running (ours
    // created before a crash, or someone's manual refresh), or a new one.
    let child = match st.children.get(&account_id) {
        Some(id) => job::load(kv, id)?,
        None => None,
    };
    let child = match child {
        Some(c) => c,
        None => match job::running(kv, "refresh", Some(&account_id))? {
            Some(c) => c,
            None => {
                let account = match account::load(kv, &account_id) {
                    Ok(a) => a,
                    Err(e) if e.code == ErrorCode::NotFound => {
                        finish_account(st, &account_id, None, "skipped", None, None);
                        return Ok(true);
                    }
                    Err(e) => return Err(e),
                };
                let full = wants_full(&account, now, ctx.config.full_refresh_days);
                let initial = crate::refresh::initial_state(kv, &account, full, now)?;
                let mut c = Job::new(
                    &(ctx.new_id)()?,
                    "refresh",
                    Some(&account_id),
                    &format!("daily:{}", job.id),
                    now,
                );
                c.checkpoint = serde_json::to_value(&initial).map_err(ApiError::internal)?;
                job::start(kv, &c)?.into_job()
            }
        },
    };
    st.children.insert(account_id.clone(), child.id.clone());
    checkpoint(kv, job, st, now)?;
    let child = if child.is_running() {
        match runner::run(kv, ctx.gw, &child.id, ctx.our_id, budget, now).await {
            Ok(ran) => ran.job,
            Err(e) => {
                // Not Apple (the refresh handles Apple's errors itself): record it, move on.
                let f = Failure {
                    code: e.code.as_str().to_string(),
                    message: e.message.clone(),
                };
                finish_account(
                    st,
                    &account_id,
                    Some(&child.id),
                    "failed",
                    full_of(&child),
                    Some(f),
                );
                return Ok(true);
            }
        }
    } else {
        child
    };
    match child.state {
        JobState::Succeeded => {
            finish_account(
                st,
                &account_id,
                Some(&child.id),
                "succeeded",
                full_of(&child),
                None,
            );
        }
        JobState::Failed => {
            let err = child.error.clone();
            finish_account(
                st,
                &account_id,
                Some(&child.id),
                "failed",
                full_of(&child),
                err,
            );
        }
        JobState::Running => {
            if budget.exhausted((ctx.clock)()) {
                // Our budget is spent: continue with this account next slice.
                return Ok(false);
            }
            // Its lease is held elsewhere, or Apple asked to wait: let the others go first.
            let n = st.deferrals.entry(account_id.clone()).or_insert(0);
            *n += 1;
            if *n > MAX_DEFERRALS {
                let f = Failure {
                    code: "deferred".into(),
                    message: format!(
                        "refresh still waiting after {MAX_DEFERRALS} tries in this run; its job continues in the next run"
                    ),
                };
                finish_account(
                    st,
                    &account_id,
                    Some(&child.id),
                    "deferred",
                    full_of(&child),
                    Some(f),
                );
            } else {
                st.queue.remove(0);
                st.queue.push(account_id.clone());
                waiting.insert(account_id);
            }
        }
    }
    Ok(true)
}

fn full_of(j: &Job) -> Option<bool> {
    j.checkpoint.get("full").and_then(Value::as_bool)
}

fn finish_account(
    st: &mut State,
    account_id: &str,
    job_id: Option<&str>,
    outcome: &str,
    full: Option<bool>,
    error: Option<Failure>,
) {
    st.queue.retain(|a| a != account_id);
    st.accounts.push(AccountOutcome {
        account_id: account_id.to_string(),
        job_id: job_id.map(str::to_string),
        outcome: outcome.to_string(),
        full,
        error,
    });
}

async fn reconcile_step<K: Kv, G: Gateway, S: WebhookSender>(
    ctx: &Ctx<'_, K, G, S>,
    job: &mut Job,
    st: &mut State,
    budget: &mut Budget,
) -> Result<bool, ApiError> {
    let kv = ctx.kv;
    let now = (ctx.clock)();
    let existing = match &st.reconcile_job {
        Some(id) => job::load(kv, id)?,
        None => None,
    };
    let mut child = match existing {
        Some(j) => j,
        None => {
            let (j, _created) =
                reconcile::start(kv, &(ctx.new_id)()?, &format!("daily:{}", job.id), now)?;
            st.reconcile_job = Some(j.id.clone());
            checkpoint(kv, job, st, now)?;
            j
        }
    };
    let finished = reconcile::run_slice(kv, &mut child, |a| ctx.gw.client(a), now, budget).await?;
    if finished {
        st.reconcile = Some(json!({
            "jobId": child.id,
            "state": child.state,
            "result": child.result,
        }));
        st.phase = Phase::Notices;
        return Ok(true);
    }
    if budget.exhausted((ctx.clock)()) {
        return Ok(false);
    }
    // Held elsewhere, or Apple asked to wait.
    st.reconcile_deferrals += 1;
    if st.reconcile_deferrals > MAX_DEFERRALS {
        st.reconcile = Some(json!({
            "jobId": child.id,
            "state": "deferred",
            "message": "reconcile still waiting; its job continues in the next run",
        }));
        st.phase = Phase::Notices;
        return Ok(true);
    }
    Ok(false)
}

/// The result of a finished run.
fn result(st: &State) -> Value {
    let count = |o: &str| st.accounts.iter().filter(|a| a.outcome == o).count();
    json!({
        "accounts": st.accounts,
        "refreshed": count("succeeded"),
        "failed": count("failed"),
        "deferred": count("deferred"),
        "skipped": count("skipped"),
        "events": st.events,
        "reconcile": st.reconcile,
        "notices": st.notices,
    })
}

/// What `GET /api/daily` shows: the running or last run, and when the next one starts.
pub fn view(kv: &impl Kv, config: &Config, now: DateTime<Utc>) -> Result<Value, ApiError> {
    let running = job::running(kv, KIND, None)?;
    let last = last(kv)?;
    let job = match (&running, &last) {
        (Some(j), _) => Some(j.clone()),
        (None, Some(l)) => job::load(kv, &l.job_id)?,
        _ => None,
    };
    let next_run_at = if running.is_none() && is_due(last.as_ref(), now, config.daily_at) {
        now
    } else {
        next_scheduled(now, config.daily_at)
    };
    Ok(json!({
        "running": running.is_some(),
        "job": job,
        "last": last,
        "dailyAtUtc": config.daily_at.format("%H:%M").to_string(),
        "fullRefreshDays": config.full_refresh_days,
        "nextRunAt": next_run_at,
    }))
}

/// The one line the scheduler logs per tick: the daily route's HTTP status, the tick's status
/// (`idle`, `busy`, `started`, `running`, `finished`), and the job's id, state and progress when
/// there is one. Never the job record itself (its checkpoint can be kilobytes).
pub fn tick_line(http_status: u16, body: &[u8]) -> String {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let short: String = text.chars().take(120).collect();
            return format!("{http_status} (not JSON) {short}");
        }
    };
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    if let Some(e) = v.get("error") {
        return format!(
            "{http_status} error {}: {}",
            text(&e["code"]),
            text(&e["message"])
        );
    }
    let mut line = format!("{http_status} {}", text(&v["status"]));
    let job = &v["job"];
    if job.is_object() {
        line.push_str(&format!(
            " job {} {}",
            text(&job["id"]),
            text(&job["state"])
        ));
        let p = &job["progress"];
        let phase = text(&p["phase"]);
        if !phase.is_empty() {
            line.push_str(&format!(" {phase}"));
        }
        if let Some(done) = p["done"].as_u64() {
            match p["total"].as_u64() {
                Some(total) => line.push_str(&format!(" {done}/{total}")),
                None => line.push_str(&format!(" {done}")),
            }
        }
    }
    if let Some(next) = v["nextRunAt"].as_str() {
        line.push_str(&format!(" next {next}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 10, h, m, 0).unwrap()
    }

    fn at(s: &str) -> NaiveTime {
        parse_daily_at(s).unwrap()
    }

    #[test]
    fn scheduled_times() {
        assert_eq!(last_scheduled(t(3, 0), at("02:00")), t(2, 0));
        assert_eq!(last_scheduled(t(2, 0), at("02:00")), t(2, 0));
        assert_eq!(
            last_scheduled(t(1, 59), at("02:00")),
            t(2, 0) - Duration::days(1)
        );
        assert_eq!(next_scheduled(t(1, 59), at("02:00")), t(2, 0));
        assert_eq!(
            next_scheduled(t(2, 0), at("02:00")),
            t(2, 0) + Duration::days(1)
        );
        assert_eq!(
            last_scheduled(t(0, 5), at("23:30")),
            t(23, 30) - Duration::days(1)
        );
    }

    #[test]
    fn due_once_per_scheduled_time() {
        let a = at("02:00");
        assert!(is_due(None, t(1, 0), a), "never ran");
        let ran = |started: DateTime<Utc>| Last {
            job_id: "j".into(),
            started_at: started,
            finished_at: None,
            state: JobState::Succeeded,
        };
        // Ran at 02:05 today: not due again until 02:00 tomorrow.
        let l = ran(t(2, 5));
        assert!(!is_due(Some(&l), t(2, 10), a));
        assert!(!is_due(Some(&l), t(23, 59), a));
        assert!(is_due(Some(&l), t(2, 0) + Duration::days(1), a));
        // Ran yesterday at 02:05: due from 02:00 today, not at 01:59.
        let l = ran(t(2, 5) - Duration::days(1));
        assert!(!is_due(Some(&l), t(1, 59), a));
        assert!(is_due(Some(&l), t(2, 0), a));
        // Forced at 01:00 today: today's 02:00 run still happens.
        let l = ran(t(1, 0));
        assert!(is_due(Some(&l), t(2, 1), a));
    }

    #[test]
    fn config_from_variables() {
        let c = Config::from_vars(None, None).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.daily_at, at("02:00"));
        let c = Config::from_vars(Some("23:45"), Some("3")).unwrap();
        assert_eq!(c.daily_at, at("23:45"));
        assert_eq!(c.full_refresh_days, 3);
        for bad in ["24:00", "2", "02:60", "noon"] {
            assert!(Config::from_vars(Some(bad), None).is_err(), "{bad}");
        }
        assert!(Config::from_vars(None, Some("-1")).is_err());
        assert!(Config::from_vars(None, Some("x")).is_err());
        assert_eq!(
            Config::from_vars(Some(""), Some(" ")).unwrap(),
            Config::default()
        );
    }

    // ---- the state machine against a scripted Apple ----

    use crate::model::{Account, Lifecycle};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use vpp_apple::testing::{block_on, json as apple_json, FakeClock, ScriptedTransport};
    use vpp_apple::{AppleRequest, AppleResponse, Client, Target};
    use vpp_store::MemoryKv;

    /// Apple for every account; accounts named `slow*` answer 429 while `storm` > 0. Clones
    /// share the counters and the clock.
    #[derive(Clone)]
    struct TestGateway {
        storm: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
        clock: FakeClock,
    }

    impl Gateway for TestGateway {
        type T = ScriptedTransport;
        type C = FakeClock;
        async fn inspect(&self, _: &str, _: &str) -> Result<crate::account::Inspected, ApiError> {
            Err(ApiError::internal("not in this test"))
        }
        fn client(&self, account_id: &str) -> Client<ScriptedTransport, FakeClock> {
            let slow = account_id.starts_with("slow");
            let (storm, calls) = (self.storm.clone(), self.calls.clone());
            let t = ScriptedTransport::new(move |req: &AppleRequest, _| {
                calls.fetch_add(1, Ordering::SeqCst);
                if slow && storm.load(Ordering::SeqCst) > 0 {
                    storm.fetch_sub(1, Ordering::SeqCst);
                    let mut r = apple_json(
                        429,
                        json!({"errorNumber": 9646, "errorMessage": "slow down"}),
                    );
                    r.retry_after = Some("1".into());
                    return Ok::<AppleResponse, String>(r);
                }
                let Target::Api { path, .. } = &req.target else {
                    return Err("absolute".into());
                };
                let page = |field: &str, items: Value| json!({field: items, "currentPageIndex": 0, "totalPages": 1, "size": 1, "versionId": "v1"});
                Ok(match path.as_str() {
                    "client/config" => apple_json(200, json!({"locationName": "L", "uId": "u"})),
                    "assets" => apple_json(
                        200,
                        page(
                            "assets",
                            json!([{"adamId": "1", "pricingParam": "STDQ", "productType": "App",
                            "totalCount": 5, "availableCount": 4, "assignedCount": 1, "retiredCount": 0,
                            "deviceAssignable": true, "revocable": true, "supportedPlatforms": ["iOS"]}]),
                        ),
                    ),
                    "assignments" => apple_json(
                        200,
                        page(
                            "assignments",
                            json!([{"adamId": "1", "pricingParam": "STDQ", "serialNumber": "S1"}]),
                        ),
                    ),
                    "users" => apple_json(200, page("users", json!([]))),
                    p => apple_json(
                        404,
                        json!({"errorNumber": 9602, "errorMessage": format!("no {p}")}),
                    ),
                })
            });
            Client::new(t, self.clock.clone())
                .with_policy(vpp_apple::RetryPolicy::none())
                .with_pacer(vpp_apple::Pacer::unlimited())
        }
        async fn forget(&self, _: &str) -> Result<(), ApiError> {
            Ok(())
        }
    }

    struct NoWebhook;
    impl WebhookSender for NoWebhook {
        async fn post(&self, _: &str, _: &[(String, String)], _: &[u8]) -> Result<u16, String> {
            Ok(204)
        }
    }

    fn seed(kv: &MemoryKv, ids: &[&str]) {
        let list: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        set_json(kv, &keys::accounts(), &list).unwrap();
        for id in ids {
            let mut a: Account = serde_json::from_value(json!({
                "id": id, "name": id, "organization": "O", "location": null, "locationId": null,
                "country": null, "defaultPlatform": null, "websiteUrl": null,
                "tokenExpiresAt": "2030-01-01T00:00:00Z", "createdAt": "2025-01-01T00:00:00Z",
                "updatedAt": "2025-01-01T00:00:00Z"
            }))
            .unwrap();
            a.lifecycle = Lifecycle::Active;
            set_json(kv, &keys::account(id), &a).unwrap();
        }
    }

    struct Harness {
        kv: MemoryKv,
        gw: TestGateway,
        next: Cell<u32>,
    }

    impl Harness {
        fn new(ids: &[&str], storm: usize) -> Harness {
            let kv = MemoryKv::default();
            seed(&kv, ids);
            Harness {
                kv,
                gw: TestGateway {
                    storm: Arc::new(AtomicUsize::new(storm)),
                    calls: Arc::default(),
                    clock: FakeClock::at(t(3, 0)),
                },
                next: Cell::new(0),
            }
        }

        fn now(&self) -> DateTime<Utc> {
            vpp_apple::Clock::now(&self.gw.clock)
        }

        fn set_now(&self, at: DateTime<Utc>) {
            if let Ok(d) = (at - self.now()).to_std() {
                self.gw.clock.advance(d);
            }
        }

        fn tick(&self, force: bool, calls: u32) -> Tick {
            let clock = || self.now();
            let new_id = || {
                self.next.set(self.next.get() + 1);
                Ok(format!("id{}", self.next.get()))
            };
            let ctx = Ctx {
                kv: &self.kv,
                gw: &self.gw,
                sender: &NoWebhook,
                config: Config::default(),
                our_id: "us",
                requested_by: "scheduler",
                clock: &clock,
                new_id: &new_id,
            };
            let mut budget = Budget::new(self.now(), 20, calls);
            block_on(tick(&ctx, force, &mut budget)).unwrap()
        }

        /// Tick until the run ends; returns the finished job and the number of ticks.
        fn run_to_end(&self, calls: u32) -> (Job, u32) {
            for n in 1..200 {
                match self.tick(false, calls) {
                    Tick::Ran { job, .. } if !job.is_running() => return (*job, n),
                    Tick::Ran { .. } => {}
                    other => panic!("tick {n}: {other:?}"),
                }
                self.set_now(self.now() + Duration::seconds(5));
            }
            panic!("daily run did not end");
        }
    }

    fn outcomes(job: &Job) -> Vec<(String, String)> {
        job.result.as_ref().unwrap()["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["accountId"].as_str().unwrap().to_string(),
                    a["outcome"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn a_run_over_more_accounts_than_the_job_index_keeps_does_not_lose_itself() {
        // One child refresh job per account: more of them than the index keeps finished jobs.
        let ids: Vec<String> = (0..(job::KEPT_JOBS + 20))
            .map(|i| format!("acc{i}"))
            .collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let h = Harness::new(&refs, 0);
        let (job, ticks) = h.run_to_end(150);
        assert!(ticks > 1, "several slices");
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        let result = job.result.as_ref().unwrap();
        assert_eq!(result["refreshed"], ids.len(), "{result}");
        assert!(
            result["reconcile"]["jobId"].is_string(),
            "reconcile ran: {result}"
        );
        assert!(job::load(&h.kv, &job.id).unwrap().is_some());
    }

    #[test]
    fn runs_every_phase_then_is_idle_until_the_next_scheduled_time() {
        let h = Harness::new(&["a", "b"], 0);
        let (job, ticks) = h.run_to_end(1000);
        assert_eq!(ticks, 1);
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(
            outcomes(&job),
            vec![
                ("a".into(), "succeeded".into()),
                ("b".into(), "succeeded".into())
            ]
        );
        let r = job.result.clone().unwrap();
        assert_eq!(r["reconcile"]["state"], "succeeded");
        assert!(r["notices"].is_object());
        let acc: Account = get_json(&h.kv, &keys::account("a")).unwrap().unwrap();
        assert!(acc.last_full_refresh.is_some(), "first refresh is full");
        assert_eq!(last(&h.kv).unwrap().unwrap().state, JobState::Succeeded);
        assert!(!h.kv.exists(&keys::lease(LEASE_SCOPE)).unwrap());
        // Not due again today; due at tomorrow's 02:00, and then incremental.
        assert_eq!(
            h.tick(false, 1000),
            Tick::Idle {
                next_run_at: t(2, 0) + Duration::days(1)
            }
        );
        h.set_now(t(2, 0) + Duration::days(1));
        let (job2, _) = h.run_to_end(1000);
        assert_ne!(job2.id, job.id);
        let fulls: Vec<Value> = job2.result.unwrap()["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["full"].clone())
            .collect();
        assert_eq!(fulls, vec![json!(false), json!(false)]);
        // Forced: a run now.
        assert!(matches!(
            h.tick(true, 1000),
            Tick::Ran { started: true, .. }
        ));
    }

    #[test]
    fn small_slices_give_the_same_outcome() {
        let h = Harness::new(&["a", "b", "c"], 0);
        let (job, ticks) = h.run_to_end(1);
        assert!(ticks > 6, "{ticks}");
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(outcomes(&job).len(), 3);
        let refreshes = job::recent(&h.kv, 50)
            .unwrap()
            .into_iter()
            .filter(|j| j.kind == "refresh")
            .count();
        assert_eq!(
            refreshes, 3,
            "one refresh job per account, resumed across slices"
        );
    }

    #[test]
    fn a_second_invocation_is_busy_while_the_lease_is_held() {
        let h = Harness::new(&["a"], 0);
        assert!(job::acquire_lease(&h.kv, LEASE_SCOPE, "other", h.now()).unwrap());
        assert_eq!(h.tick(false, 1000), Tick::Busy);
        assert!(
            job::running(&h.kv, KIND, None).unwrap().is_none(),
            "nothing started"
        );
        // A crashed holder's lease expires.
        h.set_now(h.now() + Duration::seconds(job::LEASE_SECONDS + 1));
        assert!(matches!(h.tick(false, 1000), Tick::Ran { .. }));
    }

    #[test]
    fn a_rate_limited_account_goes_last_and_the_others_finish() {
        // `slow` gets 3 refusals: deferred behind `b`, then done in a later slice.
        let h = Harness::new(&["slow", "b"], 3);
        let (job, ticks) = h.run_to_end(1000);
        assert!(ticks >= 2, "{ticks}");
        assert_eq!(
            outcomes(&job),
            vec![
                ("b".into(), "succeeded".into()),
                ("slow".into(), "succeeded".into())
            ]
        );
        // A storm that outlasts the deferrals: recorded, the run still ends.
        let h = Harness::new(&["slow", "b"], 1000);
        let (job, _) = h.run_to_end(1000);
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(
            outcomes(&job),
            vec![
                ("b".into(), "succeeded".into()),
                ("slow".into(), "deferred".into())
            ]
        );
        assert!(
            job::running(&h.kv, "refresh", Some("slow"))
                .unwrap()
                .is_some(),
            "adopted by the next run"
        );
    }

    /// A full refresh of account `a` an admin started (job `manual`), not yet run.
    fn manual_refresh(h: &Harness) {
        let mut manual = Job::new("manual", "refresh", Some("a"), "admin", h.now());
        let acc: Account = get_json(&h.kv, &keys::account("a")).unwrap().unwrap();
        manual.checkpoint = serde_json::to_value(
            crate::refresh::initial_state(&h.kv, &acc, true, h.now()).unwrap(),
        )
        .unwrap();
        job::create(&h.kv, &manual).unwrap();
    }

    #[test]
    fn adopts_a_refresh_already_running() {
        let h = Harness::new(&["a"], 0);
        manual_refresh(&h);
        let (job, _) = h.run_to_end(1000);
        assert_eq!(job.result.unwrap()["accounts"][0]["jobId"], "manual");
        let refreshes = job::recent(&h.kv, 50)
            .unwrap()
            .into_iter()
            .filter(|j| j.kind == "refresh")
            .count();
        assert_eq!(refreshes, 1);
    }

    /// Two invocations resuming one job at once (two instances answering a resume, or a refresh
    /// request joining the running one): only one works on it, and the job's work is done once.
    /// They used to share the lease (its holder was the job id) and both ran the refresh from
    /// one checkpoint, one of them deleting the generation the other was writing.
    #[test]
    fn a_job_resumed_from_two_places_at_once_runs_in_one() {
        let calls_of = |second_enters: bool| {
            let h = Harness::new(&["a"], 0);
            manual_refresh(&h);
            // The second invocation comes in right after the first one's first swap (its lease).
            let second: Arc<std::sync::Mutex<Option<runner::Ran>>> = Arc::default();
            if second_enters {
                let (gw, out) = (h.gw.clone(), second.clone());
                h.kv.after_next_swap(move |kv| {
                    let now = vpp_apple::Clock::now(&gw.clock);
                    let mut budget = Budget::new(now, 20, 1000);
                    let ran =
                        block_on(runner::run(kv, &gw, "manual", "our", &mut budget, now)).unwrap();
                    *out.lock().unwrap() = Some(ran);
                });
            }
            let mut budget = Budget::new(h.now(), 20, 1000);
            let first = block_on(runner::run(
                &h.kv,
                &h.gw,
                "manual",
                "our",
                &mut budget,
                h.now(),
            ))
            .unwrap();
            assert!(first.worked && !first.job.is_running(), "{:?}", first.job);
            assert_eq!(first.job.state, job::JobState::Succeeded, "{:?}", first.job);
            if second_enters {
                let second = second
                    .lock()
                    .unwrap()
                    .take()
                    .expect("the second invocation ran");
                assert!(!second.worked, "the second invocation stays out");
            }
            // A call after the job ended does nothing more, and no lease is left behind.
            let calls = h.gw.calls.load(Ordering::SeqCst);
            let again = block_on(runner::run(
                &h.kv,
                &h.gw,
                "manual",
                "our",
                &mut budget,
                h.now(),
            ))
            .unwrap();
            assert!(!again.worked);
            assert_eq!(h.gw.calls.load(Ordering::SeqCst), calls);
            assert!(!h.kv.exists(&keys::lease("a")).unwrap());
            calls
        };
        assert_eq!(calls_of(true), calls_of(false), "Apple was read once");
    }

    #[test]
    fn full_refresh_by_calendar_days() {
        let mut a: Account = serde_json::from_value(json!({
            "id": "a", "name": "A", "organization": "O", "location": null, "locationId": null,
            "country": null, "defaultPlatform": null, "websiteUrl": null,
            "tokenExpiresAt": "2026-01-01T00:00:00Z", "createdAt": "2025-01-01T00:00:00Z",
            "updatedAt": "2025-01-01T00:00:00Z"
        }))
        .unwrap();
        assert!(wants_full(&a, t(2, 0), 7), "never fully refreshed");
        a.last_full_refresh = Some(t(2, 7) - Duration::days(7));
        assert!(
            wants_full(&a, t(2, 1), 7),
            "a few minutes short of 7 days still counts"
        );
        a.last_full_refresh = Some(t(2, 0) - Duration::days(6));
        assert!(!wants_full(&a, t(2, 0), 7));
        assert!(wants_full(&a, t(2, 0), 0), "0: every run is full");
    }
}

#[cfg(test)]
mod tick_line_tests {
    use super::tick_line;
    use serde_json::json;

    #[test]
    fn a_running_tick_is_one_short_line_without_the_checkpoint() {
        let checkpoint = "x".repeat(5000);
        let body = json!({"status": "running", "nextRunAt": "2026-12-01T02:00:00Z",
            "job": {"id": "j1", "state": "running", "progress": {"phase": "refresh", "done": 3, "total": 7},
                    "checkpoint": {"big": checkpoint}}});
        let line = tick_line(202, body.to_string().as_bytes());
        assert_eq!(
            line,
            "202 running job j1 running refresh 3/7 next 2026-12-01T02:00:00Z"
        );
    }

    #[test]
    fn idle_busy_errors_and_garbage_stay_short() {
        assert_eq!(
            tick_line(
                200,
                br#"{"status":"idle","nextRunAt":"2026-12-01T02:00:00Z"}"#
            ),
            "200 idle next 2026-12-01T02:00:00Z"
        );
        assert_eq!(
            tick_line(202, br#"{"status":"busy","message":"m"}"#),
            "202 busy"
        );
        assert_eq!(
            tick_line(
                401,
                br#"{"error":{"code":"unauthorized","message":"no key"}}"#
            ),
            "401 error unauthorized: no key"
        );
        let garbage = vec![b'<'; 4000];
        assert!(tick_line(502, &garbage).len() < 200);
    }
}
