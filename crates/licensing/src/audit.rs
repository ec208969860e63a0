//! The audit log: who did what, when, and how it ended, for every mutating call.
//!
//! Records are appended to pages of [`keys::AUDIT_PAGE`] records; `audit` holds the number of
//! the page being filled. Only the newest [`RETAINED_PAGES`] pages are kept, so the key count
//! stays bounded. Reads go newest page first, a page per call. A page is also full at
//! [`keys::RING_PAGE_BYTES`]. When the ring is made smaller (50 pages of 200 before), the first
//! page move deletes every page older than the new ring (`drop_pages_from` walks back while
//! pages exist), so a store written by the previous layout shrinks on its own.

use crate::error::ApiError;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vpp_store::{keys, update, Kv, StoreError};

/// Pages kept: the ring's size is written in the layout (`keys::AUDIT_PAGES_KEPT`).
pub const RETAINED_PAGES: u64 = keys::AUDIT_PAGES_KEPT;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub at: DateTime<Utc>,
    /// Role and key fingerprint (`admin:1a2b3c4d`), or `apple`, or `scheduler`.
    pub actor: String,
    /// What was asked, e.g. `POST /api/accounts`.
    pub action: String,
    /// What it was about (an account id, a policy id), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The HTTP status the caller got.
    pub status: u16,
    /// The error code, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Head {
    page: u64,
}

/// Append one record. Concurrent writers are safe (compare-and-swap on the page and the head).
pub fn record(kv: &impl Kv, rec: &AuditRecord) -> Result<(), StoreError> {
    record_keeping(kv, rec, RETAINED_PAGES, keys::AUDIT_PAGE)
}

fn record_keeping(
    kv: &impl Kv,
    rec: &AuditRecord,
    retained: u64,
    page_records: usize,
) -> Result<(), StoreError> {
    for _ in 0..vpp_store::MAX_SWAP_ATTEMPTS {
        let head: Head = vpp_store::get_json(kv, &keys::audit_head())?.unwrap_or_default();
        let appended =
            update::<Vec<AuditRecord>, bool>(kv, &keys::audit_page(head.page), |page| {
                let mut page = page.unwrap_or_default();
                if page.len() >= page_records || page_bytes(&page) >= keys::RING_PAGE_BYTES {
                    return Ok((None, false));
                }
                page.push(rec.clone());
                Ok((Some(page), true))
            })?;
        if appended {
            return Ok(());
        }
        // The page is full: move the head on (once, whoever wins) and drop the oldest page.
        let moved = update::<Head, bool>(kv, &keys::audit_head(), |h| {
            let h = h.unwrap_or_default();
            if h.page != head.page {
                return Ok((None, false));
            }
            Ok((Some(Head { page: h.page + 1 }), true))
        })?;
        if moved && head.page + 1 >= retained {
            drop_pages_from(kv, head.page + 1 - retained)?;
        }
    }
    Err(StoreError::Contended {
        key: keys::audit_head(),
    })
}

/// The stored size of a page, from above: a page is full at [`keys::AUDIT_PAGE`] records or
/// [`keys::RING_PAGE_BYTES`] bytes, whichever comes first (long actions or targets never push a
/// page towards the value limit). Counted from the fields' lengths, not by encoding the page.
fn page_bytes(page: &[AuditRecord]) -> usize {
    // Field names, quotes, the timestamp and the status: ~120 B; strings may be escaped (×2).
    page.iter()
        .map(|r| {
            let text = r.actor.len()
                + r.action.len()
                + r.target.as_ref().map_or(0, String::len)
                + r.error.as_ref().map_or(0, String::len);
            120 + 2 * text
        })
        .sum()
}

/// Delete `page` and any older page still stored (one left behind by a crash between moving the
/// head and deleting), so the ring never keeps more than its size.
fn drop_pages_from(kv: &impl Kv, page: u64) -> Result<(), StoreError> {
    kv.delete(&keys::audit_page(page))?;
    let mut older = page;
    while older > 0 && kv.exists(&keys::audit_page(older - 1))? {
        older -= 1;
        kv.delete(&keys::audit_page(older))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// Pass as `?page=` to read older records; absent on the oldest page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page: Option<u64>,
}

/// One page, newest records first. `page` defaults to the newest.
pub fn list(kv: &impl Kv, page: Option<u64>) -> Result<AuditPage, ApiError> {
    let head: Head = vpp_store::get_json(kv, &keys::audit_head())?.unwrap_or_default();
    let page = page.unwrap_or(head.page);
    if page > head.page {
        return Err(ApiError::not_found(format!("audit page {page}"))
            .with_details(serde_json::json!({"field": "page"})));
    }
    let mut records: Vec<AuditRecord> =
        vpp_store::get_json(kv, &keys::audit_page(page))?.unwrap_or_default();
    records.reverse();
    let oldest_kept = (head.page + 1).saturating_sub(RETAINED_PAGES);
    let next_page = (page > oldest_kept).then(|| page - 1);
    Ok(AuditPage { records, next_page })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpp_store::MemoryKv;

    /// Pages of a few records, for the ring's own tests (the real size: `keys::AUDIT_PAGE`).
    const SMALL: usize = 20;

    fn rec(i: usize) -> AuditRecord {
        AuditRecord {
            at: Utc::now(),
            actor: "admin:00000000".into(),
            action: format!("POST /api/x/{i}"),
            target: None,
            status: 200,
            error: None,
        }
    }

    #[test]
    fn pages_roll_over_and_read_newest_first() {
        let kv = MemoryKv::default();
        for i in 0..(keys::AUDIT_PAGE + 5) {
            record(&kv, &rec(i)).unwrap();
        }
        let newest = list(&kv, None).unwrap();
        assert_eq!(newest.records.len(), 5);
        assert_eq!(
            newest.records[0].action,
            format!("POST /api/x/{}", keys::AUDIT_PAGE + 4)
        );
        assert_eq!(newest.next_page, Some(0));
        let older = list(&kv, Some(0)).unwrap();
        assert_eq!(older.records.len(), keys::AUDIT_PAGE);
        assert_eq!(older.next_page, None);
        assert!(list(&kv, Some(9)).is_err());
    }

    #[test]
    fn a_page_is_full_at_its_byte_bound_too() {
        let kv = MemoryKv::default();
        let mut long = rec(0);
        long.target = Some("t".repeat(20_000));
        for _ in 0..(keys::RING_PAGE_BYTES / 20_000 + 5) {
            record(&kv, &long).unwrap();
        }
        let head: Head = vpp_store::get_json(&kv, &keys::audit_head())
            .unwrap()
            .unwrap();
        assert!(head.page >= 1, "the page moved on by bytes");
        for k in kv.keys() {
            let v = kv.get(&k).unwrap().unwrap();
            assert!(v.len() < keys::RING_PAGE_BYTES + 25_000, "{k}: {}", v.len());
        }
    }

    #[test]
    fn a_ring_written_by_the_previous_layout_shrinks_at_the_next_page_move() {
        let kv = MemoryKv::default();
        // The previous layout: 50 pages kept, head at page 60 (pages 11..=60 stored).
        for p in 11..=60u64 {
            vpp_store::set_json(&kv, &keys::audit_page(p), &vec![rec(p as usize)]).unwrap();
        }
        vpp_store::set_json(&kv, &keys::audit_head(), &Head { page: 60 }).unwrap();
        for i in 0..SMALL {
            record_keeping(&kv, &rec(i), RETAINED_PAGES, SMALL).unwrap();
        }
        let pages = kv.keys().iter().filter(|k| k.starts_with("audit/")).count() as u64;
        assert_eq!(pages, RETAINED_PAGES);
    }

    #[test]
    fn old_pages_are_dropped() {
        let kv = MemoryKv::default();
        for i in 0..(SMALL * 5) {
            record_keeping(&kv, &rec(i), 3, SMALL).unwrap();
        }
        let pages = kv.keys().iter().filter(|k| k.starts_with("audit/")).count() as u64;
        assert_eq!(pages, 3, "pages kept");
    }

    #[test]
    fn a_page_left_behind_by_a_crash_is_dropped_later() {
        let kv = MemoryKv::default();
        for i in 0..(SMALL * 4) {
            record_keeping(&kv, &rec(i), 3, SMALL).unwrap();
        }
        // As if a crash had come between moving the head and deleting page 0.
        kv.set(&keys::audit_page(0), b"[]").unwrap();
        for i in 0..(SMALL * 2) {
            record_keeping(&kv, &rec(i), 3, SMALL).unwrap();
        }
        let pages = kv.keys().iter().filter(|k| k.starts_with("audit/")).count() as u64;
        assert_eq!(pages, 3, "pages kept");
    }
}
