//! The key-value layout: every key vpp-spin writes, who writes it, and how big it gets.
//!
//! Rules the layout keeps (PRODUCT.md section 4):
//! - the number of keys grows with the bytes stored (≈ bytes / a shard of ~100-400 KiB), never
//!   with the number of assets, assignments or accounts as such; every value stays under
//!   [`VALUE_LIMIT`] (Fermyon Cloud refuses values over 1 MB);
//! - an account's copy of Apple's assets and assignments is packed (see "The copy" below);
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
//! | `assets/{id}` | the copy's index: generation, sync time, page and shard counts (~200 B) | refresh (one write switches generations) |
//! | `assets/{id}/staging` | the index of the generation a full refresh is building | refresh |
//! | `assets/{id}/{gen}/{page}` | a page of the account's assets with counts: asset key → record | refresh, events, notifications (CAS) |
//! | `assets/{id}/{gen}/raw/{n}` | Apple's asset page `n` as read, while a full refresh reads them (deleted when packed) | refresh |
//! | `assignments/{id}/{gen}/{shard}` | a shard of the assignment copy: asset key → subject → made by | refresh; events and notifications (CAS) |
//! | `ledger/{id}/{shard}` | settled ledger entries (confirmed, revoking, failed): asset → subject → entry; shard = `shard_of("{asset}|{subject}", LEDGER_SHARDS)`; failed entries pruned after 7 days | licenses, jobs (CAS) |
//! | `ledger/{id}/open/{n}` | open ledger entries (queued, unknown, pending) of the assets hashed to `n = shard_of(asset, 16)`: asset → subject → entry; ≤ 10,000 per asset and 12,000 per value (~45 B each: ≤ ~540 KiB); an asset's count is its reservation, admitted with one CAS; all 16 created by the refresh before assets are assignable | licenses, jobs, notifications (CAS) |
//! | `ledger/{id}/open-assets` | asset keys that may have open ledger entries (added after each admission, removed by settling when empty, repaired by settling; ≤ one per asset with entries in flight, ~20 B each) | licenses, jobs (CAS) |
//! | `event/{eventId}` | an Apple event we track | licenses, jobs, notifications (CAS) |
//! | `events/{id}` | index: ids of the account's pending events (polled by `event::poll_due`) | licenses, jobs (CAS) |
//! | `events/{id}/done` | ring: ids of the account's last [`EVENTS_DONE_KEPT`] ended events; an event evicted from it has its `event/{eventId}` record deleted | licenses, jobs, notifications (CAS) |
//! | `policies`, `policies/page/{n}` | app policies: the index (id, name, account, the page it lives on, its size) and pages of whole policies, packed first-fit up to [`POLICY_PAGE_BYTES`] (a policy ≤ [`POLICY_MAX_BYTES`]); `policy/{id}` is the one-value-per-policy layout of earlier versions, read until the policy is next put (moved to a page) or deleted | licenses (CAS) |
//! | `settings` | license settings (notification switch, low-license threshold, webhook URL + secret) | licenses (CAS) |
//! | `notices/{page}`, `notices` | license-removal notices, pages of [`NOTICE_PAGE`] + head; ring of [`NOTICE_PAGES_KEPT`] pages | licenses, jobs (CAS) |
//! | `notices/outbox` | delivery cursor (first notice not yet delivered), backoff, and notices dropped undelivered with why (fixed size) | licenses, jobs (CAS) |
//! | `users/{id}/{shard}` | managed users of an account: clientUserId → user; shard = `shard_of(clientUserId, USER_SHARDS)` | accounts (users API, refresh), notifications (CAS) |
//! | `jobs`, `job/{id}`, `jobs/done/{n}`, `lease/{id}` | job index, running job state machines, finished job records in [`JOB_DONE_PAGES`] pages (`n = shard_of(jobId, JOB_DONE_PAGES)`), per-account leases; at most one running job per account and kind; [`KEPT_JOBS`] finished jobs kept (running ones never dropped) | accounts, licenses (CAS) |
//! | `audit/{page}`, `audit` | audit records, pages of [`AUDIT_PAGE`] + head; ring of [`AUDIT_PAGES_KEPT`] pages | every HTTP component (CAS) |
//! | `notified/{id}` | recent Apple `notificationId`s of an account (dedupe ring of [`NOTIFIED_IDS`]) | licenses (CAS) |
//! | `daily/last` | the newest daily run: job id, started, finished, state (due-ness) | licenses, under `lease/daily` |

// ## The copy (assets and assignments as Apple has them), size-bounded
//
// One account's copy lives under a generation `gen`; a full refresh builds `gen + 1` beside it and
// switches with the single write of `assets/{id}` (the index), then deletes the old generation.
// - Assets: `P = asset_pages_for(assets)` pages; asset `k` (`adamId:pricingParam`) lives on page
//   `shard_of(k, P)`. A page holds ~[`ASSET_PAGE_ENTRIES`] records (~300 B each: ~30 KiB):
//   small, because a page of the licenses list or a lookup of one asset reads (scans) a whole
//   one. (The index records `P`, so a copy written with another page size stays readable.)
// - Assignments: `C = copy_shards_for(assignments)` shards for the whole account. Asset `k` with
//   `n = asset_copy_pages_for(inUse)` (capped at `C`) owns the consecutive shards
//   `shard_of(k, C) + i mod C`, `i < n`; subject `t` of it lives on shard
//   `copy_shard_of(k, t, n, C)`. Small assets share shards; a big one is spread over `n` of
//   them, ~[`ASSET_COPY_PAGE`] of its entries on each, so page `i` of an asset's assignments is
//   one read. Entries are compact (foreign `0`, ours `[eventId, unixSeconds]`: ~20-60 B), a
//   shard holds ~[`COPY_SHARD_MIN_ENTRIES`] of them (~20-60 KiB) until the account has
//   [`COPY_SHARDS_SMALL`] shards, then up to ~[`COPY_SHARD_ENTRIES`] (~160-480 KiB), then
//   more shards of that size ([`copy_shards_for`]).
// - Bounds: 10,000 assets and 1,000,000 assignments make 100 asset pages and 123 copy shards
//   (plus as many again while a full refresh builds the next generation, and 10 raw pages):
//   456 keys at the peak ([`copy_peak_keys`]), the largest value ~260 KiB. Nothing in the copy grows with the number of assets
//   or assignments except through their bytes.
// - Growth between full refreshes: an incremental refresh that would put more than
//   ~[`ASSET_COPY_PAGE`] of one asset's entries on a shard first spreads the asset over more of
//   the generation's shards (`copy::respread`).

// ## The key budget: every key of the whole app, with every ring full
//
// Fermyon Cloud holds at most [`CLOUD_KEYS`] keys in a store. Each family's maximum, with `A`
// accounts (per account: `a` assets, `n` assignments, `u` users, `e` pending events) and `b`
// bytes of policies; [`key_budget`] sums it:
//
// | family | keys at most |
// |---|---|
// | app: `instance`, `accounts`, `apple/service-config`, `settings`, `policies`, `notices`, `notices/outbox`, `jobs`, `audit`, `daily/last`, `lease/daily`, `lease/reconcile` | [`APP_FIXED_KEYS`] = 12 |
// | audit ring | [`AUDIT_PAGES_KEPT`] + 1 (a page a crash left behind until the next page move) |
// | notice ring | [`NOTICE_PAGES_KEPT`] + 1 (the same) |
// | finished jobs | [`JOB_DONE_PAGES`] |
// | running jobs | [`RUNNING_JOBS_PER_ACCOUNT`] × A + 2 (one per kind and scope: refresh, clean up, ledger per account; daily and reconcile) |
// | policy pages | `policy_pages_for(b)` = ⌈2b / [`POLICY_PAGE_BYTES`]⌉ + 1 (first fit with policies of at most half a page: every page but one is more than half full; the most bytes ever held counts, pages emptied by deletes are reused, not removed) |
// | per account: `account`, `token`, `apple/{id}`, `apple/{id}/pace`, `assets/{id}`, `assets/{id}/staging`, `events/{id}`, `events/{id}/done`, `ledger/{id}/open-assets`, `notified/{id}`, `lease/{id}` | [`ACCOUNT_FIXED_KEYS`] = 11 |
// | the copy at its peak (two generations while a full refresh builds the next, plus Apple's raw asset pages) | 2 × (`asset_pages_for(a)` + `copy_shards_for(n)`) + ⌈a / 1,000⌉ |
// | ledger | [`LEDGER_SHARDS`] + [`LEDGER_OPEN_VALUES`] |
// | users | [`USER_SHARDS`] (fixed; `u` only fills them: 100,000 users ≈ 300 KiB a shard) |
// | events | [`EVENTS_DONE_KEPT`] ended + e pending (one record each) |
//
// Supported on Fermyon Cloud ([`SUPPORTED`]): one account of 10,000 assets, 1,000,000
// assignments and 100,000 users, with up to [`SUPPORTED_PENDING_EVENTS`] events pending at
// once and [`SUPPORTED_POLICY_BYTES`] of policies (up to `policy::MAX_POLICIES`, 1,000):
// [`SUPPORTED_BUDGET`] keys (asserted ≤ 90% of
// [`CLOUD_KEYS`] below). Several small accounts fit too: [`accounts_that_fit`] says how many
// of a shape (e.g. 3 accounts of 1,000 assets and 20,000 assignments). Self-hosted Spin and
// Redis have no key limit; there the same formula is the store's size, not a cap.
// Pending events are one key each while Apple works on them (seconds to minutes): an account
// sends no more requests to Apple while [`MAX_PENDING_EVENTS`] of its events are pending; what
// waits stays queued in the ledger (`event::has_room`). Senders that check at the same moment
// may pass it by one each.

/// Fermyon Cloud's key limit per store.
pub const CLOUD_KEYS: usize = 1024;
/// App-wide keys that are always there (see the budget table).
pub const APP_FIXED_KEYS: usize = 12;
/// Keys of an account apart from its copy, ledger, users and events.
pub const ACCOUNT_FIXED_KEYS: usize = 11;
/// Job kinds that run per account, at most one running each (refresh, clean up, ledger).
pub const RUNNING_JOBS_PER_ACCOUNT: usize = 3;
/// Settled ledger shards per account (`ledger/{id}/{shard}`).
pub const LEDGER_SHARDS: u32 = 32;
/// Open ledger values per account (`ledger/{id}/open/{n}`).
pub const LEDGER_OPEN_VALUES: u32 = 16;
/// Ended events whose records are kept per account (for `GET /api/events/{id}`). (Before: 500;
/// the next event to end evicts the excess.)
pub const EVENTS_DONE_KEPT: usize = 100;
/// Assets per page Apple serves (the raw pages a full refresh keeps until it packs them).
pub const APPLE_ASSET_PAGE: usize = 1000;
/// Pending events an account may have at once; sends wait (queued) beyond it.
pub const MAX_PENDING_EVENTS: usize = 100;
/// Pending events the supported shape allows for at once.
pub const SUPPORTED_PENDING_EVENTS: usize = MAX_PENDING_EVENTS;
/// Bytes of policies the supported shape allows for (e.g. 1,000 policies of ~700 devices each,
/// or 30 of 20,000).
pub const SUPPORTED_POLICY_BYTES: usize = 10_000_000;
/// A page of policies is full at this many bytes (under [`VALUE_LIMIT`]).
pub const POLICY_PAGE_BYTES: usize = 900_000;
/// The largest policy (its stored JSON): half a page, so first fit keeps pages more than half
/// full. 20,000 serial numbers of 12 characters take ~300 KB.
pub const POLICY_MAX_BYTES: usize = POLICY_PAGE_BYTES / 2;

/// Policy pages that `bytes` of policies take at most (first fit, see the budget table).
pub const fn policy_pages_for(bytes: usize) -> usize {
    (2 * bytes).div_ceil(POLICY_PAGE_BYTES) + 1
}

/// What a deployment holds, for [`key_budget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub accounts: usize,
    /// Per account.
    pub assets: usize,
    /// Per account.
    pub assignments: usize,
    /// Per account, events pending at once.
    pub pending_events: usize,
    /// App-wide: the most bytes of policies ever held.
    pub policy_bytes: usize,
}

/// The shape supported on Fermyon Cloud.
pub const SUPPORTED: Shape = Shape {
    accounts: 1,
    assets: 10_000,
    assignments: 1_000_000,
    pending_events: SUPPORTED_PENDING_EVENTS,
    policy_bytes: SUPPORTED_POLICY_BYTES,
};

/// Keys of the app-wide families with every ring full (running jobs of `accounts` included).
pub const fn app_keys(accounts: usize, policy_bytes: usize) -> usize {
    APP_FIXED_KEYS
        + (AUDIT_PAGES_KEPT as usize + 1)
        + (NOTICE_PAGES_KEPT as usize + 1)
        + JOB_DONE_PAGES as usize
        + RUNNING_JOBS_PER_ACCOUNT * accounts
        + 2
        + policy_pages_for(policy_bytes)
}

/// Keys of a copy of `assets` and `assignments` at its peak (a full refresh: two generations,
/// Apple's raw asset pages, both indexes).
pub const fn copy_peak_keys(assets: usize, assignments: usize) -> usize {
    2 * (asset_pages_for(assets) as usize + copy_shards_for(assignments) as usize)
        + assets.div_ceil(APPLE_ASSET_PAGE)
}

/// Keys of one account with every ring full and its copy at its peak.
pub const fn account_keys(assets: usize, assignments: usize, pending_events: usize) -> usize {
    ACCOUNT_FIXED_KEYS
        + copy_peak_keys(assets, assignments)
        + LEDGER_SHARDS as usize
        + LEDGER_OPEN_VALUES as usize
        + USER_SHARDS as usize
        + EVENTS_DONE_KEPT
        + pending_events
}

/// The most keys the whole app holds for `shape`, every ring full, at a full refresh's peak.
pub const fn key_budget(shape: &Shape) -> usize {
    app_keys(shape.accounts, shape.policy_bytes)
        + shape.accounts * account_keys(shape.assets, shape.assignments, shape.pending_events)
}

/// The budget of the supported shape.
pub const SUPPORTED_BUDGET: usize = key_budget(&SUPPORTED);
const _: () = assert!(
    SUPPORTED_BUDGET * 10 <= CLOUD_KEYS * 9,
    "no room left on Fermyon Cloud"
);

/// How many accounts of `assets`, `assignments` and `pending_events` each fit in
/// [`CLOUD_KEYS`] with [`SUPPORTED_POLICY_BYTES`] of policies (running jobs and all).
pub const fn accounts_that_fit(assets: usize, assignments: usize, pending_events: usize) -> usize {
    let per = account_keys(assets, assignments, pending_events) + RUNNING_JOBS_PER_ACCOUNT;
    let fixed = app_keys(0, SUPPORTED_POLICY_BYTES);
    if fixed >= CLOUD_KEYS {
        return 0;
    }
    (CLOUD_KEYS - fixed) / per
}

/// The largest value any writer may store (Fermyon Cloud: 1 MB per value).
pub const VALUE_LIMIT: usize = 1_000_000;
/// Asset records per asset page (target).
pub const ASSET_PAGE_ENTRIES: usize = 100;
/// Asset records a page may hold before it is split (between full refreshes, when new assets
/// arrive: `copy::insert_assets`): ~300 B each, ~120 KiB.
pub const ASSET_PAGE_SPLIT: usize = 4 * ASSET_PAGE_ENTRIES;
/// Assignment entries per copy shard (target; ~20-60 B each: ~160-480 KiB). (Before: 4,096;
/// a copy written with it stays readable, its index records its shard count, and the next full
/// refresh writes the new size.)
pub const COPY_SHARD_ENTRIES: usize = 8192;
/// Assignment entries per copy shard while an account has fewer than [`COPY_SHARDS_SMALL`]
/// shards (~20-60 KiB a shard; see [`copy_shards_for`]).
pub const COPY_SHARD_MIN_ENTRIES: usize = 1024;
/// Copy shards an account uses at most before its shards grow past
/// [`COPY_SHARD_MIN_ENTRIES`] entries.
pub const COPY_SHARDS_SMALL: u32 = 64;
/// An asset's entries per copy shard it owns (and per page of its assignments).
pub const ASSET_COPY_PAGE: usize = 1000;

/// Shards of an account's managed users (fixed: 100,000 users at ~200 B stay ~300 KiB a shard).
pub const USER_SHARDS: u32 = 64;
/// The byte bound of a page of a ring (audit, jobs, ended events): a page is full at its count
/// or at this many bytes, whichever comes first, so a ring page stays far under [`VALUE_LIMIT`].
pub const RING_PAGE_BYTES: usize = 256 * 1024;
/// Audit records per audit page (~150-300 B each; full earlier at [`RING_PAGE_BYTES`]).
pub const AUDIT_PAGE: usize = 1000;
/// Notices per notice page (~250-400 B each: ≤ ~200 KiB; a notice's fields are bounded by the
/// copy's keys and subjects).
pub const NOTICE_PAGE: usize = 500;

// Bounds of what accumulates: rings, so the key count and every value stay fixed.
/// Audit pages kept ([`AUDIT_PAGE`] records each): 10,000 records. (Before: 50 pages of 200;
/// the first page move deletes the pages older than the ring.)
pub const AUDIT_PAGES_KEPT: u64 = 10;
/// Notice pages kept ([`NOTICE_PAGE`] notices each): 20,000 notices. A page leaves the ring
/// even when its notices were never delivered; the outbox then counts them as dropped, with why.
/// (Before: 100 pages of 200; the first page move deletes the pages older than the ring.)
pub const NOTICE_PAGES_KEPT: u64 = 40;
/// Finished jobs kept in the job index (running jobs are never dropped).
pub const KEPT_JOBS: usize = 200;
/// Pages of finished job records (`jobs/done/{n}`, `n = shard_of(jobId, JOB_DONE_PAGES)`).
pub const JOB_DONE_PAGES: u32 = 8;
/// Finished job records per page at most (twice the even share of [`KEPT_JOBS`], for hashing's
/// unevenness); a page is also full at [`RING_PAGE_BYTES`], oldest out first.
pub const JOB_DONE_PAGE: usize = 2 * KEPT_JOBS / JOB_DONE_PAGES as usize;
/// Apple `notificationId`s remembered per account for deduplication (Apple retries within
/// minutes; ~40 B each).
pub const NOTIFIED_IDS: usize = 2000;

/// The claim on creating `key` (atomics builds only): an integer that only `increment` ever
/// touches. Whoever raises it from 0 to 1 may create `key`, then deletes the claim; it exists only
/// while a key is being created (or after its creator stopped in between: the next creator breaks
/// it after a wait). See `vpp_spin_bridge::kv`.
pub fn creation_claim(key: &str) -> String {
    format!("creating/{key}")
}
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
/// The index of an account's copy (generation, page and shard counts).
pub fn assets(account: &str) -> String {
    format!("assets/{account}")
}
/// The index of the generation a full refresh is building.
pub fn assets_staging(account: &str) -> String {
    format!("assets/{account}/staging")
}
/// One page of an account's assets in a generation.
pub fn asset_page(account: &str, generation: u64, page: u32) -> String {
    format!("assets/{account}/{generation}/{page}")
}
/// Apple's asset page `n` as a full refresh read it (until it packs the pages).
pub fn asset_raw_page(account: &str, generation: u64, n: u32) -> String {
    format!("assets/{account}/{generation}/raw/{n}")
}
/// One shard of an account's assignment copy in a generation.
pub fn copy_shard(account: &str, generation: u64, shard: u32) -> String {
    format!("assignments/{account}/{generation}/{shard}")
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
/// Assets of an account with open ledger entries (where reads of many assets look).
pub fn ledger_open_assets(account: &str) -> String {
    format!("ledger/{account}/open-assets")
}
/// Open value `n` of an account's ledger: the open entries of the assets hashed to it.
pub fn ledger_open(account: &str, n: u32) -> String {
    format!("ledger/{account}/open/{n}")
}
pub fn policies() -> String {
    "policies".into()
}
/// A policy in the layout of earlier versions (one value each); read until moved to a page.
pub fn policy(id: &str) -> String {
    format!("policy/{id}")
}
/// A page of policies (id → policy).
pub fn policy_page(n: u32) -> String {
    format!("policies/page/{n}")
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
/// Page `n` of finished job records.
pub fn jobs_done_page(n: u32) -> String {
    format!("jobs/done/{n}")
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

/// Asset pages for `count` assets (at least one).
pub const fn asset_pages_for(count: usize) -> u32 {
    let n = count.div_ceil(ASSET_PAGE_ENTRIES);
    (if n == 0 { 1 } else { n }) as u32
}

/// Copy shards for `count` assignments (at least one): shards of ~[`COPY_SHARD_MIN_ENTRIES`]
/// until the account has [`COPY_SHARDS_SMALL`] of them (~65,000 assignments), as many as that
/// up to [`COPY_SHARD_ENTRIES`] each (~524,000), then more of that size. Small shards make a
/// page of an asset's assignments (one shard) and an incremental refresh's rewrites small; the
/// count is capped so the supported shape's keys are those of [`COPY_SHARD_ENTRIES`] alone.
pub const fn copy_shards_for(count: usize) -> u32 {
    let big = count.div_ceil(COPY_SHARD_ENTRIES);
    let mut small = count.div_ceil(COPY_SHARD_MIN_ENTRIES);
    if small > COPY_SHARDS_SMALL as usize {
        small = COPY_SHARDS_SMALL as usize;
    }
    let n = if big > small { big } else { small };
    (if n == 0 { 1 } else { n }) as u32
}

/// Copy shards (and assignment pages) of an asset with `in_use` assignments, of `copy_shards`.
pub fn asset_copy_pages_for(in_use: usize, copy_shards: u32) -> u32 {
    (in_use.div_ceil(ASSET_COPY_PAGE).max(1) as u32).min(copy_shards.max(1))
}

/// The page of the asset `asset_key` among `pages` asset pages.
pub fn asset_page_of(asset_key: &str, pages: u32) -> u32 {
    shard_of(asset_key, pages)
}

/// The page of `asset_key` in a copy whose asset pages grew from `base` (0: never split) to
/// `pages` by splitting one page at a time (linear hashing, `copy::split_next_page`): with
/// `b = base × 2^L ≤ pages < 2b`, pages below `pages - b` are split and use `shard_of(k, 2b)`,
/// the others `shard_of(k, b)`. With `base` 0 (or equal to `pages`) this is
/// [`asset_page_of`], so a copy that never split reads as before.
pub fn asset_page_in(asset_key: &str, pages: u32, base: u32) -> u32 {
    let b = asset_page_level(pages, base);
    let p = shard_of(asset_key, b);
    if p < pages.max(1) - b {
        shard_of(asset_key, 2 * b)
    } else {
        p
    }
}

/// The base of a copy of `pages` asset pages split from `base` (0: never split): `pages` when
/// it never split. Two layouts of one base are one family of linear hashing: an asset's page in
/// one is found from its page in the other (see [`asset_pages_holding`]).
pub fn asset_page_base(pages: u32, base: u32) -> u32 {
    if base == 0 {
        pages.max(1)
    } else {
        base
    }
}

/// The modulus of page `page` of a layout: the assets on it are those whose hash is `page`
/// modulo it (`2b` for a page split at this level and for the page split off it, `b`
/// otherwise).
fn asset_page_modulus(page: u32, pages: u32, base: u32) -> u32 {
    let b = asset_page_level(pages, base);
    if page < pages.max(1) - b || page >= b {
        2 * b
    } else {
        b
    }
}

/// The pages of the layout (`pages`, `base`) that can hold assets of page `old` of the layout
/// (`old_pages`, `base`): the same base, any number of splits between (more pages or fewer).
/// Both moduli are `base × 2^i`, so page `q` holds assets of `old` exactly when `q` and `old`
/// agree modulo the smaller one. In page order; one page when nothing split in between.
pub fn asset_pages_holding(old: u32, old_pages: u32, pages: u32, base: u32) -> Vec<u32> {
    let base = asset_page_base(old_pages, base);
    let m_old = asset_page_modulus(old, old_pages, base);
    (0..pages.max(1))
        .filter(|&q| {
            let m = asset_page_modulus(q, pages, base).min(m_old);
            q % m == old % m
        })
        .collect()
}

/// The asset pages and base (0: not split) of a full refresh's new generation of `assets`
/// assets, when the current generation has `pages` pages of base `base` (`None`: no copy yet).
/// The new generation keeps the current base when it needs at least that many pages, so it
/// is the same family and a cursor into the licenses list stays valid across the refresh; an
/// account that shrank below its base starts a new family (such a cursor is refused, 409).
/// Either way the page count is [`asset_pages_for`], what the key budget counts.
pub fn asset_layout_for(assets: usize, current: Option<(u32, u32)>) -> (u32, u32) {
    let pages = asset_pages_for(assets);
    match current {
        Some((p, b)) => {
            let base = asset_page_base(p, b);
            if base < pages {
                (pages, base)
            } else {
                (pages, 0)
            }
        }
        None => (pages, 0),
    }
}

/// The level size `b` of [`asset_page_in`]: `base × 2^L`, the largest not above `pages`.
pub fn asset_page_level(pages: u32, base: u32) -> u32 {
    let n = pages.max(1);
    let mut b = if base == 0 { n } else { base.min(n) };
    while b.saturating_mul(2) <= n {
        b *= 2;
    }
    b
}

/// The `i`-th copy shard of an asset (its `i`-th page of assignments).
pub fn asset_copy_shard(asset_key: &str, i: u32, copy_shards: u32) -> u32 {
    let c = copy_shards.max(1);
    ((u64::from(shard_of(asset_key, c)) + u64::from(i)) % u64::from(c)) as u32
}

/// The copy shard of subject `tag` of an asset spread over `asset_pages` of `copy_shards`.
pub fn copy_shard_of(asset_key: &str, tag: &str, asset_pages: u32, copy_shards: u32) -> u32 {
    asset_copy_shard(asset_key, shard_of(tag, asset_pages.max(1)), copy_shards)
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
        assert_eq!(copy_shards_for(0), 1);
        assert_eq!(copy_shards_for(COPY_SHARD_MIN_ENTRIES), 1);
        assert_eq!(copy_shards_for(COPY_SHARD_MIN_ENTRIES + 1), 2);
        // 100,000 assignments: 64 shards of ~1,560 (before: 13 of ~7,700).
        assert_eq!(copy_shards_for(100_000), COPY_SHARDS_SMALL);
        let small_max = COPY_SHARDS_SMALL as usize * COPY_SHARD_ENTRIES;
        assert_eq!(copy_shards_for(small_max), COPY_SHARDS_SMALL);
        assert_eq!(copy_shards_for(small_max + 1), COPY_SHARDS_SMALL + 1);
        // The supported shape's shards are those of COPY_SHARD_ENTRIES alone.
        assert_eq!(copy_shards_for(1_000_000), 123);
        assert_eq!(
            copy_shards_for(1_000_000),
            1_000_000usize.div_ceil(COPY_SHARD_ENTRIES) as u32
        );
        assert_eq!(asset_pages_for(10_000), 100);
        assert_eq!(asset_copy_pages_for(0, 245), 1);
        assert_eq!(asset_copy_pages_for(100_000, 245), 100);
        assert_eq!(asset_copy_pages_for(100_000, 7), 7);
    }

    #[test]
    fn an_asset_owns_consecutive_shards_and_its_subjects_stay_in_them() {
        let c = 245;
        let owned: Vec<u32> = (0..5).map(|i| asset_copy_shard("1:STDQ", i, c)).collect();
        for n in 0..1000 {
            let s = copy_shard_of("1:STDQ", &format!("s:SER{n}"), 5, c);
            assert!(owned.contains(&s));
        }
        for w in owned.windows(2) {
            assert_eq!(w[1], (w[0] + 1) % c);
        }
    }

    #[test]
    fn the_supported_shape_fits_fermyon_cloud_with_room() {
        assert_eq!(copy_peak_keys(10_000, 1_000_000), 456);
        assert_eq!(key_budget(&SUPPORTED), 880);
        // Policies count by their bytes: 10 MB of them in at most 24 pages.
        assert_eq!(policy_pages_for(SUPPORTED_POLICY_BYTES), 24);
        assert_eq!(policy_pages_for(0), 1);
        const { assert!(POLICY_PAGE_BYTES < VALUE_LIMIT) };
        assert!(key_budget(&SUPPORTED) <= CLOUD_KEYS * 9 / 10);
        // Several smaller accounts: how many fit.
        assert_eq!(
            accounts_that_fit(10_000, 1_000_000, SUPPORTED_PENDING_EVENTS),
            1
        );
        assert!(accounts_that_fit(1_000, 20_000, 20) >= 3);
        // Every ring page stays far under the value limit.
        const { assert!(RING_PAGE_BYTES * 2 < VALUE_LIMIT) };
        const { assert!(JOB_DONE_PAGE * (JOB_DONE_PAGES as usize) >= KEPT_JOBS) };
    }

    #[test]
    fn split_pages_keep_every_asset_on_one_page_and_move_only_the_split_half() {
        let ks: Vec<String> = (0..2000).map(|i| format!("{i}:STDQ")).collect();
        for k in &ks {
            assert_eq!(asset_page_in(k, 3, 0), asset_page_of(k, 3));
        }
        // From 3 pages to 13, one split at a time: an asset moves only off the page split, to
        // the new page.
        for n in 3..13u32 {
            for k in &ks {
                let before = asset_page_in(k, n, 3);
                let after = asset_page_in(k, n + 1, 3);
                let split = n - asset_page_level(n, 3);
                assert!(after < n + 1);
                assert!(
                    after == before || (before == split && after == n),
                    "{k} {n}"
                );
            }
        }
    }

    #[test]
    fn the_pages_holding_an_old_page_are_exactly_where_its_assets_went() {
        // Enough assets that every page of every layout below holds some of every old page
        // it can: the pages listed are exactly those the assets went to.
        let ks: Vec<String> = (0..4000).map(|i| format!("{}:STDQ", 100000 + i)).collect();
        for base in [1u32, 3] {
            for old_pages in base..base * 5 {
                let old_of: Vec<u32> = ks
                    .iter()
                    .map(|k| asset_page_in(k, old_pages, base))
                    .collect();
                for pages in base..base * 9 {
                    let now: Vec<u32> = ks.iter().map(|k| asset_page_in(k, pages, base)).collect();
                    for old in 0..old_pages {
                        let holding = asset_pages_holding(old, old_pages, pages, base);
                        let went: Vec<u32> = (0..ks.len())
                            .filter(|&i| old_of[i] == old)
                            .map(|i| now[i])
                            .collect::<std::collections::BTreeSet<u32>>()
                            .into_iter()
                            .collect();
                        assert_eq!(
                            holding, went,
                            "base {base}, {old_pages} -> {pages} pages: {old}"
                        );
                    }
                }
            }
        }
        // Nothing split between: the page itself.
        assert_eq!(asset_pages_holding(2, 7, 7, 4), vec![2]);
        assert_eq!(asset_pages_holding(2, 7, 7, 0), vec![2]);
    }

    #[test]
    fn a_full_refresh_keeps_the_base_unless_the_account_shrank_below_it() {
        // No copy yet: a new family of asset_pages_for pages.
        assert_eq!(asset_layout_for(1_000, None), (10, 0));
        // Never split, as many pages or more: the same base.
        assert_eq!(asset_layout_for(1_000, Some((10, 0))), (10, 0));
        assert_eq!(asset_layout_for(3_000, Some((10, 0))), (30, 10));
        // Split from 3 to 17: base 3 kept.
        assert_eq!(asset_layout_for(2_000, Some((17, 3))), (20, 3));
        // Shrank below the base: a new family.
        assert_eq!(asset_layout_for(200, Some((10, 0))), (2, 0));
        // Whatever the history, the page count is what the key budget counts.
        for (a, cur) in [(5_000, Some((1, 0))), (10_000, Some((64, 2))), (7, None)] {
            assert_eq!(asset_layout_for(a, cur).0, asset_pages_for(a));
        }
    }

    #[test]
    fn keys_stay_short() {
        // Fermyon Cloud caps keys at 255 bytes.
        let id = "a".repeat(36);
        assert!(copy_shard(&id, u64::MAX, u32::MAX).len() < 255);
        assert!(asset_raw_page(&id, u64::MAX, u32::MAX).len() < 255);
        assert!(ledger_shard(&id, u32::MAX).len() < 255);
        assert!(ledger_open(&id, u32::MAX).len() < 255);
        assert!(ledger_open_assets(&id).len() < 255);
    }
}
