//! The account's copy of Apple's state: its assets with counts and every assignment (marked ours
//! or foreign), in the size-bounded layout of `vpp_store::keys` ("The copy"). This module is the
//! only code that knows how the copy is packed; everything else reads and writes it through the
//! functions here:
//!
//! - [`assets_for`] / [`all_assets`]: asset records as an [`AssetsDoc`] view (a few reads /
//!   every page, for jobs);
//! - [`update_assets`], [`recount`]: change records (one compare-and-swap per page); in-use
//!   is always recounted from the copy's entries, never moved by a difference;
//! - [`held`], [`edit_assignments`]: look up and change assignments (one read or
//!   compare-and-swap per copy shard);
//! - [`asset_assignments`]: page `i` of an asset's assignments (one read);
//! - [`delete_generation`]: drop a generation (refresh, account removal).
//!
//! Refresh (`crate::refresh`) builds a new generation with [`write_pages`] and [`merge_entries`].

use crate::model::{AssetRecord, AssetsDoc, MadeBy, Subject};
use chrono::{DateTime, TimeZone, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use vpp_store::{get_json, keys, set_json, update, Kv, StoreError};

/// The members of a JSON object as raw text (key with its quotes, value), found by a byte scan
/// that tracks only strings and nesting: far cheaper than decoding, and exact for the valid JSON
/// `serde_json` writes. `None` when the text is not an object.
pub(crate) fn members(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let ws = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    let mut i = 0;
    let n = bytes.len();
    let skip_ws = |mut i: usize| {
        while i < n && ws(bytes[i]) {
            i += 1;
        }
        i
    };
    // The end (exclusive) of the string starting at `i` (a quote).
    let string_end = |mut i: usize| -> Option<usize> {
        i += 1;
        while i < n {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
        None
    };
    i = skip_ws(i);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(i + 1);
    let mut out = Vec::new();
    if bytes.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if bytes.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(i)?;
        let key = &bytes[i..key_end];
        i = skip_ws(key_end);
        if bytes.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(i + 1);
        let start = i;
        let mut depth = 0usize;
        while i < n {
            match bytes[i] {
                b'"' => {
                    i = string_end(i)?;
                    if depth == 0 {
                        break;
                    }
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                b',' if depth == 0 => break,
                _ => {}
            }
            i += 1;
        }
        let mut value_end = i;
        while value_end > start && ws(bytes[value_end - 1]) {
            value_end -= 1;
        }
        out.push((key, &bytes[start..value_end]));
        i = skip_ws(i);
        match bytes.get(i) {
            Some(b',') => i = skip_ws(i + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

/// The end (exclusive) of the JSON value that starts at `start` (no leading whitespace), by
/// the same byte scan as [`members`]: strings and nesting only.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    let n = bytes.len();
    let mut i = start;
    let mut depth = 0usize;
    while i < n {
        match bytes[i] {
            b'"' => {
                i += 1;
                loop {
                    match bytes.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                if depth == 0 {
                    return Some(i);
                }
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b',' | b' ' | b'\n' | b'\r' | b'\t' if depth == 0 => return Some(i),
            _ => {}
        }
        i += 1;
    }
    (depth == 0 && i > start).then_some(n)
}

/// Whether `key` has the form of an asset key (`adamId:pricingParam`: ASCII digits, a colon,
/// ASCII letters), which no member nested in the copy's and the ledger's tables has: subject
/// tags begin with `s:` or `u:`, record and entry members have fixed names.
fn is_asset_key(key: &str) -> bool {
    key.split_once(':').is_some_and(|(adam, pricing)| {
        !adam.is_empty()
            && adam.bytes().all(|b| b.is_ascii_digit())
            && !pricing.is_empty()
            && pricing.bytes().all(|b| b.is_ascii_alphabetic())
    })
}

/// The stored text of the member `asset_key` of a table of assets (an asset page, a copy shard,
/// an open ledger value) as `serde_json` writes it (compact: `{"k":v,...}`, then the write
/// mark's whitespace), found by a substring search for `"k":` after `{` or `,`, without
/// scanning the members before it. An unescaped quote is always a string's edge in JSON, so a
/// match is a member's key; being of the asset-key form ([`is_asset_key`]), it is one of the
/// table's own members, not a nested one. `Some(None)`: not in the table; `None`: the text is
/// not compact or the key not of that form (the caller scans every member instead).
fn asset_member<'a>(bytes: &'a [u8], asset_key: &str) -> Option<Option<&'a [u8]>> {
    if !is_asset_key(asset_key) || !(bytes.starts_with(b"{\"") || bytes.starts_with(b"{}")) {
        return None;
    }
    let needle = format!("\"{asset_key}\":");
    for at in memchr::memmem::find_iter(bytes, needle.as_bytes()) {
        if at > 0 && matches!(bytes[at - 1], b'{' | b',') {
            let start = at + needle.len();
            let end = value_end(bytes, start)?;
            return Some(Some(&bytes[start..end]));
        }
    }
    Some(None)
}

/// Decode only the entries named in `wanted` of the object stored at `key` (the others are
/// skipped, never decoded): a read of one asset of a page or of a shard costs a substring
/// search per wanted asset ([`asset_member`]), or a byte scan of the members when that cannot
/// decide.
pub(crate) fn pick<T: DeserializeOwned>(
    kv: &impl Kv,
    key: &str,
    wanted: &BTreeSet<&str>,
) -> Result<BTreeMap<String, T>, StoreError> {
    pick_in(key, kv.get(key)?.as_deref(), wanted)
}

/// A wanted member and its stored text (`None`: not in the table).
type Member<'a, 'b> = (&'a str, Option<&'b [u8]>);

/// [`pick`] from the bytes read from `key` (`None`: the key is absent).
pub(crate) fn pick_in<T: DeserializeOwned>(
    key: &str,
    stored: Option<&[u8]>,
    wanted: &BTreeSet<&str>,
) -> Result<BTreeMap<String, T>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let Some(bytes) = stored else {
        return Ok(BTreeMap::new());
    };
    let found: Option<Vec<Member>> = wanted
        .iter()
        .map(|w| asset_member(bytes, w).map(|v| (*w, v)))
        .collect();
    if let Some(found) = found {
        let mut out = BTreeMap::new();
        for (name, v) in found {
            if let Some(v) = v {
                let value: T = serde_json::from_slice(v).map_err(|e| corrupt(e.to_string()))?;
                out.insert(name.to_string(), value);
            }
        }
        return Ok(out);
    }
    let list = members(bytes).ok_or_else(|| corrupt("not a JSON object".into()))?;
    let mut out = BTreeMap::new();
    // Keys as serde_json writes them (quoted, escaped): compared without decoding.
    let encoded: BTreeSet<String> = wanted
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .collect();
    for (k, v) in list {
        let take = std::str::from_utf8(k).is_ok_and(|k| encoded.contains(k));
        if take {
            let name: String = serde_json::from_slice(k).map_err(|e| corrupt(e.to_string()))?;
            let value: T = serde_json::from_slice(v).map_err(|e| corrupt(e.to_string()))?;
            out.insert(name, value);
        }
    }
    Ok(out)
}

/// The index of one generation of an account's copy (`keys::assets`, `keys::assets_staging`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyIndex {
    pub generation: u64,
    pub synced_at: Option<DateTime<Utc>>,
    pub asset_pages: u32,
    pub copy_shards: u32,
    /// Assets and assignments (Apple's `assignedCount` sum) when the generation was planned.
    #[serde(default)]
    pub assets: u64,
    #[serde(default)]
    pub assignments: u64,
    /// Raw Apple asset pages a full refresh stored for this generation (deleted once packed).
    #[serde(default)]
    pub raw_pages: u32,
    /// The raw pages have been packed into asset pages.
    #[serde(default)]
    pub packed: bool,
    /// The page count before the first split since this generation was written (0: never
    /// split); see `keys::asset_page_in`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub base_pages: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Default for CopyIndex {
    fn default() -> Self {
        CopyIndex {
            generation: 0,
            synced_at: None,
            asset_pages: 1,
            copy_shards: 1,
            assets: 0,
            assignments: 0,
            raw_pages: 0,
            packed: true,
            base_pages: 0,
        }
    }
}

impl CopyIndex {
    pub fn page_of(&self, asset_key: &str) -> u32 {
        keys::asset_page_in(asset_key, self.asset_pages, self.base_pages)
    }

    fn view(&self, assets: Vec<AssetRecord>) -> AssetsDoc {
        AssetsDoc {
            generation: self.generation,
            synced_at: self.synced_at,
            copy_shards: self.copy_shards,
            assets,
        }
    }
}

/// One page of assets: asset key → record.
pub type AssetPage = BTreeMap<String, AssetRecord>;

/// How an assignment is stored: foreign `0`, ours `[eventId, unixMillis]` (compact: a million
/// assignments must fit in a few hundred values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Held {
    Foreign(u8),
    Ours(Option<String>, Option<i64>),
}

impl From<&MadeBy> for Held {
    fn from(m: &MadeBy) -> Held {
        match m {
            MadeBy::Foreign => Held::Foreign(0),
            MadeBy::Ours { event_id, at } => {
                Held::Ours(event_id.clone(), at.map(|t| t.timestamp_millis()))
            }
        }
    }
}

impl From<&Held> for MadeBy {
    fn from(h: &Held) -> MadeBy {
        match h {
            Held::Foreign(_) => MadeBy::Foreign,
            Held::Ours(event_id, at) => MadeBy::Ours {
                event_id: event_id.clone(),
                at: at.and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
            },
        }
    }
}

/// One copy shard: asset key → subject tag → who made it. Maps, so writing the same Apple page
/// twice (a resumed refresh) changes nothing.
pub type CopyShard = BTreeMap<String, BTreeMap<String, Held>>;

/// The current generation's index (an empty copy when the account was never refreshed).
pub fn index(kv: &impl Kv, account: &str) -> Result<CopyIndex, StoreError> {
    Ok(get_json(kv, &keys::assets(account))?.unwrap_or_default())
}

/// The index of the generation a full refresh is building, if any.
pub fn staging(kv: &impl Kv, account: &str) -> Result<Option<CopyIndex>, StoreError> {
    get_json(kv, &keys::assets_staging(account))
}

/// One asset page of a generation: the records whose page it is by `ix` (a split killed
/// before its clean up leaves copies of moved records on the page split; they are not its).
pub fn page(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    page: u32,
) -> Result<AssetPage, StoreError> {
    let mut records: AssetPage =
        get_json(kv, &keys::asset_page(account, ix.generation, page))?.unwrap_or_default();
    records.retain(|k, _| ix.page_of(k) == page);
    Ok(records)
}

/// The records of `asset_keys` (those the copy has) in the current generation: one read for
/// the index and one per asset page they are on.
pub fn assets_for(
    kv: &impl Kv,
    account: &str,
    asset_keys: &[String],
) -> Result<AssetsDoc, StoreError> {
    let ix = index(kv, account)?;
    assets_in(kv, account, &ix, asset_keys)
}

/// [`assets_for`] in a given generation.
pub fn assets_in(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    asset_keys: &[String],
) -> Result<AssetsDoc, StoreError> {
    let mut by_page: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
    for k in asset_keys {
        by_page.entry(ix.page_of(k)).or_default().push(k);
    }
    let mut out = Vec::new();
    for (p, wanted) in by_page {
        let wanted: BTreeSet<&str> = wanted.into_iter().map(String::as_str).collect();
        let records: AssetPage = pick(kv, &keys::asset_page(account, ix.generation, p), &wanted)?;
        out.extend(records.into_values());
    }
    Ok(ix.view(out))
}

/// Records of an asset page as stored (their JSON text, never decoded here): what a list page
/// copies its rows from.
#[derive(Debug, Default)]
pub struct RawPage {
    bytes: Vec<u8>,
    /// Asset key and where its record's text is in `bytes`.
    entries: Vec<(String, std::ops::Range<usize>)>,
}

impl RawPage {
    /// Asset key and record text, in the page's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries
            .iter()
            .map(|(k, r)| (k.as_str(), &self.bytes[r.clone()]))
    }
}

/// At most `n` records of asset page `page` after the asset key `after` (`""`: from the
/// start) for which `keep` holds, in the page's order (by key), as stored (never decoded).
/// Only the page's own records (see [`page`]).
pub fn page_after_raw(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    page: u32,
    after: &str,
    n: usize,
    keep: impl Fn(&str) -> bool,
) -> Result<RawPage, StoreError> {
    let key = keys::asset_page(account, ix.generation, page);
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.clone(),
        reason,
    };
    let Some(bytes) = kv.get(&key)? else {
        return Ok(RawPage::default());
    };
    let mut entries = Vec::new();
    {
        let list = members(&bytes).ok_or_else(|| corrupt("not a JSON object".into()))?;
        let base = bytes.as_ptr() as usize;
        for (k, v) in list {
            if entries.len() >= n {
                break;
            }
            // A key without escapes is its text between the quotes (asset keys are digits,
            // a colon and letters): no decode per record.
            let plain = k
                .strip_prefix(b"\"")
                .and_then(|t| t.strip_suffix(b"\""))
                .filter(|t| !t.contains(&b'\\'))
                .and_then(|t| std::str::from_utf8(t).ok());
            let name: String = match plain {
                Some(text) => text.to_string(),
                None => serde_json::from_slice(k).map_err(|e| corrupt(e.to_string()))?,
            };
            if name.as_str() > after && ix.page_of(&name) == page && keep(&name) {
                let start = v.as_ptr() as usize - base;
                entries.push((name, start..start + v.len()));
            }
        }
    }
    Ok(RawPage { bytes, entries })
}

/// One asset of the current generation, with the view it came from.
pub fn asset(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
) -> Result<(AssetsDoc, Option<AssetRecord>), StoreError> {
    let mut doc = assets_for(kv, account, &[asset_key.to_string()])?;
    let found = doc.assets.pop();
    Ok((doc, found))
}

/// Every asset of the current generation, page by page in the copy's order (jobs only: this
/// reads every asset page).
pub fn all_assets(kv: &impl Kv, account: &str) -> Result<AssetsDoc, StoreError> {
    let ix = index(kv, account)?;
    let mut out = Vec::new();
    for p in 0..ix.asset_pages {
        out.extend(page(kv, account, &ix, p)?.into_values());
    }
    Ok(ix.view(out))
}

/// Change the records of `asset_keys` in the current generation, one compare-and-swap per page;
/// `f` may run more than once per record (a lost race re-reads). Returns the keys found. A key
/// not found where the index said is looked for again when the index changed meanwhile (its
/// page was split: [`split_next_page`]).
pub fn update_assets(
    kv: &impl Kv,
    account: &str,
    asset_keys: &[String],
    mut f: impl FnMut(&mut AssetRecord),
) -> Result<BTreeSet<String>, StoreError> {
    let mut ix = index(kv, account)?;
    let mut found = BTreeSet::new();
    let mut rest: Vec<&String> = asset_keys.iter().collect();
    for _ in 0..vpp_store::MAX_SWAP_ATTEMPTS {
        let mut by_page: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
        for k in &rest {
            by_page.entry(ix.page_of(k)).or_default().push(k);
        }
        for (p, wanted) in by_page {
            let hit = update::<AssetPage, Vec<String>>(
                kv,
                &keys::asset_page(account, ix.generation, p),
                |cur| {
                    let Some(mut records) = cur else {
                        return Ok((None, Vec::new()));
                    };
                    let mut hit = Vec::new();
                    for k in &wanted {
                        if let Some(r) = records.get_mut(k.as_str()) {
                            f(r);
                            hit.push(k.to_string());
                        }
                    }
                    Ok(((!hit.is_empty()).then_some(records), hit))
                },
            )?;
            found.extend(hit);
        }
        rest.retain(|k| !found.contains(k.as_str()));
        if rest.is_empty() {
            break;
        }
        let now = index(kv, account)?;
        if now.generation != ix.generation || now.asset_pages == ix.asset_pages {
            break;
        }
        ix = now;
    }
    Ok(found)
}

/// The key holding the index of generation `ix` when it is the current copy (the one that
/// may be split); `None` for a full refresh's staging generation, whose pages the refresh sized
/// from Apple's whole asset list and whose index it rewrites itself.
fn splittable_index(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
) -> Result<Option<String>, StoreError> {
    if staging(kv, account)?.is_some_and(|s| s.generation == ix.generation) {
        return Ok(None);
    }
    Ok(Some(keys::assets(account)))
}

/// Add records the copy does not have yet (an asset Apple listed after the copy was built)
/// to generation `ix`; existing records are left alone. A page that would hold more than
/// [`keys::ASSET_PAGE_SPLIT`] records is not written past it: the pages are split one at a
/// time ([`split_next_page`]) until every record has room, so an account that grows between
/// full refreshes keeps small pages.
pub fn insert_assets(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    records: Vec<AssetRecord>,
) -> Result<(), StoreError> {
    let key = splittable_index(kv, account, ix)?;
    let room_of = |len: usize| match key {
        Some(_) => keys::ASSET_PAGE_SPLIT.saturating_sub(len),
        None => usize::MAX,
    };
    let mut rest = records;
    // Each round stores records or splits one page; splitting every page twice is the most
    // any batch needs.
    let mut rounds = 0u32;
    while !rest.is_empty() {
        let cur = match &key {
            Some(k) => get_json::<CopyIndex>(kv, k)?.filter(|c| c.generation == ix.generation),
            None => None,
        }
        .unwrap_or_else(|| ix.clone());
        let mut by_page: BTreeMap<u32, Vec<AssetRecord>> = BTreeMap::new();
        for r in rest.drain(..) {
            by_page.entry(cur.page_of(&r.key())).or_default().push(r);
        }
        let mut full = false;
        for (p, list) in by_page {
            let page_key = keys::asset_page(account, cur.generation, p);
            let left = update::<AssetPage, Vec<AssetRecord>>(kv, &page_key, |now| {
                let mut records = now.unwrap_or_default();
                let fresh: Vec<&AssetRecord> = list
                    .iter()
                    .filter(|r| !records.contains_key(&r.key()))
                    .collect();
                if fresh.is_empty() {
                    return Ok((None, Vec::new()));
                }
                let room = room_of(records.len());
                let left: Vec<AssetRecord> =
                    fresh.iter().skip(room).map(|r| (*r).clone()).collect();
                for r in fresh.into_iter().take(room) {
                    records.insert(r.key(), r.clone());
                }
                Ok((Some(records), left))
            })?;
            full |= !left.is_empty();
            rest.extend(left);
        }
        if let (true, Some(k)) = (full, &key) {
            rounds += 1;
            if rounds > 2 * cur.asset_pages.max(1) + 8 {
                return Err(StoreError::Contended { key: k.clone() });
            }
            split_next_page(kv, account, k, &cur)?;
        }
    }
    Ok(())
}

/// Split the next asset page of generation `ix` (whose index is at `index_key`) in two:
/// linear hashing, one page at a time (`keys::asset_page_in`). Safe against readers and
/// writers in between, like [`respread`]: the records that move are first copied to the new
/// page, then the index switches to one more page (one compare-and-swap; readers and writers
/// follow it; a writer that missed a record looks again after reading the new index), then the
/// moved records leave the old page, carrying over any record changed there meanwhile.
///
/// An invocation killed between the switch and the clean up leaves copies of the moved records
/// on the old page: readers ignore them ([`page`], [`page_after_raw`] keep a page's own
/// records), and the next split clears them first ([`clear_last_split`]).
pub fn split_next_page(
    kv: &impl Kv,
    account: &str,
    index_key: &str,
    ix: &CopyIndex,
) -> Result<(), StoreError> {
    clear_last_split(kv, account, ix)?;
    let n = ix.asset_pages.max(1);
    let b = keys::asset_page_level(n, ix.base_pages);
    let split = n - b;
    let from = keys::asset_page(account, ix.generation, split);
    let to = keys::asset_page(account, ix.generation, n);
    let stays = |k: &str| keys::shard_of(k, 2 * b) == split;
    // 1. Copy what moves.
    let old: AssetPage = get_json(kv, &from)?.unwrap_or_default();
    let moving: AssetPage = old.into_iter().filter(|(k, _)| !stays(k)).collect();
    update::<AssetPage, ()>(kv, &to, |cur| {
        let mut page = cur.unwrap_or_default();
        for (k, r) in &moving {
            page.entry(k.clone()).or_insert_with(|| r.clone());
        }
        Ok((Some(page), ()))
    })?;
    // 2. Switch the index.
    let switched = update::<CopyIndex, bool>(kv, index_key, |cur| {
        let Some(mut c) = cur else {
            return Ok((None, false));
        };
        if c.generation != ix.generation || c.asset_pages != ix.asset_pages {
            return Ok((None, false));
        }
        if c.base_pages == 0 {
            c.base_pages = n;
        }
        c.asset_pages = n + 1;
        Ok((Some(c), true))
    })?;
    if !switched {
        // Another writer split first (page `n` is theirs too), or the generation went.
        let now: Option<CopyIndex> = get_json(kv, index_key)?;
        if !now.is_some_and(|c| c.generation == ix.generation && c.asset_pages > n) {
            kv.delete(&to)?;
        }
        return Ok(());
    }
    // 3. Clear the moved records from the old page, carrying over what changed there.
    let carried = update::<AssetPage, Vec<(String, AssetRecord)>>(kv, &from, |cur| {
        let Some(mut page) = cur else {
            return Ok((None, Vec::new()));
        };
        let mut carry = Vec::new();
        let before = page.len();
        page.retain(|k, r| {
            if stays(k) {
                return true;
            }
            if moving.get(k) != Some(r) {
                carry.push((k.clone(), r.clone()));
            }
            false
        });
        Ok(((page.len() != before).then_some(page), carry))
    })?;
    if !carried.is_empty() {
        update::<AssetPage, ()>(kv, &to, |cur| {
            let mut page = cur.unwrap_or_default();
            for (k, r) in &carried {
                page.insert(k.clone(), r.clone());
            }
            Ok((Some(page), ()))
        })?;
    }
    Ok(())
}

/// Clear what the last split of `ix` left on the page it split, if it was killed before its
/// clean up: the records whose page is now the one split off. Their copies there were written
/// before the index switched and writes after it went to them, so the old ones are dropped.
/// One read when there is nothing to clear.
pub fn clear_last_split(kv: &impl Kv, account: &str, ix: &CopyIndex) -> Result<(), StoreError> {
    let n = ix.asset_pages.max(1);
    if ix.base_pages == 0 || n <= ix.base_pages {
        return Ok(());
    }
    let split = (n - 1) - keys::asset_page_level(n - 1, ix.base_pages);
    let key = keys::asset_page(account, ix.generation, split);
    let stale = |page: &AssetPage| page.keys().any(|k| ix.page_of(k) != split);
    if !get_json::<AssetPage>(kv, &key)?.is_some_and(|p| stale(&p)) {
        return Ok(());
    }
    update::<AssetPage, ()>(kv, &key, |cur| {
        let Some(mut page) = cur else {
            return Ok((None, ()));
        };
        let before = page.len();
        page.retain(|k, _| ix.page_of(k) == split);
        Ok(((page.len() != before).then_some(page), ()))
    })
}

/// Put in-use (and available, by the same difference) of `asset_keys` in generation
/// `generation` right: in-use is the number of the asset's entries the copy holds, read from its
/// copy shards inside the compare-and-swap of the asset page (after the page is read, so a
/// writer whose swap wins has counted every copy edit made before it; one that counted too
/// early loses the swap and counts again).
///
/// Why a count and not a difference: the copy and the counts are separate values, and an
/// invocation killed between the two writes must not leave them apart. A recount is idempotent,
/// so whoever reads the outcome again (a poll, a notification Apple sends again, a resumed job)
/// completes what the killed one left. A generation a full refresh replaced since is left alone
/// (the new one has Apple's counts).
pub fn recount(
    kv: &impl Kv,
    account: &str,
    generation: u64,
    asset_keys: &[String],
) -> Result<(), StoreError> {
    let ix = index(kv, account)?;
    if ix.generation != generation || asset_keys.is_empty() {
        return Ok(());
    }
    let mut by_page: BTreeMap<u32, BTreeSet<&String>> = BTreeMap::new();
    for k in asset_keys {
        by_page.entry(ix.page_of(k)).or_default().insert(k);
    }
    for (p, wanted) in by_page {
        update::<AssetPage, ()>(kv, &keys::asset_page(account, ix.generation, p), |cur| {
            let Some(mut records) = cur else {
                return Ok((None, ()));
            };
            let mut changed = false;
            for k in &wanted {
                let Some(r) = records.get_mut(k.as_str()) else {
                    continue;
                };
                let held = entries_held(kv, account, &ix, r)? as i64;
                let d = held - r.in_use;
                if d != 0 {
                    r.in_use = held;
                    if r.total != vpp_apple::Asset::UNLIMITED_TOTAL {
                        r.available = (r.available - d).max(0);
                    }
                    changed = true;
                }
            }
            Ok((changed.then_some(records), ()))
        })?;
    }
    Ok(())
}

/// How many subjects hold `asset` in generation `ix` of the copy: one read of each copy shard it
/// owns (a subject met twice, as between the steps of [`respread`], counts once).
fn entries_held(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    asset: &AssetRecord,
) -> Result<usize, StoreError> {
    let ak = asset.key();
    let only = BTreeSet::from([ak.as_str()]);
    let shards: BTreeSet<u32> = (0..asset.shards.max(1))
        .map(|i| keys::asset_copy_shard(&ak, i, ix.copy_shards))
        .collect();
    if shards.len() == 1 {
        let n = shards.into_iter().next().unwrap_or_default();
        let shard: CopyShard = pick(kv, &keys::copy_shard(account, ix.generation, n), &only)?;
        return Ok(shard.get(&ak).map_or(0, BTreeMap::len));
    }
    let mut tags: BTreeSet<String> = BTreeSet::new();
    for n in shards {
        let mut shard: CopyShard = pick(kv, &keys::copy_shard(account, ix.generation, n), &only)?;
        if let Some(m) = shard.remove(&ak) {
            tags.extend(m.into_keys());
        }
    }
    Ok(tags.len())
}

/// The copy shard that holds `subject` of `asset` in the generation `doc` was read from.
pub fn shard_of(doc: &AssetsDoc, asset: &AssetRecord, subject: &Subject) -> u32 {
    keys::copy_shard_of(&asset.key(), &subject.tag(), asset.shards, doc.copy_shards)
}

/// Which of `subjects` hold `asset` in the copy, and who made each: one read per copy shard.
pub fn held(
    kv: &impl Kv,
    account: &str,
    doc: &AssetsDoc,
    asset: &AssetRecord,
    subjects: &[Subject],
) -> Result<BTreeMap<String, MadeBy>, StoreError> {
    let ak = asset.key();
    let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for s in subjects {
        by_shard
            .entry(shard_of(doc, asset, s))
            .or_default()
            .push(s.tag());
    }
    let mut out = BTreeMap::new();
    let only = BTreeSet::from([ak.as_str()]);
    for (n, tags) in by_shard {
        let shard: CopyShard = pick(kv, &keys::copy_shard(account, doc.generation, n), &only)?;
        if let Some(m) = shard.get(&ak) {
            for t in tags {
                if let Some(h) = m.get(&t) {
                    out.insert(t, MadeBy::from(h));
                }
            }
        }
    }
    Ok(out)
}

/// What [`edit_assignments`] does to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Keep,
    Put(MadeBy),
    Remove,
}

/// Change assignments of the copy (generation of `doc`): `entries[i]` is (asset, subject), and
/// `f(i, current)` says what to do with it. One compare-and-swap per copy shard; `f` may run
/// again after a lost race. Returns each entry's value before the change.
pub fn edit_assignments(
    kv: &impl Kv,
    account: &str,
    doc: &AssetsDoc,
    entries: &[(&AssetRecord, &Subject)],
    mut f: impl FnMut(usize, Option<&MadeBy>) -> Edit,
) -> Result<Vec<Option<MadeBy>>, StoreError> {
    let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, (asset, subject)) in entries.iter().enumerate() {
        by_shard
            .entry(shard_of(doc, asset, subject))
            .or_default()
            .push(i);
    }
    let mut before: Vec<Option<MadeBy>> = vec![None; entries.len()];
    for (n, idx) in by_shard {
        let seen = update::<CopyShard, Vec<(usize, Option<MadeBy>)>>(
            kv,
            &keys::copy_shard(account, doc.generation, n),
            |cur| {
                let mut shard = cur.unwrap_or_default();
                let mut seen = Vec::new();
                let mut changed = false;
                for &i in &idx {
                    let (asset, subject) = entries[i];
                    let ak = asset.key();
                    let tag = subject.tag();
                    let had = shard.get(&ak).and_then(|m| m.get(&tag)).map(MadeBy::from);
                    match f(i, had.as_ref()) {
                        Edit::Keep => {}
                        Edit::Put(by) => {
                            let h = Held::from(&by);
                            let m = shard.entry(ak).or_default();
                            if m.get(&tag) != Some(&h) {
                                m.insert(tag, h);
                                changed = true;
                            }
                        }
                        Edit::Remove => {
                            if let Some(m) = shard.get_mut(&ak) {
                                changed |= m.remove(&tag).is_some();
                                if m.is_empty() {
                                    shard.remove(&ak);
                                }
                            }
                        }
                    }
                    seen.push((i, had));
                }
                Ok((changed.then_some(shard), seen))
            },
        )?;
        for (i, had) in seen {
            before[i] = had;
        }
    }
    Ok(before)
}

/// Page `page` (below `asset.shards`) of an asset's assignments: one read.
pub fn asset_assignments(
    kv: &impl Kv,
    account: &str,
    doc: &AssetsDoc,
    asset: &AssetRecord,
    page: u32,
) -> Result<Vec<(String, MadeBy)>, StoreError> {
    let n = keys::asset_copy_shard(&asset.key(), page, doc.copy_shards);
    let ak = asset.key();
    let only = BTreeSet::from([ak.as_str()]);
    let shard: CopyShard = pick(kv, &keys::copy_shard(account, doc.generation, n), &only)?;
    Ok(page_entries(shard, asset, page))
}

/// A value as read from the store (`None`: the key is absent).
pub type Stored = Option<Vec<u8>>;

/// An asset's record and the entries of one page of its assignments.
pub type AssetWithPage = (AssetRecord, Vec<(String, MadeBy)>);

/// An asset of generation `ix` with page `page` of its assignments, and the values of `also`,
/// read in one call ([`Kv::get_many`]: the asset page and the copy shard of that page are
/// both known from the index and the asset key). `None` when the generation has no such
/// asset. A page at or past the asset's page count gives no entries (the caller says 404).
pub fn asset_with_page(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    asset_key: &str,
    page: u32,
    also: &[&str],
) -> Result<(Option<AssetWithPage>, Vec<Stored>), StoreError> {
    let page_key = keys::asset_page(account, ix.generation, ix.page_of(asset_key));
    let shard_key = keys::copy_shard(
        account,
        ix.generation,
        keys::asset_copy_shard(asset_key, page, ix.copy_shards),
    );
    let mut wanted_keys = vec![page_key.as_str(), shard_key.as_str()];
    wanted_keys.extend_from_slice(also);
    let mut got = kv.get_many(&wanted_keys)?.into_iter();
    let (stored_page, stored_shard) = (got.next().flatten(), got.next().flatten());
    let rest: Vec<Stored> = got.collect();
    let only = BTreeSet::from([asset_key]);
    let mut records: AssetPage = pick_in(&page_key, stored_page.as_deref(), &only)?;
    let Some(asset) = records.remove(asset_key) else {
        return Ok((None, rest));
    };
    let entries = if page < asset.shards.max(1) {
        let shard: CopyShard = pick_in(&shard_key, stored_shard.as_deref(), &only)?;
        page_entries(shard, &asset, page)
    } else {
        Vec::new()
    };
    Ok((Some((asset, entries)), rest))
}

/// The entries of page `page` of `asset` in a copy shard read for it.
fn page_entries(mut shard: CopyShard, asset: &AssetRecord, page: u32) -> Vec<(String, MadeBy)> {
    let ak = asset.key();
    let pages = asset.shards.max(1);
    shard
        .remove(&ak)
        .unwrap_or_default()
        .into_iter()
        // A shard an asset owns twice (more pages than shards cannot happen: capped) or shares:
        // keep only this page's subjects.
        .filter(|(tag, _)| keys::shard_of(tag, pages) == page)
        .map(|(tag, h)| {
            let by = MadeBy::from(&h);
            (tag, by)
        })
        .collect()
}

/// Spread an asset's assignments over `pages` copy shards of generation `ix` (capped at the
/// generation's shard count), when it has fewer: what an incremental refresh does before
/// adding many entries to one asset, so that no shard grows past its bound (each of the
/// asset's shards keeps ~[`keys::ASSET_COPY_PAGE`] of its entries). Returns the asset's page
/// count afterwards (unchanged when it already had enough or is not in the copy).
///
/// Safe against readers and writers in between: entries are first copied to their new shards,
/// then the record switches to the new count (readers and writers follow the record), then the
/// old positions are cleared; an entry changed at its old position meanwhile is carried over.
pub fn respread(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    asset_key: &str,
    pages: u32,
) -> Result<u32, StoreError> {
    let doc = assets_in(kv, account, ix, &[asset_key.to_string()])?;
    let Some(rec) = doc.assets.first() else {
        return Ok(0);
    };
    let old = rec.shards.max(1);
    let new = pages.min(ix.copy_shards.max(1));
    if new <= old {
        return Ok(old);
    }
    let c = ix.copy_shards;
    let only = BTreeSet::from([asset_key]);
    // 1. Copy every entry to its new shard (where that differs from where it is).
    let mut copied: BTreeMap<String, (u32, Held)> = BTreeMap::new();
    for i in 0..old {
        let from = keys::asset_copy_shard(asset_key, i, c);
        let mut shard: CopyShard =
            pick(kv, &keys::copy_shard(account, ix.generation, from), &only)?;
        for (tag, h) in shard.remove(asset_key).unwrap_or_default() {
            copied.insert(tag, (from, h));
        }
    }
    let mut moves: BTreeMap<u32, Vec<(&String, &Held)>> = BTreeMap::new();
    for (tag, (from, h)) in &copied {
        let to = keys::copy_shard_of(asset_key, tag, new, c);
        if to != *from {
            moves.entry(to).or_default().push((tag, h));
        }
    }
    for (to, list) in &moves {
        update::<CopyShard, ()>(kv, &keys::copy_shard(account, ix.generation, *to), |cur| {
            let mut shard = cur.unwrap_or_default();
            let m = shard.entry(asset_key.to_string()).or_default();
            for (tag, h) in list {
                m.entry((*tag).clone()).or_insert_with(|| (*h).clone());
            }
            Ok((Some(shard), ()))
        })?;
    }
    // 2. Switch the record.
    update_assets(kv, account, &[asset_key.to_string()], |r| {
        if r.shards < new {
            r.shards = new;
        }
    })?;
    // 3. Clear the old positions, carrying over what changed there since step 1 (a changed
    // value, or an entry removed there: `None`).
    let mut carried: BTreeMap<u32, Vec<(String, Option<Held>)>> = BTreeMap::new();
    for i in 0..old {
        let from = keys::asset_copy_shard(asset_key, i, c);
        let moved = update::<CopyShard, Vec<(String, Option<Held>)>>(
            kv,
            &keys::copy_shard(account, ix.generation, from),
            |cur| {
                let mut shard = cur.unwrap_or_default();
                let mut changed: Vec<(String, Option<Held>)> = copied
                    .iter()
                    .filter(|(tag, (f, _))| {
                        *f == from
                            && keys::copy_shard_of(asset_key, tag, new, c) != from
                            && !shard.get(asset_key).is_some_and(|m| m.contains_key(*tag))
                    })
                    .map(|(tag, _)| (tag.clone(), None))
                    .collect();
                let Some(m) = shard.get_mut(asset_key) else {
                    return Ok((None, changed));
                };
                let before = m.len();
                m.retain(|tag, h| {
                    if keys::copy_shard_of(asset_key, tag, new, c) == from {
                        return true;
                    }
                    if copied.get(tag).map(|(_, was)| was) != Some(h) {
                        changed.push((tag.clone(), Some(h.clone())));
                    }
                    false
                });
                if m.len() == before {
                    return Ok((None, changed));
                }
                if m.is_empty() {
                    shard.remove(asset_key);
                }
                Ok((Some(shard), changed))
            },
        )?;
        for (tag, h) in moved {
            let to = keys::copy_shard_of(asset_key, &tag, new, c);
            carried.entry(to).or_default().push((tag, h));
        }
    }
    for (to, list) in carried {
        update::<CopyShard, ()>(kv, &keys::copy_shard(account, ix.generation, to), |cur| {
            let mut shard = cur.unwrap_or_default();
            let m = shard.entry(asset_key.to_string()).or_default();
            for (tag, h) in &list {
                match h {
                    Some(h) => {
                        m.insert(tag.clone(), h.clone());
                    }
                    // Removed at the old position after the copy: remove the copy, unless a
                    // writer following the new count changed it since.
                    None => {
                        if m.get(tag) == copied.get(tag).map(|(_, was)| was) {
                            m.remove(tag);
                        }
                    }
                }
            }
            if m.is_empty() {
                shard.remove(asset_key);
            }
            Ok((Some(shard), ()))
        })?;
    }
    Ok(new)
}

/// Write a new generation's asset pages whole (full refresh): records grouped by page.
pub fn write_pages(
    kv: &impl Kv,
    account: &str,
    ix: &CopyIndex,
    records: Vec<AssetRecord>,
) -> Result<(), StoreError> {
    let mut pages: Vec<AssetPage> = vec![AssetPage::new(); ix.asset_pages.max(1) as usize];
    for r in records {
        let p = ix.page_of(&r.key()) as usize;
        pages[p].insert(r.key(), r);
    }
    for (p, records) in pages.into_iter().enumerate() {
        set_json(
            kv,
            &keys::asset_page(account, ix.generation, p as u32),
            &records,
        )?;
    }
    Ok(())
}

/// One assignment a refresh read: its copy shard, asset key, subject tag and maker.
pub type ReadEntry = (u32, String, String, MadeBy);

/// Merge entries into the copy shards of generation `generation` (one compare-and-swap per
/// shard touched); an entry already there is overwritten. Refuses to let a shard pass
/// [`keys::VALUE_LIMIT`].
pub fn merge_entries(
    kv: &impl Kv,
    account: &str,
    generation: u64,
    mut entries: Vec<ReadEntry>,
) -> Result<usize, StoreError> {
    entries.sort_by_key(|e| e.0);
    let mut written = 0;
    let mut start = 0;
    while start < entries.len() {
        let n = entries[start].0;
        let end = start + entries[start..].partition_point(|e| e.0 == n);
        let group = &entries[start..end];
        let key = keys::copy_shard(account, generation, n);
        update::<CopyShard, ()>(kv, &key, |cur| {
            let mut shard = cur.unwrap_or_default();
            for (_, ak, tag, by) in group {
                shard
                    .entry(ak.clone())
                    .or_default()
                    .insert(tag.clone(), Held::from(by));
            }
            let entries: usize = shard.values().map(BTreeMap::len).sum();
            if entries > keys::COPY_SHARD_ENTRIES * 3 {
                let size = serde_json::to_vec(&shard).map(|v| v.len()).unwrap_or(0);
                if size > keys::VALUE_LIMIT {
                    return Err(StoreError::Corrupt {
                        key: key.clone(),
                        reason: format!(
                            "copy shard would hold {size} bytes, over the {} byte limit; run a full refresh",
                            keys::VALUE_LIMIT
                        ),
                    });
                }
            }
            Ok((Some(shard), ()))
        })?;
        written += 1;
        start = end;
    }
    Ok(written)
}

/// Write a complete generation of the copy from records (sized for their `in_use`) and make it
/// current: what a full refresh's pack and commit produce, for seeding stores in tests and tools.
pub fn write_generation(
    kv: &impl Kv,
    account: &str,
    generation: u64,
    synced_at: Option<DateTime<Utc>>,
    mut records: Vec<AssetRecord>,
) -> Result<CopyIndex, StoreError> {
    let assignments: u64 = records.iter().map(|r| r.in_use.max(0) as u64).sum();
    let ix = CopyIndex {
        generation,
        synced_at,
        asset_pages: keys::asset_pages_for(records.len()),
        copy_shards: keys::copy_shards_for(assignments as usize),
        assets: records.len() as u64,
        assignments,
        raw_pages: 0,
        packed: true,
        base_pages: 0,
    };
    for r in records.iter_mut() {
        r.shards = keys::asset_copy_pages_for(r.in_use.max(0) as usize, ix.copy_shards);
    }
    write_pages(kv, account, &ix, records)?;
    set_json(kv, &keys::assets(account), &ix)?;
    Ok(ix)
}

/// Every assignment of an asset in the current generation (every page of it).
pub fn all_of_asset(
    kv: &impl Kv,
    account: &str,
    asset_key: &str,
) -> Result<BTreeMap<String, MadeBy>, StoreError> {
    let (doc, found) = asset(kv, account, asset_key)?;
    let mut out = BTreeMap::new();
    if let Some(a) = found {
        for p in 0..a.shards.max(1) {
            out.extend(asset_assignments(kv, account, &doc, &a, p)?);
        }
    }
    Ok(out)
}

/// Delete every value of a generation (its pages, raw pages and copy shards).
pub fn delete_generation(kv: &impl Kv, account: &str, ix: &CopyIndex) -> Result<(), StoreError> {
    for p in 0..ix.asset_pages {
        kv.delete(&keys::asset_page(account, ix.generation, p))?;
    }
    for n in 0..ix.raw_pages {
        kv.delete(&keys::asset_raw_page(account, ix.generation, n))?;
    }
    for n in 0..ix.copy_shards {
        kv.delete(&keys::copy_shard(account, ix.generation, n))?;
    }
    Ok(())
}

/// Delete an account's whole copy: the current generation, one being built, both indexes.
pub fn delete_all(kv: &impl Kv, account: &str) -> Result<(), StoreError> {
    if let Some(ix) = get_json::<CopyIndex>(kv, &keys::assets(account))? {
        delete_generation(kv, account, &ix)?;
    }
    if let Some(ix) = staging(kv, account)? {
        delete_generation(kv, account, &ix)?;
    }
    kv.delete(&keys::assets_staging(account))?;
    kv.delete(&keys::assets(account))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use vpp_store::MemoryKv;

    fn rec(adam: &str, in_use: i64, shards: u32) -> AssetRecord {
        AssetRecord {
            adam_id: adam.into(),
            pricing_param: "STDQ".into(),
            product_type: "App".into(),
            name: None,
            icon_url: None,
            total: 100,
            available: 100 - in_use,
            in_use,
            retired: 0,
            device_assignable: true,
            revocable: true,
            supported_platforms: Vec::new(),
            shards,
        }
    }

    #[test]
    fn pick_decodes_exactly_what_a_full_decode_finds() {
        let kv = MemoryKv::default();
        let mut shard: CopyShard = BTreeMap::new();
        let odd = ["a\"b", "c\\d", "{x}", "[y],", "é:ü", "", "z"];
        for (i, ak) in odd.iter().enumerate() {
            let mut m = BTreeMap::new();
            m.insert(format!("s:{ak}"), Held::Foreign(0));
            m.insert(
                format!("u:{i}}}"),
                Held::Ours(Some(format!("e\"{i}]")), Some(i as i64)),
            );
            m.insert(format!("s:{i}"), Held::Ours(None, None));
            shard.insert(ak.to_string(), m);
        }
        set_json(&kv, "k", &shard).unwrap();
        for ak in odd {
            let only = BTreeSet::from([ak]);
            let got: CopyShard = pick(&kv, "k", &only).unwrap();
            assert_eq!(got.get(ak), shard.get(ak), "{ak:?}");
            assert_eq!(got.len(), 1);
        }
        let none: CopyShard = pick(&kv, "absent", &BTreeSet::from(["a"])).unwrap();
        assert!(none.is_empty());
        // Whitespace between tokens (any writer's JSON) and a value that is not an object.
        kv.set("w", b" { \"a\" : [1, {\"b\": \"}\"}] ,\n \"c\" : 2 } ")
            .unwrap();
        let got: BTreeMap<String, Value> = pick(&kv, "w", &BTreeSet::from(["a", "c"])).unwrap();
        assert_eq!(got["a"], serde_json::json!([1, {"b": "}"}]));
        assert_eq!(got["c"], serde_json::json!(2));
        kv.set("bad", b"[1,2]").unwrap();
        assert!(pick::<Value>(&kv, "bad", &BTreeSet::from(["a"])).is_err());
    }

    /// The substring search finds exactly the member a scan of every member finds, in tables
    /// whose nested strings and tags spell other members' keys, written with and without a
    /// write mark; text that is not compact, or a key not of the asset-key form, is scanned.
    #[test]
    fn an_asset_is_found_by_search_exactly_as_by_a_scan() {
        let kv = MemoryKv::default();
        let tricky = [
            "s:7:STDQ",
            "s:,\"7:STDQ\":{",
            "u:{\"7:STDQ\":",
            "s:\\",
            "u:\"17:STDQ\":{\"x\":1}",
            "s:é",
            "s:\"7:STDQ",
            "u:x\\\"8:STDQ",
        ];
        let mut shard: CopyShard = BTreeMap::new();
        for (i, ak) in ["17:STDQ", "7:PLUS", "7:STDQ", "70:STDQ", "8:STDQ"]
            .iter()
            .enumerate()
        {
            let mut m = BTreeMap::new();
            for (j, t) in tricky.iter().enumerate() {
                let h = match (i + j) % 3 {
                    0 => Held::Foreign(0),
                    1 => Held::Ours(Some(format!(",\"{ak}\":{{{j}")), Some(j as i64)),
                    _ => Held::Ours(None, None),
                };
                m.insert(t.to_string(), h);
            }
            shard.insert(ak.to_string(), m);
        }
        let mut page = AssetPage::new();
        for ak in ["7:STDQ", "70:PLUS"] {
            let mut r = rec(ak.split(':').next().unwrap(), 3, 1);
            r.name = Some(format!("a,\"7:STDQ\":{{\"adamId\":\"9\"}} {ak}"));
            page.insert(r.key(), r);
        }
        set_json(&kv, "shard", &shard).unwrap();
        update::<CopyShard, ()>(&kv, "marked", |_| Ok((Some(shard.clone()), ()))).unwrap();
        set_json(&kv, "page", &page).unwrap();
        set_json(&kv, "empty", &CopyShard::new()).unwrap();
        let mut pretty = serde_json::to_vec_pretty(&shard).unwrap();
        pretty.extend_from_slice(b"\n");
        kv.set("pretty", &pretty).unwrap();
        let scan = |key: &str, ak: &str| -> Option<Value> {
            let bytes = kv.get(key).unwrap()?;
            let list = members(&bytes).unwrap();
            let quoted = serde_json::to_string(ak).unwrap();
            list.into_iter()
                .find(|(k, _)| *k == quoted.as_bytes())
                .map(|(_, v)| serde_json::from_slice(v).unwrap())
        };
        for key in ["shard", "marked", "page", "empty", "pretty"] {
            let bytes = kv.get(key).unwrap().unwrap();
            for ak in [
                "7:STDQ", "7:PLUS", "17:STDQ", "70:PLUS", "8:STDQ", "9:STDQ", "7",
            ] {
                let got: BTreeMap<String, Value> = pick(&kv, key, &BTreeSet::from([ak])).unwrap();
                assert_eq!(got.get(ak).cloned(), scan(key, ak), "{key} {ak}");
                let searched = asset_member(&bytes, ak).is_some();
                assert_eq!(searched, key != "pretty" && ak != "7", "{key} {ak}");
            }
            let two: BTreeMap<String, Value> =
                pick(&kv, key, &BTreeSet::from(["7:STDQ", "8:STDQ"])).unwrap();
            assert_eq!(two.get("8:STDQ").cloned(), scan(key, "8:STDQ"), "{key}");
        }
        kv.set("bad", b"{\"7:STDQ\":{\"s:1\":0").unwrap();
        assert!(pick::<Value>(&kv, "bad", &BTreeSet::from(["7:STDQ"])).is_err());
    }

    #[test]
    fn held_entries_round_trip_compactly() {
        let ours = MadeBy::Ours {
            event_id: Some("e1".into()),
            at: Utc.timestamp_millis_opt(1_700_000_000_123).single(),
        };
        for m in [MadeBy::Foreign, ours.clone()] {
            let h = Held::from(&m);
            let text = serde_json::to_string(&h).unwrap();
            let back: Held = serde_json::from_str(&text).unwrap();
            assert_eq!(MadeBy::from(&back), m);
        }
        assert_eq!(
            serde_json::to_string(&Held::from(&MadeBy::Foreign)).unwrap(),
            "0"
        );
    }

    #[test]
    fn pages_lookups_edits_and_asset_pages() {
        let kv = MemoryKv::default();
        let ix = CopyIndex {
            generation: 3,
            asset_pages: 4,
            copy_shards: 9,
            ..CopyIndex::default()
        };
        set_json(&kv, &keys::assets("a"), &ix).unwrap();
        let records: Vec<AssetRecord> = (0..40).map(|i| rec(&format!("{i}"), 0, 3)).collect();
        write_pages(&kv, "a", &ix, records).unwrap();
        let doc = all_assets(&kv, "a").unwrap();
        assert_eq!(doc.assets.len(), 40);
        let (doc, a) = asset(&kv, "a", "7:STDQ").unwrap();
        let a = a.unwrap();
        let subjects: Vec<Subject> = (0..50)
            .map(|i| Subject::SerialNumber(format!("S{i}")))
            .collect();
        let entries: Vec<(&AssetRecord, &Subject)> = subjects.iter().map(|s| (&a, s)).collect();
        let before =
            edit_assignments(&kv, "a", &doc, &entries, |_, _| Edit::Put(MadeBy::Foreign)).unwrap();
        assert!(before.iter().all(Option::is_none));
        let found = held(&kv, "a", &doc, &a, &subjects[..5]).unwrap();
        assert_eq!(found.len(), 5);
        let mut all = Vec::new();
        for p in 0..a.shards {
            all.extend(asset_assignments(&kv, "a", &doc, &a, p).unwrap());
        }
        assert_eq!(all.len(), 50);
        update_assets(&kv, "a", &["7:STDQ".to_string()], |r| r.in_use = 50).unwrap();
        assert_eq!(asset(&kv, "a", "7:STDQ").unwrap().1.unwrap().in_use, 50);
        delete_all(&kv, "a").unwrap();
        assert!(kv.keys().is_empty());
    }
}
