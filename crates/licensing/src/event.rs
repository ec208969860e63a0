//! Apple's asynchronous events (associate, disassociate, revoke): tracked from the moment Apple
//! accepts them until their outcome is applied to the ledger, the assignment copy and the
//! counts.
//!
//! Exactly once: every change is a state transition per (asset, subject) — ledger open →
//! `confirmed`/`failed` (moved by [`crate::ledger`]), copy absent → present — and counts and
//! notices move only with a transition; reservations are the open entries themselves. So an outcome that arrives twice (event status and notification, or a
//! notification delivered twice) changes nothing the second time.
//!
//! Polling follows Apple's rules: at least [`POLL_INTERVAL_SECS`] between polls of an event,
//! and an event still `PENDING` after [`RESEND_AFTER_SECS`] is sent again.

use crate::model::{
    AssetRecord, AssetsDoc, EventFailure, EventKind, EventRecord, EventState, Failure, LedgerState,
    MadeBy, Subject,
};
use crate::{job::Budget, ledger, notice};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use vpp_apple::{
    AppleError, AssetRef, Client, Clock, EventStatus, EventStatusKind, ManageAssetsRequest,
    RevokeAssetsRequest, Transport,
};
use vpp_store::{get_json, keys, set_json, update, Kv, StoreError};

/// Apple: wait at least 30 s between polls of a pending event.
pub const POLL_INTERVAL_SECS: i64 = 30;
/// The first poll of a new event (Apple usually answers within seconds).
pub const FIRST_POLL_AFTER_SECS: i64 = 5;
/// Apple: still PENDING after 10 minutes → send the request again.
pub const RESEND_AFTER_SECS: i64 = 600;
/// Ended events whose records are kept per account (for `GET /api/events/{id}`).
pub const KEPT_DONE_EVENTS: usize = vpp_store::keys::EVENTS_DONE_KEPT;
/// An event sent again is still polled (Apple may yet apply it) for this long.
pub const GIVE_UP_AFTER_SECS: i64 = 86_400;

/// One (asset, subject) result of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// `adamId:pricingParam`.
    pub asset_key: String,
    pub subject: Subject,
    /// `None`: done; `Some`: Apple refused it for this subject.
    pub failure: Option<Failure>,
}

/// The final word on an event (from `GET /status`).
#[derive(Debug, Clone, PartialEq)]
pub struct Terminal {
    pub state: EventState,
    pub num_requested: Option<i64>,
    pub num_completed: Option<i64>,
    pub failures: Vec<EventFailure>,
}

/// Remember an event Apple accepted, and list it for polling.
pub fn track(kv: &impl Kv, record: &EventRecord) -> Result<(), StoreError> {
    set_json(kv, &keys::event(&record.id), record)?;
    if record.state == EventState::Pending {
        update::<Vec<String>, ()>(kv, &keys::account_events(&record.account_id), |cur| {
            let mut ids = cur.unwrap_or_default();
            if ids.contains(&record.id) {
                return Ok((None, ()));
            }
            ids.push(record.id.clone());
            Ok((Some(ids), ()))
        })?;
    }
    Ok(())
}

/// May the account send another request to Apple now? Not while
/// [`keys::MAX_PENDING_EVENTS`] of its events are pending (each is a key until it ends): what
/// waits stays queued, and polls or notifications make room.
pub fn has_room(kv: &impl Kv, account_id: &str) -> Result<bool, StoreError> {
    let pending =
        get_json::<Vec<String>>(kv, &keys::account_events(account_id))?.map_or(0, |ids| ids.len());
    Ok(pending < keys::MAX_PENDING_EVENTS)
}

pub fn load(kv: &impl Kv, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
    get_json(kv, &keys::event(event_id))
}

/// Take an event off the pending index once it ended; its record stays readable among the
/// account's last [`KEPT_DONE_EVENTS`] ended events, and older records are deleted (bounded).
fn untrack(kv: &impl Kv, account_id: &str, event_id: &str) -> Result<(), StoreError> {
    update::<Vec<String>, ()>(kv, &keys::account_events(account_id), |cur| {
        let Some(mut ids) = cur else {
            return Ok((None, ()));
        };
        let before = ids.len();
        ids.retain(|i| i != event_id);
        Ok(((ids.len() != before).then_some(ids), ()))
    })?;
    let evicted =
        update::<Vec<String>, Vec<String>>(kv, &keys::account_events_done(account_id), |cur| {
            let mut ids = cur.unwrap_or_default();
            if ids.iter().any(|i| i == event_id) {
                return Ok((None, Vec::new()));
            }
            ids.push(event_id.to_string());
            let excess = ids.len().saturating_sub(KEPT_DONE_EVENTS);
            let evicted: Vec<String> = ids.drain(..excess).collect();
            Ok((Some(ids), evicted))
        })?;
    for id in evicted {
        // Only records that really ended go (a pending one is still in the index).
        if load(kv, &id)?.is_some_and(|r| r.state != EventState::Pending) {
            kv.delete(&keys::event(&id))?;
        }
    }
    Ok(())
}

/// A new event record for what Apple just accepted.
pub fn new_record(
    event_id: &str,
    account_id: &str,
    kind: EventKind,
    source: &str,
    assets: Vec<AssetRef>,
    subjects: Vec<Subject>,
    now: DateTime<Utc>,
) -> EventRecord {
    EventRecord {
        id: event_id.to_string(),
        account_id: account_id.to_string(),
        kind,
        source: source.to_string(),
        assets,
        num_requested: Some(subjects.len() as i64),
        subjects,
        state: EventState::Pending,
        created_at: now,
        updated_at: now,
        polled_at: None,
        num_completed: None,
        failures: Vec::new(),
        applied: false,
        resent_as: None,
        copy_generation: None,
        owed_notices: Vec::new(),
    }
}

pub fn asset_ref_key(a: &AssetRef) -> String {
    crate::model::asset_key(&a.adam_id, a.pricing_param.as_str())
}

/// A removal of ours (`id`, not yet applied) owes the notice of `pair` when its outcome is
/// read (see [`EventRecord::owed_notices`]).
pub fn owe_notice(kv: &impl Kv, id: &str, pair: (String, Subject)) -> Result<(), StoreError> {
    update::<EventRecord, ()>(kv, &keys::event(id), |cur| match cur {
        Some(mut r) if !r.applied && r.kind != EventKind::Associate => {
            if r.owed_notices.contains(&pair) {
                return Ok((None, ()));
            }
            r.owed_notices.push(pair.clone());
            Ok((Some(r), ()))
        }
        _ => Ok((None, ())),
    })
}

/// Apply per-(asset, subject) results of an event (from a notification or a status poll) and,
/// when given, its final state. `event_id` `None`: an event we did not make (a notification of
/// another MDM's or Apple's own change): the copy and counts still follow it. Returns the event
/// record as it now stands, when we track it.
pub fn apply_outcome(
    kv: &impl Kv,
    account_id: &str,
    kind: EventKind,
    event_id: Option<&str>,
    items: &[Item],
    terminal: Option<Terminal>,
    now: DateTime<Utc>,
) -> Result<Option<EventRecord>, StoreError> {
    let record = match event_id {
        Some(id) => load(kv, id)?,
        None => None,
    };
    // An outcome already applied (a late notification after the poll, or the other way round)
    // changes nothing: applying it again would confirm a license revoked since, or take one
    // away twice.
    if let Some(r) = record.as_ref().filter(|r| r.applied) {
        return Ok(Some(r.clone()));
    }
    let ours = record.is_some();
    let source = record
        .as_ref()
        .map(|r| r.source.clone())
        .unwrap_or_else(|| "apple".to_string());
    let wanted: Vec<String> = items
        .iter()
        .map(|i| i.asset_key.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let doc: AssetsDoc = crate::copy::assets_for(kv, account_id, &wanted)?;
    let removing = kind != EventKind::Associate;
    // A clean up whose copy a full refresh replaced since: what it names was held when it was
    // asked (a foreign license in that copy), and only a clean up takes one away.
    let copy_replaced = record
        .as_ref()
        .and_then(|r| r.copy_generation)
        .is_some_and(|g| g != doc.generation);

    // 0. A removal of ours owes the notices of what it finds held: written on its record before
    // anything moves, so an invocation killed between the moves and the notices finds them
    // when the outcome is read again (what an earlier reading found stays: the moves are done).
    let owed_before: Vec<(String, Subject)> = record
        .as_ref()
        .map(|r| r.owed_notices.clone())
        .unwrap_or_default();
    if let Some(r) = record.as_ref().filter(|_| removing) {
        let owed: Vec<(String, Subject)> = held_before_removal(
            kv,
            account_id,
            &doc,
            items,
            copy_replaced,
            Some(r.created_at),
        )?
        .into_iter()
        .filter(|p| !owed_before.contains(p))
        .collect();
        if !owed.is_empty() {
            update::<EventRecord, ()>(kv, &keys::event(&r.id), |cur| match cur {
                Some(mut cur) if !cur.applied => {
                    let before = cur.owed_notices.len();
                    for p in &owed {
                        if !cur.owed_notices.contains(p) {
                            cur.owed_notices.push(p.clone());
                        }
                    }
                    let changed = cur.owed_notices.len() != before;
                    Ok((changed.then_some(cur), ()))
                }
                _ => Ok((None, ())),
            })?;
        }
    }

    // 0'. A removal we cannot place in time, of what a removal of ours still pending asks for
    // (most likely that request, sent again after its answer was lost: see step 4): the
    // notices of what it finds held are owed on that removal's record before anything moves,
    // so an invocation killed between the moves and the notices finds them when that
    // removal's outcome is read (or this one again). Held as that removal sees it, asked when
    // it was: an assignment of ours Apple accepted after it (which this one, accepted before
    // it, came before too) is not what it takes.
    if record.is_none() && removing {
        let held = held_before_removal(kv, account_id, &doc, items, false, None)?;
        for ((ak, tag), (id, _, at)) in pending_removals(kv, account_id, &held)? {
            let Some(s) = Subject::from_tag(&tag) else {
                continue;
            };
            let item: Vec<Item> = items
                .iter()
                .filter(|it| it.asset_key == ak && it.subject == s)
                .cloned()
                .collect();
            if held_before_removal(kv, account_id, &doc, &item, false, Some(at))?.is_empty() {
                continue;
            }
            owe_notice(kv, &id, (ak, s))?;
        }
    }

    // 1. Ledger (its own moves): per asset, which items were ours before this outcome.
    let mut by_asset: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        by_asset.entry(it.asset_key.as_str()).or_default().push(i);
    }
    // Associate: ours (the copy says "this instance"); removal: the previous ledger state.
    let mut was_ours = vec![false; items.len()];
    let mut prev: Vec<Option<LedgerState>> = vec![None; items.len()];
    let mut stale = vec![false; items.len()];
    // Removal: left as it is because a newer request of ours came after it: the ledger entry
    // records it (kept: see `ledger::gone`), or the copy's entry is its (see `made_after`).
    let mut newer_ours = vec![false; items.len()];
    let mut taken: Vec<((String, Subject), String)> = Vec::new();
    // Open entries a later removal took: closed once their notices are recorded (step 4).
    let mut to_close: Vec<(String, Vec<Subject>)> = Vec::new();
    for (ak, idx) in &by_asset {
        let ok: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|i| items[*i].failure.is_none())
            .collect();
        let bad: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|i| items[*i].failure.is_some())
            .collect();
        let ok_subjects: Vec<Subject> = ok.iter().map(|i| items[*i].subject.clone()).collect();
        if !removing {
            if !ok.is_empty() {
                let asked = record.as_ref().map(|r| r.created_at);
                let done =
                    ledger::confirm(kv, account_id, ak, &ok_subjects, event_id, ours, asked, now)?;
                for (s, by) in done.taken {
                    taken.push(((ak.to_string(), s), by));
                }
                if !done.to_close.is_empty() {
                    to_close.push((ak.to_string(), done.to_close));
                }
                // An assignment we cannot place in time (an event we never learned of), of a
                // subject we hold no claim on and whose removal we reported lately: it may be a
                // late report of an assignment that removal ended (a request of ours whose
                // answer was lost). Put in the copy, a later report of that removal would
                // count the license twice; a refresh decides.
                let unclaimed: Vec<Subject> = ok
                    .iter()
                    .zip(&done.flags)
                    .filter(|(_, f)| !ours && **f == Some(false))
                    .map(|(i, _)| items[*i].subject.clone())
                    .collect();
                let ended = notice::noticed_recently(kv, account_id, ak, &unclaimed, now)?;
                for (i, f) in ok.iter().zip(done.flags) {
                    match f {
                        Some(false) if !ours && ended.contains(&items[*i].subject.tag()) => {
                            stale[*i] = true
                        }
                        Some(f) => was_ours[*i] = f,
                        // Stale: the ledger has moved on (revoked or gone since); the copy
                        // and counts stay as they are.
                        None => stale[*i] = true,
                    }
                }
            }
            if !bad.is_empty() {
                let failures: Vec<(Subject, Failure)> = bad
                    .iter()
                    .filter_map(|i| {
                        let it = &items[*i];
                        it.failure.clone().map(|f| (it.subject.clone(), f))
                    })
                    .collect();
                ledger::fail(
                    kv,
                    account_id,
                    ak,
                    &failures,
                    event_id.filter(|_| ours),
                    now,
                )?;
            }
        } else {
            if !ok.is_empty() {
                let asked_at = record.as_ref().map(|r| r.created_at);
                let states = ledger::gone(kv, account_id, ak, &ok_subjects, asked_at, now)?;
                // A removal we cannot place in time (not ours, or its answer was lost) and an
                // open entry of ours: the assignment it waits on may have come after it.
                let open = if asked_at.is_none() {
                    ledger::open_subjects(kv, account_id, ak)?
                } else {
                    BTreeSet::new()
                };
                // The copy's entry records an assignment of ours accepted after this removal.
                let later = match (asked_at, doc.assets.iter().find(|a| a.key() == *ak)) {
                    (Some(t), Some(asset)) => {
                        let held = crate::copy::held(kv, account_id, &doc, asset, &ok_subjects)?;
                        made_after(kv, account_id, ak, &held, event_id, t)?
                    }
                    _ => BTreeSet::new(),
                };
                // A foreign license in the copy that a removal of ours reported taking lately,
                // named by a removal we cannot place in time: a late report of that removal's
                // twin (sent again after a lost answer), and the license in the copy was
                // assigned again since; or someone else's removal of it. A refresh decides; the
                // copy, counts and notices stay as they are.
                let foreign_taken = match (asked_at, doc.assets.iter().find(|a| a.key() == *ak)) {
                    (None, Some(asset)) => {
                        let held = crate::copy::held(kv, account_id, &doc, asset, &ok_subjects)?;
                        let foreign: Vec<Subject> = ok_subjects
                            .iter()
                            .filter(|s| held.get(&s.tag()) == Some(&MadeBy::Foreign))
                            .cloned()
                            .collect();
                        notice::noticed_by_ours_recently(kv, account_id, ak, &foreign, now)?
                    }
                    _ => BTreeSet::new(),
                };
                for (i, g) in ok.iter().zip(states) {
                    prev[*i] = g.before;
                    // No claim of ours (no entry, or a refused request's): the copy's entry
                    // is that later assignment's.
                    let unclaimed = g.before.is_none_or(|b| b == LedgerState::Failed);
                    if unclaimed && later.contains(&items[*i].subject.tag()) {
                        stale[*i] = true;
                        newer_ours[*i] = true;
                        continue;
                    }
                    // An assignment of ours this removal may have come before: a full
                    // refresh decides; the copy, counts and notices stay as they are.
                    newer_ours[*i] = g.kept;
                    let tag = items[*i].subject.tag();
                    stale[*i] = g.kept
                        || (g.before.is_none()
                            && (open.contains(&tag) || foreign_taken.contains(&tag)));
                }
            }
            for i in &bad {
                let it = &items[*i];
                ledger::revoke_refused(
                    kv,
                    account_id,
                    ak,
                    std::slice::from_ref(&it.subject),
                    it.failure.clone(),
                    now,
                )?;
            }
        }
    }

    // 2. Copy (through `crate::copy`): one compare-and-swap per copy shard; then the counts.
    let mut copy_items: Vec<(usize, AssetRecord)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if it.failure.is_some() || stale[i] {
            continue;
        }
        if let Some(asset) = doc.assets.iter().find(|a| a.key() == it.asset_key) {
            copy_items.push((i, asset.clone()));
        }
    }
    let entries: Vec<(&AssetRecord, &Subject)> = copy_items
        .iter()
        .map(|(i, a)| (a, &items[*i].subject))
        .collect();
    let had = crate::copy::edit_assignments(kv, account_id, &doc, &entries, |j, cur| {
        let i = copy_items[j].0;
        if removing {
            return if cur.is_some() {
                crate::copy::Edit::Remove
            } else {
                crate::copy::Edit::Keep
            };
        }
        let ledgered = was_ours[i];
        let made_by = if ledgered {
            MadeBy::Ours {
                event_id: event_id.map(str::to_string),
                at: Some(now),
            }
        } else {
            MadeBy::Foreign
        };
        match cur {
            None => crate::copy::Edit::Put(made_by),
            Some(MadeBy::Foreign) if ledgered => crate::copy::Edit::Put(made_by),
            Some(_) => crate::copy::Edit::Keep,
        }
    })?;
    let mut removed: Vec<(String, Subject)> = Vec::new();
    let mut was_present = vec![false; items.len()];
    for (j, (i, _)) in copy_items.iter().enumerate() {
        was_present[*i] = had[j].is_some();
    }
    for (i, it) in items.iter().enumerate() {
        if it.failure.is_some() || stale[i] {
            continue;
        }
        if removing
            && (was_present[i]
                || prev[i].is_some_and(|p| p != LedgerState::Failed)
                || copy_replaced)
        {
            removed.push((it.asset_key.clone(), it.subject.clone()));
        }
    }
    // Counts follow the copy: recounted from its entries (every asset the outcome names, also
    // when nothing of it moves now), so an invocation killed between the copy's write and this
    // one is put right when the outcome is read again.
    let touched: Vec<String> = doc.assets.iter().map(AssetRecord::key).collect();
    crate::copy::recount(kv, account_id, doc.generation, &touched)?;

    // 3. An open entry of ours this removal came after (see `ledger::taken_while_open`): the
    // notice is this removal's when it knew the license was held (in the copy), else the
    // associate's success owes it.
    if let Some(r) = record.as_ref().filter(|_| removing) {
        for (ak, idx) in &by_asset {
            let ok: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|i| items[*i].failure.is_none())
                .collect();
            if ok.is_empty() {
                continue;
            }
            let subjects: Vec<Subject> = ok.iter().map(|i| items[*i].subject.clone()).collect();
            let noticed: BTreeSet<String> = ok
                .iter()
                .filter(|i| was_present[**i])
                .map(|i| items[*i].subject.tag())
                .collect();
            ledger::taken_while_open(
                kv,
                account_id,
                ak,
                &subjects,
                r.created_at,
                &r.source,
                &noticed,
            )?;
        }
    }

    // 4. Notices for every license taken away: an outcome of ours records them keyed by its
    // event (once each), with those an earlier, killed reading of it owed.
    let mut by_source: BTreeMap<String, Vec<(String, Subject)>> = BTreeMap::new();
    for (pair, by) in taken {
        by_source.entry(by).or_default().push(pair);
    }
    match event_id.filter(|_| ours) {
        Some(id) => {
            let asked_at = record.as_ref().map_or(now, |r| r.created_at);
            let mut owed = Vec::new();
            for pair in owed_before {
                // Owed: it was held when asked for; a newer request of ours that keeps its
                // entry, or whose assignment the copy shows, came after it (Apple applies them
                // in the order it accepted them): what this removal took stays taken.
                let ok = items.iter().enumerate().any(|(i, it)| {
                    it.failure.is_none()
                        && (!stale[i] || newer_ours[i])
                        && it.asset_key == pair.0
                        && it.subject == pair.1
                });
                if ok && !removed.contains(&pair) {
                    owed.push(pair);
                }
            }
            // An owed license another removal of ours, accepted before this one, reported
            // taking since this one was accepted: Apple applied that one first, so it took the
            // license (the ledger found it held when this one was asked, and owed it here);
            // this one found nothing left.
            let noticed = notice::noticed_by_events_since(kv, account_id, &owed, id, asked_at)?;
            for pair in owed {
                let mut earlier = false;
                for e in noticed.get(&pair).into_iter().flatten() {
                    if load(kv, e)?
                        .is_some_and(|r| r.kind != EventKind::Associate && r.created_at < asked_at)
                    {
                        earlier = true;
                    }
                }
                if !earlier {
                    removed.push(pair);
                }
            }
            let event = (id, record.as_ref().map_or(now, |r| r.created_at));
            notice::record_event_removals(kv, account_id, &removed, &source, event, now)?;
            for (by, pairs) in by_source {
                notice::record_event_removals(kv, account_id, &pairs, &by, event, now)?;
            }
        }
        None => {
            // A removal we cannot place in time of what a removal of ours still pending asks
            // for: most likely that request itself, sent again after its answer was lost
            // (Apple accepted it twice; we know only the second event). The notice is that
            // removal's: its reason, keyed by its event (reading its own outcome adds none).
            let asking = if removing {
                pending_removals(kv, account_id, &removed)?
            } else {
                BTreeMap::new()
            };
            type Removal = (String, String, DateTime<Utc>);
            let mut by_removal: BTreeMap<Removal, Vec<(String, Subject)>> = BTreeMap::new();
            let mut rest = Vec::new();
            for pair in removed {
                match asking.get(&(pair.0.clone(), pair.1.tag())) {
                    Some(ours) => by_removal.entry(ours.clone()).or_default().push(pair),
                    None => rest.push(pair),
                }
            }
            for ((id, by, at), pairs) in by_removal {
                notice::record_event_removals(kv, account_id, &pairs, &by, (&id, at), now)?;
            }
            notice::record_removals(kv, account_id, &rest, &source, now)?;
            for (by, pairs) in by_source {
                notice::record_removals(kv, account_id, &pairs, &by, now)?;
            }
        }
    }

    for (ak, subjects) in &to_close {
        ledger::close_taken(kv, account_id, ak, subjects)?;
    }

    // 5. The event record.
    let Some(id) = event_id.filter(|_| ours) else {
        return Ok(None);
    };
    let ok_count = items.iter().filter(|i| i.failure.is_none()).count() as i64;
    let failed: Vec<&Item> = items.iter().filter(|i| i.failure.is_some()).collect();
    let updated = update::<EventRecord, Option<EventRecord>>(kv, &keys::event(id), |cur| {
        let Some(mut r) = cur else {
            return Ok((None, None));
        };
        if r.applied {
            return Ok((None, Some(r)));
        }
        match &terminal {
            Some(t) => {
                r.state = t.state;
                r.num_requested = t.num_requested.or(r.num_requested);
                r.num_completed = t.num_completed;
                r.failures = t.failures.clone();
                r.applied = true;
            }
            None => {
                r.num_completed = Some(r.num_completed.unwrap_or(0) + ok_count);
                let mut groups: BTreeMap<(Option<i64>, String), Vec<String>> = BTreeMap::new();
                for it in &failed {
                    if let Some(f) = &it.failure {
                        groups
                            .entry((f.code.parse::<i64>().ok(), f.message.clone()))
                            .or_default()
                            .push(it.subject.tag());
                    }
                }
                for ((number, message), subjects) in groups {
                    r.failures.push(EventFailure {
                        subjects,
                        error_number: number,
                        message,
                    });
                }
                let failed_n: i64 = r.failures.iter().map(|f| f.subjects.len() as i64).sum();
                let expected = (r.subjects.len() * r.assets.len().max(1)) as i64;
                if r.kind != EventKind::Revoke
                    && r.num_completed.unwrap_or(0) + failed_n >= expected
                {
                    r.state = if failed_n > 0 {
                        EventState::Failed
                    } else {
                        EventState::Complete
                    };
                    r.applied = true;
                }
            }
        }
        r.updated_at = now;
        Ok((Some(r.clone()), Some(r)))
    })?;
    if let Some(r) = &updated {
        if r.state != EventState::Pending {
            untrack(kv, account_id, id)?;
        }
    }
    Ok(updated)
}

/// Of `pairs` (asset key, subject), those a removal of ours Apple accepted and whose outcome is
/// not yet read asks for, as (asset key, subject tag) → (its event id, its source, when Apple
/// accepted it); the oldest such removal when several do.
#[allow(clippy::type_complexity)]
fn pending_removals(
    kv: &impl Kv,
    account_id: &str,
    pairs: &[(String, Subject)],
) -> Result<BTreeMap<(String, String), (String, String, DateTime<Utc>)>, StoreError> {
    let mut out = BTreeMap::new();
    if pairs.is_empty() {
        return Ok(out);
    }
    let ids: Vec<String> = get_json(kv, &keys::account_events(account_id))?.unwrap_or_default();
    let mut records: Vec<EventRecord> = Vec::new();
    for id in ids {
        if let Some(r) = load(kv, &id)? {
            if r.kind != EventKind::Associate && !r.applied && r.account_id == account_id {
                records.push(r);
            }
        }
    }
    records.sort_by_key(|r| r.created_at);
    for (ak, s) in pairs {
        let ours = records.iter().find(|r| {
            r.subjects.contains(s)
                && (r.assets.is_empty() || r.assets.iter().any(|a| asset_ref_key(a) == *ak))
        });
        if let Some(r) = ours {
            out.insert(
                (ak.clone(), s.tag()),
                (r.id.clone(), r.source.clone(), r.created_at),
            );
        }
    }
    Ok(out)
}

/// The (asset key, subject) pairs a removal's outcome finds held before it moves anything: what
/// it will owe a notice for (as step 2 of [`apply_outcome`] decides: in the copy, a ledger entry
/// not failed, or a clean up whose copy was replaced).
fn held_before_removal(
    kv: &impl Kv,
    account_id: &str,
    doc: &AssetsDoc,
    items: &[Item],
    copy_replaced: bool,
    asked_at: Option<DateTime<Utc>>,
) -> Result<Vec<(String, Subject)>, StoreError> {
    let mut out = Vec::new();
    let mut by_asset: BTreeMap<&str, Vec<Subject>> = BTreeMap::new();
    for it in items.iter().filter(|it| it.failure.is_none()) {
        by_asset
            .entry(it.asset_key.as_str())
            .or_default()
            .push(it.subject.clone());
    }
    for (ak, subjects) in by_asset {
        let in_copy = match doc.assets.iter().find(|a| a.key() == ak) {
            Some(asset) => crate::copy::held(kv, account_id, doc, asset, &subjects)?,
            None => BTreeMap::new(),
        };
        let later = match asked_at {
            Some(t) => made_after(kv, account_id, ak, &in_copy, None, t)?,
            None => BTreeSet::new(),
        };
        for s in subjects {
            let entry = ledger::settled(kv, account_id, ak, &s)?;
            if entry
                .as_ref()
                .is_some_and(|e| !ledger::removal_takes(e, asked_at))
            {
                // Kept by step 1: the removal may have come before it (no notice).
                continue;
            }
            let unclaimed = entry
                .as_ref()
                .is_none_or(|e| e.state == LedgerState::Failed);
            if unclaimed && later.contains(&s.tag()) {
                // An assignment accepted after the removal (no notice).
                continue;
            }
            let ledgered = entry.is_some_and(|e| e.state != LedgerState::Failed);
            if copy_replaced || ledgered || in_copy.contains_key(&s.tag()) {
                out.push((ak.to_string(), s));
            }
        }
    }
    Ok(out)
}

/// Subjects (by tag) whose copy entry records an assignment of ours Apple accepted after
/// `asked_at` (another event than `removal`): a removal accepted at `asked_at` came before it
/// and did not take what the copy shows.
///
/// Also when the copy's entry is an open entry's of ours (it names none of our events, or one
/// the entry waits on) admitted after `asked_at`: every request of that entry was sent, so
/// accepted, after the removal (also when its event has no record yet: an invocation stopped
/// before tracking it, or its answer was lost).
fn made_after(
    kv: &impl Kv,
    account_id: &str,
    asset_key: &str,
    held: &BTreeMap<String, MadeBy>,
    removal: Option<&str>,
    asked_at: DateTime<Utc>,
) -> Result<BTreeSet<String>, StoreError> {
    let mut out = BTreeSet::new();
    let mut open: Option<ledger::OpenDoc> = None;
    for (tag, m) in held {
        let MadeBy::Ours { event_id, .. } = m else {
            continue;
        };
        if event_id.is_some() && event_id.as_deref() == removal {
            continue;
        }
        if let Some(id) = event_id {
            if load(kv, id)?
                .is_some_and(|r| r.kind == EventKind::Associate && r.created_at > asked_at)
            {
                out.insert(tag.clone());
                continue;
            }
        }
        if open.is_none() {
            open = Some(ledger::open_doc(kv, account_id, asset_key)?);
        }
        if open
            .as_ref()
            .is_some_and(|o| ledger::admitted_after(o, tag, event_id.as_deref(), asked_at))
        {
            out.insert(tag.clone());
        }
    }
    Ok(out)
}

/// The subjects an Apple `ErrorResponse` names (`errorInfo`).
pub fn failure_subjects(f: &vpp_apple::ErrorResponse) -> Vec<Subject> {
    let Some(info) = &f.error_info else {
        return Vec::new();
    };
    info.serial_numbers
        .iter()
        .map(|s| Subject::SerialNumber(s.clone()))
        .chain(
            info.client_user_ids
                .iter()
                .map(|u| Subject::ClientUserId(u.clone())),
        )
        .collect()
}

fn failure_of(f: &vpp_apple::ErrorResponse) -> Failure {
    Failure {
        code: f.error_number.to_string(),
        message: f
            .error_message
            .clone()
            .unwrap_or_else(|| format!("Apple error {}", f.error_number)),
    }
}

/// The assets an event concerns: its own, or for a revoke every revocable asset we know.
fn event_assets(record: &EventRecord, doc: &AssetsDoc) -> Vec<String> {
    if record.assets.is_empty() {
        doc.assets
            .iter()
            .filter(|a| a.revocable)
            .map(|a| a.key())
            .collect()
    } else {
        record.assets.iter().map(asset_ref_key).collect()
    }
}

/// Turn a final `GET /status` answer into items and a terminal state.
pub fn items_from_status(
    record: &EventRecord,
    doc: &AssetsDoc,
    status: &EventStatus,
) -> (Vec<Item>, Terminal) {
    let assets = event_assets(record, doc);
    let mut failed: BTreeMap<(String, String), Failure> = BTreeMap::new();
    let mut unnamed: Option<Failure> = None;
    let mut failures = Vec::new();
    for f in &status.failures {
        let subjects = failure_subjects(f);
        let fail_assets: Vec<String> = f
            .error_info
            .as_ref()
            .map(|i| i.assets.iter().map(asset_ref_key).collect())
            .filter(|v: &Vec<String>| !v.is_empty())
            .unwrap_or_else(|| assets.clone());
        if subjects.is_empty() {
            unnamed.get_or_insert_with(|| failure_of(f));
        }
        for s in &subjects {
            for a in &fail_assets {
                failed.insert((a.clone(), s.tag()), failure_of(f));
            }
        }
        failures.push(EventFailure {
            subjects: subjects.iter().map(Subject::tag).collect(),
            error_number: Some(f.error_number),
            message: failure_of(f).message,
        });
    }
    let state = match status.event_status {
        EventStatusKind::Failed => EventState::Failed,
        _ => EventState::Complete,
    };
    let mut items = Vec::new();
    for a in &assets {
        for s in &record.subjects {
            let failure = failed.get(&(a.clone(), s.tag())).cloned().or_else(|| {
                // Apple failed the event without naming anyone: nothing can be confirmed.
                (state == EventState::Failed && failed.is_empty())
                    .then(|| unnamed.clone())
                    .flatten()
                    .or_else(|| {
                        (state == EventState::Failed && failed.is_empty()).then(|| Failure {
                            code: "failed".into(),
                            message: "Apple reported the event as failed".into(),
                        })
                    })
            });
            items.push(Item {
                asset_key: a.clone(),
                subject: s.clone(),
                failure,
            });
        }
    }
    let terminal = Terminal {
        state,
        num_requested: status.num_requested,
        num_completed: status.num_completed,
        failures,
    };
    (items, terminal)
}

/// Is this event due for a status poll now?
pub fn poll_due_at(record: &EventRecord) -> DateTime<Utc> {
    match record.polled_at {
        Some(p) => p + Duration::seconds(POLL_INTERVAL_SECS),
        None => record.created_at + Duration::seconds(FIRST_POLL_AFTER_SECS),
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PollReport {
    pub polled: u32,
    pub completed: u32,
    pub resent: u32,
    pub errors: Vec<String>,
    /// Events still waiting for their next poll.
    pub waiting: u32,
}

/// Poll one event now (the caller checked [`poll_due_at`]) and apply what Apple says.
/// `may_resend`: an event still pending after [`RESEND_AFTER_SECS`] is sent again (jobs only:
/// a request a person reads never writes at Apple).
pub async fn poll_event<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    record: &EventRecord,
    now: DateTime<Utc>,
    may_resend: bool,
) -> Result<EventRecord, PollError> {
    let status = client.event_status(&record.id).await;
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            mark_polled(kv, &record.id, None, now)?;
            return Err(PollError::Apple(e));
        }
    };
    if status.event_status == EventStatusKind::Pending {
        let r = mark_polled(kv, &record.id, Some(&status), now)?.unwrap_or(record.clone());
        let age = now - record.created_at;
        if may_resend && r.resent_as.is_none() && age >= Duration::seconds(RESEND_AFTER_SECS) {
            return resend(kv, client, &r, now).await;
        }
        if r.resent_as.is_some() && age >= Duration::seconds(GIVE_UP_AFTER_SECS) {
            // Sent again long ago and still pending: stop polling it (the new one decides).
            return Ok(give_up(kv, &r, now)?);
        }
        return Ok(r);
    }
    let doc: AssetsDoc = if record.assets.is_empty() {
        crate::copy::all_assets(kv, &record.account_id)?
    } else {
        let wanted: Vec<String> = record.assets.iter().map(asset_ref_key).collect();
        crate::copy::assets_for(kv, &record.account_id, &wanted)?
    };
    let (items, terminal) = items_from_status(record, &doc, &status);
    mark_polled(kv, &record.id, None, now)?;
    let r = apply_outcome(
        kv,
        &record.account_id,
        record.kind,
        Some(&record.id),
        &items,
        Some(terminal),
        now,
    )?;
    Ok(r.unwrap_or_else(|| record.clone()))
}

#[derive(Debug)]
pub enum PollError {
    Store(StoreError),
    Apple(AppleError),
}

impl From<StoreError> for PollError {
    fn from(e: StoreError) -> Self {
        PollError::Store(e)
    }
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::Store(e) => write!(f, "{e}"),
            PollError::Apple(e) => write!(f, "{e}"),
        }
    }
}

fn mark_polled(
    kv: &impl Kv,
    id: &str,
    status: Option<&EventStatus>,
    now: DateTime<Utc>,
) -> Result<Option<EventRecord>, StoreError> {
    update::<EventRecord, Option<EventRecord>>(kv, &keys::event(id), |cur| {
        let Some(mut r) = cur else {
            return Ok((None, None));
        };
        r.polled_at = Some(now);
        if let Some(s) = status {
            r.num_requested = s.num_requested.or(r.num_requested);
            r.num_completed = s.num_completed.or(r.num_completed);
        }
        Ok((Some(r.clone()), Some(r)))
    })
}

/// Apple: an event still pending after 10 minutes is sent again. Both events stay tracked
/// (Apple may apply either): the old one names the new one and is not sent again; the ledger's
/// open entries wait on both.
async fn resend<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    record: &EventRecord,
    now: DateTime<Utc>,
) -> Result<EventRecord, PollError> {
    let serials: Vec<String> = record
        .subjects
        .iter()
        .filter_map(|s| match s {
            Subject::SerialNumber(x) => Some(x.clone()),
            _ => None,
        })
        .collect();
    let users: Vec<String> = record
        .subjects
        .iter()
        .filter_map(|s| match s {
            Subject::ClientUserId(x) => Some(x.clone()),
            _ => None,
        })
        .collect();
    let sent = match record.kind {
        EventKind::Revoke => {
            client
                .revoke(&RevokeAssetsRequest {
                    client_user_ids: users,
                    serial_numbers: serials,
                })
                .await
        }
        kind => {
            let req = ManageAssetsRequest {
                assets: record.assets.clone(),
                client_user_ids: users,
                serial_numbers: serials,
            };
            if kind == EventKind::Associate {
                client.associate(&req).await
            } else {
                client.disassociate(&req).await
            }
        }
    };
    let events = sent.map_err(|e| PollError::Apple(e.error))?;
    let Some(first) = events.first() else {
        return Ok(record.clone());
    };
    let mut fresh = record.clone();
    fresh.id = first.event_id.clone();
    fresh.created_at = now;
    fresh.updated_at = now;
    fresh.polled_at = None;
    fresh.num_completed = None;
    fresh.resent_as = None;
    track(kv, &fresh)?;
    if record.kind == EventKind::Associate {
        for a in &record.assets {
            ledger::accepted(
                kv,
                &record.account_id,
                &asset_ref_key(a),
                &record.subjects,
                &fresh.id,
            )?;
        }
    }
    update::<EventRecord, ()>(kv, &keys::event(&record.id), |cur| {
        let mut r = cur.unwrap_or_else(|| record.clone());
        r.resent_as = Some(fresh.id.clone());
        r.updated_at = now;
        Ok((Some(r), ()))
    })?;
    Ok(fresh)
}

/// Stop tracking an event that was sent again and never finished.
fn give_up(
    kv: &impl Kv,
    record: &EventRecord,
    now: DateTime<Utc>,
) -> Result<EventRecord, StoreError> {
    let r = update::<EventRecord, EventRecord>(kv, &keys::event(&record.id), |cur| {
        let mut r = cur.unwrap_or_else(|| record.clone());
        r.state = EventState::Failed;
        r.applied = true;
        r.updated_at = now;
        r.failures.push(EventFailure {
            subjects: Vec::new(),
            error_number: None,
            message: format!(
                "still pending after {} hours; sent again as event {}",
                GIVE_UP_AFTER_SECS / 3600,
                r.resent_as.clone().unwrap_or_default()
            ),
        });
        Ok((Some(r.clone()), r))
    })?;
    untrack(kv, &record.account_id, &record.id)?;
    Ok(r)
}

/// Poll every pending event that is due, across all accounts, within `budget`.
pub async fn poll_due<T: Transport, C: Clock>(
    kv: &impl Kv,
    client_for_account: impl Fn(&str) -> Client<T, C>,
    now: DateTime<Utc>,
    budget: &mut Budget,
) -> Result<PollReport, StoreError> {
    let mut report = PollReport::default();
    let accounts: Vec<String> = get_json(kv, &keys::accounts())?.unwrap_or_default();
    for account in accounts {
        let ids: Vec<String> = get_json(kv, &keys::account_events(&account))?.unwrap_or_default();
        if ids.is_empty() {
            continue;
        }
        let client = client_for_account(&account);
        poll_account(kv, &client, &account, now, budget, &mut report).await?;
    }
    Ok(report)
}

/// Poll the due pending events of one account, within `budget`.
pub async fn poll_account<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account: &str,
    now: DateTime<Utc>,
    budget: &mut Budget,
    report: &mut PollReport,
) -> Result<(), StoreError> {
    let ids: Vec<String> = get_json(kv, &keys::account_events(account))?.unwrap_or_default();
    for id in ids {
        let Some(record) = load(kv, &id)? else {
            untrack(kv, account, &id)?;
            continue;
        };
        if record.state != EventState::Pending {
            untrack(kv, account, &id)?;
            continue;
        }
        if poll_due_at(&record) > now {
            report.waiting += 1;
            continue;
        }
        if !budget.take_call(now) {
            report.waiting += 1;
            continue;
        }
        report.polled += 1;
        match poll_event(kv, client, &record, now, true).await {
            Ok(r) if r.id != record.id => report.resent += 1,
            Ok(r) if r.state != EventState::Pending => report.completed += 1,
            Ok(_) => report.waiting += 1,
            Err(PollError::Store(e)) => return Err(e),
            Err(e) => report.errors.push(format!("event {id}: {e}")),
        }
    }
    Ok(())
}

/// What `GET /api/events/{id}` shows: the record plus the outcome per device or user.
pub fn view(record: &EventRecord) -> serde_json::Value {
    let failed: BTreeMap<String, &EventFailure> = record
        .failures
        .iter()
        .flat_map(|f| f.subjects.iter().map(move |s| (s.clone(), f)))
        .collect();
    let done = record.state != EventState::Pending;
    let unnamed_failure = record.state == EventState::Failed
        && failed.is_empty()
        && record.failures.iter().any(|f| f.subjects.is_empty());
    let results: Vec<serde_json::Value> = record
        .subjects
        .iter()
        .map(|s| {
            let mut v = subject_json(s);
            let (state, err) = match failed.get(&s.tag()) {
                Some(f) => ("failed", Some(*f)),
                None if unnamed_failure => ("failed", record.failures.first()),
                None if done => ("succeeded", None),
                None => ("pending", None),
            };
            v["state"] = state.into();
            if let Some(f) = err {
                v["error"] =
                    serde_json::json!({"appleErrorNumber": f.error_number, "message": f.message});
            }
            v
        })
        .collect();
    let mut v = serde_json::to_value(record).unwrap_or_default();
    v["results"] = results.into();
    v
}

pub fn subject_json(s: &Subject) -> serde_json::Value {
    match s {
        Subject::SerialNumber(x) => serde_json::json!({"serialNumber": x}),
        Subject::ClientUserId(x) => serde_json::json!({"clientUserId": x}),
    }
}

/// Subjects in a set, for quick membership tests.
pub fn tags(subjects: &[Subject]) -> BTreeSet<String> {
    subjects.iter().map(Subject::tag).collect()
}
