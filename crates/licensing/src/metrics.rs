//! `GET /api/metrics`: what an operator alerts on, in Prometheus' text exposition format
//! (version 0.0.4).
//!
//! Reads a bounded number of keys: the account index; per account its record, its Apple state
//! and its pending-events index; what the licenses list reads (per account: record, copy index,
//! reservations, asset pages; the settings); the job index and the jobs it keeps (at most
//! [`crate::job::KEPT_JOBS`]); the notice outbox. Never a per-assignment key.

use crate::apple_state::{AppleState, Owner};
use crate::error::ApiError;
use crate::job::{self, JobState};
use crate::licenses::{self, Filter};
use crate::model::Account;
use crate::notice;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::fmt::Write;
use vpp_store::{get_json, keys, Kv};

/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family being written: `# HELP`, `# TYPE`, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
    }

    fn set(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample("", labels, value);
    }
}

struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &'static str, kind: &str, help: &str) -> Family<'_> {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        Family {
            out: &mut self.out,
            name,
        }
    }
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn bool01(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn owner_label(o: &Owner) -> &'static str {
    match o {
        Owner::Unknown => "unknown",
        Owner::Unclaimed => "unclaimed",
        Owner::Ours => "ours",
        Owner::Foreign { .. } => "another_mdm",
    }
}

struct AccountFacts {
    account: Account,
    apple: AppleState,
    pending_events: usize,
}

/// Jobs of one kind and outcome among the jobs kept.
#[derive(Default)]
struct JobFigures {
    count: u64,
    /// Seconds from creation to finish, finished jobs only.
    duration_sum: f64,
    duration_count: u64,
    duration_max: f64,
}

fn job_state(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    }
}

/// The whole exposition.
pub fn render(kv: &impl Kv, now: DateTime<Utc>) -> Result<String, ApiError> {
    let ids: Vec<String> = get_json(kv, &keys::accounts())?.unwrap_or_default();
    let mut accounts = Vec::with_capacity(ids.len());
    for id in &ids {
        let Some(account) = get_json::<Account>(kv, &keys::account(id))? else {
            continue;
        };
        let apple: AppleState = get_json(kv, &keys::apple_state(id))?.unwrap_or_default();
        let pending: Vec<String> = get_json(kv, &keys::account_events(id))?.unwrap_or_default();
        accounts.push(AccountFacts {
            account,
            apple,
            pending_events: pending.len(),
        });
    }
    let rows = licenses::list(kv, &Filter::default())?;
    let jobs = job::recent(kv, job::KEPT_JOBS)?;
    let notices = notice::list(kv, None)?;

    let mut x = Exposition { out: String::new() };

    let mut f = x.family("vpp_accounts", "gauge", "App Store License accounts.");
    f.set(&[], accounts.len() as f64);

    let mut f = x.family(
        "vpp_account_info",
        "gauge",
        "An account's names (always 1); join on account_id.",
    );
    for a in &accounts {
        let acc = &a.account;
        f.set(
            &[
                ("account_id", &acc.id),
                ("name", &acc.name),
                ("organization", &acc.organization),
                ("location", acc.location.as_deref().unwrap_or("")),
            ],
            1.0,
        );
    }

    let mut f = x.family(
        "vpp_account_seconds_since_last_sync",
        "gauge",
        "Seconds since the account's last successful synchronization with Apple (absent: never synchronized).",
    );
    for a in &accounts {
        if let Some(t) = a.account.last_synchronized {
            let secs = (now - t).num_milliseconds() as f64 / 1000.0;
            f.set(&[("account_id", &a.account.id)], secs.max(0.0));
        }
    }

    let mut f = x.family(
        "vpp_account_token_expiry_days",
        "gauge",
        "Days until the account's server token expires (negative: expired).",
    );
    for a in &accounts {
        let expires = a
            .apple
            .token_expires_at
            .unwrap_or(a.account.token_expires_at);
        let days = (expires - now).num_seconds() as f64 / 86_400.0;
        f.set(
            &[("account_id", &a.account.id)],
            (days * 1000.0).round() / 1000.0,
        );
    }

    let mut f = x.family(
        "vpp_account_owned",
        "gauge",
        "1 when this instance owns the account's location at Apple; owner says who does (ours, another_mdm, unclaimed, unknown).",
    );
    for a in &accounts {
        let owner = owner_label(&a.apple.owner);
        f.set(
            &[("account_id", &a.account.id), ("owner", owner)],
            bool01(a.apple.owner == Owner::Ours),
        );
    }

    let mut f = x.family(
        "vpp_account_last_apple_error_number",
        "gauge",
        "Apple's errorNumber of the account's last failed call (0: the last call succeeded or Apple gave no number); code is our error code.",
    );
    for a in &accounts {
        let (code, n) = match &a.apple.last_error {
            Some(e) => (e.code.as_str(), e.number.unwrap_or(0)),
            None => ("", 0),
        };
        f.set(&[("account_id", &a.account.id), ("code", code)], n as f64);
    }

    let mut f = x.family(
        "vpp_account_pending_events",
        "gauge",
        "Apple events of the account still pending (assignments and revocations not confirmed yet).",
    );
    for a in &accounts {
        f.set(&[("account_id", &a.account.id)], a.pending_events as f64);
    }

    let mut f = x.family(
        "vpp_apple_calls_total",
        "counter",
        "HTTP requests to Apple (retries included) per account and endpoint since the account was added.",
    );
    for a in &accounts {
        for (endpoint, c) in &a.apple.calls {
            f.set(
                &[("account_id", &a.account.id), ("endpoint", endpoint)],
                c.calls as f64,
            );
        }
    }

    let mut f = x.family(
        "vpp_apple_errors_total",
        "counter",
        "Calls to Apple that failed after their retries, per account, endpoint and error_number (Apple's errorNumber, or our code when Apple gave none).",
    );
    for a in &accounts {
        for (endpoint, c) in &a.apple.calls {
            for (error, n) in &c.errors {
                f.set(
                    &[
                        ("account_id", &a.account.id),
                        ("endpoint", endpoint),
                        ("error_number", error),
                    ],
                    *n as f64,
                );
            }
        }
    }

    let mut f = x.family(
        "vpp_asset_licenses",
        "gauge",
        "Licenses of an asset by state: total, in_use, available, pending (held by our unconfirmed assignments), retired.",
    );
    for r in &rows {
        for (state, v) in [
            ("total", r.total),
            ("in_use", r.in_use),
            ("available", r.available),
            ("pending", r.pending),
            ("retired", r.retired),
        ] {
            f.set(
                &[
                    ("account_id", &r.account_id),
                    ("adam_id", &r.adam_id),
                    ("pricing_param", &r.pricing_param),
                    ("state", state),
                ],
                v as f64,
            );
        }
    }

    let mut f = x.family(
        "vpp_asset_low_licenses",
        "gauge",
        "1 when an asset's available licenses (less pending ones) are at or below the low-license threshold.",
    );
    for r in &rows {
        f.set(
            &[
                ("account_id", &r.account_id),
                ("adam_id", &r.adam_id),
                ("pricing_param", &r.pricing_param),
                ("name", r.name.as_deref().unwrap_or("")),
            ],
            bool01(r.low_licenses),
        );
    }

    let mut figures: BTreeMap<(String, &'static str), JobFigures> = BTreeMap::new();
    for j in &jobs {
        let fig = figures
            .entry((j.kind.clone(), job_state(j.state)))
            .or_default();
        fig.count += 1;
        if let Some(done) = j.finished_at {
            let secs = ((done - j.created_at).num_milliseconds() as f64 / 1000.0).max(0.0);
            fig.duration_sum += secs;
            fig.duration_count += 1;
            fig.duration_max = fig.duration_max.max(secs);
        }
    }
    let mut f = x.family(
        "vpp_jobs",
        "gauge",
        "Jobs kept in the job index by kind and state (running, succeeded, failed).",
    );
    for ((kind, state), fig) in &figures {
        f.set(&[("kind", kind), ("state", state)], fig.count as f64);
    }
    let mut f = x.family(
        "vpp_job_duration_seconds",
        "summary",
        "Creation-to-finish time of the finished jobs kept in the job index, by kind and outcome.",
    );
    for ((kind, state), fig) in figures.iter().filter(|(_, g)| g.duration_count > 0) {
        let labels = [("kind", kind.as_str()), ("outcome", *state)];
        f.sample("_sum", &labels, fig.duration_sum);
        f.sample("_count", &labels, fig.duration_count as f64);
    }
    let mut f = x.family(
        "vpp_job_duration_seconds_max",
        "gauge",
        "Longest creation-to-finish time among the finished jobs kept, by kind and outcome.",
    );
    for ((kind, state), fig) in figures.iter().filter(|(_, g)| g.duration_count > 0) {
        f.set(&[("kind", kind), ("outcome", state)], fig.duration_max);
    }

    let total_pending: usize = accounts.iter().map(|a| a.pending_events).sum();
    let mut f = x.family(
        "vpp_pending_events",
        "gauge",
        "Apple events still pending, all accounts.",
    );
    f.set(&[], total_pending as f64);

    let mut f = x.family(
        "vpp_notices_undelivered",
        "gauge",
        "License-removal notices not yet delivered to the webhook.",
    );
    f.set(&[], notices.undelivered as f64);

    Ok(x.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_numbers_are_plain() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(-2.5), "-2.5");
        assert_eq!(number(f64::INFINITY), "+Inf");
    }

    #[test]
    fn an_empty_store_still_gives_every_family() {
        let kv = vpp_store::MemoryKv::default();
        let text = render(&kv, Utc::now()).unwrap();
        for name in [
            "vpp_accounts 0",
            "# TYPE vpp_asset_licenses gauge",
            "# TYPE vpp_apple_calls_total counter",
            "# TYPE vpp_job_duration_seconds summary",
            "vpp_pending_events 0",
            "vpp_notices_undelivered 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(text.ends_with('\n'));
    }

    /// Counts reads, and fails on any write: the metrics route only reads.
    struct Counting {
        inner: vpp_store::MemoryKv,
        reads: std::cell::Cell<usize>,
    }

    impl Kv for Counting {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, vpp_store::KvError> {
            self.reads.set(self.reads.get() + 1);
            self.inner.get(key)
        }
        fn set(&self, key: &str, _: &[u8]) -> Result<(), vpp_store::KvError> {
            panic!("metrics wrote {key}")
        }
        fn delete(&self, key: &str) -> Result<(), vpp_store::KvError> {
            panic!("metrics deleted {key}")
        }
        fn swap(&self, key: &str, _: Option<&[u8]>, _: &[u8]) -> Result<bool, vpp_store::KvError> {
            panic!("metrics swapped {key}")
        }
    }

    fn put(kv: &vpp_store::MemoryKv, key: String, v: serde_json::Value) {
        kv.set(&key, v.to_string().as_bytes()).unwrap();
    }

    /// `accounts` accounts of `assets` assets each, with Apple state and a finished job each.
    fn store(accounts: usize, assets: usize) -> vpp_store::MemoryKv {
        use serde_json::json;
        let kv = vpp_store::MemoryKv::default();
        let ids: Vec<String> = (0..accounts).map(|i| format!("{i:032x}")).collect();
        put(&kv, keys::accounts(), json!(ids));
        let mut index = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            put(
                &kv,
                keys::account(id),
                json!({
                "id": id, "name": format!("A{i}"), "organization": "Org", "location": "Loc",
                "locationId": null, "country": null, "defaultPlatform": null, "websiteUrl": null,
                "tokenExpiresAt": "2030-01-01T00:00:00Z", "createdAt": "2026-01-01T00:00:00Z",
                "updatedAt": "2026-01-01T00:00:00Z", "lastSynchronized": "2026-11-30T11:00:00Z"}),
            );
            put(
                &kv,
                keys::apple_state(id),
                json!({
                "owner": {"kind": "ours"},
                "lastError": {"code": "apple_rejected", "message": "m", "number": 9632, "at": "2026-11-30T11:00:00Z"},
                "calls": {"assets": {"calls": 7, "errors": {"9632": 2}}}}),
            );
            put(&kv, keys::account_events(id), json!(["e1", "e2"]));
            let list: Vec<_> = (0..assets).map(|a| json!({
                "adamId": format!("{}", 1000 + a), "pricingParam": "STDQ", "productType": "App",
                "name": format!("App \"{a}\""), "total": 10, "available": 4, "inUse": 6, "retired": 0})).collect();
            let records: Vec<crate::model::AssetRecord> =
                serde_json::from_value(json!(list)).unwrap();
            crate::copy::write_generation(&kv, id, 1, None, records).unwrap();
            let job = format!("{:032x}", 1000 + i);
            put(
                &kv,
                keys::job(&job),
                json!({
                "id": job, "kind": "refresh", "accountId": id, "state": "succeeded", "requestedBy": "admin",
                "createdAt": "2026-11-30T11:00:00Z", "updatedAt": "2026-11-30T11:00:30Z",
                "finishedAt": "2026-11-30T11:00:30Z", "progress": {"phase": "done", "done": 1}, "slices": 1}),
            );
            index.push(json!({"id": job, "kind": "refresh", "createdAt": "2026-11-30T11:00:00Z"}));
        }
        put(&kv, keys::jobs(), json!(index));
        kv
    }

    #[test]
    fn figures_come_from_the_stored_records() {
        let now: DateTime<Utc> = "2026-11-30T12:00:00Z".parse().unwrap();
        let text = render(&store(2, 3), now).unwrap();
        let id = format!("{:032x}", 0);
        for line in [
            "vpp_accounts 2".to_string(),
            format!("vpp_account_seconds_since_last_sync{{account_id=\"{id}\"}} 3600"),
            format!("vpp_account_owned{{account_id=\"{id}\",owner=\"ours\"}} 1"),
            format!("vpp_account_last_apple_error_number{{account_id=\"{id}\",code=\"apple_rejected\"}} 9632"),
            format!("vpp_account_pending_events{{account_id=\"{id}\"}} 2"),
            format!("vpp_apple_calls_total{{account_id=\"{id}\",endpoint=\"assets\"}} 7"),
            format!("vpp_apple_errors_total{{account_id=\"{id}\",endpoint=\"assets\",error_number=\"9632\"}} 2"),
            format!("vpp_asset_licenses{{account_id=\"{id}\",adam_id=\"1000\",pricing_param=\"STDQ\",state=\"in_use\"}} 6"),
            format!("vpp_asset_low_licenses{{account_id=\"{id}\",adam_id=\"1000\",pricing_param=\"STDQ\",name=\"App \\\"0\\\"\"}} 1"),
            "vpp_jobs{kind=\"refresh\",state=\"succeeded\"} 2".to_string(),
            "vpp_job_duration_seconds_sum{kind=\"refresh\",outcome=\"succeeded\"} 60".to_string(),
            "vpp_job_duration_seconds_count{kind=\"refresh\",outcome=\"succeeded\"} 2".to_string(),
            "vpp_pending_events 4".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn reads_grow_with_accounts_and_kept_jobs_never_with_assets() {
        let now = Utc::now();
        let reads = |accounts: usize, assets: usize| {
            let kv = Counting {
                inner: store(accounts, assets),
                reads: Default::default(),
            };
            render(&kv, now).unwrap();
            kv.reads.get()
        };
        assert_eq!(reads(3, 1), reads(3, keys::ASSET_PAGE_ENTRIES));
        let per_account = reads(4, 1) - reads(3, 1);
        // record, Apple state, pending events, and the licenses list's record, copy index,
        // reservations (the open-assets list; no asset has open entries here) and one asset
        // page (`keys::ASSET_PAGE_ENTRIES` assets fit on one); plus the account's one job.
        assert!(per_account <= 8, "{per_account} reads per account");
        assert!(
            reads(0, 0) <= 8,
            "{} reads with nothing stored",
            reads(0, 0)
        );
    }
}
