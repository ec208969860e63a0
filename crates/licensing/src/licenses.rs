//! The licenses list (one row per asset, with counts and a low-license flag), its CSV export,
//! and the paged assignments of one asset.
//!
//! Reads are bounded whatever the size of the account: a page of the list reads the settings,
//! the account index, per account (at most [`ACCOUNTS_PER_REQUEST`]) its record, its copy index
//! and its reservations (`ledger::open_reservations`: the assets with open entries), and the few
//! small asset pages its rows are on (see `pages_for`); it returns a cursor to continue. The
//! JSON page ([`list_page_json`]) copies each row's record members from their stored text; the
//! rows of [`list_page`] (the CSV export, the metrics) decode only the records they return. A page of an asset's assignments is the account, the copy
//! index, one asset page and one copy shard (scanned, only the asset's entries decoded).

use crate::copy::{self, CopyIndex};
use crate::error::{ApiError, ErrorCode};
use crate::model::{asset_key, Account, AssetRecord, AssetsDoc, MadeBy, Subject};
use crate::{event, settings};
use serde::Serialize;
use serde_json::{json, Value};
use vpp_store::{get_json, keys, Kv};

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LicenseRow {
    pub account_id: String,
    pub account_name: String,
    pub adam_id: String,
    pub pricing_param: String,
    pub name: Option<String>,
    /// Apple's artwork for the asset, when Apple gave one.
    pub icon_url: Option<String>,
    pub product_type: String,
    pub total: i64,
    pub available: i64,
    pub in_use: i64,
    pub retired: i64,
    /// Licenses held by our associations Apple has not confirmed yet.
    pub pending: i64,
    pub unlimited: bool,
    pub low_licenses: bool,
    pub device_assignable: bool,
    pub revocable: bool,
    pub synced_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Rows per page of the list unless `limit` says otherwise (a screenful: what a console shows
/// at once; the rest follows by cursor), and the most `limit` may ask.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;
/// Asset pages one request reads at most beyond those its rows need (a search may return
/// fewer rows and a cursor): a page of `limit` rows reads at most
/// `limit / keys::ASSET_PAGE_ENTRIES + PAGES_PER_REQUEST` asset pages.
pub const PAGES_PER_REQUEST: u32 = 3;

/// Asset pages a request for `limit` rows may read.
fn pages_for(limit: usize) -> u32 {
    (limit.div_ceil(keys::ASSET_PAGE_ENTRIES) as u32).saturating_add(PAGES_PER_REQUEST)
}
/// Accounts one request visits at most (each costs its record, copy index and reservations).
pub const ACCOUNTS_PER_REQUEST: u32 = 8;

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub account_id: Option<String>,
    /// Case-insensitive substring of the name (or the adamId).
    pub search: Option<String>,
    pub low_only: bool,
}

fn row(
    account: &Account,
    ix: &CopyIndex,
    a: &AssetRecord,
    pending: i64,
    threshold: i64,
) -> LicenseRow {
    let unlimited = a.total == vpp_apple::Asset::UNLIMITED_TOTAL;
    LicenseRow {
        account_id: account.id.clone(),
        account_name: account.name.clone(),
        adam_id: a.adam_id.clone(),
        pricing_param: a.pricing_param.clone(),
        name: a.name.clone(),
        icon_url: a.icon_url.clone(),
        product_type: a.product_type.clone(),
        total: a.total,
        available: a.available,
        in_use: a.in_use,
        retired: a.retired,
        pending,
        unlimited,
        low_licenses: !unlimited && a.available - pending <= threshold,
        device_assignable: a.device_assignable,
        revocable: a.revocable,
        synced_at: ix.synced_at,
    }
}

/// One page of the list and where the next one starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub rows: Vec<LicenseRow>,
    pub next_cursor: Option<String>,
}

/// Where a page of the list starts: an account, its asset page, the last asset key returned.
///
/// A walk goes through an account's asset pages as they were laid out when it entered the
/// account (`layout`: the base and page count, see `keys::asset_pages_holding`): a page split
/// since, or a full refresh that kept the base, moves assets to other pages, and the walk reads
/// an old page's assets from wherever they are now, so no asset is returned twice or skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    account: String,
    page: u32,
    /// (base, pages) of the account's layout the walk follows; `None` in a cursor given before
    /// cursors carried it (the current layout is followed).
    layout: Option<(u32, u32)>,
    after: String,
}

impl Cursor {
    fn start(account: &str) -> Cursor {
        Cursor {
            account: account.to_string(),
            page: 0,
            layout: None,
            after: String::new(),
        }
    }

    fn encode(&self) -> String {
        match self.layout {
            Some((base, pages)) => format!(
                "{}~{}.{}.{}~{}",
                self.account, self.page, base, pages, self.after
            ),
            None => format!("{}~{}~{}", self.account, self.page, self.after),
        }
    }

    fn parse(s: &str) -> Result<Cursor, ApiError> {
        let bad = || ApiError::invalid_field("cursor", "not a cursor this API returned");
        let mut parts = s.splitn(3, '~');
        let account = parts.next().filter(|a| !a.is_empty()).ok_or_else(bad)?;
        let numbers: Vec<u32> = parts
            .next()
            .ok_or_else(bad)?
            .split('.')
            .map(|n| n.parse::<u32>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let (page, layout) = match numbers[..] {
            [page] => (page, None),
            [page, base, pages] => (page, Some((base, pages))),
            _ => return Err(bad()),
        };
        let after = parts.next().ok_or_else(bad)?;
        Ok(Cursor {
            account: account.to_string(),
            page,
            layout,
            after: after.to_string(),
        })
    }
}

/// A `cursor` parameter of the list's form (absent or empty: the first page), for requests
/// that take it without paging (the CSV export): 400 otherwise, as [`list_page`] answers.
pub fn check_cursor(cursor: Option<&str>) -> Result<(), ApiError> {
    match cursor.filter(|c| !c.is_empty()) {
        Some(c) => Cursor::parse(c).map(|_| ()),
        None => Ok(()),
    }
}

/// One page of the licenses list, at most `limit` rows, starting at `cursor` (from the
/// previous page's `next_cursor`; `None`: the beginning). Rows come account by account, in the
/// copy's order (stable between refreshes that do not change the assets).
pub fn list_page(
    kv: &impl Kv,
    filter: &Filter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<ListPage, ApiError> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let mut rows = Vec::new();
    let next_cursor = walk(
        kv,
        filter,
        cursor,
        limit,
        pages_for(limit),
        ACCOUNTS_PER_REQUEST,
        &mut rows,
    )?;
    Ok(ListPage { rows, next_cursor })
}

/// [`list_page`] as the response body `{"licenses": [...], "nextCursor": ...}`, each row
/// written from its stored record's text (copied, never decoded and serialized again): the
/// same JSON as serializing the page's [`LicenseRow`]s, for a fraction of the work.
pub fn list_page_json(
    kv: &impl Kv,
    filter: &Filter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let mut rows = JsonRows::default();
    rows.out.extend_from_slice(b"{\"licenses\":[");
    let next_cursor = walk(
        kv,
        filter,
        cursor,
        limit,
        pages_for(limit),
        ACCOUNTS_PER_REQUEST,
        &mut rows,
    )?;
    let mut out = rows.out;
    out.extend_from_slice(b"],\"nextCursor\":");
    out.extend_from_slice(json_text(&next_cursor).as_bytes());
    out.push(b'}');
    Ok(out)
}

/// A stored asset record's members, found by a byte scan (`copy::members`): nothing decoded.
struct RawRecord<'a> {
    text: &'a [u8],
    members: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> RawRecord<'a> {
    fn parse(text: &'a [u8]) -> Result<RawRecord<'a>, ApiError> {
        let members = copy::members(text).ok_or_else(|| corrupt_record("not a JSON object"))?;
        Ok(RawRecord { text, members })
    }

    /// The text of member `field` (a plain camelCase name, so its key is `"field"` exactly).
    fn get(&self, field: &str) -> Option<&'a [u8]> {
        self.members
            .iter()
            .find(|(k, _)| k.len() == field.len() + 2 && &k[1..k.len() - 1] == field.as_bytes())
            .map(|(_, v)| *v)
    }

    fn required(&self, field: &str) -> Result<&'a [u8], ApiError> {
        self.get(field)
            .ok_or_else(|| corrupt_record(&format!("an asset record without {field}")))
    }

    fn int(&self, field: &str) -> Result<i64, ApiError> {
        std::str::from_utf8(self.required(field)?)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| corrupt_record(&format!("an asset record's {field} is not a number")))
    }

    fn string(&self, field: &str) -> Result<Option<String>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v).map_err(|e| corrupt_record(&e.to_string())),
        }
    }
}

fn corrupt_record(reason: &str) -> ApiError {
    ApiError::store(vpp_store::StoreError::Corrupt {
        key: "asset page".into(),
        reason: reason.to_string(),
    })
}

fn json_text(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// What a walk of the list makes of the rows it keeps.
trait RowSink {
    fn add(
        &mut self,
        account: &Account,
        ix: &CopyIndex,
        record: &RawRecord<'_>,
        pending: i64,
        threshold: i64,
    ) -> Result<(), ApiError>;

    fn len(&self) -> usize;
}

impl RowSink for Vec<LicenseRow> {
    fn add(
        &mut self,
        account: &Account,
        ix: &CopyIndex,
        record: &RawRecord<'_>,
        pending: i64,
        threshold: i64,
    ) -> Result<(), ApiError> {
        let a: AssetRecord =
            serde_json::from_slice(record.text).map_err(|e| corrupt_record(&e.to_string()))?;
        self.push(row(account, ix, &a, pending, threshold));
        Ok(())
    }

    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// Rows written as JSON straight from the records' text.
#[derive(Default)]
struct JsonRows {
    out: Vec<u8>,
    rows: usize,
    /// `{"accountId":..,"accountName":..,` of the account being walked, its id, and its
    /// `syncedAt` value.
    account: Option<(String, Vec<u8>, Vec<u8>)>,
}

impl RowSink for JsonRows {
    fn add(
        &mut self,
        account: &Account,
        ix: &CopyIndex,
        record: &RawRecord<'_>,
        pending: i64,
        threshold: i64,
    ) -> Result<(), ApiError> {
        if self.account.as_ref().map(|(id, _, _)| id) != Some(&account.id) {
            let head = format!(
                "{{\"accountId\":{},\"accountName\":{},",
                json_text(&account.id),
                json_text(&account.name)
            );
            let synced = json_text(&ix.synced_at);
            self.account = Some((account.id.clone(), head.into_bytes(), synced.into_bytes()));
        }
        let Some((_, head, synced)) = &self.account else {
            return Ok(());
        };
        let total = record.int("total")?;
        let available = record.int("available")?;
        let unlimited = total == vpp_apple::Asset::UNLIMITED_TOTAL;
        let low = !unlimited && available - pending <= threshold;
        let out = &mut self.out;
        if self.rows > 0 {
            out.push(b',');
        }
        out.extend_from_slice(head);
        let mut member = |name: &str, value: &[u8]| {
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(value);
            out.push(b',');
        };
        member("adamId", record.required("adamId")?);
        member("pricingParam", record.required("pricingParam")?);
        member("name", record.get("name").unwrap_or(b"null"));
        member("iconUrl", record.get("iconUrl").unwrap_or(b"null"));
        member("productType", record.required("productType")?);
        member("total", record.required("total")?);
        member("available", record.required("available")?);
        member("inUse", record.required("inUse")?);
        member("retired", record.required("retired")?);
        member("pending", pending.to_string().as_bytes());
        member("unlimited", if unlimited { b"true" } else { b"false" });
        member("lowLicenses", if low { b"true" } else { b"false" });
        member(
            "deviceAssignable",
            record.get("deviceAssignable").unwrap_or(b"false"),
        );
        member("revocable", record.get("revocable").unwrap_or(b"false"));
        out.extend_from_slice(b"\"syncedAt\":");
        out.extend_from_slice(synced);
        out.push(b'}');
        self.rows += 1;
        Ok(())
    }

    fn len(&self) -> usize {
        self.rows
    }
}

/// Rows from `cursor` on into `rows`, stopping after `limit` rows, `max_pages` asset pages or
/// `max_accounts` accounts visited (whichever comes first); returns the cursor to continue.
fn walk(
    kv: &impl Kv,
    filter: &Filter,
    cursor: Option<&str>,
    limit: usize,
    max_pages: u32,
    max_accounts: u32,
    rows: &mut impl RowSink,
) -> Result<Option<String>, ApiError> {
    let threshold = settings::load(kv)?.low_license_threshold;
    // One account asked for: its record is read once, here.
    let mut known: Option<Account> = None;
    let ids: Vec<String> = match &filter.account_id {
        Some(id) => {
            known = get_json::<Account>(kv, &keys::account(id))?;
            if known.is_none() {
                return Err(ApiError::not_found(format!("account {id}")));
            }
            vec![id.clone()]
        }
        None => get_json(kv, &keys::accounts())?.unwrap_or_default(),
    };
    let mut at = match cursor.filter(|c| !c.is_empty()) {
        None => match ids.first() {
            None => return Ok(None),
            Some(first) => Cursor::start(first),
        },
        Some(c) => Cursor::parse(c)?,
    };
    let Some(mut account_index) = ids.iter().position(|i| *i == at.account) else {
        // A well-formed cursor into a list that no longer holds its account (deleted, or a
        // cursor of another accountId's list): the state changed, not the request's form.
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the cursor's account is no longer listed; start again without a cursor",
        )
        .with_details(json!({"field": "cursor"})));
    };
    let needle = filter.search.as_ref().map(|s| s.to_lowercase());
    let mut pages_read = 0;
    let mut visits = 0;
    loop {
        visits += 1;
        if visits > max_accounts {
            return Ok(Some(at.encode()));
        }
        let id = &ids[account_index];
        let record = match known.take() {
            Some(a) if a.id == *id => Some(a),
            _ => get_json::<Account>(kv, &keys::account(id))?,
        };
        let Some(account) = record else {
            account_index += 1;
            match ids.get(account_index) {
                Some(next) => {
                    at = Cursor::start(next);
                    continue;
                }
                None => break,
            }
        };
        let ix = copy::index(kv, id)?;
        let base_now = keys::asset_page_base(ix.asset_pages, ix.base_pages);
        let (base, pages) = match at.layout {
            Some((base, pages)) if base != base_now || pages < base => {
                // A full refresh of an account that shrank below its base laid its assets out
                // anew: where the walk stood means nothing there.
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "this account's licenses were laid out anew by a full synchronization since \
                     the cursor was given; start again without a cursor",
                )
                .with_details(json!({"field": "cursor"})));
            }
            Some(layout) => layout,
            None => (base_now, ix.asset_pages.max(1)),
        };
        at.layout = Some((base, pages));
        // Reservations: the open ledger values of the assets that may have open entries.
        let reserved = crate::ledger::open_reservations(kv, id)?;
        while at.page < pages {
            if pages_read >= max_pages {
                return Ok(Some(at.encode()));
            }
            // The pages holding the walked page's assets now: itself, unless it split since.
            let holding = keys::asset_pages_holding(at.page, pages, ix.asset_pages, base);
            pages_read += holding.len() as u32;
            // Without a filter every record read is a row: read only the rows still wanted.
            // (One more than the rows wanted: whether another follows tells a full last page
            // from one with more after it.)
            let want = if needle.is_none() && !filter.low_only {
                limit.saturating_sub(rows.len()).saturating_add(1)
            } else {
                usize::MAX
            };
            let walked = at.page;
            let in_walked = |k: &str| keys::asset_page_in(k, pages, base) == walked;
            let parts = holding
                .into_iter()
                .map(|q| copy::page_after_raw(kv, id, &ix, q, &at.after, want, in_walked))
                .collect::<Result<Vec<_>, _>>()?;
            let mut records: Vec<(&str, &[u8])> = parts.iter().flat_map(|p| p.iter()).collect();
            if parts.len() > 1 {
                records.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            let read = records.len();
            for (i, (k, text)) in records.into_iter().enumerate() {
                at.after.clear();
                at.after.push_str(k);
                let record = RawRecord::parse(text)?;
                if let Some(n) = &needle {
                    let name = record.string("name")?.unwrap_or_default().to_lowercase();
                    let adam_id = record.string("adamId")?.unwrap_or_default();
                    if !name.contains(n.as_str()) && !adam_id.contains(n.as_str()) {
                        continue;
                    }
                }
                let pending = reserved.get(k).copied().unwrap_or(0);
                if filter.low_only {
                    let total = record.int("total")?;
                    let low = total != vpp_apple::Asset::UNLIMITED_TOTAL
                        && record.int("available")? - pending <= threshold;
                    if !low {
                        continue;
                    }
                }
                rows.add(&account, &ix, &record, pending, threshold)?;
                if rows.len() >= limit {
                    // No cursor when this was the list's last record: a full last page ends
                    // the walk (a filtered walk may still end on a page that comes out empty).
                    let last =
                        i + 1 == read && at.page + 1 >= pages && account_index + 1 >= ids.len();
                    return Ok((!last).then(|| at.encode()));
                }
            }
            at.page += 1;
            at.after.clear();
        }
        account_index += 1;
        match ids.get(account_index) {
            Some(next) => at = Cursor::start(next),
            None => break,
        }
    }
    Ok(None)
}

/// The whole list in one walk (every asset page of every account, each read once; for the
/// metrics, small stores and tests).
pub fn list(kv: &impl Kv, filter: &Filter) -> Result<Vec<LicenseRow>, ApiError> {
    let mut rows = Vec::new();
    walk(kv, filter, None, usize::MAX, u32::MAX, u32::MAX, &mut rows)?;
    Ok(rows)
}

/// Characters that make a spreadsheet read a cell as a formula when they lead it (a leading tab
/// or carriage return is skipped by some spreadsheets before they look).
const FORMULA_LEADS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

fn csv_field(s: &str) -> String {
    let formula = s.starts_with(FORMULA_LEADS);
    if formula || s.contains([',', '"', '\n', '\r', '\t']) || s.starts_with(' ') {
        // Quote, and neutralise spreadsheet formulas with a leading apostrophe.
        let body = if formula {
            format!("'{s}")
        } else {
            s.to_string()
        };
        format!("\"{}\"", body.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub const CSV_HEADER: &str = "accountId,accountName,adamId,pricingParam,name,productType,total,available,inUse,retired,pending,unlimited,lowLicenses";

pub fn to_csv(rows: &[LicenseRow]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    out.push_str(&csv_rows(rows));
    out
}

/// Rows as CSV lines (no header): a streamed export writes one page at a time.
pub fn csv_rows(rows: &[LicenseRow]) -> String {
    let mut out = String::new();
    for r in rows {
        let fields = [
            csv_field(&r.account_id),
            csv_field(&r.account_name),
            csv_field(&r.adam_id),
            csv_field(&r.pricing_param),
            csv_field(r.name.as_deref().unwrap_or("")),
            csv_field(&r.product_type),
            r.total.to_string(),
            r.available.to_string(),
            r.in_use.to_string(),
            r.retired.to_string(),
            r.pending.to_string(),
            r.unlimited.to_string(),
            r.low_licenses.to_string(),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// The CSV export, produced a bounded page of the list at a time so it can be written to the
/// response as it is read (memory stays flat whatever the number of rows): the header with the
/// first page, then one chunk per page until [`CsvExport::next_chunk`] answers `None`.
#[derive(Debug, Clone)]
pub struct CsvExport {
    filter: Filter,
    cursor: Option<String>,
    started: bool,
    done: bool,
}

impl CsvExport {
    pub fn new(filter: Filter) -> CsvExport {
        CsvExport {
            filter,
            cursor: None,
            started: false,
            done: false,
        }
    }

    /// The next chunk of the document (the first one carries the header), `None` at the end.
    /// An error in the first chunk (an unknown account) means nothing was produced.
    pub fn next_chunk(&mut self, kv: &impl Kv) -> Result<Option<String>, ApiError> {
        if self.done {
            return Ok(None);
        }
        let page = list_page(kv, &self.filter, self.cursor.as_deref(), MAX_LIMIT)?;
        let mut out = String::new();
        if !self.started {
            self.started = true;
            out.push_str(CSV_HEADER);
            out.push_str("\r\n");
        }
        out.push_str(&csv_rows(&page.rows));
        match page.next_cursor {
            Some(c) => self.cursor = Some(c),
            None => self.done = true,
        }
        Ok(Some(out))
    }
}

/// One page of an asset's assignments: page `n` is copy shard `n`.
pub fn assignments(
    kv: &impl Kv,
    account_id: &str,
    adam_id: &str,
    pricing: Option<&str>,
    page: Option<u64>,
) -> Result<Value, ApiError> {
    crate::assignment::validate_adam_id(adam_id)?;
    let first_pricing = crate::assignment::validate_pricing(pricing)?;
    if account_id.is_empty() {
        // What `load_account` says.
        crate::assignment::load_account(kv, account_id)?;
    }
    let page = page.unwrap_or(0);
    let page32 = u32::try_from(page).unwrap_or(u32::MAX);
    // Two calls to the store in the usual case: the account with the copy's index and the
    // settings, then the asset's page with the copy shard of the page asked for and the
    // asset's open ledger value (STDQ first unless pricingParam says; PLUS read after when
    // STDQ is not there).
    let (account_key, index_key, settings_key) = (
        keys::account(account_id),
        keys::assets(account_id),
        keys::settings(),
    );
    let got = kv.get_many(&[
        account_key.as_str(),
        index_key.as_str(),
        settings_key.as_str(),
    ])?;
    let account: Account = vpp_store::from_stored(&account_key, got[0].as_deref())?
        .ok_or_else(|| ApiError::not_found(format!("account {account_id}")))?;
    let ix: CopyIndex = vpp_store::from_stored(&index_key, got[1].as_deref())?.unwrap_or_default();
    let threshold = vpp_store::from_stored::<settings::Settings>(&settings_key, got[2].as_deref())?
        .unwrap_or_default()
        .low_license_threshold;
    let mut found = None;
    let mut tried = vec![first_pricing];
    if pricing.is_none() {
        tried.push("PLUS".into());
    }
    for p in &tried {
        let ak = asset_key(adam_id, p);
        let open_key = crate::ledger::open_key(&account.id, &ak);
        let (hit, rest) =
            copy::asset_with_page(kv, &account.id, &ix, &ak, page32, &[open_key.as_str()])?;
        if let Some(hit) = hit {
            let open_bytes = rest.into_iter().next().flatten();
            found = Some((hit, (open_key, open_bytes)));
            break;
        }
    }
    let Some(((asset, entries), (open_key, open_bytes))) = found else {
        return Err(match pricing {
            Some(_) => {
                let none = AssetsDoc::default();
                crate::assignment::find_asset(&none, account_id, adam_id, &tried[0])
                    .err()
                    .unwrap_or_else(|| ApiError::not_found(format!("asset {adam_id}")))
            }
            None => ApiError::not_found(format!("asset {adam_id} in account {account_id}")),
        });
    };
    if page >= u64::from(asset.shards) {
        return Err(ApiError::not_found(format!(
            "page {page} (the asset's assignments have {} pages)",
            asset.shards
        ))
        .with_details(json!({"field": "page"})));
    }
    let list: Vec<Value> = entries
        .iter()
        .filter_map(|(tag, by)| {
            let subject = Subject::from_tag(tag)?;
            let mut v = event::subject_json(&subject);
            match by {
                MadeBy::Ours { event_id, at } => {
                    v["madeBy"] = "thisInstance".into();
                    v["eventId"] = json!(event_id);
                    v["at"] = json!(at);
                }
                MadeBy::Foreign => v["madeBy"] = "foreign".into(),
            }
            Some(v)
        })
        .collect();
    // Our open entries (not yet in Apple's copy): shown with their state, on the first page;
    // their number is the asset's reservation (`pending` in its license row) on every page.
    let open = crate::ledger::open_doc_in(&open_key, open_bytes.as_deref(), &asset.key())?;
    let license = row(&account, &ix, &asset, open.entries.len() as i64, threshold);
    let mut pending = Vec::new();
    if page == 0 {
        for (tag, o) in &open.entries {
            let Some(subject) = Subject::from_tag(tag) else {
                continue;
            };
            let mut v = event::subject_json(&subject);
            v["madeBy"] = "thisInstance".into();
            v["state"] = o.state.name().into();
            v["eventIds"] = json!(open.event_ids(o));
            v["since"] = json!(chrono::DateTime::from_timestamp(o.since, 0));
            pending.push(v);
        }
    }
    let next = page + 1;
    Ok(json!({
        "license": license,
        "pending": pending,
        "accountId": account.id,
        "adamId": asset.adam_id,
        "pricingParam": asset.pricing_param,
        "inUse": asset.in_use,
        "page": page,
        "pages": asset.shards,
        "nextPage": (next < u64::from(asset.shards)).then_some(next),
        "assignments": list,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Account `a1` named `name`, stored.
    fn store_account(kv: &vpp_store::MemoryKv, name: &str) {
        let account: crate::model::Account = serde_json::from_value(json!({
            "id": "a1", "name": name, "organization": "Org", "location": "Main",
            "locationId": "uid1", "country": "US", "defaultPlatform": "volumestore",
            "websiteUrl": null, "tokenExpiresAt": "2030-01-01T00:00:00Z",
            "createdAt": "2025-01-01T00:00:00Z", "updatedAt": "2025-01-01T00:00:00Z",
        }))
        .unwrap();
        vpp_store::set_json(kv, &keys::account("a1"), &account).unwrap();
    }

    /// The cursor's form is the request's (400); its account missing from the list is the
    /// state's (409, start again), as the OpenAPI document's `cursor` pattern says.
    #[test]
    fn a_malformed_cursor_is_400_and_one_into_an_account_not_listed_is_409() {
        let kv = vpp_store::MemoryKv::default();
        let all = Filter::default();
        for bad in ["\u{b}", "x", "0123456789abcdef0123456789abcdef~page~"] {
            let e = list_page(&kv, &all, Some(bad), 10).unwrap_err();
            assert_eq!(
                (e.status(), e.code.as_str()),
                (400, "invalid_request"),
                "{bad:?}"
            );
        }
        for bad in ["\u{b}", "x", "0123456789abcdef0123456789abcdef~page~"] {
            assert_eq!(
                check_cursor(Some(bad)).unwrap_err().status(),
                400,
                "{bad:?}"
            );
        }
        assert!(check_cursor(Some("")).is_ok() && check_cursor(None).is_ok());
        let stale = "0123456789abcdef0123456789abcdef~0~";
        assert!(check_cursor(Some(stale)).is_ok());
        let e = list_page(&kv, &all, Some(stale), 10).unwrap_err();
        assert_eq!((e.status(), e.code.as_str()), (409, "conflict"));
        assert_eq!(e.body()["error"]["details"]["field"], "cursor");
    }

    /// A store whose `get_many` is one call, counting calls.
    struct Calls<'a>(&'a vpp_store::MemoryKv, std::cell::Cell<usize>);

    impl Kv for Calls<'_> {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, vpp_store::KvError> {
            self.1.set(self.1.get() + 1);
            self.0.get(key)
        }
        fn set(&self, key: &str, value: &[u8]) -> Result<(), vpp_store::KvError> {
            self.0.set(key, value)
        }
        fn delete(&self, key: &str) -> Result<(), vpp_store::KvError> {
            self.0.delete(key)
        }
        fn swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            new: &[u8],
        ) -> Result<bool, vpp_store::KvError> {
            self.0.swap(key, expected, new)
        }
        fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, vpp_store::KvError> {
            self.1.set(self.1.get() + 1);
            keys.iter().map(|k| self.0.get(k)).collect()
        }
    }

    /// An asset's assignments page is the asset's record and its entries on that page as the
    /// copy holds them, read in two store calls (STDQ, or the asset asked for); a PLUS-only
    /// asset is found without pricingParam; what is not there is a 404 that says what.
    #[test]
    fn an_assignments_page_is_the_copy_read_in_two_calls() {
        use vpp_store::MemoryKv;
        let kv = MemoryKv::default();
        store_account(&kv, "School");
        let record = |adam: u32, pricing: &str, in_use: i64| AssetRecord {
            adam_id: adam.to_string(),
            pricing_param: pricing.into(),
            product_type: "App".into(),
            name: None,
            icon_url: None,
            total: 10_000,
            available: 10_000 - in_use,
            in_use,
            retired: 0,
            device_assignable: true,
            revocable: true,
            supported_platforms: Vec::new(),
            shards: 1,
        };
        let mut records: Vec<AssetRecord> =
            (0..300).map(|i| record(1000 + i, "STDQ", 20)).collect();
        records.push(record(5, "PLUS", 3));
        records.push(record(7, "STDQ", 2_500));
        copy::write_generation(&kv, "a1", 1, None, records).unwrap();
        for (adam, pricing, n) in [
            (1000, "STDQ", 20),
            (1001, "STDQ", 20),
            (5, "PLUS", 3),
            (7, "STDQ", 2_500),
        ] {
            let (doc, a) = copy::asset(&kv, "a1", &asset_key(&adam.to_string(), pricing)).unwrap();
            let a = a.unwrap();
            let subjects: Vec<Subject> = (0..n)
                .map(|i| Subject::SerialNumber(format!("S{adam}-{i}")))
                .collect();
            let entries: Vec<(&AssetRecord, &Subject)> = subjects.iter().map(|s| (&a, s)).collect();
            copy::edit_assignments(&kv, "a1", &doc, &entries, |i, _| {
                copy::Edit::Put(if i % 2 == 0 {
                    MadeBy::Foreign
                } else {
                    MadeBy::Ours {
                        event_id: Some(format!("e{i}")),
                        at: None,
                    }
                })
            })
            .unwrap();
        }
        let calls = Calls(&kv, std::cell::Cell::new(0));
        for (adam, pricing, pages, want_calls) in [
            ("1000", None, 1, 2),
            ("1001", Some("STDQ"), 1, 2),
            ("5", None, 1, 3),
            ("5", Some("PLUS"), 1, 2),
            // 2,500 entries: a page of ASSET_COPY_PAGE each, as the account's shards allow.
            (
                "7",
                None,
                keys::asset_copy_pages_for(2_500, copy::index(&kv, "a1").unwrap().copy_shards),
                2,
            ),
        ] {
            let (doc, a) = copy::asset(
                &kv,
                "a1",
                &asset_key(
                    adam,
                    pricing.unwrap_or(if adam == "5" { "PLUS" } else { "STDQ" }),
                ),
            )
            .unwrap();
            let a = a.unwrap();
            assert_eq!(a.shards, pages, "{adam}");
            let mut seen = 0;
            for p in 0..pages {
                calls.1.set(0);
                let got = assignments(&calls, "a1", adam, pricing, Some(u64::from(p))).unwrap();
                if p == 0 {
                    assert_eq!(calls.1.get(), want_calls, "{adam} {pricing:?}");
                }
                let want = copy::asset_assignments(&kv, "a1", &doc, &a, p).unwrap();
                let tags: Vec<String> = got["assignments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| format!("s:{}", v["serialNumber"].as_str().unwrap()))
                    .collect();
                let want_tags: Vec<String> = want.iter().map(|(t, _)| t.clone()).collect();
                assert_eq!(tags, want_tags, "{adam} page {p}");
                assert_eq!(got["inUse"], a.in_use);
                // The asset's row of the list, as the list gives it, on every page.
                let filter = Filter {
                    account_id: Some("a1".into()),
                    search: Some(adam.into()),
                    low_only: false,
                };
                let rows = list(&kv, &filter).unwrap();
                let want_row = rows
                    .iter()
                    .find(|r| r.adam_id == adam && r.pricing_param == a.pricing_param)
                    .unwrap();
                assert_eq!(got["license"], serde_json::to_value(want_row).unwrap());
                assert_eq!(got["pages"], pages);
                assert_eq!(got["pricingParam"], a.pricing_param);
                assert_eq!(
                    got["nextPage"],
                    if p + 1 < pages {
                        json!(p + 1)
                    } else {
                        Value::Null
                    }
                );
                seen += tags.len();
            }
            assert_eq!(seen as i64, a.in_use, "{adam}");
            let e = assignments(&calls, "a1", adam, pricing, Some(u64::from(pages))).unwrap_err();
            assert_eq!(
                (e.status(), e.body()["error"]["details"]["field"].clone()),
                (404, json!("page"))
            );
        }
        let e = assignments(&calls, "a1", "1000", Some("PLUS"), None).unwrap_err();
        assert_eq!(e.status(), 404);
        assert_eq!(e.body()["error"]["details"]["pricingParam"], "PLUS");
        let e = assignments(&calls, "a1", "99", None, None).unwrap_err();
        assert_eq!(e.status(), 404);
        let e = assignments(&calls, "nope", "1000", None, None).unwrap_err();
        assert!(e.body()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("account nope"));
        assert_eq!(
            assignments(&calls, "", "1000", None, None)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            assignments(&calls, "a1", "x", None, None)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            assignments(&calls, "a1", "1000", Some("X"), None)
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn the_csv_export_in_chunks_is_the_whole_document() {
        use vpp_store::{set_json, MemoryKv};
        let kv = MemoryKv::default();
        store_account(&kv, "School, \"North\"");
        set_json(&kv, &keys::accounts(), &vec!["a1".to_string()]).unwrap();
        let records: Vec<AssetRecord> = (0..2_600)
            .map(|i| AssetRecord {
                adam_id: format!("{}", 100_000 + i),
                pricing_param: "STDQ".into(),
                product_type: "App".into(),
                name: Some(format!("=App {i}")),
                icon_url: None,
                total: 10,
                available: 10 - (i % 3),
                in_use: i % 3,
                retired: 0,
                device_assignable: true,
                revocable: true,
                supported_platforms: Vec::new(),
                shards: 1,
            })
            .collect();
        copy::write_generation(&kv, "a1", 1, None, records).unwrap();
        let mut export = CsvExport::new(Filter::default());
        let mut chunks = Vec::new();
        while let Some(c) = export.next_chunk(&kv).unwrap() {
            chunks.push(c);
        }
        // Several pages of at most MAX_LIMIT rows (a page of the list reads a few asset pages).
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        let whole = to_csv(&list(&kv, &Filter::default()).unwrap());
        assert_eq!(chunks.concat(), whole);
        assert_eq!(whole.lines().count(), 2_601);
        assert_eq!(export.next_chunk(&kv).unwrap(), None);
        // An unknown account fails before anything is produced.
        let mut bad = CsvExport::new(Filter {
            account_id: Some("nope".into()),
            ..Filter::default()
        });
        assert!(bad.next_chunk(&kv).is_err());
    }

    /// Account `a1` listed, with `n` assets from adamId 100000 in one generation.
    fn listed_account(kv: &vpp_store::MemoryKv, n: usize) {
        store_account(kv, "North");
        vpp_store::set_json(kv, &keys::accounts(), &vec!["a1".to_string()]).unwrap();
        let records: Vec<AssetRecord> = (0..n)
            .map(|i| AssetRecord {
                adam_id: format!("{}", 100_000 + i),
                pricing_param: "STDQ".into(),
                product_type: "App".into(),
                name: Some(format!("App {i}")),
                icon_url: None,
                total: 10,
                available: 10,
                in_use: 0,
                retired: 0,
                device_assignable: true,
                revocable: true,
                supported_platforms: Vec::new(),
                shards: 1,
            })
            .collect();
        copy::write_generation(kv, "a1", 1, None, records).unwrap();
    }

    /// Walk the list by cursor, `limit` rows a request, calling `between` after each page;
    /// the adamIds in the order returned.
    fn walk_all(
        kv: &vpp_store::MemoryKv,
        limit: usize,
        mut between: impl FnMut(usize),
    ) -> Result<Vec<String>, ApiError> {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for request in 0.. {
            let page = list_page(kv, &Filter::default(), cursor.as_deref(), limit)?;
            seen.extend(page.rows.into_iter().map(|r| r.adam_id));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
            between(request);
        }
        Ok(seen)
    }

    /// A page that ends exactly at the list's last asset says nothing follows (no cursor for
    /// an empty page); one with more after it gives a cursor.
    #[test]
    fn a_full_last_page_has_no_cursor() {
        let kv = vpp_store::MemoryKv::default();
        listed_account(&kv, 100);
        let first = list_page(&kv, &Filter::default(), None, 50).unwrap();
        assert_eq!(first.rows.len(), 50);
        let second = list_page(&kv, &Filter::default(), first.next_cursor.as_deref(), 50).unwrap();
        assert_eq!((second.rows.len(), second.next_cursor), (50, None));
        let all = list_page(&kv, &Filter::default(), None, 100).unwrap();
        assert_eq!((all.rows.len(), all.next_cursor), (100, None));
        let most = list_page(&kv, &Filter::default(), None, 99).unwrap();
        assert!(most.next_cursor.is_some());
        // 450 assets in pages of 50: nine requests, the last one without a cursor.
        let mut requests = 1;
        let listed = walk_all(&kv, 50, |_| requests += 1).unwrap();
        assert_eq!((listed.len(), requests), (100, 2));
        let kv = vpp_store::MemoryKv::default();
        listed_account(&kv, 450);
        let mut requests = 1;
        each_once(&walk_all(&kv, 50, |_| requests += 1).unwrap(), 450);
        assert_eq!(requests, 9);
    }

    fn each_once(seen: &[String], n: usize) {
        let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "an asset returned twice");
        assert_eq!(seen.len(), n, "an asset skipped");
    }

    /// Pages split while a client walks the list (an incremental refresh adding assets): each
    /// asset is returned once. Before the walk followed its starting layout, the assets that
    /// moved from a page already walked to the new page came again.
    #[test]
    fn a_walk_by_cursor_returns_each_asset_once_while_pages_split() {
        let kv = vpp_store::MemoryKv::default();
        listed_account(&kv, 450);
        let start = copy::index(&kv, "a1").unwrap();
        assert_eq!((start.asset_pages, start.base_pages), (5, 0));
        let seen = walk_all(&kv, 30, |_| {
            let ix = copy::index(&kv, "a1").unwrap();
            copy::split_next_page(&kv, "a1", &keys::assets("a1"), &ix).unwrap();
        })
        .unwrap();
        let end = copy::index(&kv, "a1").unwrap();
        assert!(end.asset_pages >= 2 * start.asset_pages, "{end:?}");
        each_once(&seen, 450);
    }

    /// A split killed between its index switch and its clean up leaves copies of the moved
    /// records on the page it split: the list shows each asset once, the whole-copy read too,
    /// and the next split clears them.
    #[test]
    fn copies_left_by_a_killed_split_are_not_listed_and_the_next_split_clears_them() {
        use vpp_store::{get_json, set_json};
        let kv = vpp_store::MemoryKv::default();
        listed_account(&kv, 450);
        let before = copy::index(&kv, "a1").unwrap();
        let split_page = keys::asset_page("a1", 1, 0);
        let old: copy::AssetPage = get_json(&kv, &split_page).unwrap().unwrap();
        copy::split_next_page(&kv, "a1", &keys::assets("a1"), &before).unwrap();
        // What the kill leaves: the moved records still on the old page as well.
        set_json(&kv, &split_page, &old).unwrap();
        let ix = copy::index(&kv, "a1").unwrap();
        let moved = old.keys().filter(|k| ix.page_of(k) != 0).count();
        assert!(moved > 0);
        each_once(&walk_all(&kv, 1000, |_| {}).unwrap(), 450);
        each_once(&walk_all(&kv, 17, |_| {}).unwrap(), 450);
        assert_eq!(copy::all_assets(&kv, "a1").unwrap().assets.len(), 450);
        copy::split_next_page(&kv, "a1", &keys::assets("a1"), &ix).unwrap();
        let cleared: copy::AssetPage = get_json(&kv, &split_page).unwrap().unwrap();
        assert_eq!(
            cleared.len(),
            old.len() - moved,
            "the stale copies are gone"
        );
        assert!(cleared.keys().all(|k| ix.page_of(k) == 0));
    }

    /// A full refresh switching generations mid-walk keeps the walk's base when the account
    /// did not shrink below it: the walk goes on, each asset once. One that lays the account
    /// out anew makes the cursor a 409 (start again), never a silent repeat or skip.
    #[test]
    fn a_walk_by_cursor_goes_on_across_a_full_refresh_or_is_refused() {
        let kv = vpp_store::MemoryKv::default();
        listed_account(&kv, 450);
        let rewrite = |n: usize, generation: u64| {
            // What a full refresh's pack and commit write: the layout keys::asset_layout_for
            // gives from the current index.
            let cur = copy::index(&kv, "a1").unwrap();
            let mut records: Vec<AssetRecord> = copy::all_assets(&kv, "a1").unwrap().assets;
            records.truncate(n);
            let (pages, base) =
                keys::asset_layout_for(records.len(), Some((cur.asset_pages, cur.base_pages)));
            let ix = CopyIndex {
                generation,
                asset_pages: pages,
                base_pages: base,
                ..cur.clone()
            };
            copy::write_pages(&kv, "a1", &ix, records).unwrap();
            vpp_store::set_json(&kv, &keys::assets("a1"), &ix).unwrap();
            copy::delete_generation(&kv, "a1", &cur).unwrap();
        };
        // Split twice, then a full refresh of the same assets keeps base 5.
        let seen = walk_all(&kv, 40, |request| match request {
            0 | 1 => {
                let ix = copy::index(&kv, "a1").unwrap();
                copy::split_next_page(&kv, "a1", &keys::assets("a1"), &ix).unwrap();
            }
            3 => rewrite(450, 2),
            _ => {}
        })
        .unwrap();
        let ix = copy::index(&kv, "a1").unwrap();
        assert_eq!((ix.generation, ix.asset_pages, ix.base_pages), (2, 5, 0));
        each_once(&seen, 450);
        // The account shrinks to 150 assets (2 pages, below base 5): a new layout.
        let first = list_page(&kv, &Filter::default(), None, 40).unwrap();
        rewrite(150, 3);
        let e = list_page(&kv, &Filter::default(), first.next_cursor.as_deref(), 40).unwrap_err();
        assert_eq!((e.status(), e.code.as_str()), (409, "conflict"));
        assert_eq!(e.body()["error"]["details"]["field"], "cursor");
        each_once(&walk_all(&kv, 40, |_| {}).unwrap(), 150);
    }

    /// The body written from the records' text is the JSON of the rows decoded and serialized,
    /// whatever the records hold (escapes, absent optional members, unlimited, pending, low).
    #[test]
    fn a_page_written_from_stored_text_is_the_rows_serialized() {
        use vpp_store::{set_json, MemoryKv};
        let kv = MemoryKv::default();
        store_account(&kv, "School \"North\" \\ é");
        set_json(&kv, &keys::accounts(), &vec!["a1".to_string()]).unwrap();
        let records: Vec<AssetRecord> = (0..260)
            .map(|i| AssetRecord {
                adam_id: format!("{}", 100_000 + i),
                pricing_param: if i % 7 == 0 { "PLUS" } else { "STDQ" }.into(),
                product_type: if i % 2 == 0 { "App" } else { "Book" }.into(),
                name: (i % 5 != 0).then(|| format!("App \"{i}\" \\ \u{1} ü,}}")),
                icon_url: (i % 3 == 0).then(|| format!("https://e.test/{i}.png")),
                total: if i % 11 == 0 {
                    vpp_apple::Asset::UNLIMITED_TOTAL
                } else {
                    10
                },
                available: 10 - (i % 12),
                in_use: i % 12,
                retired: i % 2,
                device_assignable: i % 4 != 0,
                revocable: i % 6 != 0,
                supported_platforms: vec!["iOS".into()],
                shards: 1,
            })
            .collect();
        let synced = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        copy::write_generation(&kv, "a1", 1, Some(synced), records).unwrap();
        // A record written before the optional members existed.
        let ix = copy::index(&kv, "a1").unwrap();
        let old_key = keys::asset_page(
            "a1",
            ix.generation,
            ix.page_of(&crate::model::asset_key("100003", "STDQ")),
        );
        let mut page: serde_json::Map<String, Value> =
            serde_json::from_slice(&kv.get(&old_key).unwrap().unwrap()).unwrap();
        page["100003:STDQ"] = json!({"adamId": "100003", "pricingParam": "STDQ",
            "productType": "App", "total": 5, "available": 1, "inUse": 4, "retired": 0});
        set_json(&kv, &old_key, &page).unwrap();
        set_json(&kv, &keys::settings(), &json!({"lowLicenseThreshold": 3})).unwrap();
        // Open ledger entries: rows with `pending`, some of them low because of it.
        for (adam, n) in [("100001", 1), ("100002", 3), ("100009", 2)] {
            let subjects: Vec<crate::model::Subject> = (0..n)
                .map(|i| crate::model::Subject::SerialNumber(format!("S{adam}-{i}")))
                .collect();
            crate::ledger::admit(
                &kv,
                "a1",
                &crate::model::asset_key(adam, "STDQ"),
                &subjects,
                false,
                chrono::Utc::now(),
            )
            .unwrap();
        }
        let filters = [
            Filter::default(),
            Filter {
                account_id: Some("a1".into()),
                ..Filter::default()
            },
            Filter {
                low_only: true,
                ..Filter::default()
            },
            Filter {
                search: Some("\"1".into()),
                ..Filter::default()
            },
        ];
        for filter in &filters {
            for limit in [1, 7, 50, 1000] {
                let mut cursor: Option<String> = None;
                loop {
                    let page = list_page(&kv, filter, cursor.as_deref(), limit).unwrap();
                    let body = list_page_json(&kv, filter, cursor.as_deref(), limit).unwrap();
                    let text: Value = serde_json::from_slice(&body).unwrap();
                    let want = json!({"licenses": page.rows, "nextCursor": page.next_cursor});
                    assert_eq!(text, want, "{filter:?} {limit} {cursor:?}");
                    match page.next_cursor {
                        Some(c) => cursor = Some(c),
                        None => break,
                    }
                }
            }
        }
        // Low rows and unlimited ones were among them.
        let all = list(&kv, &Filter::default()).unwrap();
        assert!(all.iter().any(|r| r.low_licenses) && all.iter().any(|r| r.unlimited));
        assert!(all.iter().any(|r| r.name.is_none() && r.icon_url.is_none()));
        // 1 + 3 + the 1 license 100009 had free.
        assert_eq!(all.iter().map(|r| r.pending).sum::<i64>(), 5);
    }

    #[test]
    fn csv_quotes_and_neutralises() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=1+1"), "\"'=1+1\"");
    }

    #[test]
    fn csv_formula_guard_covers_every_leading_trigger() {
        for (raw, want) in [
            ("+SUM(A1)", "\"'+SUM(A1)\""),
            ("-2+3", "\"'-2+3\""),
            ("@cmd", "\"'@cmd\""),
            ("\t=1+1", "\"'\t=1+1\""),
            ("\r=1+1", "\"'\r=1+1\""),
            ("a\tb", "\"a\tb\""),
        ] {
            assert_eq!(csv_field(raw), want, "{raw:?}");
        }
    }
}
