//! License-removal notices: when the setting is on, every license taken from a device or user
//! (reconcile, clean up, the API, or found gone at refresh) becomes a notice. Notices are listed
//! by the API and POSTed to the configured webhook, signed, retried with backoff.
//!
//! Layout: pages of [`keys::NOTICE_PAGE`] notices (`notices/{page}`) with a head (`notices`), a
//! ring of [`keys::NOTICE_PAGES_KEPT`] pages; and an outbox (`notices/outbox`) of fixed size: the
//! position of the first notice not yet delivered (notices are appended in order and delivered
//! in order), the backoff, and what left the ring undelivered. Storage stays bounded whether or
//! not a webhook is set or answering: when a page leaves the ring while it still holds
//! undelivered notices, they are counted in the outbox as dropped with the reason (no webhook,
//! or the webhook's last error), shown by `GET /api/notices`.
//!
//! Delivery: `POST {noticeWebhookUrl}` with body `{"notices": [Notice, ...]}` (at most
//! [`DELIVERY_BATCH`]) and the header `X-VPP-Signature: t=<unix seconds>,v1=<hex>` where `v1` is
//! HMAC-SHA256(noticeWebhookSecret, "<t>.<body>"). Any 2xx counts as delivered. Receivers
//! deduplicate on `id` (a delivery can repeat if the answer is lost).

use crate::model::Subject;
use crate::settings;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use vpp_store::{get_json, keys, update, Kv, StoreError};

/// Notice pages kept: the ring's size is written in the layout (`keys::NOTICE_PAGES_KEPT`).
pub const RETAINED_PAGES: u64 = keys::NOTICE_PAGES_KEPT;
/// Notices per webhook POST.
pub const DELIVERY_BATCH: usize = 100;
/// First retry delay; doubles per failed attempt up to [`MAX_BACKOFF_SECS`].
pub const BASE_BACKOFF_SECS: i64 = 30;
pub const MAX_BACKOFF_SECS: i64 = 3600;
pub const SIGNATURE_HEADER: &str = "x-vpp-signature";
/// Rounds of [`record_removals`] in a row that may make no progress (other writers filled every
/// page we tried) before it reports contention. Rounds that store notices never count.
const MAX_IDLE_ROUNDS: usize = vpp_store::MAX_SWAP_ATTEMPTS * 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    /// `{page}-{position}`: unique and stable.
    pub id: String,
    pub account_id: String,
    pub adam_id: String,
    pub pricing_param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_id: Option<String>,
    /// `reconcile`, `cleanup`, `api`, `refresh`, `apple`...
    pub reason: String,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// The event of ours whose outcome took the license away, when one did: one notice per
    /// (event, asset, subject), also when the outcome is read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Head {
    page: u64,
}

/// A notice's place: page and index in the page (its id is `{page}-{index}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Position {
    page: u64,
    index: usize,
}

/// A reference to an undelivered notice, as the outbox kept them before the cursor (read once
/// to find where delivery stands, never written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NoticeRef {
    page: u64,
    id: String,
}

/// Notices that left the ring before they were delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DroppedNotices {
    pub at: DateTime<Utc>,
    pub count: u64,
    /// Why they were not delivered in time.
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Outbox {
    /// The first notice not yet delivered: everything before it was delivered or dropped.
    #[serde(default)]
    next: Option<Position>,
    /// The former layout's list of undelivered notices; only read (see [`cursor`]).
    #[serde(default, skip_serializing)]
    pending: Vec<NoticeRef>,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    last_delivered_at: Option<DateTime<Utc>>,
    /// Undelivered notices that left the ring, in total.
    #[serde(default)]
    dropped: u64,
    #[serde(default)]
    last_drop: Option<DroppedNotices>,
}

fn position_of(id: &str) -> Option<Position> {
    let (page, index) = id.split_once('-')?;
    Some(Position {
        page: page.parse().ok()?,
        index: index.parse().ok()?,
    })
}

/// Where delivery stands. An outbox written before the cursor existed has `pending` references
/// (delivery stands at the oldest) or none (everything stored was delivered: the end).
fn cursor(kv: &impl Kv, outbox: Option<&Outbox>) -> Result<Position, StoreError> {
    let Some(o) = outbox else {
        return Ok(Position::default());
    };
    if let Some(p) = o.next {
        return Ok(p);
    }
    if let Some(p) = o.pending.iter().filter_map(|r| position_of(&r.id)).min() {
        return Ok(p);
    }
    let head: Head = get_json(kv, &keys::notices_head())?.unwrap_or_default();
    let len = page_len(kv, head.page)?;
    Ok(Position {
        page: head.page,
        index: len,
    })
}

fn page_len(kv: &impl Kv, page: u64) -> Result<usize, StoreError> {
    Ok(get_json::<Vec<Notice>>(kv, &keys::notices_page(page))?
        .map(|l| l.len())
        .unwrap_or(0))
}

/// Notices from `from` to the end (pages below the head are full).
fn undelivered(from: Position, head: u64, head_len: usize) -> u64 {
    if from.page > head {
        return 0;
    }
    let pages = (head - from.page) * keys::NOTICE_PAGE as u64;
    (pages + head_len as u64).saturating_sub(from.index as u64)
}

fn subject_fields(s: &Subject) -> (Option<String>, Option<String>) {
    match s {
        Subject::SerialNumber(x) => (Some(x.clone()), None),
        Subject::ClientUserId(x) => (None, Some(x.clone())),
    }
}

/// Record a notice for every (asset key `adamId:pricingParam`, subject) taken away. Does nothing
/// when the setting is off. Safe with concurrent writers; any number of removals at once (each
/// round stores a page's worth; only rounds that store nothing count towards contention).
pub fn record_removals(
    kv: &impl Kv,
    account_id: &str,
    removed: &[(String, Subject)],
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    record_keeping(kv, account_id, removed, reason, None, now, RETAINED_PAGES)
}

/// Record the notices an event's outcome owes, exactly once per (event, asset, subject): those
/// already recorded for `event_id` (an outcome read again after an invocation was killed
/// between its writes) are not recorded again.
pub fn record_event_removals(
    kv: &impl Kv,
    account_id: &str,
    removed: &[(String, Subject)],
    reason: &str,
    event: (&str, DateTime<Utc>),
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    record_keeping(
        kv,
        account_id,
        removed,
        reason,
        Some(event),
        now,
        RETAINED_PAGES,
    )
}

/// Clocks of several instances may differ this much: a notice's `at` is its writer's time.
const CLOCK_SKEW_SECS: i64 = 300;
/// How late a report of a removal may come and still be matched with its notice (a late
/// notification, or an event polled again): an event is followed for a day at most
/// (`event::GIVE_UP_AFTER_SECS`).
pub const RECENT_SECS: i64 = 86_400;

/// The notice pages that may hold notices recorded at or after `since`, newest first: the
/// head page, the one before it, and further back while a page's newest notice is not older
/// than `since` (pages fill in order: an older page holds nothing newer). Bounded by the ring:
/// a page that left it is gone (more than [`RETAINED_PAGES`] pages of notices since `since`).
///
/// This is what makes "was it noticed already?" sound: a window of a fixed number of pages
/// (it was the newest two) misses a notice when more than a page or two of others were
/// recorded after it (a bulk revoke of thousands), and the removal then gets a second notice.
fn pages_since(kv: &impl Kv, since: DateTime<Utc>) -> Result<Vec<Vec<Notice>>, StoreError> {
    let since = since - Duration::seconds(CLOCK_SKEW_SECS);
    let head: Head = get_json(kv, &keys::notices_head())?.unwrap_or_default();
    let mut out = Vec::new();
    let mut page = head.page;
    loop {
        let list: Option<Vec<Notice>> = get_json(kv, &keys::notices_page(page))?;
        let Some(list) = list.or_else(|| (page == head.page).then(Vec::new)) else {
            break; // left the ring
        };
        let newest = list.iter().map(|n| n.at).max();
        if out.len() >= 2 && newest.is_none_or(|t| t < since) {
            break;
        }
        out.push(list);
        if page == 0 || out.len() as u64 > RETAINED_PAGES {
            break;
        }
        page -= 1;
    }
    Ok(out)
}

/// Notices already recorded for the event `event_id` Apple accepted at `asked_at`, as (asset
/// key, subject tag): every page written since it was accepted ([`pages_since`]).
fn recorded_for(
    kv: &impl Kv,
    event_id: &str,
    asked_at: DateTime<Utc>,
) -> Result<BTreeSet<(String, String)>, StoreError> {
    let mut out = BTreeSet::new();
    for list in pages_since(kv, asked_at)? {
        for n in list
            .iter()
            .filter(|n| n.event_id.as_deref() == Some(event_id))
        {
            let subject = match (&n.serial_number, &n.client_user_id) {
                (Some(s), _) => Subject::SerialNumber(s.clone()),
                (None, Some(u)) => Subject::ClientUserId(u.clone()),
                (None, None) => continue,
            };
            out.insert((format!("{}:{}", n.adam_id, n.pricing_param), subject.tag()));
        }
    }
    Ok(out)
}

/// Of `subjects`, those (by tag) with a removal notice for `asset_key` of `account_id` recorded
/// in the last [`RECENT_SECS`] before `now` ([`pages_since`]): a removal of theirs was
/// reported lately.
pub fn noticed_recently(
    kv: &impl Kv,
    account_id: &str,
    asset_key: &str,
    subjects: &[Subject],
    now: DateTime<Utc>,
) -> Result<BTreeSet<String>, StoreError> {
    noticed_in_recent_pages(kv, account_id, asset_key, subjects, false, now)
}

/// [`noticed_recently`], counting only notices an event of ours gave (the outcome of a
/// removal we asked for, keyed by its event).
pub fn noticed_by_ours_recently(
    kv: &impl Kv,
    account_id: &str,
    asset_key: &str,
    subjects: &[Subject],
    now: DateTime<Utc>,
) -> Result<BTreeSet<String>, StoreError> {
    noticed_in_recent_pages(kv, account_id, asset_key, subjects, true, now)
}

/// Of `pairs` (asset key, subject), the events of ours (other than `except`) whose notice for
/// the pair was recorded at or after `since` in `account_id`, as pair → event ids.
pub fn noticed_by_events_since(
    kv: &impl Kv,
    account_id: &str,
    pairs: &[(String, Subject)],
    except: &str,
    since: DateTime<Utc>,
) -> Result<BTreeMap<(String, Subject), Vec<String>>, StoreError> {
    let mut out: BTreeMap<(String, Subject), Vec<String>> = BTreeMap::new();
    if pairs.is_empty() {
        return Ok(out);
    }
    for list in pages_since(kv, since)? {
        for n in list
            .iter()
            .filter(|n| n.account_id == account_id && n.at >= since)
        {
            let Some(e) = n.event_id.as_deref().filter(|e| *e != except) else {
                continue;
            };
            for (ak, s) in pairs {
                let (adam_id, pricing) = ak.split_once(':').unwrap_or((ak, "STDQ"));
                let (serial, user) = subject_fields(s);
                if n.adam_id == adam_id
                    && n.pricing_param == pricing
                    && n.serial_number == serial
                    && n.client_user_id == user
                {
                    out.entry((ak.clone(), s.clone()))
                        .or_default()
                        .push(e.to_string());
                }
            }
        }
    }
    Ok(out)
}

fn noticed_in_recent_pages(
    kv: &impl Kv,
    account_id: &str,
    asset_key: &str,
    subjects: &[Subject],
    by_ours: bool,
    now: DateTime<Utc>,
) -> Result<BTreeSet<String>, StoreError> {
    let mut out = BTreeSet::new();
    if subjects.is_empty() {
        return Ok(out);
    }
    let (adam_id, pricing) = asset_key.split_once(':').unwrap_or((asset_key, "STDQ"));
    let since = now - Duration::seconds(RECENT_SECS);
    for list in pages_since(kv, since)? {
        for n in list.iter().filter(|n| {
            n.account_id == account_id
                && n.adam_id == adam_id
                && n.pricing_param == pricing
                && (!by_ours || n.event_id.is_some())
        }) {
            for s in subjects {
                let (serial, user) = subject_fields(s);
                if (serial.is_some() && n.serial_number == serial)
                    || (user.is_some() && n.client_user_id == user)
                {
                    out.insert(s.tag());
                }
            }
        }
    }
    Ok(out)
}

fn record_keeping(
    kv: &impl Kv,
    account_id: &str,
    removed: &[(String, Subject)],
    reason: &str,
    event: Option<(&str, DateTime<Utc>)>,
    now: DateTime<Utc>,
    retained: u64,
) -> Result<(), StoreError> {
    let event_id = event.map(|(id, _)| id);
    if removed.is_empty() || !settings::load(kv)?.license_removal_notification {
        return Ok(());
    }
    let fresh: Vec<(String, Subject)>;
    let mut rest: &[(String, Subject)] = removed;
    if let Some((id, asked_at)) = event {
        let done = recorded_for(kv, id, asked_at)?;
        let mut seen = BTreeSet::new();
        fresh = removed
            .iter()
            .filter(|(a, s)| {
                let k = (a.clone(), s.tag());
                !done.contains(&k) && seen.insert(k)
            })
            .cloned()
            .collect();
        rest = &fresh;
    }
    let mut idle_rounds = 0;
    while !rest.is_empty() {
        let head: Head = get_json(kv, &keys::notices_head())?.unwrap_or_default();
        let page = head.page;
        let taken = update::<Vec<Notice>, usize>(kv, &keys::notices_page(page), |cur| {
            let mut list = cur.unwrap_or_default();
            let room = keys::NOTICE_PAGE.saturating_sub(list.len());
            if room == 0 {
                return Ok((None, 0));
            }
            let n = room.min(rest.len());
            for (asset, subject) in &rest[..n] {
                let (adam_id, pricing) = asset.split_once(':').unwrap_or((asset, "STDQ"));
                let (serial_number, client_user_id) = subject_fields(subject);
                list.push(Notice {
                    id: format!("{page}-{}", list.len()),
                    account_id: account_id.to_string(),
                    adam_id: adam_id.to_string(),
                    pricing_param: pricing.to_string(),
                    serial_number,
                    client_user_id,
                    reason: reason.to_string(),
                    at: now,
                    delivered_at: None,
                    event_id: event_id.map(str::to_string),
                });
            }
            Ok((Some(list), n))
        })?;
        if taken > 0 {
            rest = &rest[taken..];
            idle_rounds = 0;
            continue;
        }
        // The page is full: move the head on (once, whoever wins); the page that falls out of
        // the ring goes.
        let moved = update::<Head, bool>(kv, &keys::notices_head(), |h| {
            let h = h.unwrap_or_default();
            if h.page != page {
                return Ok((None, false));
            }
            Ok((Some(Head { page: page + 1 }), true))
        })?;
        if moved {
            idle_rounds = 0;
            retire_pages(kv, page + 1, retained, now)?;
        } else {
            idle_rounds += 1;
            if idle_rounds > MAX_IDLE_ROUNDS {
                return Err(StoreError::Contended {
                    key: keys::notices_head(),
                });
            }
        }
    }
    Ok(())
}

/// The head moved to `head`: the page that fell out of the ring (and any older one a crash left
/// behind) is deleted. Undelivered notices on it are counted as dropped, with why, first.
fn retire_pages(
    kv: &impl Kv,
    head: u64,
    retained: u64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if head < retained {
        return Ok(());
    }
    let old = head - retained;
    let first_kept = Position {
        page: old + 1,
        index: 0,
    };
    let raw: Option<Outbox> = get_json(kv, &keys::notices_outbox())?;
    let at = cursor(kv, raw.as_ref())?;
    if at < first_kept {
        let cfg = settings::load(kv)?;
        update::<Outbox, ()>(kv, &keys::notices_outbox(), |cur| {
            let from = cursor(kv, cur.as_ref())?;
            let mut o = cur.unwrap_or_default();
            if from >= first_kept {
                return Ok((None, ()));
            }
            let count = undelivered(from, old, keys::NOTICE_PAGE);
            let reason = match (&cfg.notice_webhook_url, &o.last_error) {
                (None, _) => "no notice webhook is configured".to_string(),
                (Some(_), Some(e)) => format!("the webhook did not take them in time: {e}"),
                (Some(_), None) => "the webhook was not reached in time".to_string(),
            };
            o.next = Some(first_kept);
            o.dropped = o.dropped.saturating_add(count);
            o.last_drop = Some(DroppedNotices {
                at: now,
                count,
                reason,
            });
            Ok((Some(o), ()))
        })?;
    }
    kv.delete(&keys::notices_page(old))?;
    let mut older = old;
    while older > 0 && kv.exists(&keys::notices_page(older - 1))? {
        older -= 1;
        kv.delete(&keys::notices_page(older))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NoticePage {
    pub notices: Vec<Notice>,
    /// Pass as `?page=` for older notices; absent on the oldest page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page: Option<u64>,
    /// Notices not yet delivered to the webhook, in all pages.
    pub undelivered: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_delivery_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_delivery_at: Option<DateTime<Utc>>,
    /// Undelivered notices that left the kept pages (the ring) before delivery, in total.
    pub dropped: u64,
    /// The newest such loss: when, how many, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_drop: Option<DroppedNotices>,
}

/// One page of notices, newest first (`page` defaults to the newest).
pub fn list(kv: &impl Kv, page: Option<u64>) -> Result<NoticePage, crate::ApiError> {
    let head: Head = get_json(kv, &keys::notices_head())?.unwrap_or_default();
    let page = page.unwrap_or(head.page);
    if page > head.page {
        return Err(crate::ApiError::not_found(format!("notice page {page}"))
            .with_details(serde_json::json!({"field": "page"})));
    }
    let mut notices: Vec<Notice> = get_json(kv, &keys::notices_page(page))?.unwrap_or_default();
    let head_len = if page == head.page {
        notices.len()
    } else {
        page_len(kv, head.page)?
    };
    notices.reverse();
    let outbox: Option<Outbox> = get_json(kv, &keys::notices_outbox())?;
    let from = cursor(kv, outbox.as_ref())?;
    let outbox = outbox.unwrap_or_default();
    let next_page = (page > 0 && kv.exists(&keys::notices_page(page - 1))?).then(|| page - 1);
    Ok(NoticePage {
        notices,
        next_page,
        undelivered: undelivered(from, head.page, head_len),
        last_delivery_error: outbox.last_error,
        next_delivery_at: outbox.next_attempt_at,
        dropped: outbox.dropped,
        last_drop: outbox.last_drop,
    })
}

/// Sends one webhook POST; `Ok(status)` for any HTTP answer, `Err` when none came back.
pub trait WebhookSender {
    fn post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> impl Future<Output = Result<u16, String>>;

    /// What the operator allows beyond public `https://` hosts; the stored URL is checked again
    /// against it before every delivery (the rules may have tightened since it was stored).
    fn rules(&self) -> settings::WebhookRules {
        settings::WebhookRules::default()
    }
}

/// The signature header value for `body` sent at `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable_hmac());
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

// HMAC accepts keys of any length; this is never reached.
fn unreachable_hmac() -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(b"k").unwrap_or_else(|_| unreachable_hmac())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryReport {
    pub delivered: usize,
    pub remaining: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Nothing was tried: no webhook, nothing pending, or backing off.
    pub skipped: bool,
}

fn backoff(attempts: u32) -> Duration {
    let secs = BASE_BACKOFF_SECS.saturating_mul(1i64 << attempts.saturating_sub(1).min(20));
    Duration::seconds(secs.min(MAX_BACKOFF_SECS))
}

/// The next undelivered notices from `from` (at most [`DELIVERY_BATCH`]) and the position after
/// the last one looked at. Notices already marked delivered are passed over; pages that left the
/// ring are skipped.
fn next_batch(
    kv: &impl Kv,
    from: Position,
    head: &Head,
) -> Result<(Vec<Notice>, Position), StoreError> {
    let mut at = from;
    let mut batch = Vec::new();
    while batch.len() < DELIVERY_BATCH && at.page <= head.page {
        let list: Vec<Notice> = get_json(kv, &keys::notices_page(at.page))?.unwrap_or_default();
        while batch.len() < DELIVERY_BATCH && at.index < list.len() {
            let n = &list[at.index];
            if n.delivered_at.is_none() {
                batch.push(n.clone());
            }
            at.index += 1;
        }
        if at.index < list.len() || at.page == head.page {
            break;
        }
        at = Position {
            page: at.page + 1,
            index: 0,
        };
    }
    Ok((batch, at))
}

/// Where delivery stands now, the head, and how many notices are left.
fn standing(kv: &impl Kv) -> Result<(Outbox, Position, Head, u64), StoreError> {
    let raw: Option<Outbox> = get_json(kv, &keys::notices_outbox())?;
    let from = cursor(kv, raw.as_ref())?;
    let head: Head = get_json(kv, &keys::notices_head())?.unwrap_or_default();
    let left = undelivered(from, head.page, page_len(kv, head.page)?);
    Ok((raw.unwrap_or_default(), from, head, left))
}

/// Deliver pending notices, at most `max_batches` POSTs. Honors the backoff unless `force`.
pub async fn deliver_due<S: WebhookSender>(
    kv: &impl Kv,
    sender: &S,
    now: DateTime<Utc>,
    max_batches: usize,
    force: bool,
) -> Result<DeliveryReport, StoreError> {
    let cfg = settings::load(kv)?;
    let mut report = DeliveryReport::default();
    let (Some(url), Some(secret)) = (cfg.notice_webhook_url, cfg.notice_webhook_secret) else {
        report.remaining = standing(kv)?.3;
        report.skipped = true;
        return Ok(report);
    };
    if let Err(e) = settings::validate_url(&url, &sender.rules()) {
        let error = e.message;
        update::<Outbox, ()>(kv, &keys::notices_outbox(), |cur| {
            let from = cursor(kv, cur.as_ref())?;
            let mut o = cur.unwrap_or_default();
            o.next = Some(from);
            o.last_error = Some(error.clone());
            Ok((Some(o), ()))
        })?;
        report.remaining = standing(kv)?.3;
        report.error = Some(error);
        return Ok(report);
    }
    for _ in 0..max_batches {
        let (outbox, from, head, left) = standing(kv)?;
        report.remaining = left;
        if left == 0 {
            break;
        }
        if !force && outbox.next_attempt_at.is_some_and(|t| t > now) {
            report.skipped = report.delivered == 0;
            break;
        }
        let (notices, upto) = next_batch(kv, from, &head)?;
        if notices.is_empty() {
            // Only notices delivered already (or none left in the ring): move past them.
            advance(kv, upto, None)?;
            if upto == from {
                break;
            }
            continue;
        }
        let body = serde_json::to_vec(&serde_json::json!({ "notices": notices }))
            .unwrap_or_else(|_| b"{\"notices\":[]}".to_vec());
        let headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            (
                SIGNATURE_HEADER.to_string(),
                signature(&secret, now.timestamp(), &body),
            ),
        ];
        match sender.post(&url, &headers, &body).await {
            Ok(status) if (200..300).contains(&status) => {
                let mut by_page: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
                for n in &notices {
                    if let Some(p) = position_of(&n.id) {
                        by_page.entry(p.page).or_default().insert(n.id.clone());
                    }
                }
                for (page, ids) in &by_page {
                    update::<Vec<Notice>, ()>(kv, &keys::notices_page(*page), |cur| {
                        let Some(mut list) = cur else {
                            return Ok((None, ()));
                        };
                        for n in list.iter_mut().filter(|n| ids.contains(&n.id)) {
                            n.delivered_at.get_or_insert(now);
                        }
                        Ok((Some(list), ()))
                    })?;
                }
                advance(kv, upto, Some(now))?;
                report.delivered += notices.len();
                report.remaining = standing(kv)?.3;
            }
            other => {
                let error = match other {
                    Ok(status) => format!("webhook answered HTTP {status}"),
                    Err(e) => format!("webhook unreachable: {e}"),
                };
                update::<Outbox, ()>(kv, &keys::notices_outbox(), |cur| {
                    // Keep the cursor explicit from now on (an old outbox gets one here).
                    let from = cursor(kv, cur.as_ref())?;
                    let mut o = cur.unwrap_or_default();
                    o.next = Some(from);
                    o.attempts = o.attempts.saturating_add(1);
                    o.next_attempt_at = Some(now + backoff(o.attempts));
                    o.last_error = Some(error.clone());
                    Ok((Some(o), ()))
                })?;
                report.error = Some(error);
                break;
            }
        }
    }
    Ok(report)
}

/// Move the cursor forward to `upto` (never back: a concurrent delivery or a retired page may
/// have moved it further). `delivered_at`: a delivery succeeded, the backoff resets.
fn advance(
    kv: &impl Kv,
    upto: Position,
    delivered_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    update::<Outbox, ()>(kv, &keys::notices_outbox(), |cur| {
        let o = cur;
        let from = cursor(kv, o.as_ref())?;
        let mut o = o.unwrap_or_default();
        o.next = Some(from.max(upto));
        if let Some(t) = delivered_at {
            o.attempts = 0;
            o.next_attempt_at = None;
            o.last_error = None;
            o.last_delivered_at = Some(t);
        }
        Ok((Some(o), ()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vpp_apple::testing::block_on;
    use vpp_store::MemoryKv;

    type Delivery = (Vec<(String, String)>, Vec<u8>);

    struct Hook {
        status: Mutex<u16>,
        got: Mutex<Vec<Delivery>>,
    }

    impl WebhookSender for Hook {
        fn post(
            &self,
            _url: &str,
            headers: &[(String, String)],
            body: &[u8],
        ) -> impl Future<Output = Result<u16, String>> {
            let status = *self.status.lock().unwrap();
            if status != 0 {
                self.got
                    .lock()
                    .unwrap()
                    .push((headers.to_vec(), body.to_vec()));
            }
            std::future::ready(if status == 0 {
                Err("connection refused".into())
            } else {
                Ok(status)
            })
        }
    }

    fn on(kv: &MemoryKv) {
        settings::put(
            kv,
            br#"{"licenseRemovalNotification": true, "noticeWebhookUrl": "https://hook.test/n", "noticeWebhookSecret": "0123456789abcdef"}"#,
        )
        .unwrap();
    }

    fn removed(n: usize) -> Vec<(String, Subject)> {
        (0..n)
            .map(|i| ("1:STDQ".to_string(), Subject::SerialNumber(format!("S{i}"))))
            .collect()
    }

    #[test]
    fn nothing_when_off() {
        let kv = MemoryKv::default();
        record_removals(&kv, "a", &removed(3), "api", Utc::now()).unwrap();
        assert!(list(&kv, None).unwrap().notices.is_empty());
        assert!(kv.keys().is_empty());
    }

    #[test]
    fn pages_and_listing() {
        let kv = MemoryKv::default();
        on(&kv);
        record_removals(
            &kv,
            "a",
            &removed(keys::NOTICE_PAGE + 3),
            "reconcile",
            Utc::now(),
        )
        .unwrap();
        let newest = list(&kv, None).unwrap();
        assert_eq!(newest.notices.len(), 3);
        assert_eq!(newest.next_page, Some(0));
        assert_eq!(newest.undelivered, keys::NOTICE_PAGE as u64 + 3);
        assert_eq!(
            newest.notices[0].serial_number.as_deref(),
            Some(format!("S{}", keys::NOTICE_PAGE + 2).as_str())
        );
        assert_eq!(list(&kv, Some(0)).unwrap().notices.len(), keys::NOTICE_PAGE);
        assert!(list(&kv, Some(5)).is_err());
    }

    #[test]
    fn webhook_down_then_up_delivers_once_signed() {
        let kv = MemoryKv::default();
        on(&kv);
        let t = Utc::now();
        record_removals(&kv, "a", &removed(150), "api", t).unwrap();
        let hook = Hook {
            status: Mutex::new(0),
            got: Mutex::new(Vec::new()),
        };
        let r = block_on(deliver_due(&kv, &hook, t, 10, false)).unwrap();
        assert_eq!(r.delivered, 0);
        assert!(r.error.is_some());
        // Backing off: not tried again before the delay.
        *hook.status.lock().unwrap() = 500;
        let r = block_on(deliver_due(&kv, &hook, t + Duration::seconds(5), 10, false)).unwrap();
        assert!(r.skipped);
        assert!(hook.got.lock().unwrap().is_empty());
        let r = block_on(deliver_due(
            &kv,
            &hook,
            t + Duration::seconds(31),
            10,
            false,
        ))
        .unwrap();
        assert_eq!(r.error.as_deref(), Some("webhook answered HTTP 500"));
        let o: Outbox = get_json(&kv, &keys::notices_outbox()).unwrap().unwrap();
        assert_eq!(o.attempts, 2);
        assert_eq!(o.next_attempt_at, Some(t + Duration::seconds(31 + 60)));
        hook.got.lock().unwrap().clear();
        *hook.status.lock().unwrap() = 204;
        let later = t + Duration::seconds(200);
        let r = block_on(deliver_due(&kv, &hook, later, 10, false)).unwrap();
        assert_eq!((r.delivered, r.remaining), (150, 0));
        let got = hook.got.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "two batches");
        let mut ids = BTreeSet::new();
        for (headers, body) in &got {
            let sig = &headers
                .iter()
                .find(|(k, _)| k == SIGNATURE_HEADER)
                .unwrap()
                .1;
            assert_eq!(sig, &signature("0123456789abcdef", later.timestamp(), body));
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            for n in v["notices"].as_array().unwrap() {
                assert!(ids.insert(n["id"].as_str().unwrap().to_string()), "once");
            }
        }
        assert_eq!(ids.len(), 150);
        let r = block_on(deliver_due(&kv, &hook, later, 10, false)).unwrap();
        assert_eq!(r.delivered, 0);
        assert_eq!(hook.got.lock().unwrap().len(), 2, "nothing more sent");
        assert!(list(&kv, None).unwrap().notices[0].delivered_at.is_some());
    }

    #[test]
    fn ten_thousand_removals_at_once_all_get_notices() {
        let kv = MemoryKv::default();
        on(&kv);
        record_removals(&kv, "a", &removed(10_000), "refresh", Utc::now()).unwrap();
        let newest = list(&kv, None).unwrap();
        assert_eq!(newest.undelivered, 10_000);
        let mut ids = BTreeSet::new();
        let mut page = Some(10_000 / keys::NOTICE_PAGE as u64 - 1);
        while let Some(p) = page {
            let l = list(&kv, Some(p)).unwrap();
            for n in &l.notices {
                assert!(ids.insert(n.serial_number.clone().unwrap()));
            }
            page = l.next_page;
        }
        assert_eq!(ids.len(), 10_000, "every removal has its notice");
    }

    #[test]
    fn without_a_webhook_storage_stays_bounded_and_drops_are_recorded() {
        let kv = MemoryKv::default();
        settings::put(&kv, br#"{"licenseRemovalNotification": true}"#).unwrap();
        // A ring of 8 pages here (the real one: `keys::NOTICE_PAGES_KEPT`).
        let kept = 8;
        let ring = kept as usize * keys::NOTICE_PAGE;
        let extra = 5 * keys::NOTICE_PAGE;
        let t = Utc::now();
        for chunk in removed(ring + extra).chunks(700) {
            record_keeping(&kv, "a", chunk, "reconcile", None, t, kept).unwrap();
        }
        let outbox = kv.get(&keys::notices_outbox()).unwrap().unwrap_or_default();
        assert!(outbox.len() < 1024, "outbox is {} bytes", outbox.len());
        let pages = kv
            .keys()
            .iter()
            .filter(|k| k.starts_with("notices/"))
            .count();
        assert_eq!(pages, kept as usize + 1, "pages kept and the outbox");
        let l = list(&kv, None).unwrap();
        assert_eq!(l.undelivered, ring as u64);
        assert_eq!(l.dropped, extra as u64);
        let drop = l.last_drop.unwrap();
        assert_eq!(drop.reason, "no notice webhook is configured");
        // A webhook set later gets every notice still kept, oldest first, each once.
        on(&kv);
        let hook = Hook {
            status: Mutex::new(204),
            got: Mutex::new(Vec::new()),
        };
        let r = block_on(deliver_due(&kv, &hook, t, 1000, false)).unwrap();
        assert_eq!((r.delivered, r.remaining), (ring, 0));
        let got = hook.got.lock().unwrap();
        let first: serde_json::Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(first["notices"][0]["serialNumber"], format!("S{extra}"));
        assert_eq!(list(&kv, None).unwrap().undelivered, 0);
    }

    #[test]
    fn an_outbox_of_the_former_layout_resumes_where_it_stood() {
        let kv = MemoryKv::default();
        on(&kv);
        let t = Utc::now();
        record_removals(&kv, "a", &removed(5), "api", t).unwrap();
        kv.set(
            &keys::notices_outbox(),
            br#"{"pending":[{"page":0,"id":"0-3"},{"page":0,"id":"0-4"}],"attempts":0}"#,
        )
        .unwrap();
        assert_eq!(list(&kv, None).unwrap().undelivered, 2);
        let hook = Hook {
            status: Mutex::new(200),
            got: Mutex::new(Vec::new()),
        };
        let r = block_on(deliver_due(&kv, &hook, t, 10, false)).unwrap();
        assert_eq!(r.delivered, 2);
        let got = hook.got.lock().unwrap();
        let body: serde_json::Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(body["notices"][0]["id"], "0-3");
        // Everything delivered: an old outbox with nothing pending means "at the end".
        kv.set(&keys::notices_outbox(), br#"{"pending":[]}"#)
            .unwrap();
        assert_eq!(list(&kv, None).unwrap().undelivered, 0);
    }

    /// "Noticed already?" looked at the newest two pages only: an event's outcome read again
    /// (an invocation killed between its writes) after more than a page of other notices got
    /// a second notice, and a removal reported before them was not "noticed lately". It now
    /// looks at every page written since the event was accepted (or within [`RECENT_SECS`]).
    #[test]
    fn noticed_already_holds_past_many_pages_of_other_notices() {
        let kv = MemoryKv::default();
        on(&kv);
        let t = Utc::now();
        let pair = vec![("7:STDQ".to_string(), Subject::SerialNumber("X".into()))];
        record_event_removals(&kv, "a", &pair, "api", ("ev-1", t), t).unwrap();
        let later = t + Duration::minutes(1);
        record_removals(&kv, "a", &removed(3 * keys::NOTICE_PAGE), "refresh", later).unwrap();
        // Read again: no second notice.
        let again = t + Duration::minutes(2);
        record_event_removals(&kv, "a", &pair, "api", ("ev-1", t), again).unwrap();
        let mut found = 0;
        let mut page = None;
        loop {
            let l = list(&kv, page).unwrap();
            found += l
                .notices
                .iter()
                .filter(|n| n.serial_number.as_deref() == Some("X"))
                .count();
            match l.next_page {
                Some(p) => page = Some(p),
                None => break,
            }
        }
        assert_eq!(found, 1);
        let subjects = [Subject::SerialNumber("X".into())];
        assert_eq!(
            noticed_recently(&kv, "a", "7:STDQ", &subjects, again).unwrap(),
            BTreeSet::from([subjects[0].tag()])
        );
        assert_eq!(
            noticed_by_ours_recently(&kv, "a", "7:STDQ", &subjects, again).unwrap(),
            BTreeSet::from([subjects[0].tag()])
        );
        // Long after (a day and more): not "lately", and only the newest pages are read.
        let much_later = t + Duration::seconds(RECENT_SECS + CLOCK_SKEW_SECS + 600);
        assert!(noticed_recently(&kv, "a", "7:STDQ", &subjects, much_later)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn signature_is_hmac_sha256() {
        // RFC 4231 style check against a known value computed independently.
        let s = signature("key", 1, b"body");
        assert!(s.starts_with("t=1,v1="));
        assert_eq!(s.len(), "t=1,v1=".len() + 64);
        assert_ne!(s, signature("other", 1, b"body"));
    }
}
