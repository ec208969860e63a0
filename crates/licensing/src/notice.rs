//! License-removal notices: when the setting is on, every license taken from a device or user
//! (reconcile, clean up, the API, or found gone at refresh) becomes a notice. Notices are listed
//! by the API and POSTed to the configured webhook, signed, retried with backoff, and kept until
//! delivered.
//!
//! Layout: pages of [`keys::NOTICE_PAGE`] notices (`notices/{page}`) with a head (`notices`), and
//! an outbox (`notices/outbox`) of references to undelivered notices. Old pages are dropped only
//! once everything on them is delivered.
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

/// Notice pages kept while fully delivered (older ones are dropped).
pub const RETAINED_PAGES: u64 = 100;
/// Notices per webhook POST.
pub const DELIVERY_BATCH: usize = 100;
/// First retry delay; doubles per failed attempt up to [`MAX_BACKOFF_SECS`].
pub const BASE_BACKOFF_SECS: i64 = 30;
pub const MAX_BACKOFF_SECS: i64 = 3600;
pub const SIGNATURE_HEADER: &str = "x-vpp-signature";

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
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Head {
    page: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NoticeRef {
    page: u64,
    id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Outbox {
    #[serde(default)]
    pending: Vec<NoticeRef>,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    last_delivered_at: Option<DateTime<Utc>>,
}

fn subject_fields(s: &Subject) -> (Option<String>, Option<String>) {
    match s {
        Subject::SerialNumber(x) => (Some(x.clone()), None),
        Subject::ClientUserId(x) => (None, Some(x.clone())),
    }
}

/// Record a notice for every (asset key `adamId:pricingParam`, subject) taken away. Does nothing
/// when the setting is off. Safe with concurrent writers.
pub fn record_removals(
    kv: &impl Kv,
    account_id: &str,
    removed: &[(String, Subject)],
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if removed.is_empty() || !settings::load(kv)?.license_removal_notification {
        return Ok(());
    }
    let mut rest: Vec<(String, Subject)> = removed.to_vec();
    let mut refs = Vec::new();
    let mut attempts = 0;
    while !rest.is_empty() {
        attempts += 1;
        if attempts > vpp_store::MAX_SWAP_ATTEMPTS * 4 {
            return Err(StoreError::Contended {
                key: keys::notices_head(),
            });
        }
        let head: Head = get_json(kv, &keys::notices_head())?.unwrap_or_default();
        let page = head.page;
        let (taken, added) =
            update::<Vec<Notice>, (usize, Vec<NoticeRef>)>(kv, &keys::notices_page(page), |cur| {
                let mut list = cur.unwrap_or_default();
                let room = keys::NOTICE_PAGE.saturating_sub(list.len());
                if room == 0 {
                    return Ok((None, (0, Vec::new())));
                }
                let mut added = Vec::new();
                for (asset, subject) in rest.iter().take(room) {
                    let (adam_id, pricing) = asset.split_once(':').unwrap_or((asset, "STDQ"));
                    let (serial_number, client_user_id) = subject_fields(subject);
                    let id = format!("{page}-{}", list.len());
                    added.push(NoticeRef {
                        page,
                        id: id.clone(),
                    });
                    list.push(Notice {
                        id,
                        account_id: account_id.to_string(),
                        adam_id: adam_id.to_string(),
                        pricing_param: pricing.to_string(),
                        serial_number,
                        client_user_id,
                        reason: reason.to_string(),
                        at: now,
                        delivered_at: None,
                    });
                }
                let n = added.len();
                Ok((Some(list), (n, added)))
            })?;
        rest.drain(..taken);
        refs.extend(added);
        if taken == 0 {
            let moved = update::<Head, bool>(kv, &keys::notices_head(), |h| {
                let h = h.unwrap_or_default();
                if h.page != page {
                    return Ok((None, false));
                }
                Ok((Some(Head { page: page + 1 }), true))
            })?;
            if moved {
                drop_old_page(kv, page + 1)?;
            }
        }
    }
    update::<Outbox, ()>(kv, &keys::notices_outbox(), |cur| {
        let mut o = cur.unwrap_or_default();
        o.pending.extend(refs.iter().cloned());
        Ok((Some(o), ()))
    })
}

/// Drop the page that fell out of retention, unless it still holds undelivered notices.
fn drop_old_page(kv: &impl Kv, head: u64) -> Result<(), StoreError> {
    if head < RETAINED_PAGES {
        return Ok(());
    }
    let old = head - RETAINED_PAGES;
    let outbox: Outbox = get_json(kv, &keys::notices_outbox())?.unwrap_or_default();
    if outbox.pending.iter().any(|r| r.page == old) {
        return Ok(());
    }
    kv.delete(&keys::notices_page(old))?;
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
    pub undelivered: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_delivery_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_delivery_at: Option<DateTime<Utc>>,
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
    notices.reverse();
    let outbox: Outbox = get_json(kv, &keys::notices_outbox())?.unwrap_or_default();
    let next_page = (page > 0 && kv.exists(&keys::notices_page(page - 1))?).then(|| page - 1);
    Ok(NoticePage {
        notices,
        next_page,
        undelivered: outbox.pending.len(),
        last_delivery_error: outbox.last_error,
        next_delivery_at: outbox.next_attempt_at,
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
    pub remaining: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Nothing was tried: no webhook, nothing pending, or backing off.
    pub skipped: bool,
}

fn backoff(attempts: u32) -> Duration {
    let secs = BASE_BACKOFF_SECS.saturating_mul(1i64 << attempts.saturating_sub(1).min(20));
    Duration::seconds(secs.min(MAX_BACKOFF_SECS))
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
        let outbox: Outbox = get_json(kv, &keys::notices_outbox())?.unwrap_or_default();
        report.remaining = outbox.pending.len();
        report.skipped = true;
        return Ok(report);
    };
    for _ in 0..max_batches {
        let outbox: Outbox = get_json(kv, &keys::notices_outbox())?.unwrap_or_default();
        report.remaining = outbox.pending.len();
        if outbox.pending.is_empty() {
            break;
        }
        if !force && outbox.next_attempt_at.is_some_and(|t| t > now) {
            report.skipped = report.delivered == 0;
            break;
        }
        let batch: Vec<NoticeRef> = outbox
            .pending
            .iter()
            .take(DELIVERY_BATCH)
            .cloned()
            .collect();
        let mut by_page: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for r in &batch {
            by_page.entry(r.page).or_default().insert(r.id.clone());
        }
        let mut notices = Vec::new();
        for (page, ids) in &by_page {
            let list: Vec<Notice> = get_json(kv, &keys::notices_page(*page))?.unwrap_or_default();
            notices.extend(list.into_iter().filter(|n| ids.contains(&n.id)));
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
        let sent: BTreeSet<(u64, String)> = batch.iter().map(|r| (r.page, r.id.clone())).collect();
        match sender.post(&url, &headers, &body).await {
            Ok(status) if (200..300).contains(&status) => {
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
                let left = update::<Outbox, usize>(kv, &keys::notices_outbox(), |cur| {
                    let mut o = cur.unwrap_or_default();
                    o.pending
                        .retain(|r| !sent.contains(&(r.page, r.id.clone())));
                    o.attempts = 0;
                    o.next_attempt_at = None;
                    o.last_error = None;
                    o.last_delivered_at = Some(now);
                    let n = o.pending.len();
                    Ok((Some(o), n))
                })?;
                report.delivered += batch.len();
                report.remaining = left;
            }
            other => {
                let error = match other {
                    Ok(status) => format!("webhook answered HTTP {status}"),
                    Err(e) => format!("webhook unreachable: {e}"),
                };
                update::<Outbox, ()>(kv, &keys::notices_outbox(), |cur| {
                    let mut o = cur.unwrap_or_default();
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
            br#"{"licenseRemovalNotification": true, "noticeWebhookUrl": "http://hook.test/n", "noticeWebhookSecret": "0123456789abcdef"}"#,
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
        assert_eq!(newest.undelivered, keys::NOTICE_PAGE + 3);
        assert_eq!(newest.notices[0].serial_number.as_deref(), Some("S202"));
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
    fn signature_is_hmac_sha256() {
        // RFC 4231 style check against a known value computed independently.
        let s = signature("key", 1, b"body");
        assert!(s.starts_with("t=1,v1="));
        assert_eq!(s.len(), "t=1,v1=".len() + 64);
        assert_ne!(s, signature("other", 1, b"body"));
    }
}
