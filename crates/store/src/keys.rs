//! The key-value layout: every key vpp-spin writes, who writes it, and how big it gets.
//!
//! Rules the layout keeps (PRODUCT.md section 4):
//! - the number of keys grows with accounts, assets and shards, never with assignments;
//! - every value stays well under 1 MiB (assignments are packed into shards of at most
//!   [`SHARD_TARGET`] entries);
//! - no request path lists keys: every collection has an index key;
//! - a key written by several writers is only changed with `vpp_store::update` (compare-and-swap).
//!
//! | key | value | writers |
//! |---|---|---|
//! | `instance` | this deployment's identity (`mdmInfo` id, name) | first writer wins (CAS) |
//! | `accounts` | index: ids of all accounts | accounts (CAS) |
//! | `account/{id}` | the account record | accounts, jobs (CAS) |
//! | `token/{id}` | the sealed server token | accounts (sealed by the Apple component) |
//! | `apple/{id}` | ownership, last Apple error, backoff seen by the Apple component | apple (CAS) |
//! | `apple/{id}/pace` | request timestamps of the last second for pacing | apple (CAS) |
//! | `apple/service-config` | Apple's service config and when it was read | apple |
//! | `apple/metadata/{adamId}` | name and icon of an asset | apple |
//! | `assets/{id}` | the account's assets with counts (one value, ~150 B per asset) | refresh, notifications (CAS) |
//! | `assignments/{id}/{gen}/{adamId}:{pricing}/{shard}` | one shard of an asset's assignment copy (subject → made by) | refresh; events and notifications (CAS) |
//! | `ledger/{id}/{shard}` | settled ledger entries (confirmed, revoking, failed): asset → subject → entry; shard = `shard_of("{asset}|{subject}", LEDGER_SHARDS)`; failed entries pruned after 7 days | licenses, jobs (CAS) |
//! | `ledger/{id}/open/{adamId}:{pricing}` | open ledger entries of one asset (queued, unknown, pending; ≤ 10,000, ~45 B each): their count is the asset's reservation, admitted with one CAS | licenses, jobs, notifications (CAS) |
//! | `event/{eventId}` | an Apple event we track | licenses, jobs, notifications (CAS) |
//! | `events/{id}` | index: ids of the account's pending events (polled by `event::poll_due`) | licenses, jobs (CAS) |
//! | `events/{id}/done` | ring: ids of the account's last 500 ended events; an event evicted from it has its `event/{eventId}` record deleted | licenses, jobs, notifications (CAS) |
//! | `policies`, `policy/{id}` | app policies: index of summaries, one value per policy (≤ 20,000 subjects) | licenses (CAS) |
//! | `settings` | license settings (notification switch, low-license threshold, webhook URL + secret) | licenses (CAS) |
//! | `notices/{page}`, `notices` | license-removal notices, pages of [`NOTICE_PAGE`] + head; ring of [`NOTICE_PAGES_KEPT`] pages | licenses, jobs (CAS) |
//! | `notices/outbox` | delivery cursor (first notice not yet delivered), backoff, and notices dropped undelivered with why (fixed size) | licenses, jobs (CAS) |
//! | `users/{id}/{shard}` | managed users of an account: clientUserId → user; shard = `shard_of(clientUserId, USER_SHARDS)` | accounts (users API, refresh), notifications (CAS) |
//! | `jobs`, `job/{id}`, `lease/{id}` | job index, job state machines, per-account leases; at most one running job per account and kind; [`KEPT_JOBS`] finished jobs kept (running ones never dropped) | accounts, licenses (CAS) |
//! | `audit/{page}`, `audit` | audit records, pages of [`AUDIT_PAGE`] + head; ring of [`AUDIT_PAGES_KEPT`] pages | every HTTP component (CAS) |
//! | `notified/{id}` | recent Apple `notificationId`s of an account (dedupe ring of [`NOTIFIED_IDS`]) | licenses (CAS) |
//! | `daily/last` | the newest daily run: job id, started, finished, state (due-ness) | licenses, under `lease/daily` |

/// Shards of an account's managed users (fixed: 100,000 users at ~200 B stay ~300 KiB a shard).
pub const USER_SHARDS: u32 = 64;
/// How many assignments a shard holds at most (~60 B each: ~120 KiB per value).
pub const SHARD_TARGET: usize = 2000;
/// Audit records per audit page.
pub const AUDIT_PAGE: usize = 200;
/// Notices per notice page.
pub const NOTICE_PAGE: usize = 200;

// Bounds of what accumulates: rings, so the key count and every value stay fixed.
/// Audit pages kept ([`AUDIT_PAGE`] records each): 10,000 records.
pub const AUDIT_PAGES_KEPT: u64 = 50;
/// Notice pages kept ([`NOTICE_PAGE`] notices each): 20,000 notices. A page leaves the ring
/// even when its notices were never delivered; the outbox then counts them as dropped, with why.
pub const NOTICE_PAGES_KEPT: u64 = 100;
/// Finished jobs kept in the job index (running jobs are never dropped).
pub const KEPT_JOBS: usize = 200;
/// Apple `notificationId`s remembered per account for deduplication (Apple retries within
/// minutes; ~40 B each).
pub const NOTIFIED_IDS: usize = 2000;

pub fn instance() -> String {
    "instance".into()
}
pub fn accounts() -> String {
    "accounts".into()
}
pub fn account(id: &str) -> String {
    format!("account/{id}")
}
pub fn token(id: &str) -> String {
    format!("token/{id}")
}
pub fn apple_state(id: &str) -> String {
    format!("apple/{id}")
}
pub fn apple_pace(id: &str) -> String {
    format!("apple/{id}/pace")
}
pub fn service_config() -> String {
    "apple/service-config".into()
}
pub fn metadata(adam_id: &str) -> String {
    format!("apple/metadata/{adam_id}")
}
pub fn assets(account: &str) -> String {
    format!("assets/{account}")
}
/// One shard of one asset's assignment copy (`asset` is `adamId:pricingParam`).
pub fn assignment_shard(account: &str, generation: u64, asset: &str, shard: u32) -> String {
    format!("assignments/{account}/{generation}/{asset}/{shard}")
}
pub fn ledger_shard(account: &str, shard: u32) -> String {
    format!("ledger/{account}/{shard}")
}
pub fn event(event_id: &str) -> String {
    format!("event/{event_id}")
}
pub fn account_events(account: &str) -> String {
    format!("events/{account}")
}
/// The account's most recently ended events (a bounded ring; older records are deleted).
pub fn account_events_done(account: &str) -> String {
    format!("events/{account}/done")
}
/// The open ledger entries of one asset (`asset` is `adamId:pricingParam`).
pub fn ledger_open(account: &str, asset: &str) -> String {
    format!("ledger/{account}/open/{asset}")
}
pub fn policies() -> String {
    "policies".into()
}
pub fn policy(id: &str) -> String {
    format!("policy/{id}")
}
pub fn settings() -> String {
    "settings".into()
}
pub fn notices_head() -> String {
    "notices".into()
}
pub fn notices_page(page: u64) -> String {
    format!("notices/{page}")
}
pub fn notices_outbox() -> String {
    "notices/outbox".into()
}
pub fn user_shard(account: &str, shard: u32) -> String {
    format!("users/{account}/{shard}")
}
pub fn jobs() -> String {
    "jobs".into()
}
pub fn job(id: &str) -> String {
    format!("job/{id}")
}
pub fn lease(account: &str) -> String {
    format!("lease/{account}")
}
pub fn audit_head() -> String {
    "audit".into()
}
pub fn audit_page(page: u64) -> String {
    format!("audit/{page}")
}
pub fn notified(account: &str) -> String {
    format!("notified/{account}")
}
/// The newest daily run (when it started: is the next one due?).
pub fn daily_last() -> String {
    "daily/last".into()
}

/// Stable shard of a subject (serial number or clientUserId): FNV-1a, so every component and
/// every platform computes the same shard without a dependency.
pub fn shard_of(subject: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in subject.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// How many shards hold `count` entries at [`SHARD_TARGET`] per shard (at least one).
pub fn shards_for(count: usize) -> u32 {
    count.div_ceil(SHARD_TARGET).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard_of("C02XYZ", 8), shard_of("C02XYZ", 8));
        for s in ["a", "b", "serial-1", "user@example.com"] {
            assert!(shard_of(s, 7) < 7);
        }
        assert_eq!(shard_of("x", 0), 0);
        assert_eq!(shards_for(0), 1);
        assert_eq!(shards_for(SHARD_TARGET), 1);
        assert_eq!(shards_for(SHARD_TARGET + 1), 2);
        assert_eq!(shards_for(100_000), 50);
    }

    #[test]
    fn keys_stay_short() {
        // Fermyon Cloud caps keys at 255 bytes.
        let id = "a".repeat(36);
        assert!(assignment_shard(&id, u64::MAX, "1234567890:STDQ", u32::MAX).len() < 255);
        assert!(ledger_shard(&id, u32::MAX).len() < 255);
    }
}
