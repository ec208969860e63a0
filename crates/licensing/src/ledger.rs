//! The ledger: every assignment this instance asked Apple for, per (asset, subject), and the
//! only functions that move an entry from one state to another.
//!
//! | state | where | meaning | holds a license |
//! |---|---|---|---|
//! | `queued` | open | admitted (its license set aside), not yet sent: the resume point | yes |
//! | `unknown` | open | sent, and Apple's answer is not known: it may have been applied | yes |
//! | `pending` | open | Apple accepted it (one or more events), outcome not yet known | yes |
//! | `confirmed` | shard | Apple holds it, and we made it | (counted by Apple) |
//! | `revoking` | shard | asked Apple to take it back (event once accepted) | (counted by Apple) |
//! | `failed` | shard | Apple refused it with an `errorNumber`; pruned after [`FAILED_KEEP_SECS`] | no |
//! | gone | — | no entry: Apple no longer holds it | no |
//!
//! Open entries (`queued`, `unknown`, `pending`) of one asset live together in one of the
//! account's [`OPEN_SHARDS`] open values, `ledger/{id}/open/{n}`: the licenses they hold are the asset's reservation, so it is
//! derived, never counted twice, and admitting new entries is one compare-and-swap that checks
//! what is available and sets it aside together ([`admit`]). Settled entries live in the
//! account's ledger shards (`ledger/{id}/{shard}`).
//!
//! A lost answer is never a "no": an entry whose request may have reached Apple stays `unknown`
//! until Apple's assignments for that device or user say what happened ([`settle_account`]);
//! only an Apple error with an `errorNumber` releases it at once.

use crate::copy;
use crate::error::ApiError;
use crate::event;
use crate::job::{self, Budget, Job};
use crate::model::{
    ledger_shard_of, AssetRecord, AssetsDoc, EventKind, EventRecord, Failure, LedgerEntry,
    LedgerShard, LedgerState, Subject, LEDGER_SHARDS,
};
use crate::refresh::SliceEnd;
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use vpp_apple::{
    split_manage, AppleError, AssetRef, AssignmentFilter, Client, Clock, ManageAssetsRequest,
    PricingParam, Transport,
};
use vpp_store::{get_json, keys, update, Kv, StoreError};

/// Open entries one asset may have at once (~45 B each: ≤ ~450 KiB per value).
pub const MAX_OPEN: usize = 10_000;
/// A queued entry older than this lost the request that admitted it: settling sends it.
pub const QUEUE_GRACE_SECS: i64 = 45;
/// An unknown entry Apple still does not hold after this long is given up (Apple resends a
/// request still pending after 10 minutes, so none is applied later than that).
pub const UNKNOWN_GIVE_UP_SECS: i64 = 900;
/// Failed entries are kept this long (to show why), then pruned.
pub const FAILED_KEEP_SECS: i64 = 7 * 86_400;

/// Where an open entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenState {
    #[serde(rename = "q")]
    Queued,
    #[serde(rename = "u")]
    Unknown,
    #[serde(rename = "p")]
    Pending,
}

impl OpenState {
    pub fn name(self) -> &'static str {
        match self {
            OpenState::Queued => "queued",
            OpenState::Unknown => "unknown",
            OpenState::Pending => "pending",
        }
    }
}

/// One open entry (short field names: an asset may hold [`MAX_OPEN`] of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    #[serde(rename = "s")]
    pub state: OpenState,
    /// Admitted at (unix seconds).
    #[serde(rename = "t")]
    pub since: i64,
    /// Last sent to Apple (unix seconds).
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<i64>,
    /// Every event Apple may have created for it (indexes into [`OpenDoc::events`]).
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<u32>,
    /// A removal of ours (its source) that Apple accepted after every event of this entry, and
    /// applied: whatever those events did, Apple does not hold it now. Their success is what
    /// that removal took (its notice); they confirm nothing.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<String>,
    /// That removal already sent the notice (it knew the license was held).
    #[serde(rename = "n", default, skip_serializing_if = "std::ops::Not::not")]
    pub taken_noticed: bool,
}

/// The open entries of one asset: subject tag → entry, plus the event ids they refer to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenDoc {
    #[serde(rename = "ev", default)]
    pub events: Vec<String>,
    #[serde(rename = "o", default)]
    pub entries: BTreeMap<String, Open>,
}

impl OpenDoc {
    fn event_index(&mut self, id: &str) -> u32 {
        match self.events.iter().position(|e| e == id) {
            Some(i) => i as u32,
            None => {
                self.events.push(id.to_string());
                (self.events.len() - 1) as u32
            }
        }
    }

    pub fn event_ids(&self, o: &Open) -> Vec<String> {
        o.events
            .iter()
            .filter_map(|i| self.events.get(*i as usize).cloned())
            .collect()
    }

    /// Drop event ids no entry names any more.
    fn compact(&mut self) {
        let used: BTreeSet<u32> = self
            .entries
            .values()
            .flat_map(|o| o.events.iter().copied())
            .collect();
        if used.len() == self.events.len() {
            return;
        }
        let mut map = BTreeMap::new();
        let mut events = Vec::new();
        for i in used {
            if let Some(id) = self.events.get(i as usize) {
                map.insert(i, events.len() as u32);
                events.push(id.clone());
            }
        }
        for o in self.entries.values_mut() {
            o.events = o
                .events
                .iter()
                .filter_map(|i| map.get(i).copied())
                .collect();
        }
        self.events = events;
    }
}

fn secs(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(s, 0).single().unwrap_or_default()
}

/// The open values of an account: assets are hashed over this many (a fixed number of keys,
/// created before any asset is assignable; see [`prepare`]).
pub const OPEN_SHARDS: u32 = keys::LEDGER_OPEN_VALUES;
/// Open entries one open value holds at most, over all its assets (~45 B each: ≤ ~540 KiB).
pub const MAX_OPEN_PER_SHARD: usize = 12_000;

/// One open value: asset key → its open entries (assets with none are left out).
pub type OpenShard = BTreeMap<String, OpenDoc>;

/// The open value that holds an asset's open entries.
pub fn open_shard_of(asset_key: &str) -> u32 {
    keys::shard_of(asset_key, OPEN_SHARDS)
}

pub(crate) fn open_key(account: &str, asset_key: &str) -> String {
    keys::ledger_open(account, open_shard_of(asset_key))
}

pub fn open_doc(kv: &impl Kv, account: &str, asset_key: &str) -> Result<OpenDoc, StoreError> {
    let key = open_key(account, asset_key);
    open_doc_in(&key, kv.get(&key)?.as_deref(), asset_key)
}

/// [`open_doc`] from the bytes read from the asset's open value `key`.
pub(crate) fn open_doc_in(
    key: &str,
    stored: Option<&[u8]>,
    asset_key: &str,
) -> Result<OpenDoc, StoreError> {
    let only = BTreeSet::from([asset_key]);
    let mut shard: OpenShard = crate::copy::pick_in(key, stored, &only)?;
    Ok(shard.remove(asset_key).unwrap_or_default())
}

/// Change the open entries of an asset; `f` gets them and the number of open entries of the
/// other assets in the same value, and returns whether it changed anything.
fn open_update<R>(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    mut f: impl FnMut(&mut OpenDoc, usize) -> (bool, R),
) -> Result<R, StoreError> {
    update::<OpenShard, R>(kv, &open_key(account, asset_key), |cur| {
        let mut shard = cur.unwrap_or_default();
        let mut doc = shard.remove(asset_key).unwrap_or_default();
        let others: usize = shard.values().map(|d| d.entries.len()).sum();
        let (changed, out) = f(&mut doc, others);
        if !changed {
            return Ok((None, out));
        }
        doc.compact();
        if !doc.entries.is_empty() {
            shard.insert(asset_key.to_string(), doc);
        }
        Ok((Some(shard), out))
    })
}

/// Create the account's (empty) open values that do not exist yet, before any asset becomes
/// assignable (a refresh writing assets into the copy, one writer per account). Admissions
/// then always compare-and-swap against an existing value: where the platform's swap on an
/// absent key is an upsert, two first admissions could otherwise both win. A fixed number of
/// keys ([`OPEN_SHARDS`]), whatever the number of assets.
pub fn prepare(kv: &impl Kv, account: &str) -> Result<(), StoreError> {
    let empty = serde_json::to_vec(&OpenShard::default()).map_err(|e| StoreError::Corrupt {
        key: keys::ledger_open(account, 0),
        reason: e.to_string(),
    })?;
    for n in 0..OPEN_SHARDS {
        let key = keys::ledger_open(account, n);
        if kv.get(&key)?.is_none() {
            kv.swap(&key, None, &empty)?;
        }
    }
    Ok(())
}

/// Assets of the account that may have open entries (`keys::ledger_open_assets`): where reads
/// of many assets (the licenses list) look for reservations instead of reading every asset's
/// open value. An asset is added right after entries are admitted for it and removed only by
/// settling once its open value is empty (re-checked after the removal, so a concurrent
/// admission keeps it listed); settling also lists any non-empty value it reads, so a writer
/// stopped between the two writes is repaired by the next settling.
pub fn open_assets(kv: &impl Kv, account: &str) -> Result<BTreeSet<String>, StoreError> {
    Ok(get_json(kv, &keys::ledger_open_assets(account))?.unwrap_or_default())
}

fn mark_open(kv: &impl Kv, account: &str, asset_key: &str) -> Result<(), StoreError> {
    if open_assets(kv, account)?.contains(asset_key) {
        return Ok(());
    }
    update::<BTreeSet<String>, ()>(kv, &keys::ledger_open_assets(account), |cur| {
        let mut set = cur.unwrap_or_default();
        let added = set.insert(asset_key.to_string());
        Ok((added.then_some(set), ()))
    })
}

/// Take an asset whose open value is empty off [`open_assets`] (put back at once if entries
/// were admitted meanwhile).
fn unmark_open(kv: &impl Kv, account: &str, asset_key: &str) -> Result<(), StoreError> {
    update::<BTreeSet<String>, ()>(kv, &keys::ledger_open_assets(account), |cur| {
        let Some(mut set) = cur else {
            return Ok((None, ()));
        };
        let removed = set.remove(asset_key);
        Ok((removed.then_some(set), ()))
    })?;
    if !open_doc(kv, account, asset_key)?.entries.is_empty() {
        mark_open(kv, account, asset_key)?;
    }
    Ok(())
}

/// Reservations of the account's assets that have open entries: one read for
/// [`open_assets`] and one per open value those assets are in (never one per asset).
pub fn open_reservations(kv: &impl Kv, account: &str) -> Result<BTreeMap<String, i64>, StoreError> {
    let listed = open_assets(kv, account)?;
    let shards: BTreeSet<u32> = listed.iter().map(|ak| open_shard_of(ak)).collect();
    let mut out = BTreeMap::new();
    for n in shards {
        let shard: OpenShard = get_json(kv, &keys::ledger_open(account, n))?.unwrap_or_default();
        for (ak, doc) in shard {
            if !doc.entries.is_empty() {
                out.insert(ak, doc.entries.len() as i64);
            }
        }
    }
    Ok(out)
}

/// Licenses an asset's open entries hold (its reservation).
pub fn reserved(kv: &impl Kv, account: &str, asset_key: &str) -> Result<i64, StoreError> {
    Ok(open_doc(kv, account, asset_key)?.entries.len() as i64)
}

/// Change ledger entries of one shard group: `f` maps the current entry to the new one
/// (`None`: unchanged; `Some(None)`: removed). Failed entries past [`FAILED_KEEP_SECS`] are
/// pruned on the way. Returns each subject's entry as it was.
fn shard_write(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    now: DateTime<Utc>,
    f: impl Fn(&Subject, Option<&LedgerEntry>) -> Option<Option<LedgerEntry>>,
) -> Result<BTreeMap<String, Option<LedgerEntry>>, StoreError> {
    let mut by_shard: BTreeMap<u32, Vec<&Subject>> = BTreeMap::new();
    for s in subjects {
        by_shard
            .entry(ledger_shard_of(asset_key, s))
            .or_default()
            .push(s);
    }
    let mut before = BTreeMap::new();
    for (shard, list) in by_shard {
        let seen = update::<LedgerShard, Vec<(String, Option<LedgerEntry>)>>(
            kv,
            &keys::ledger_shard(account, shard),
            |cur| {
                let mut l = cur.unwrap_or_default();
                let mut changed = prune_failed(&mut l, now);
                let mut seen = Vec::new();
                let m = l.entry(asset_key.to_string()).or_default();
                for s in &list {
                    let tag = s.tag();
                    let cur = m.get(&tag).cloned();
                    if let Some(next) = f(s, cur.as_ref()) {
                        changed = true;
                        match next {
                            Some(e) => {
                                m.insert(tag.clone(), e);
                            }
                            None => {
                                m.remove(&tag);
                            }
                        }
                    }
                    seen.push((tag, cur));
                }
                l.retain(|_, m| !m.is_empty());
                Ok((changed.then_some(l), seen))
            },
        )?;
        before.extend(seen);
    }
    Ok(before)
}

fn prune_failed(l: &mut LedgerShard, now: DateTime<Utc>) -> bool {
    let mut changed = false;
    for m in l.values_mut() {
        let n = m.len();
        m.retain(|_, e| {
            !(e.state == LedgerState::Failed && now - e.at > Duration::seconds(FAILED_KEEP_SECS))
        });
        changed |= m.len() != n;
    }
    l.retain(|_, m| !m.is_empty());
    changed
}

/// The settled entry of (asset, subject), if any.
pub fn settled(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subject: &Subject,
) -> Result<Option<LedgerEntry>, StoreError> {
    let l: LedgerShard = get_json(
        kv,
        &keys::ledger_shard(account, ledger_shard_of(asset_key, subject)),
    )?
    .unwrap_or_default();
    Ok(l.get(asset_key)
        .and_then(|m| m.get(&subject.tag()))
        .cloned())
}

/// One entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryView {
    pub state: &'static str,
    pub event_ids: Vec<String>,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
}

/// The entry of (asset, subject) in whatever state it is.
pub fn entry(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subject: &Subject,
) -> Result<Option<EntryView>, StoreError> {
    let open = open_doc(kv, account, asset_key)?;
    if let Some(o) = open.entries.get(&subject.tag()) {
        return Ok(Some(EntryView {
            state: o.state.name(),
            event_ids: open.event_ids(o),
            at: at(o.since),
            error: None,
        }));
    }
    Ok(
        settled(kv, account, asset_key, subject)?.map(|e| EntryView {
            state: match e.state {
                LedgerState::Pending => "pending",
                LedgerState::Confirmed => "confirmed",
                LedgerState::Failed => "failed",
                LedgerState::Revoking => "revoking",
            },
            event_ids: e.event_id.into_iter().collect(),
            at: e.at,
            error: e.error,
        }),
    )
}

// --- admission ------------------------------------------------------------------------------

/// What [`admit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted {
        /// Now queued, their licenses set aside.
        admitted: Vec<Subject>,
        /// Already open (nothing new set aside for them).
        already_open: Vec<Subject>,
        /// Left out for lack of licenses (only when not all-or-nothing).
        shortfall: Vec<Subject>,
    },
    /// All-or-nothing and they do not all fit: nothing changed.
    NoRoom { needed: usize, available: i64 },
}

/// Licenses of `asset_key` free to admit: Apple's available count less the open entries,
/// within [`MAX_OPEN`] per asset and [`MAX_OPEN_PER_SHARD`] per open value (`others`: the open
/// entries of the other assets in it). `None`: unlimited.
fn room(doc: &AssetsDoc, asset_key: &str, open: &OpenDoc, others: usize) -> Option<i64> {
    let asset = doc.assets.iter().find(|a| a.key() == asset_key);
    let held = open.entries.len();
    let cap = (MAX_OPEN - held.min(MAX_OPEN))
        .min(MAX_OPEN_PER_SHARD - (held + others).min(MAX_OPEN_PER_SHARD)) as i64;
    match asset {
        Some(a) if a.total == vpp_apple::Asset::UNLIMITED_TOTAL => (cap < i64::MAX).then_some(cap),
        Some(a) => Some((a.available - open.entries.len() as i64).max(0).min(cap)),
        None => Some(0),
    }
}

/// Set licenses aside for `subjects` and queue them, in one compare-and-swap that also checks
/// what is available: two admissions at once never take the same license.
pub fn admit(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    all_or_nothing: bool,
    now: DateTime<Utc>,
) -> Result<Admission, StoreError> {
    // Normally made by the refresh that listed the asset (see `prepare`).
    let key = open_key(account, asset_key);
    if kv.get(&key)?.is_none() {
        if all_or_nothing {
            // A refusal writes nothing at all.
            let doc = copy::assets_for(kv, account, &[asset_key.to_string()])?;
            let free = room(&doc, asset_key, &OpenDoc::default(), 0).unwrap_or(i64::MAX);
            if subjects.len() as i64 > free {
                return Ok(Admission::NoRoom {
                    needed: subjects.len(),
                    available: free.max(0),
                });
            }
        }
        kv.swap(&key, None, b"{}")?;
    }
    let admission = open_update(kv, account, asset_key, |open, others| {
        // Apple's counts as they are now (a completed event moves them).
        let doc = copy::assets_for(kv, account, &[asset_key.to_string()]).unwrap_or_default();
        let free = room(&doc, asset_key, open, others)
            .unwrap_or(i64::MAX)
            .max(0) as usize;
        let (already, new): (Vec<Subject>, Vec<Subject>) = subjects
            .iter()
            .cloned()
            .partition(|s| open.entries.contains_key(&s.tag()));
        if all_or_nothing && new.len() > free {
            return (
                false,
                Admission::NoRoom {
                    needed: new.len(),
                    available: free as i64,
                },
            );
        }
        let take = new.len().min(free);
        for s in &new[..take] {
            open.entries.insert(
                s.tag(),
                Open {
                    state: OpenState::Queued,
                    since: secs(now),
                    sent: None,
                    events: Vec::new(),
                    taken_by: None,
                    taken_noticed: false,
                },
            );
        }
        (
            take > 0,
            Admission::Admitted {
                admitted: new[..take].to_vec(),
                already_open: already,
                shortfall: new[take..].to_vec(),
            },
        )
    })?;
    // Listed where reads look once the entries exist (see `open_assets`).
    if matches!(&admission, Admission::Admitted { admitted, .. } if !admitted.is_empty()) {
        mark_open(kv, account, asset_key)?;
    }
    Ok(admission)
}

/// Which of `subjects` are open (any state) for the asset.
pub fn open_subjects(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
) -> Result<BTreeSet<String>, StoreError> {
    Ok(open_doc(kv, account, asset_key)?
        .entries
        .into_keys()
        .collect())
}

// --- associate: sending and its outcomes -----------------------------------------------------

/// Mark `subjects` as sent (outcome unknown until Apple answers).
fn mark_sent(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    open_update(kv, account, asset_key, |open, _| {
        let mut changed = false;
        for s in subjects {
            if let Some(o) = open.entries.get_mut(&s.tag()) {
                if o.state != OpenState::Pending {
                    o.state = OpenState::Unknown;
                }
                o.sent = Some(secs(now));
                changed = true;
            }
        }
        (changed, ())
    })
}

/// Apple accepted an associate for `subjects` as `event_id`.
pub fn accepted(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    event_id: &str,
) -> Result<(), StoreError> {
    open_update(kv, account, asset_key, |open, _| {
        let idx = open.event_index(event_id);
        let mut changed = false;
        for s in subjects {
            if let Some(o) = open.entries.get_mut(&s.tag()) {
                o.state = OpenState::Pending;
                if !o.events.contains(&idx) {
                    o.events.push(idx);
                }
                // A request after the removal: Apple applies it after.
                o.taken_by = None;
                o.taken_noticed = false;
                changed = true;
            }
        }
        (changed, ())
    })
}

/// Apple refused the request with an `errorNumber`: nothing happened for `subjects`, their
/// licenses are free again (`requeue`: keep them queued to try again later).
fn refused(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    requeue: bool,
) -> Result<(), StoreError> {
    open_update(kv, account, asset_key, |open, _| {
        let mut changed = false;
        for s in subjects {
            let tag = s.tag();
            let Some(o) = open.entries.get_mut(&tag) else {
                continue;
            };
            if !o.events.is_empty() {
                // An earlier request was accepted: that event decides.
                o.state = OpenState::Pending;
            } else if requeue {
                o.state = OpenState::Queued;
            } else {
                open.entries.remove(&tag);
            }
            changed = true;
        }
        (changed, ())
    })
}

/// Apple holds (asset, subject) and `ours` says whether we asked for it (in `event_id`, which
/// Apple accepted at `asked`). Settles each into `confirmed`. Returns, per subject, whether the
/// ledger had it (open or settled, not failed), or `None` when the outcome is stale and changed
/// nothing: an event of ours that the entry no longer waits on (its license was revoked or
/// found gone since, or a newer request of ours decides), since Apple applied what came after.
#[allow(clippy::too_many_arguments)]
pub fn confirm(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    event_id: Option<&str>,
    ours: bool,
    asked: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Confirmed, StoreError> {
    let open = open_doc(kv, account, asset_key)?;
    // An outcome of our own event moves only what waits on it.
    let own = event_id.filter(|_| ours);
    // An associate we cannot place in time (an event we never learned of: a lost answer, or
    // not ours): it may have been applied long before what our entries wait on.
    let unplaced = event_id.is_none() && !ours;
    let idx = own.and_then(|id| open.events.iter().position(|e| e == id));
    let concerns = |tag: &str| match (open.entries.get(tag), own) {
        (None, _) => false,
        // Only the entry whose request's answer was lost (sent, and it waits on no event we
        // know): a queued entry's request was never sent (or Apple refused it), so an
        // associate we cannot place is not its.
        (Some(o), None) => !unplaced || (o.events.is_empty() && o.state == OpenState::Unknown),
        (Some(o), Some(_)) => {
            o.events.is_empty() || idx.is_some_and(|i| o.events.contains(&(i as u32)))
        }
    };
    let current = settled_of(kv, account, asset_key, subjects)?;
    // Our event's success, for an entry a later removal of ours took: what that removal took.
    let taken: BTreeMap<String, String> = subjects
        .iter()
        .filter(|s| own.is_some() && concerns(&s.tag()))
        .filter_map(|s| {
            let by = open.entries.get(&s.tag())?.taken_by.clone()?;
            Some((s.tag(), by))
        })
        .collect();
    let stale: BTreeSet<String> = subjects
        .iter()
        .map(|s| s.tag())
        .filter(|tag| {
            taken.contains_key(tag)
                || (own.is_some()
                    && !concerns(tag)
                    && (open.entries.contains_key(tag) || !current.contains_key(tag)))
                // Unplaced: events of ours decide (the entry's associate, or a revoke, or the
                // refusal of our last request in an event we placed: a lost answer's twin of
                // ours was accepted, so applied, before it, and the license was not held then).
                || (unplaced
                    && ((open.entries.contains_key(tag) && !concerns(tag))
                        || current.get(tag).is_some_and(|e| {
                            e.state == LedgerState::Revoking
                                || (e.state == LedgerState::Failed
                                    && e.event_id.is_some()
                                    && !open.entries.contains_key(tag))
                        })))
        })
        .collect();
    let fresh: Vec<Subject> = subjects
        .iter()
        .filter(|s| !stale.contains(&s.tag()))
        .cloned()
        .collect();
    // When the open entry's request was last sent (it concerns this outcome).
    let sent_of = |tag: &str| {
        open.entries
            .get(tag)
            .filter(|_| concerns(tag))
            .map(|o| at(o.sent.unwrap_or(o.since)))
    };
    let before = shard_write(kv, account, asset_key, &fresh, now, |s, cur| {
        let in_open = concerns(&s.tag());
        match cur {
            Some(e) if e.state == LedgerState::Confirmed => None,
            // Revoking, and no new request of ours since: the disassociate decides.
            Some(e) if e.state == LedgerState::Revoking && !in_open => None,
            Some(e) => Some(Some(LedgerEntry {
                state: LedgerState::Confirmed,
                event_id: event_id.map(str::to_string).or(e.event_id.clone()),
                at: now,
                error: None,
                // The open entry's request, when no event of it is known: Apple accepted it
                // after it was sent, so after any removal of ours accepted before (an earlier
                // revoke read late takes nothing of it). Not the settled entry's older time.
                asked: asked.or_else(|| sent_of(&s.tag())).or(e.asked),
            })),
            None if in_open || ours => Some(Some(LedgerEntry {
                state: LedgerState::Confirmed,
                event_id: event_id.map(str::to_string),
                at: now,
                error: None,
                asked,
            })),
            None => None,
        }
    })?;
    // A revoke of ours still outstanding, asked while the license was held: this later request
    // took its entry over, and Apple applies the revoke first (it accepted it first). What the
    // revoke takes is the license it was asked for; its outcome owes that notice, also though
    // the entry now records this newer assignment.
    for s in &fresh {
        let Some(Some(e)) = before.get(&s.tag()) else {
            continue;
        };
        if e.state != LedgerState::Revoking || !concerns(&s.tag()) {
            continue;
        }
        if let Some(revoke) = e.event_id.as_deref().filter(|r| Some(*r) != event_id) {
            event::owe_notice(kv, revoke, (asset_key.to_string(), s.clone()))?;
        }
    }
    let taken_subjects: Vec<Subject> = subjects
        .iter()
        .filter(|s| taken.contains_key(&s.tag()))
        .cloned()
        .collect();
    close(kv, account, asset_key, &fresh)?;
    let flags = subjects
        .iter()
        .map(|s| {
            let tag = s.tag();
            if stale.contains(&tag) {
                return None;
            }
            Some(
                ours || open.entries.contains_key(&tag)
                    || before
                        .get(&tag)
                        .and_then(|e| e.as_ref())
                        .is_some_and(|e| e.state != LedgerState::Failed),
            )
        })
        .collect();
    Ok(Confirmed {
        flags,
        taken: taken_subjects
            .iter()
            // Its removal already sent the notice.
            .filter(|s| !open.entries.get(&s.tag()).is_some_and(|o| o.taken_noticed))
            .map(|s| {
                let by = taken.get(&s.tag()).cloned().unwrap_or_default();
                (s.clone(), by)
            })
            .collect(),
        to_close: taken_subjects,
    })
}

/// Close the open entries a later removal took ([`Confirmed::to_close`]), once the notices
/// they owe are recorded.
pub fn close_taken(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
) -> Result<(), StoreError> {
    close(kv, account, asset_key, subjects)
}

/// What [`confirm`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confirmed {
    /// Per subject: whether the ledger had it (open or settled, not failed); `None`: the
    /// outcome is stale and changed nothing.
    pub flags: Vec<Option<bool>>,
    /// Subjects a later removal of ours took once this event gave them (with its source): each
    /// owes that removal's notice.
    pub taken: Vec<(Subject, String)>,
    /// The open entries of the subjects taken (with or without a notice owed), left open: the
    /// caller closes them ([`close_taken`]) once it recorded the notices, so an invocation
    /// killed before that finds them when the outcome is read again.
    pub to_close: Vec<Subject>,
}

/// A removal of ours, accepted at `asked_at` with `source`, was applied for `subjects`: an open
/// entry whose every event Apple accepted before it is taken (see [`Open::taken_by`]).
pub fn taken_while_open(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    asked_at: DateTime<Utc>,
    source: &str,
    noticed: &BTreeSet<String>,
) -> Result<(), StoreError> {
    let open = open_doc(kv, account, asset_key)?;
    let mut accepted_at: BTreeMap<u32, Option<DateTime<Utc>>> = BTreeMap::new();
    for s in subjects {
        if let Some(o) = open.entries.get(&s.tag()) {
            for i in &o.events {
                if let std::collections::btree_map::Entry::Vacant(v) = accepted_at.entry(*i) {
                    let t = match open.events.get(*i as usize) {
                        Some(id) => event::load(kv, id)?.map(|r| r.created_at),
                        None => None,
                    };
                    v.insert(t);
                }
            }
        }
    }
    open_update(kv, account, asset_key, |doc, _| {
        let mut changed = false;
        for s in subjects {
            let Some(o) = doc.entries.get_mut(&s.tag()) else {
                continue;
            };
            let before = o.state == OpenState::Pending
                && !o.events.is_empty()
                && o.events.iter().all(|i| {
                    // The index may have moved since it was read: compare by id.
                    let same = open.events.get(*i as usize) == doc.events.get(*i as usize);
                    same && accepted_at
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|t| t < asked_at)
                });
            if before && o.taken_by.is_none() {
                o.taken_by = Some(source.to_string());
                o.taken_noticed = noticed.contains(&s.tag());
                changed = true;
            }
        }
        (changed, ())
    })
}

/// Does the open entry of `tag` record a request of ours admitted after `t`, and is the copy's
/// entry (naming `copy_event`, if any) that request's (it names no event, or one the entry
/// waits on)? The entry's requests were all sent after it was admitted: Apple accepted, so
/// applied, each of them after anything it accepted at `t`.
pub fn admitted_after(
    open: &OpenDoc,
    tag: &str,
    copy_event: Option<&str>,
    t: DateTime<Utc>,
) -> bool {
    let Some(o) = open.entries.get(tag) else {
        return false;
    };
    let reflects = copy_event.is_none_or(|id| open.event_ids(o).iter().any(|e| e == id));
    // `since` is whole seconds (rounded down): later than `t` only when really later.
    reflects && at(o.since) > t
}

/// The settled entries of `subjects` (by tag) that exist.
fn settled_of(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
) -> Result<BTreeMap<String, LedgerEntry>, StoreError> {
    let mut out = BTreeMap::new();
    for s in subjects {
        if let Some(e) = settled(kv, account, asset_key, s)? {
            out.insert(s.tag(), e);
        }
    }
    Ok(out)
}

/// Take `subjects` out of the open entries (they are settled now).
fn close(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
) -> Result<(), StoreError> {
    open_update(kv, account, asset_key, |open, _| {
        let n = open.entries.len();
        for s in subjects {
            open.entries.remove(&s.tag());
        }
        (open.entries.len() != n, ())
    })
}

/// Apple refused (asset, subject) in `event_id` (`None`: an event we did not know). An entry
/// still waiting on another event Apple may have created keeps waiting; otherwise it becomes
/// `failed`. Returns the subjects that failed.
pub fn fail(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    failures: &[(Subject, Failure)],
    event_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Subject>, StoreError> {
    let failed: Vec<Subject> = open_update(kv, account, asset_key, |open, _| {
        let idx = event_id.and_then(|id| open.events.iter().position(|e| e == id));
        let mut out = Vec::new();
        let mut changed = false;
        for (s, _) in failures {
            let tag = s.tag();
            let Some(o) = open.entries.get_mut(&tag) else {
                continue;
            };
            let concerns = match idx {
                Some(i) => o.events.contains(&(i as u32)),
                // An event we did not learn of: it can only be the lost answer of an unknown.
                None => o.events.is_empty() && o.state == OpenState::Unknown,
            };
            if !concerns {
                continue;
            }
            if let Some(i) = idx {
                o.events.retain(|e| *e != i as u32);
            }
            changed = true;
            if o.events.is_empty() {
                open.entries.remove(&tag);
                out.push(s.clone());
            }
        }
        (changed, out)
    })?;
    let by_tag: BTreeMap<String, &Failure> = failures.iter().map(|(s, f)| (s.tag(), f)).collect();
    shard_write(kv, account, asset_key, &failed, now, |s, cur| match cur {
        Some(e) if matches!(e.state, LedgerState::Confirmed | LedgerState::Revoking) => None,
        _ => Some(Some(LedgerEntry {
            state: LedgerState::Failed,
            event_id: event_id.map(str::to_string),
            at: now,
            error: by_tag.get(&s.tag()).map(|f| (*f).clone()),
            asked: None,
        })),
    })?;
    Ok(failed)
}

// --- revoke ---------------------------------------------------------------------------------

/// Mark confirmed entries `revoking` before Apple is asked; failed ones are dropped.
pub fn begin_revoke(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    shard_write(kv, account, asset_key, subjects, now, |_, cur| match cur {
        Some(e)
            if e.state == LedgerState::Confirmed
                || (e.state == LedgerState::Revoking && e.event_id.is_none()) =>
        {
            Some(Some(LedgerEntry {
                state: LedgerState::Revoking,
                event_id: None,
                at: now,
                error: None,
                asked: e.asked,
            }))
        }
        Some(e) if e.state == LedgerState::Failed => Some(None),
        _ => None,
    })?;
    Ok(())
}

/// Apple accepted the disassociate of `subjects` as `event_id`.
pub fn revoke_accepted(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    event_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    shard_write(kv, account, asset_key, subjects, now, |_, cur| match cur {
        Some(e) if e.state == LedgerState::Revoking && e.event_id.is_none() => {
            Some(Some(LedgerEntry {
                event_id: Some(event_id.to_string()),
                ..e.clone()
            }))
        }
        _ => None,
    })?;
    Ok(())
}

/// Apple refused the disassociate with an `errorNumber`: the licenses stay confirmed.
pub fn revoke_refused(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    failure: Option<Failure>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    shard_write(kv, account, asset_key, subjects, now, |_, cur| match cur {
        Some(e) if e.state == LedgerState::Revoking => Some(Some(LedgerEntry {
            state: LedgerState::Confirmed,
            error: failure.clone(),
            ..e.clone()
        })),
        _ => None,
    })?;
    Ok(())
}

/// Does a removal Apple accepted at `asked_at` (`None`: an event we did not make, or whose
/// answer we lost, so we cannot tell when) take away what `entry` records? A `confirmed` entry
/// reflects a request of its own: only a removal accepted after that request took it (Apple
/// applies events in the order it accepted them). One asked since (or, when we do not know when
/// it was asked, confirmed since), or a removal we cannot place in time, may have come before
/// it: the license it records may be held now, and the next full refresh (which sees what Apple
/// holds) decides. A `revoking` entry that knows when its assignment was accepted (`asked`) is
/// likewise not taken by a removal of ours accepted before that (an earlier revoke, read late:
/// it took an earlier license, and the entry's own revoke is still to come). Every other entry
/// (`revoking` otherwise, `pending`, `failed`) goes.
pub fn removal_takes(entry: &LedgerEntry, asked_at: Option<DateTime<Utc>>) -> bool {
    match (entry.state, asked_at, entry.asked) {
        (LedgerState::Confirmed, _, _) => {
            asked_at.is_some_and(|t| entry.asked.unwrap_or(entry.at) <= t)
        }
        (LedgerState::Revoking, Some(t), Some(asked)) => asked <= t,
        _ => true,
    }
}

/// What [`gone`] found for one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone {
    /// The settled entry's state before.
    pub before: Option<LedgerState>,
    /// The entry was kept: it records an assignment the removal may have come before (see
    /// [`removal_takes`]); the removal changes nothing for it (copy, counts, notice).
    pub kept: bool,
}

/// Apple took (asset, subject) away in an event we asked for at `asked_at` (`None`: an event we
/// did not make, or whose answer we lost): entries the removal takes ([`removal_takes`]) are
/// gone. Returns, per subject, the previous state and whether the entry was kept.
pub fn gone(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    asked_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Vec<Gone>, StoreError> {
    let before = shard_write(kv, account, asset_key, subjects, now, |_, cur| match cur {
        Some(e) if !removal_takes(e, asked_at) => None,
        Some(_) => Some(None),
        None => None,
    })?;
    Ok(subjects
        .iter()
        .map(|s| {
            let e = before.get(&s.tag()).and_then(|e| e.as_ref());
            Gone {
                before: e.map(|e| e.state),
                kept: e.is_some_and(|e| !removal_takes(e, asked_at)),
            }
        })
        .collect())
}

/// A refresh found these confirmed licenses missing at Apple: forget them, unless they changed
/// since (only `confirmed` entries not newer than `before` go).
///
/// An open entry a confirmed one left behind (its outcome's writer stopped between settling it
/// and closing it: admitted no later than it was confirmed, as settling tells) is closed first:
/// left open, the outcome read again would confirm the license Apple no longer holds (and its
/// removal would be noticed twice). Closed first, a stop between the two writes leaves the
/// confirmed entry for the next refresh.
pub fn forget_confirmed(
    kv: &impl Kv,
    account: &str,
    gone: &[(String, Subject)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut by_asset: BTreeMap<&str, Vec<Subject>> = BTreeMap::new();
    for (ak, s) in gone {
        by_asset.entry(ak.as_str()).or_default().push(s.clone());
    }
    for (ak, subjects) in by_asset {
        let open = open_doc(kv, account, ak)?;
        let mut leftovers = Vec::new();
        for s in &subjects {
            let Some(o) = open.entries.get(&s.tag()) else {
                continue;
            };
            if settled(kv, account, ak, s)?
                .is_some_and(|e| e.state == LedgerState::Confirmed && e.at.timestamp() >= o.since)
            {
                leftovers.push(s.clone());
            }
        }
        if !leftovers.is_empty() {
            close(kv, account, ak, &leftovers)?;
        }
        shard_write(kv, account, ak, &subjects, now, |_, cur| match cur {
            Some(e) if e.state == LedgerState::Confirmed => Some(None),
            _ => None,
        })?;
    }
    Ok(())
}

// --- sending --------------------------------------------------------------------------------

/// Is this error Apple's definite "no" (nothing was applied)? Only an answer with an
/// `errorNumber` is; a lost answer, a transport error or a bare 5xx may hide an applied request.
pub fn definite_no(e: &AppleError) -> bool {
    e.number().is_some()
}

/// What [`send_associate`] achieved.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    pub events: Vec<EventRecord>,
    /// Apple refused these with an `errorNumber` (released).
    pub refused: Vec<Subject>,
    /// Sent without a clear answer: `unknown` until verified.
    pub unknown: Vec<Subject>,
    /// Not sent in this budget: still queued (a job or the daily run sends them).
    pub queued: Vec<Subject>,
    pub error: Option<AppleError>,
}

pub fn asset_ref(asset_key: &str) -> AssetRef {
    let (adam, pricing) = asset_key.split_once(':').unwrap_or((asset_key, "STDQ"));
    AssetRef::new(adam.to_string(), PricingParam::from(pricing))
}

fn partition(subjects: &[Subject]) -> (Vec<String>, Vec<String>) {
    let mut serials = Vec::new();
    let mut users = Vec::new();
    for s in subjects {
        match s {
            Subject::SerialNumber(x) => serials.push(x.clone()),
            Subject::ClientUserId(x) => users.push(x.clone()),
        }
    }
    (serials, users)
}

pub fn subjects_of(req: &ManageAssetsRequest) -> Vec<Subject> {
    req.serial_numbers
        .iter()
        .map(|s| Subject::SerialNumber(s.clone()))
        .chain(
            req.client_user_ids
                .iter()
                .map(|u| Subject::ClientUserId(u.clone())),
        )
        .collect()
}

/// Send queued `subjects` of an asset to Apple, one request per Apple limit, within `budget`.
/// Each request's subjects are marked sent first; an accepted request names its event on them;
/// a definite "no" releases them (`requeue`: queues them again, for jobs that retry later); an
/// unclear outcome leaves them `unknown`.
#[allow(clippy::too_many_arguments)]
pub async fn send_associate<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account: &str,
    asset_key: &str,
    subjects: &[Subject],
    source: &str,
    requeue: bool,
    budget: &mut Budget,
) -> Result<Sent, StoreError> {
    let mut out = Sent::default();
    if subjects.is_empty() {
        return Ok(out);
    }
    let aref = asset_ref(asset_key);
    let limits = match client.limits().await {
        Ok(l) => l,
        Err(e) => {
            // Nothing was sent: still queued (or released for a caller who reports the error).
            refused(kv, account, asset_key, subjects, requeue)?;
            if requeue {
                out.queued = subjects.to_vec();
            } else {
                out.refused = subjects.to_vec();
            }
            out.error = Some(e);
            return Ok(out);
        }
    };
    let (serials, users) = partition(subjects);
    let requests = split_manage(
        &ManageAssetsRequest {
            assets: vec![aref.clone()],
            client_user_ids: users,
            serial_numbers: serials,
        },
        &limits,
    );
    let mut stop = false;
    let mut full = false;
    for req in &requests {
        let part = subjects_of(req);
        // Too many of the account's events pending: the rest waits, queued, like a spent budget.
        full = full || !event::has_room(kv, account)?;
        if stop || full || !budget.take_call(client.clock().now()) {
            out.queued.extend(part);
            continue;
        }
        let now = client.clock().now();
        mark_sent(kv, account, asset_key, &part, now)?;
        match client.associate(req).await {
            Ok(events) => {
                for ev in events {
                    // Named on the entries first: stopped before it is tracked, settling finds
                    // an entry waiting on an event without a record and tracks it again (an
                    // event tracked but named nowhere could not be found).
                    let rec = event::new_record(
                        &ev.event_id,
                        account,
                        EventKind::Associate,
                        source,
                        vec![aref.clone()],
                        part.clone(),
                        now,
                    );
                    accepted(kv, account, asset_key, &part, &ev.event_id)?;
                    event::track(kv, &rec)?;
                    out.events.push(rec);
                }
            }
            Err(be) => {
                let e = be.error;
                if definite_no(&e) {
                    refused(kv, account, asset_key, &part, requeue)?;
                    if requeue {
                        out.queued.extend(part);
                    } else {
                        out.refused.extend(part);
                    }
                } else {
                    out.unknown.extend(part);
                }
                if e.is_retryable() || !requeue {
                    stop = true;
                }
                out.error = Some(e);
            }
        }
    }
    // Whatever was not sent: released for a caller who answers with the error, else queued.
    if !requeue && !out.queued.is_empty() && out.error.is_some() {
        let rest = std::mem::take(&mut out.queued);
        refused(kv, account, asset_key, &rest, false)?;
        out.refused.extend(rest);
    }
    Ok(out)
}

// --- settling -------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleReport {
    /// Open entries a refresh saw at Apple (now confirmed).
    pub confirmed: u32,
    /// Unknown entries looked up at Apple.
    pub verified: u32,
    /// Unknown entries Apple never applied (released).
    pub released: u32,
    /// Queued entries sent.
    pub sent: u32,
    /// Still open after this pass.
    pub open: u32,
    /// Of those, still queued (not yet sent).
    #[serde(default)]
    pub queued: u32,
    pub errors: Vec<String>,
}

/// Settle what can be settled for one account, within `budget`: entries the account's copy
/// shows at Apple are confirmed; queued entries whose request ended are sent; unknown entries
/// are looked up at Apple (held: confirmed; not held after [`UNKNOWN_GIVE_UP_SECS`]: released).
pub async fn settle_account<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account: &str,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<SettleReport, StoreError> {
    settle(kv, client, account, now, budget, QUEUE_GRACE_SECS).await
}

/// [`settle_account`], sending queued entries at least `queued_after` seconds old (a ledger
/// job owns its account's queue and sends at once).
async fn settle<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account: &str,
    now: DateTime<Utc>,
    budget: &mut Budget,
    queued_after: i64,
) -> Result<SettleReport, StoreError> {
    let mut report = SettleReport::default();
    // Every asset of the copy (the ledger job and reconcile run this, never a request).
    let doc = copy::all_assets(kv, account)?;
    let polled: BTreeSet<String> = get_json::<Vec<String>>(kv, &keys::account_events(account))?
        .unwrap_or_default()
        .into_iter()
        .collect();
    settle_revoking(kv, client, account, &doc, &polled, now, budget, &mut report).await?;
    // Associates Apple accepted that we track, still to be read: an unknown entry one of them
    // names was stopped between tracking the event and naming it (see `send_associate`).
    let mut tracked_associates = Vec::new();
    for id in &polled {
        if let Some(r) = event::load(kv, id)? {
            if r.kind == EventKind::Associate && r.state == crate::model::EventState::Pending {
                tracked_associates.push(r);
            }
        }
    }
    let listed = open_assets(kv, account)?;
    for asset in &doc.assets {
        let ak = asset.key();
        let open = open_doc(kv, account, &ak)?;
        if open.entries.is_empty() {
            if listed.contains(&ak) {
                unmark_open(kv, account, &ak)?;
            }
            continue;
        }
        if !listed.contains(&ak) {
            // A writer stopped between admitting and listing the asset.
            mark_open(kv, account, &ak)?;
        }
        let mut seen = Vec::new();
        let mut settled_leftover = Vec::new();
        let mut to_send = Vec::new();
        let mut to_verify = Vec::new();
        // Which open subjects the copy shows at Apple: one read per copy shard they are on.
        let open_subjects: Vec<Subject> = open
            .entries
            .keys()
            .filter_map(|t| Subject::from_tag(t))
            .collect();
        let at_apple = copy::held(kv, account, &doc, asset, &open_subjects)?;
        for (tag, o) in &open.entries {
            let Some(s) = Subject::from_tag(tag) else {
                continue;
            };
            if at_apple.contains_key(tag) {
                seen.push(s);
                continue;
            }
            if let Some(e) = settled(kv, account, &ak, &s)? {
                // Settled by a writer that stopped before closing the open entry.
                if e.at.timestamp() >= o.since && e.state != LedgerState::Pending {
                    settled_leftover.push(s);
                    continue;
                }
            }
            match o.state {
                OpenState::Queued if now.timestamp() - o.since >= queued_after => to_send.push(s),
                OpenState::Unknown if o.events.is_empty() => {
                    let sent = o.sent.unwrap_or(o.since);
                    let ids: Vec<&str> = tracked_associates
                        .iter()
                        .filter(|r| {
                            r.created_at.timestamp() >= sent
                                && r.subjects.contains(&s)
                                && r.assets.iter().any(|a| event::asset_ref_key(a) == ak)
                        })
                        .map(|r| r.id.as_str())
                        .collect();
                    if ids.is_empty() {
                        to_verify.push((s, o.clone()));
                    } else {
                        // Its request was accepted: the event decides (and orders it).
                        for id in ids {
                            accepted(kv, account, &ak, std::slice::from_ref(&s), id)?;
                        }
                    }
                }
                OpenState::Pending => {
                    // Waiting on events nobody polls (stopped between two writes)?
                    let ids = open.event_ids(o);
                    if ids.iter().any(|id| polled.contains(id)) {
                        continue;
                    }
                    let mut retracked = false;
                    for id in &ids {
                        match event::load(kv, id)? {
                            Some(r) if r.state == crate::model::EventState::Pending => {
                                event::track(kv, &r)?;
                                retracked = true;
                            }
                            Some(_) => {}
                            None => {
                                // Accepted, and stopped before its record was written: track
                                // it again (when it was sent orders it among our removals).
                                let named: Vec<Subject> = open
                                    .entries
                                    .iter()
                                    .filter(|(_, e)| open.event_ids(e).contains(id))
                                    .filter_map(|(t, _)| Subject::from_tag(t))
                                    .collect();
                                let rec = event::new_record(
                                    id,
                                    account,
                                    EventKind::Associate,
                                    "ledger",
                                    vec![asset_ref(&ak)],
                                    named,
                                    at(o.sent.unwrap_or(o.since)),
                                );
                                event::track(kv, &rec)?;
                                retracked = true;
                            }
                        }
                    }
                    if !retracked {
                        to_verify.push((s, o.clone()));
                    }
                }
                _ => {}
            }
        }
        if !seen.is_empty() {
            report.confirmed += seen.len() as u32;
            let c = confirm(kv, account, &ak, &seen, None, true, None, now)?;
            close(kv, account, &ak, &c.to_close)?;
        }
        if !settled_leftover.is_empty() {
            close(kv, account, &ak, &settled_leftover)?;
        }
        for (s, o) in to_verify {
            if !budget.take_call(now) {
                break;
            }
            report.verified += 1;
            match held_at_apple(client, asset, &s).await {
                Ok(true) => {
                    report.confirmed += 1;
                    let c = confirm(
                        kv,
                        account,
                        &ak,
                        std::slice::from_ref(&s),
                        None,
                        true,
                        None,
                        now,
                    )?;
                    close(kv, account, &ak, &c.to_close)?;
                }
                Ok(false) => {
                    let since = o.sent.unwrap_or(o.since);
                    if now.timestamp() - since >= UNKNOWN_GIVE_UP_SECS {
                        report.released += 1;
                        release_unknown(kv, account, &ak, &s)?;
                    }
                }
                Err(e) => report.errors.push(format!("verify {ak} {}: {e}", s.tag())),
            }
        }
        if !to_send.is_empty() {
            let sent =
                send_associate(kv, client, account, &ak, &to_send, "ledger", true, budget).await?;
            report.sent += (to_send.len() - sent.queued.len()) as u32;
            if let Some(e) = sent.error {
                report.errors.push(format!("associate {ak}: {e}"));
            }
        }
        let open = open_doc(kv, account, &ak)?;
        report.open += open.entries.len() as u32;
        report.queued += open
            .entries
            .values()
            .filter(|o| o.state == OpenState::Queued)
            .count() as u32;
    }
    Ok(report)
}

// --- the ledger job ---------------------------------------------------------------------------

/// Job kind that sends an account's queued entries (bulk assign, policy put) and settles it.
pub const JOB_KIND: &str = "ledger";

/// Start the account's ledger job, or return the one already running.
pub fn start_job(
    kv: &impl Kv,
    job_id: &str,
    account: &str,
    requested_by: &str,
    now: DateTime<Utc>,
) -> Result<(Job, bool), StoreError> {
    let mut j = Job::new(job_id, JOB_KIND, Some(account), requested_by, now);
    j.progress.phase = "send".into();
    // One ledger job per account: the check and the listing are one compare-and-swap.
    let started = job::start(kv, &j)?;
    let created = started.created();
    Ok((started.into_job(), created))
}

/// One slice of the ledger job: send queued entries, settle the rest. Done when nothing of
/// the account is queued any more (pending events are the daily run's to poll).
pub async fn run_slice<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    job: &mut Job,
    budget: &mut Budget,
) -> Result<SliceEnd, ApiError> {
    let account = job
        .account_id
        .clone()
        .ok_or_else(|| ApiError::internal("ledger job without an account"))?;
    let now = client.clock().now();
    if !event::has_room(kv, &account)? {
        // Sends wait for room: end what Apple finished first (the daily run polls otherwise).
        let mut polled = event::PollReport::default();
        event::poll_account(kv, client, &account, now, budget, &mut polled).await?;
    }
    let r = settle(kv, client, &account, now, budget, 0).await?;
    job.slices += 1;
    job.updated_at = now;
    let mut st: SettleReport = serde_json::from_value(job.checkpoint.clone()).unwrap_or_default();
    st.confirmed += r.confirmed;
    st.verified += r.verified;
    st.released += r.released;
    st.sent += r.sent;
    st.open = r.open;
    st.queued = r.queued;
    st.errors.extend(r.errors);
    let keep = st.errors.len().saturating_sub(20);
    st.errors.drain(..keep);
    job.progress.done = u64::from(st.sent);
    job.progress.total = Some(u64::from(st.sent + st.queued));
    job.checkpoint = serde_json::to_value(&st).map_err(ApiError::internal)?;
    if st.queued == 0 {
        job.succeed(job.checkpoint.clone(), now);
        return Ok(SliceEnd::Done);
    }
    Ok(SliceEnd::Paused)
}

/// `revoking` entries whose disassociate nobody waits for (never sent, its answer lost, or
/// stopped between two writes): Apple's assignments decide. Not held: gone (with its notice);
/// held: `confirmed` again (reconcile takes it back if no policy wants it).
#[allow(clippy::too_many_arguments)]
async fn settle_revoking<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account: &str,
    doc: &AssetsDoc,
    polled: &BTreeSet<String>,
    now: DateTime<Utc>,
    budget: &mut Budget,
    report: &mut SettleReport,
) -> Result<(), StoreError> {
    let mut stale: Vec<(String, Subject, DateTime<Utc>)> = Vec::new();
    for shard in 0..LEDGER_SHARDS {
        let l: LedgerShard = get_json(kv, &keys::ledger_shard(account, shard))?.unwrap_or_default();
        for (ak, m) in l {
            for (tag, e) in m {
                if e.state != LedgerState::Revoking
                    || now - e.at < Duration::seconds(QUEUE_GRACE_SECS)
                {
                    continue;
                }
                let waited_on = match &e.event_id {
                    Some(id) if polled.contains(id) => true,
                    Some(id) => match event::load(kv, id)? {
                        // Tracked, but off the polled index (stopped between two writes).
                        Some(r) if r.state == crate::model::EventState::Pending => {
                            event::track(kv, &r)?;
                            true
                        }
                        _ => false,
                    },
                    None => false,
                };
                if !waited_on {
                    if let Some(s) = Subject::from_tag(&tag) {
                        stale.push((ak.clone(), s, e.at));
                    }
                }
            }
        }
    }
    for (ak, s, asked) in stale {
        let Some(asset) = doc.assets.iter().find(|a| a.key() == ak) else {
            continue;
        };
        if !budget.take_call(now) {
            break;
        }
        report.verified += 1;
        match held_at_apple(client, asset, &s).await {
            Ok(true) => revoke_refused(kv, account, &ak, std::slice::from_ref(&s), None, now)?,
            Ok(false) => {
                // Apple does not hold it: out of the copy too (unless the copy records an
                // assignment of ours made after the revoke was asked), so a late report of the
                // removal (a sending whose answer was lost) finds nothing left to take and
                // sends no second notice. The copy first: a kill after it leaves the entry
                // `revoking`, verified again (the notice follows the entry).
                let had =
                    crate::copy::edit_assignments(kv, account, doc, &[(asset, &s)], |_, cur| {
                        match cur {
                            Some(crate::model::MadeBy::Ours { at: Some(t), .. }) if *t > asked => {
                                crate::copy::Edit::Keep
                            }
                            Some(_) => crate::copy::Edit::Remove,
                            None => crate::copy::Edit::Keep,
                        }
                    })?;
                if had.first().is_some_and(Option::is_some) {
                    crate::copy::recount(kv, account, doc.generation, std::slice::from_ref(&ak))?;
                }
                let prev = gone(kv, account, &ak, std::slice::from_ref(&s), None, now)?;
                if prev.first().and_then(|g| g.before) == Some(LedgerState::Revoking) {
                    crate::notice::record_removals(
                        kv,
                        account,
                        &[(ak.clone(), s)],
                        "reconcile",
                        now,
                    )?;
                }
            }
            Err(e) => report.errors.push(format!("verify {ak} {}: {e}", s.tag())),
        }
    }
    Ok(())
}

/// Drop an unknown entry Apple never applied (only while it is still unknown, no event).
fn release_unknown(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
    s: &Subject,
) -> Result<(), StoreError> {
    open_update(kv, account, asset_key, |open, _| {
        let tag = s.tag();
        let drop = open
            .entries
            .get(&tag)
            .is_some_and(|o| o.state != OpenState::Queued);
        if drop {
            open.entries.remove(&tag);
        }
        (drop, ())
    })
}

/// Does Apple hold `asset` for `subject` now? (`GET /assignments` for that device or user.)
pub async fn held_at_apple<T: Transport, C: Clock>(
    client: &Client<T, C>,
    asset: &AssetRecord,
    subject: &Subject,
) -> Result<bool, AppleError> {
    let mut filter = AssignmentFilter {
        adam_id: Some(asset.adam_id.clone()),
        ..AssignmentFilter::default()
    };
    match subject {
        Subject::SerialNumber(s) => filter.serial_number = Some(s.clone()),
        Subject::ClientUserId(u) => filter.client_user_id = Some(u.clone()),
    }
    let page = client.all_assignments(&filter, None).await?;
    Ok(page.assignments.iter().any(|a| {
        a.adam_id == asset.adam_id
            && a.pricing_param.as_str() == asset.pricing_param
            && match subject {
                Subject::SerialNumber(s) => a.serial_number.as_deref() == Some(s.as_str()),
                Subject::ClientUserId(u) => a.client_user_id.as_deref() == Some(u.as_str()),
            }
    }))
}

/// What [`verify_before_removal`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Unknown entries Apple holds: confirmed, so the removal takes a license the books know.
    pub confirmed: u32,
    /// Subjects whose assignment of ours still has an unknown outcome (not held at Apple now,
    /// or not looked up): the removal must not be sent for them yet.
    pub waiting: Vec<Subject>,
}

/// Before a removal of ours is sent: each of `subjects` whose assignment of ours has an unknown
/// outcome (the answer to its request was lost) is looked up at Apple first, and confirmed when
/// Apple holds it. The removal then takes a license the books know of, and its notice is given.
///
/// Not held (or not looked up: out of `budget`, one Apple call each, or the lookup failed),
/// the entry stays unknown and the subject waits: the removal is not sent for it. Apple may
/// still hold the request whose answer was lost, accepted before the removal and so applied
/// before it; sent now, the removal would take that license, and nothing could ever tell
/// (Apple answers a removal of a license not held with success too, and the lookup that
/// settles the entry then finds nothing either way): its notice would be lost, or given for a
/// removal that did not happen. Once the entry settles (confirmed, or released as never
/// applied), a removal asked again is exact.
pub async fn verify_before_removal<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account: &str,
    asset: &AssetRecord,
    subjects: &[Subject],
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<Verified, StoreError> {
    let ak = asset.key();
    let open = open_doc(kv, account, &ak)?;
    let unknown: Vec<&Subject> = subjects
        .iter()
        .filter(|s| {
            open.entries
                .get(&s.tag())
                .is_some_and(|o| o.state == OpenState::Unknown)
        })
        .collect();
    let mut out = Verified::default();
    for s in unknown {
        let held = budget.take_call(now) && held_now(client, asset, s).await;
        if held {
            let c = confirm(
                kv,
                account,
                &ak,
                std::slice::from_ref(s),
                None,
                true,
                None,
                now,
            )?;
            close(kv, account, &ak, &c.to_close)?;
            out.confirmed += 1;
        }
        // Still unknown (not held, not looked up, or settled otherwise meanwhile: read again).
        let still = open_doc(kv, account, &ak)?
            .entries
            .get(&s.tag())
            .is_some_and(|o| o.state == OpenState::Unknown);
        if still {
            out.waiting.push(s.clone());
        }
    }
    Ok(out)
}

/// Does Apple hold `asset` for `subject` (a failed lookup: not known to)?
async fn held_now<T: Transport, C: Clock>(
    client: &Client<T, C>,
    asset: &AssetRecord,
    subject: &Subject,
) -> bool {
    matches!(held_at_apple(client, asset, subject).await, Ok(true))
}

/// Every account's open entries and due events, within `budget` (the daily run, reconcile).
pub async fn settle_all<T: Transport, C: Clock>(
    kv: &impl Kv,
    client_for_account: impl Fn(&str) -> Client<T, C>,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<SettleReport, StoreError> {
    let mut total = SettleReport::default();
    let accounts: Vec<String> = get_json(kv, &keys::accounts())?.unwrap_or_default();
    for a in accounts {
        if budget.exhausted(now) {
            break;
        }
        let client = client_for_account(&a);
        let r = settle_account(kv, &client, &a, now, budget).await?;
        total.confirmed += r.confirmed;
        total.verified += r.verified;
        total.released += r.released;
        total.sent += r.sent;
        total.open += r.open;
        total.queued += r.queued;
        total.errors.extend(r.errors);
    }
    Ok(total)
}

/// Every ledger key of an account (for deleting the account).
pub fn delete_account(kv: &impl Kv, account: &str) -> Result<(), StoreError> {
    for shard in 0..LEDGER_SHARDS {
        kv.delete(&keys::ledger_shard(account, shard))?;
    }
    for n in 0..OPEN_SHARDS {
        kv.delete(&keys::ledger_open(account, n))?;
    }
    kv.delete(&keys::ledger_open_assets(account))?;
    Ok(())
}

/// Is (asset, subject) ours (open, or settled and not failed)? Reads each value once.
#[derive(Default)]
pub struct Cache {
    shards: BTreeMap<u32, LedgerShard>,
    open: BTreeMap<String, OpenDoc>,
}

impl Cache {
    /// Who made an assignment Apple holds, as the copy records it.
    pub fn made_by(
        &mut self,
        kv: &impl Kv,
        account: &str,
        asset_key: &str,
        subject: &Subject,
    ) -> Result<crate::model::MadeBy, StoreError> {
        use crate::model::MadeBy;
        let n = ledger_shard_of(asset_key, subject);
        if let std::collections::btree_map::Entry::Vacant(v) = self.shards.entry(n) {
            v.insert(get_json(kv, &keys::ledger_shard(account, n))?.unwrap_or_default());
        }
        if let Some(e) = self
            .shards
            .get(&n)
            .and_then(|s| s.get(asset_key))
            .and_then(|m| m.get(&subject.tag()))
        {
            if e.state != LedgerState::Failed {
                return Ok(MadeBy::Ours {
                    event_id: e.event_id.clone(),
                    at: Some(e.at),
                });
            }
        }
        if !self.open.contains_key(asset_key) {
            let d = open_doc(kv, account, asset_key)?;
            self.open.insert(asset_key.to_string(), d);
        }
        if let Some(d) = self.open.get(asset_key) {
            if let Some(o) = d.entries.get(&subject.tag()) {
                return Ok(MadeBy::Ours {
                    event_id: d.event_ids(o).pop(),
                    at: Some(at(o.since)),
                });
            }
        }
        Ok(MadeBy::Foreign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpp_store::MemoryKv;

    fn unlimited(adam: &str) -> AssetRecord {
        AssetRecord {
            adam_id: adam.into(),
            pricing_param: "STDQ".into(),
            product_type: "App".into(),
            name: None,
            icon_url: None,
            total: vpp_apple::Asset::UNLIMITED_TOTAL,
            available: 0,
            in_use: 0,
            retired: 0,
            device_assignable: true,
            revocable: true,
            supported_platforms: Vec::new(),
            shards: 1,
        }
    }

    fn devices(prefix: &str, n: usize) -> Vec<Subject> {
        (0..n)
            .map(|i| Subject::SerialNumber(format!("{prefix}{i:06}")))
            .collect()
    }

    #[test]
    fn open_values_are_a_fixed_few_and_each_stays_under_the_value_limit() {
        let kv = MemoryKv::default();
        // Many assets: still OPEN_SHARDS open values.
        let assets: Vec<AssetRecord> = (0..200).map(|i| unlimited(&format!("{i}"))).collect();
        copy::write_generation(&kv, "a", 1, None, assets.clone()).unwrap();
        prepare(&kv, "a").unwrap();
        let open_keys = kv
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("ledger/a/open/"))
            .count();
        assert_eq!(open_keys, OPEN_SHARDS as usize);
        // Two assets that share an open value: together they never pass MAX_OPEN_PER_SHARD.
        let first = assets[0].key();
        let other = assets[1..]
            .iter()
            .map(AssetRecord::key)
            .find(|k| open_shard_of(k) == open_shard_of(&first))
            .unwrap();
        let now = Utc::now();
        match admit(&kv, "a", &first, &devices("A", MAX_OPEN), true, now).unwrap() {
            Admission::Admitted { admitted, .. } => assert_eq!(admitted.len(), MAX_OPEN),
            other => panic!("{other:?}"),
        }
        let room_left = MAX_OPEN_PER_SHARD - MAX_OPEN;
        match admit(&kv, "a", &other, &devices("B", room_left + 5), true, now).unwrap() {
            Admission::NoRoom { needed, available } => {
                assert_eq!((needed, available), (room_left + 5, room_left as i64))
            }
            other => panic!("{other:?}"),
        }
        match admit(&kv, "a", &other, &devices("B", room_left + 5), false, now).unwrap() {
            Admission::Admitted {
                admitted,
                shortfall,
                ..
            } => assert_eq!((admitted.len(), shortfall.len()), (room_left, 5)),
            other => panic!("{other:?}"),
        }
        assert_eq!(reserved(&kv, "a", &first).unwrap(), MAX_OPEN as i64);
        assert_eq!(reserved(&kv, "a", &other).unwrap(), room_left as i64);
        let size = kv
            .get(&keys::ledger_open("a", open_shard_of(&first)))
            .unwrap()
            .unwrap()
            .len();
        assert!(size < keys::VALUE_LIMIT, "{size} bytes");
        // The licenses list finds both through the open-assets list.
        let r = open_reservations(&kv, "a").unwrap();
        assert_eq!(r.get(&first), Some(&(MAX_OPEN as i64)));
        assert_eq!(r.get(&other), Some(&(room_left as i64)));
    }
}
