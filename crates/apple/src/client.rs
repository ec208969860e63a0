//! The typed client: one request core (pace, send, retry, classify, decode, record `mdmInfo`)
//! with every v2 endpoint around it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::AppleError;
use crate::retry::{send_with_retry, Pacer, RetryPolicy};
use crate::transport::{percent_encode, AppleRequest, Clock, Method, Target, Transport};
use crate::types::*;

/// Apple: "re-sync every 5 minutes".
pub const SERVICE_CONFIG_TTL_SECS: i64 = 300;
/// Used when the service config has no `contentMetadataLookup` URL.
pub const DEFAULT_METADATA_LOOKUP_URL: &str =
    "https://uclient-api.itunes.apple.com/WebObjects/MZStorePlatform.woa/wa/lookup";
/// IDs per metadata lookup (keeps URLs short; Apple documents no limit).
pub const METADATA_IDS_PER_REQUEST: usize = 100;
/// Apple: parallel page fetches are allowed, but no more than 5 at once.
pub const MAX_PAGES_IN_FLIGHT: u32 = 5;
/// A guard against a server whose `nextPageIndex` never ends.
pub const MAX_PAGES: u32 = 100_000;

// ---------------------------------------------------------------------------------------------
// Filters

/// `GET /assets` query parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssetFilter {
    pub adam_id: Option<String>,
    pub product_type: Option<ProductType>,
    pub pricing_param: Option<PricingParam>,
    pub revocable: Option<bool>,
    pub device_assignable: Option<bool>,
    pub max_available_count: Option<i64>,
    pub min_available_count: Option<i64>,
    pub max_assigned_count: Option<i64>,
    pub min_assigned_count: Option<i64>,
    pub unlimited: Option<bool>,
}

impl AssetFilter {
    pub fn adam_id(id: impl Into<String>) -> Self {
        AssetFilter {
            adam_id: Some(id.into()),
            ..Default::default()
        }
    }

    pub fn query(&self) -> Vec<(String, String)> {
        let mut q = Query::default();
        q.opt("adamId", self.adam_id.as_ref());
        q.opt("productType", self.product_type.as_ref());
        q.opt("pricingParam", self.pricing_param.as_ref());
        q.opt("revocable", self.revocable.as_ref());
        q.opt("deviceAssignable", self.device_assignable.as_ref());
        q.opt("maxAvailableCount", self.max_available_count.as_ref());
        q.opt("minAvailableCount", self.min_available_count.as_ref());
        q.opt("maxAssignedCount", self.max_assigned_count.as_ref());
        q.opt("minAssignedCount", self.min_assigned_count.as_ref());
        q.opt("unlimited", self.unlimited.as_ref());
        q.0
    }
}

/// `GET /assignments` query parameters (`sinceVersionId` and `pageIndex` are arguments).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssignmentFilter {
    pub adam_id: Option<String>,
    pub client_user_id: Option<String>,
    pub serial_number: Option<String>,
    pub pricing_param: Option<PricingParam>,
    pub exclude_inactive_users: Option<bool>,
    pub include_user_state: Option<bool>,
}

impl AssignmentFilter {
    pub fn query(&self) -> Vec<(String, String)> {
        let mut q = Query::default();
        q.opt("adamId", self.adam_id.as_ref());
        q.opt("clientUserId", self.client_user_id.as_ref());
        q.opt("serialNumber", self.serial_number.as_ref());
        q.opt("pricingParam", self.pricing_param.as_ref());
        q.opt("excludeInactiveUsers", self.exclude_inactive_users.as_ref());
        q.opt("includeUserState", self.include_user_state.as_ref());
        q.0
    }
}

/// `GET /users` query parameters. `extra` carries undocumented ones (`includeRetired`,
/// `managedAppleId`; UNCONFIRMED).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserFilter {
    pub client_user_id: Option<String>,
    pub active_only: Option<bool>,
    pub retired_only: Option<bool>,
    pub extra: Vec<(String, String)>,
}

impl UserFilter {
    pub fn query(&self) -> Vec<(String, String)> {
        let mut q = Query::default();
        q.opt("clientUserId", self.client_user_id.as_ref());
        q.opt("activeOnly", self.active_only.as_ref());
        q.opt("retiredOnly", self.retired_only.as_ref());
        q.0.extend(self.extra.iter().cloned());
        q.0
    }
}

#[derive(Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn opt<V: fmt::Display>(&mut self, key: &str, v: Option<&V>) {
        if let Some(v) = v {
            self.0.push((key.to_string(), v.to_string()));
        }
    }
}

fn paged_query(
    mut base: Vec<(String, String)>,
    since_version: Option<&str>,
    page_index: u32,
) -> Vec<(String, String)> {
    if let Some(v) = since_version {
        base.push(("sinceVersionId".into(), v.to_string()));
    }
    // Index 0 is the default; omitting it sidesteps error 9650's "greater than 0" wording.
    if page_index > 0 {
        base.push(("pageIndex".into(), page_index.to_string()));
    }
    base
}

// ---------------------------------------------------------------------------------------------
// Paging

/// A page of a paged endpoint. `absorb` appends a later page's items.
pub trait Paged: DeserializeOwned {
    fn next_page_index(&self) -> Option<u32>;
    fn total_pages(&self) -> Option<u32>;
    fn absorb(&mut self, later: Self);
}

macro_rules! paged {
    ($ty:ty, $($field:ident),+) => {
        impl Paged for $ty {
            fn next_page_index(&self) -> Option<u32> {
                self.next_page_index
            }
            fn total_pages(&self) -> Option<u32> {
                self.total_pages
            }
            fn absorb(&mut self, later: Self) {
                $(self.$field.extend(later.$field);)+
                // versionId stays the first page's; paging fields follow the latest page.
                self.current_page_index = later.current_page_index;
                self.next_page_index = later.next_page_index;
                self.total_pages = later.total_pages;
                if later.mdm_info.is_some() {
                    self.mdm_info = later.mdm_info;
                }
                if self.version_id.is_none() {
                    self.version_id = later.version_id;
                }
            }
        }
    };
}

paged!(AssetsPage, assets, unlimited_assets);
paged!(AssignmentsPage, assignments);
paged!(UsersPage, users);

// ---------------------------------------------------------------------------------------------
// Splitting to Apple's limits

fn dedupe<T: Eq + Hash + Clone>(items: &[T]) -> Vec<T> {
    let mut seen = HashSet::new();
    items
        .iter()
        .filter(|i| seen.insert((*i).clone()))
        .cloned()
        .collect()
}

fn chunked<T: Clone>(items: &[T], size: u32) -> Vec<Vec<T>> {
    let size = usize::try_from(size.max(1)).unwrap_or(usize::MAX);
    items.chunks(size).map(<[T]>::to_vec).collect()
}

/// Split one logical associate/disassociate into requests within `maxAssets`,
/// `maxSerialNumbers` and `maxClientUserIds`, one kind of ID per request (Fleet: Apple accepts
/// one or the other; UNCONFIRMED either way). Duplicates are dropped (Apple rejects them,
/// 9703–9705). With no IDs at all, one request per asset chunk goes out so Apple reports 9719.
pub fn split_manage(req: &ManageAssetsRequest, limits: &Limits) -> Vec<ManageAssetsRequest> {
    let assets = dedupe(&req.assets);
    let serials = dedupe(&req.serial_numbers);
    let users = dedupe(&req.client_user_ids);
    let mut id_groups: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for chunk in chunked(&serials, limits.max_serial_numbers) {
        id_groups.push((Vec::new(), chunk));
    }
    for chunk in chunked(&users, limits.max_client_user_ids) {
        id_groups.push((chunk, Vec::new()));
    }
    if id_groups.is_empty() {
        id_groups.push((Vec::new(), Vec::new()));
    }
    let mut asset_chunks = chunked(&assets, limits.max_assets);
    if asset_chunks.is_empty() {
        asset_chunks.push(Vec::new());
    }
    let mut out = Vec::with_capacity(asset_chunks.len() * id_groups.len());
    for assets in &asset_chunks {
        for (users, serials) in &id_groups {
            out.push(ManageAssetsRequest {
                assets: assets.clone(),
                client_user_ids: users.clone(),
                serial_numbers: serials.clone(),
            });
        }
    }
    out
}

/// Split a revoke within `maxRevokeSerialNumbers` and `maxRevokeClientUserIds`.
pub fn split_revoke(req: &RevokeAssetsRequest, limits: &Limits) -> Vec<RevokeAssetsRequest> {
    let serials = dedupe(&req.serial_numbers);
    let users = dedupe(&req.client_user_ids);
    let mut out = Vec::new();
    for chunk in chunked(&serials, limits.max_revoke_serial_numbers) {
        out.push(RevokeAssetsRequest {
            client_user_ids: Vec::new(),
            serial_numbers: chunk,
        });
    }
    for chunk in chunked(&users, limits.max_revoke_client_user_ids) {
        out.push(RevokeAssetsRequest {
            client_user_ids: chunk,
            serial_numbers: Vec::new(),
        });
    }
    if out.is_empty() {
        out.push(RevokeAssetsRequest::default());
    }
    out
}

/// Split a user-management request within `maxUsers`, one entry per `clientUserId`.
pub fn split_users(users: &[RequestUser], limits: &Limits) -> Vec<ManageUsersRequest> {
    let mut seen = HashSet::new();
    let unique: Vec<RequestUser> = users
        .iter()
        .filter(|u| seen.insert(u.client_user_id.clone()))
        .cloned()
        .collect();
    let mut out: Vec<ManageUsersRequest> = chunked(&unique, limits.max_users)
        .into_iter()
        .map(|users| ManageUsersRequest { users })
        .collect();
    if out.is_empty() {
        out.push(ManageUsersRequest::default());
    }
    out
}

/// A split request failed part-way: `submitted` lists the events Apple already accepted, which
/// will still be processed.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchError {
    pub submitted: Vec<EventResponse>,
    pub error: AppleError,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (after {} accepted request(s))",
            self.error,
            self.submitted.len()
        )
    }
}

impl std::error::Error for BatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<BatchError> for AppleError {
    fn from(e: BatchError) -> AppleError {
        e.error
    }
}

// ---------------------------------------------------------------------------------------------
// Ownership

/// Who holds a location, by its `mdmInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    Ours,
    Foreign { id: String, name: String },
    Unclaimed,
}

/// Compare the echoed `mdmInfo` with ours. A missing or empty `mdmInfo` is `Unclaimed`; only
/// `client/config` says that with authority.
pub fn check_owner(expected_id: &str, mdm_info: Option<&MdmInfo>) -> Ownership {
    match mdm_info {
        None => Ownership::Unclaimed,
        Some(m) if m.id.is_empty() => Ownership::Unclaimed,
        Some(m) if m.id == expected_id => Ownership::Ours,
        Some(m) => Ownership::Foreign {
            id: m.id.clone(),
            name: m.name.clone(),
        },
    }
}

/// What Apple echoes on most responses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResponseEcho {
    pub mdm_info: Option<MdmInfo>,
    pub token_expiration_date: Option<String>,
    pub u_id: Option<String>,
}

impl ResponseEcho {
    fn from_value(v: &Value) -> ResponseEcho {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        ResponseEcho {
            mdm_info: v
                .get("mdmInfo")
                .and_then(|m| serde_json::from_value(m.clone()).ok()),
            token_expiration_date: s("tokenExpirationDate"),
            u_id: s("uId"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Apple's Apps and Books v2 API over a transport. Methods take `&self`; caches and the pacer
/// use short-lived locks, never held across an await.
pub struct Client<T: Transport, C: Clock> {
    transport: T,
    clock: C,
    pacer: Pacer,
    policy: RetryPolicy,
    page_concurrency: u32,
    service_config: Mutex<Option<(DateTime<Utc>, ServiceConfig)>>,
    client_config: Mutex<Option<ClientConfig>>,
    metadata: Mutex<HashMap<String, AssetMetadata>>,
    last_echo: Mutex<Option<ResponseEcho>>,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn to_body<B: Serialize>(body: &B) -> Result<Vec<u8>, AppleError> {
    serde_json::to_vec(body).map_err(|e| AppleError::Decode(format!("encoding the request: {e}")))
}

impl<T: Transport, C: Clock> Client<T, C> {
    /// A client with the default retry policy and a pacer at the documented 15 requests/s
    /// (updated from every service config read).
    pub fn new(transport: T, clock: C) -> Self {
        Client {
            transport,
            clock,
            pacer: Pacer::default(),
            policy: RetryPolicy::default(),
            page_concurrency: 1,
            service_config: Mutex::new(None),
            client_config: Mutex::new(None),
            metadata: Mutex::new(HashMap::new()),
            last_echo: Mutex::new(None),
        }
    }

    /// For callers behind the Apple component's proxy, which paces and retries for every
    /// caller of a token: one attempt, no local pacing.
    pub fn proxied(transport: T, clock: C) -> Self {
        Client::new(transport, clock)
            .with_policy(RetryPolicy::none())
            .with_pacer(Pacer::unlimited())
    }

    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Pages fetched at once by `all_*` (1 to [`MAX_PAGES_IN_FLIGHT`]; default 1).
    pub fn with_page_concurrency(mut self, n: u32) -> Self {
        self.page_concurrency = n.clamp(1, MAX_PAGES_IN_FLIGHT);
        self
    }

    pub fn with_pacer(mut self, pacer: Pacer) -> Self {
        self.pacer = pacer;
        self
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The `mdmInfo` echoed on the latest response that carried the usual echo fields
    /// (`None` if that response had none).
    pub fn last_mdm_info(&self) -> Option<MdmInfo> {
        lock(&self.last_echo)
            .as_ref()
            .and_then(|e| e.mdm_info.clone())
    }

    /// `mdmInfo`, `tokenExpirationDate` and `uId` of the latest API response.
    pub fn last_echo(&self) -> Option<ResponseEcho> {
        lock(&self.last_echo).clone()
    }

    /// The request core: pace, send, retry, classify errors (also on 200), then decode.
    async fn call<R: DeserializeOwned>(
        &self,
        req: &AppleRequest,
        record_echo: bool,
    ) -> Result<R, AppleError> {
        let resp =
            send_with_retry(&self.transport, &self.clock, &self.pacer, &self.policy, req).await?;
        let value: Value = serde_json::from_slice(&resp.body).map_err(|e| {
            AppleError::Decode(format!(
                "{} {}: body is not JSON: {e}",
                req.method.as_str(),
                req.path_and_query()
            ))
        })?;
        if record_echo {
            *lock(&self.last_echo) = Some(ResponseEcho::from_value(&value));
        }
        serde_json::from_value(value).map_err(|e| {
            AppleError::Decode(format!(
                "{} {}: {e}",
                req.method.as_str(),
                req.path_and_query()
            ))
        })
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, AppleError> {
        self.call(&AppleRequest::post(path, to_body(body)?), true)
            .await
    }

    // --- service and client config ------------------------------------------------------

    /// `GET /service/config`, cached for five minutes.
    pub async fn service_config(&self) -> Result<ServiceConfig, AppleError> {
        let now = self.clock.now();
        if let Some((at, cfg)) = lock(&self.service_config).as_ref() {
            let age = now - *at;
            if age >= ChronoDuration::zero()
                && age < ChronoDuration::seconds(SERVICE_CONFIG_TTL_SECS)
            {
                return Ok(cfg.clone());
            }
        }
        let cfg: ServiceConfig = self
            .call(&AppleRequest::get("service/config", Vec::new()), false)
            .await?;
        self.set_service_config(cfg.clone());
        Ok(cfg)
    }

    /// Inject a service config (e.g. one cached in the key-value store); it counts as fresh.
    pub fn set_service_config(&self, cfg: ServiceConfig) {
        // An unlimited pacer (behind the proxy) stays unlimited.
        if self.pacer.max_per_second() != u32::MAX {
            self.pacer
                .set_max_per_second(cfg.limits.max_request_per_second);
        }
        *lock(&self.service_config) = Some((self.clock.now(), cfg));
    }

    pub async fn limits(&self) -> Result<Limits, AppleError> {
        Ok(self.service_config().await?.limits)
    }

    /// `GET /client/config`. Also refreshes the copy the metadata lookup uses.
    pub async fn client_config(&self) -> Result<ClientConfig, AppleError> {
        let cfg: ClientConfig = self
            .call(&AppleRequest::get("client/config", Vec::new()), true)
            .await?;
        *lock(&self.client_config) = Some(cfg.clone());
        Ok(cfg)
    }

    /// Use a client config read earlier (e.g. by a previous invocation of the same job) for
    /// the metadata lookup's platform and storefront, instead of reading it again.
    pub fn remember_client_config(&self, cfg: ClientConfig) {
        *lock(&self.client_config) = Some(cfg);
    }

    /// `POST /client/config`: claims the location (`mdmInfo`) and sets notifications.
    pub async fn set_client_config(
        &self,
        req: &ClientConfigRequest,
    ) -> Result<ClientConfig, AppleError> {
        let cfg: ClientConfig = self.post("client/config", req).await?;
        *lock(&self.client_config) = Some(cfg.clone());
        Ok(cfg)
    }

    /// Read `client/config` and compare its `mdmInfo` with ours (Zentral's `verify_mdm_info`).
    pub async fn verify_owner(&self, expected_id: &str) -> Result<Ownership, AppleError> {
        let cfg = self.client_config().await?;
        Ok(check_owner(expected_id, cfg.mdm_info.as_ref()))
    }

    // --- assets and assignments ----------------------------------------------------------

    /// One page of `GET /assets` (zero-based `page_index`).
    pub async fn assets_page(
        &self,
        filter: &AssetFilter,
        page_index: u32,
    ) -> Result<AssetsPage, AppleError> {
        let q = paged_query(filter.query(), None, page_index);
        self.call(&AppleRequest::get("assets", q), true).await
    }

    /// Every page of `GET /assets`, merged; `version_id` is the first page's.
    pub async fn all_assets(&self, filter: &AssetFilter) -> Result<AssetsPage, AppleError> {
        let q = filter.query();
        self.all_pages("assets", &q, None).await
    }

    /// One page of `GET /assignments`.
    pub async fn assignments_page(
        &self,
        filter: &AssignmentFilter,
        since_version: Option<&str>,
        page_index: u32,
    ) -> Result<AssignmentsPage, AppleError> {
        let q = paged_query(filter.query(), since_version, page_index);
        self.call(&AppleRequest::get("assignments", q), true).await
    }

    /// Every page of `GET /assignments` (only changes when `since_version` is given).
    pub async fn all_assignments(
        &self,
        filter: &AssignmentFilter,
        since_version: Option<&str>,
    ) -> Result<AssignmentsPage, AppleError> {
        let q = filter.query();
        self.all_pages("assignments", &q, since_version).await
    }

    /// Paging from index 0 until `nextPageIndex` is absent. `totalPages` may change on the way:
    /// it only sizes the next batch of up to `page_concurrency` pages, and a page past the end
    /// (fetched because `totalPages` shrank) is dropped. A `nextPageIndex` that does not
    /// advance is an error.
    async fn all_pages<P: Paged>(
        &self,
        path: &str,
        base: &[(String, String)],
        since_version: Option<&str>,
    ) -> Result<P, AppleError> {
        let fetch = |index: u32| {
            let req = AppleRequest::get(path, paged_query(base.to_vec(), since_version, index));
            async move { self.call::<P>(&req, true).await }
        };
        let mut all: P = fetch(0).await?;
        let mut current = 0u32;
        let mut read = 1u32;
        while let Some(next) = all.next_page_index() {
            if next <= current {
                return Err(AppleError::Decode(format!(
                    "GET {path}: nextPageIndex {next} does not follow page {current}"
                )));
            }
            if read >= MAX_PAGES {
                return Err(AppleError::Decode(format!(
                    "GET {path}: more than {MAX_PAGES} pages"
                )));
            }
            // Speculate only within the advertised total, and only when it is consecutive.
            let known_end = all.total_pages().unwrap_or(0);
            let batch = if next == current + 1 && known_end > next {
                (known_end - next).min(self.page_concurrency).max(1)
            } else {
                1
            };
            let pages = join_all((next..next + batch).map(fetch).collect()).await;
            let mut expected = Some(next);
            for (index, page) in (next..next + batch).zip(pages) {
                if expected != Some(index) {
                    break; // past the end, or Apple skipped ahead: follow nextPageIndex instead
                }
                let page = page?;
                expected = page.next_page_index();
                all.absorb(page);
                current = index;
                read += 1;
            }
        }
        Ok(all)
    }

    async fn send_batches<B: Serialize>(
        &self,
        path: &str,
        batches: Vec<B>,
    ) -> Result<Vec<EventResponse>, BatchError> {
        let mut submitted = Vec::with_capacity(batches.len());
        for batch in &batches {
            match self.post::<B, EventResponse>(path, batch).await {
                Ok(ev) => submitted.push(ev),
                Err(error) => return Err(BatchError { submitted, error }),
            }
        }
        Ok(submitted)
    }

    async fn limits_for_batch(&self) -> Result<Limits, BatchError> {
        self.limits().await.map_err(|error| BatchError {
            submitted: Vec::new(),
            error,
        })
    }

    /// `POST /assets/associate`, split to the limits; one event per Apple request.
    pub async fn associate(
        &self,
        req: &ManageAssetsRequest,
    ) -> Result<Vec<EventResponse>, BatchError> {
        let limits = self.limits_for_batch().await?;
        self.send_batches("assets/associate", split_manage(req, &limits))
            .await
    }

    /// `POST /assets/disassociate`, split to the limits.
    pub async fn disassociate(
        &self,
        req: &ManageAssetsRequest,
    ) -> Result<Vec<EventResponse>, BatchError> {
        let limits = self.limits_for_batch().await?;
        self.send_batches("assets/disassociate", split_manage(req, &limits))
            .await
    }

    /// `POST /assets/revoke`, split to the revoke limits.
    pub async fn revoke(
        &self,
        req: &RevokeAssetsRequest,
    ) -> Result<Vec<EventResponse>, BatchError> {
        let limits = self.limits_for_batch().await?;
        self.send_batches("assets/revoke", split_revoke(req, &limits))
            .await
    }

    /// `GET /status?eventId=…`.
    pub async fn event_status(&self, event_id: &str) -> Result<EventStatus, AppleError> {
        let q = vec![("eventId".to_string(), event_id.to_string())];
        self.call(&AppleRequest::get("status", q), true).await
    }

    // --- users ---------------------------------------------------------------------------

    pub async fn users_page(
        &self,
        filter: &UserFilter,
        since_version: Option<&str>,
        page_index: u32,
    ) -> Result<UsersPage, AppleError> {
        let q = paged_query(filter.query(), since_version, page_index);
        self.call(&AppleRequest::get("users", q), true).await
    }

    pub async fn all_users(
        &self,
        filter: &UserFilter,
        since_version: Option<&str>,
    ) -> Result<UsersPage, AppleError> {
        let q = filter.query();
        self.all_pages("users", &q, since_version).await
    }

    async fn manage_users(
        &self,
        path: &str,
        users: &[RequestUser],
    ) -> Result<Vec<EventResponse>, BatchError> {
        let limits = self.limits_for_batch().await?;
        self.send_batches(path, split_users(users, &limits)).await
    }

    pub async fn create_users(
        &self,
        users: &[RequestUser],
    ) -> Result<Vec<EventResponse>, BatchError> {
        self.manage_users("users/create", users).await
    }

    pub async fn update_users(
        &self,
        users: &[RequestUser],
    ) -> Result<Vec<EventResponse>, BatchError> {
        self.manage_users("users/update", users).await
    }

    /// `POST /users/retire`; only `clientUserId` is sent.
    pub async fn retire_users(
        &self,
        client_user_ids: &[String],
    ) -> Result<Vec<EventResponse>, BatchError> {
        let users: Vec<RequestUser> = client_user_ids.iter().map(RequestUser::id).collect();
        self.manage_users("users/retire", &users).await
    }

    // --- metadata ------------------------------------------------------------------------

    /// Names and icons from the content metadata lookup (URL from service config; platform
    /// and storefront from client config). Cached in the client; IDs Apple does not know are
    /// left out of the result.
    pub async fn metadata(&self, ids: &[String]) -> Result<Vec<AssetMetadata>, AppleError> {
        let ids = dedupe(ids);
        let missing: Vec<String> = {
            let cache = lock(&self.metadata);
            ids.iter()
                .filter(|id| !cache.contains_key(*id))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            let base = self
                .service_config()
                .await?
                .urls
                .content_metadata_lookup
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_METADATA_LOOKUP_URL.to_string());
            let cached_cfg = lock(&self.client_config).clone();
            let cfg = match cached_cfg {
                Some(c) => c,
                None => self.client_config().await?,
            };
            let platform = cfg
                .default_platform
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "volumestore".to_string());
            let cc = cfg
                .country_iso2a_code
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "us".to_string())
                .to_lowercase();
            for chunk in missing.chunks(METADATA_IDS_PER_REQUEST) {
                let url = metadata_url(&base, &platform, &cc, chunk);
                let req = AppleRequest {
                    method: Method::Get,
                    target: Target::Absolute(url),
                    body: None,
                };
                let body: Value = self.call(&req, false).await?;
                let found = parse_metadata(&body);
                let mut cache = lock(&self.metadata);
                for m in found {
                    cache.insert(m.adam_id.clone(), m);
                }
            }
        }
        let cache = lock(&self.metadata);
        Ok(ids.iter().filter_map(|id| cache.get(id).cloned()).collect())
    }
}

/// Run futures together; outputs in input order. (No runtime: each future registers its own
/// waker, as Spin's outbound HTTP futures do.)
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (fut, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(out.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

/// `{lookup}?version=2&p=mdm-lockup&caller=MDM&platform=…&cc=…&id=a,b`.
pub fn metadata_url(base: &str, platform: &str, cc: &str, ids: &[String]) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let ids: Vec<String> = ids.iter().map(|i| percent_encode(i)).collect();
    format!(
        "{base}{sep}version=2&p=mdm-lockup&caller=MDM&platform={}&cc={}&id={}",
        percent_encode(platform),
        percent_encode(cc),
        ids.join(",")
    )
}

/// Read `{results: {"<adamId>": {name, kind, bundleId, artwork}}}`. `artwork` is either an
/// array of sized images (largest wins) or an object with a `{w}x{h}bb.{f}` template.
pub fn parse_metadata(body: &Value) -> Vec<AssetMetadata> {
    let Some(results) = body.get("results") else {
        return Vec::new();
    };
    let entries: Vec<(String, &Value)> = match results {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        // Tolerate a list of items carrying their own id.
        Value::Array(items) => items
            .iter()
            .filter_map(|v| {
                let id = v.get("id").or_else(|| v.get("adamId"))?;
                let id = match id {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((id, v))
            })
            .collect(),
        _ => Vec::new(),
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    entries
        .into_iter()
        .map(|(id, item)| AssetMetadata {
            adam_id: id,
            name: text(item, "name"),
            icon_url: item.get("artwork").and_then(icon_url),
            kind: text(item, "kind"),
            bundle_id: text(item, "bundleId"),
        })
        .collect()
}

fn icon_url(artwork: &Value) -> Option<String> {
    let width = |v: &Value| v.get("width").and_then(Value::as_u64).unwrap_or(0);
    match artwork {
        Value::Array(items) => items
            .iter()
            .filter(|i| i.get("url").and_then(Value::as_str).is_some())
            .max_by_key(|i| width(i))
            .and_then(|i| i.get("url").and_then(Value::as_str))
            .map(str::to_string),
        Value::Object(_) => {
            let template = artwork.get("url").and_then(Value::as_str)?;
            let w = match width(artwork) {
                0 => 512,
                w => w.min(512),
            };
            let h = match artwork.get("height").and_then(Value::as_u64) {
                Some(h) if h > 0 => h.min(512),
                _ => w,
            };
            Some(
                template
                    .replace("{w}", &w.to_string())
                    .replace("{h}", &h.to_string())
                    .replace("{c}", "bb")
                    .replace("{f}", "png"),
            )
        }
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}
