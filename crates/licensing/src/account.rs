//! App Store License accounts: add, list with status, get, edit, test, reclaim, delete.
//!
//! Apple is reached through a [`Gateway`]: the apple component's internal API in production
//! (`vpp_spin_bridge`), anything else in tests. The gateway seals tokens; this module never
//! stores or returns a token in clear.

use crate::apple_state::{AppleState, Owner};
use crate::error::{ApiError, ErrorCode};
use crate::instance::{self, Instance};
use crate::job;
use crate::model::{Account, Lifecycle};
use crate::status::{self, Status};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::future::Future;
use vpp_apple::{
    Client, ClientConfig, ClientConfigRequest, Clock, NotificationType, ServerToken, Transport,
};
use vpp_store::{get_json, keys, set_json, update, Kv};

/// Jobs that work on one account's copy: while one runs, the account is syncing.
const ACCOUNT_JOBS: &[&str] = &["refresh", "cleanup"];

/// Longest display name an account may have.
pub const MAX_NAME_LEN: usize = 100;

/// What the apple component returns for a token that is not stored yet.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub sealed: String,
    pub client_config: ClientConfig,
    pub owner: Owner,
}

/// The way to Apple for account operations.
pub trait Gateway {
    type T: Transport;
    type C: Clock;
    /// Read client config with `token` (not stored yet) and seal it for `account_id`.
    fn inspect(
        &self,
        account_id: &str,
        token: &str,
    ) -> impl Future<Output = Result<Inspected, ApiError>>;
    /// A client that calls Apple with the stored token of `account_id`.
    fn client(&self, account_id: &str) -> Client<Self::T, Self::C>;
    /// Drop what the apple component keeps for `account_id`.
    fn forget(&self, account_id: &str) -> impl Future<Output = Result<(), ApiError>>;
}

/// Who we are and where Apple can reach us, for claiming a location.
#[derive(Debug, Clone)]
pub struct Identity {
    pub instance: Instance,
    pub name: String,
    /// `public_url`, when set: Apple's notifications go to `{public_url}/api/apple/notifications/{id}`.
    pub public_url: Option<String>,
    /// Ask Apple for notifications (needs an HTTPS public URL at the real Apple).
    pub notify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddAccount {
    pub name: String,
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EditAccount {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

/// An account as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    pub id: String,
    pub name: String,
    pub status: Status,
    pub organization: String,
    pub location: Option<String>,
    pub location_id: Option<String>,
    pub country: Option<String>,
    pub last_synchronized: Option<DateTime<Utc>>,
    pub last_sync: Option<crate::model::SyncOutcome>,
    pub expiry_date: DateTime<Utc>,
    pub owner: Owner,
    /// The last error Apple answered for this account, until the next success clears it.
    pub last_apple_error: Option<crate::apple_state::AppleFailure>,
    /// When Apple last answered this account without an error.
    pub last_apple_ok_at: Option<DateTime<Utc>>,
    pub policies: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub notifications: bool,
}

pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn validate_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::invalid_field("name", "name must not be empty"));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(ApiError::invalid_field(
            "name",
            format!("name must be at most {MAX_NAME_LEN} characters"),
        ));
    }
    Ok(name.to_string())
}

/// Parse and check a token file before anything is sent to Apple.
pub fn validate_token(token: &str, now: DateTime<Utc>) -> Result<ServerToken, ApiError> {
    let parsed = ServerToken::parse(token).map_err(|e| {
        ApiError::new(
            ErrorCode::TokenMalformed,
            format!("the token is not a valid .vpptoken file: {e}"),
        )
        .with_details(json!({"field": "token", "reason": e.code()}))
    })?;
    if parsed.is_expired(now) {
        return Err(ApiError::new(
            ErrorCode::TokenExpired,
            format!(
                "the token expired on {}; download a new one from Apple Business Manager or Apple School Manager",
                parsed.expires_at.format("%Y-%m-%d")
            ),
        )
        .with_details(json!({"field": "token", "expiryDate": parsed.expires_at})));
    }
    Ok(parsed)
}

/// Everything about an add request that can be checked without Apple.
pub fn validate_add(
    input: &AddAccount,
    now: DateTime<Utc>,
) -> Result<(String, ServerToken), ApiError> {
    Ok((
        validate_name(&input.name)?,
        validate_token(&input.token, now)?,
    ))
}

pub fn ids(kv: &impl Kv) -> Result<Vec<String>, ApiError> {
    Ok(get_json(kv, &keys::accounts())?.unwrap_or_default())
}

/// A listed account (not one still being added).
pub fn load(kv: &impl Kv, id: &str) -> Result<Account, ApiError> {
    match get_json::<Account>(kv, &keys::account(id))? {
        Some(a) if a.lifecycle == Lifecycle::Active => Ok(a),
        _ => Err(ApiError::not_found(format!("account {id}"))),
    }
}

pub fn apple_state(kv: &impl Kv, id: &str) -> Result<AppleState, ApiError> {
    Ok(get_json(kv, &keys::apple_state(id))?.unwrap_or_default())
}

/// Names of the app policies that use an account (the policy index is the licenses' module).
pub type PolicyNames<'a> = dyn Fn(&str) -> Result<Vec<String>, ApiError> + 'a;

pub fn view(
    kv: &impl Kv,
    account: &Account,
    policies: &PolicyNames<'_>,
    now: DateTime<Utc>,
) -> Result<AccountView, ApiError> {
    let apple = apple_state(kv, &account.id)?;
    let syncing = job::running_of(kv, ACCOUNT_JOBS, Some(&account.id))?.is_some();
    Ok(AccountView {
        id: account.id.clone(),
        name: account.name.clone(),
        status: status::derive(account, &apple, syncing, now),
        organization: account.organization.clone(),
        location: account.location.clone(),
        location_id: account.location_id.clone(),
        country: account.country.clone(),
        last_synchronized: account.last_synchronized,
        last_sync: account.last_sync.clone(),
        expiry_date: account.token_expires_at,
        owner: apple.owner.clone(),
        last_apple_error: apple.last_error.clone(),
        last_apple_ok_at: apple.last_ok_at,
        policies: policies(&account.id)?,
        created_at: account.created_at,
        notifications: account.notification_secret_sha256.is_some(),
    })
}

pub fn list(
    kv: &impl Kv,
    policies: &PolicyNames<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<AccountView>, ApiError> {
    let mut out = Vec::new();
    for id in ids(kv)? {
        if let Some(a) = get_json::<Account>(kv, &keys::account(&id))? {
            out.push(view(kv, &a, policies, now)?);
        }
    }
    Ok(out)
}

fn notification_url(identity: &Identity, account_id: &str) -> Option<String> {
    identity.public_url.as_deref().map(|u| {
        format!(
            "{}/api/apple/notifications/{account_id}",
            u.trim_end_matches('/')
        )
    })
}

/// The client config we write to own a location: our mdmInfo, plus notifications when Apple
/// can reach us.
fn claim_request(
    identity: &Identity,
    account_id: &str,
    secret: Option<&str>,
) -> ClientConfigRequest {
    let url = notification_url(identity, account_id);
    let with_notifications = identity.notify && url.is_some() && secret.is_some();
    ClientConfigRequest {
        mdm_info: Some(instance::mdm_info(
            &identity.instance,
            &identity.name,
            identity.public_url.as_deref(),
        )),
        notification_url: url.filter(|_| with_notifications),
        notification_auth_token: secret.filter(|_| with_notifications).map(str::to_string),
        notification_types: with_notifications.then(|| {
            vec![
                NotificationType::AssetManagement,
                NotificationType::AssetCount,
                NotificationType::UserManagement,
                NotificationType::UserAssociated,
            ]
        }),
    }
}

/// Add an account. `id` and `notification_secret` are fresh random values from the caller.
/// Nothing is left stored when any step fails.
pub async fn add<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    input: AddAccount,
    identity: &Identity,
    id: &str,
    notification_secret: &str,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    let (name, token) = validate_add(&input, now)?;
    let inspected = match gw.inspect(id, &input.token).await {
        Ok(i) => i,
        Err(e) => {
            // The apple component may have paced this id: leave no key behind.
            let _ = gw.forget(id).await;
            return Err(e);
        }
    };
    let cfg = &inspected.client_config;
    if let Some(uid) = cfg.u_id.as_deref() {
        for other in ids(kv)? {
            if let Some(a) = get_json::<Account>(kv, &keys::account(&other))? {
                if a.location_id.as_deref() == Some(uid) {
                    let _ = gw.forget(id).await;
                    return Err(ApiError::new(
                        ErrorCode::DuplicateLocation,
                        format!(
                            "the location of this token is already added as account \"{}\"",
                            a.name
                        ),
                    )
                    .with_details(json!({"accountId": a.id, "locationId": uid})));
                }
            }
        }
    }
    let with_notifications = identity.notify && identity.public_url.is_some();
    let mut account = Account {
        id: id.to_string(),
        name,
        organization: token.org_name.clone(),
        location: cfg.location_name.clone(),
        location_id: cfg.u_id.clone(),
        country: cfg.country_iso2a_code.clone(),
        default_platform: cfg.default_platform.clone(),
        website_url: cfg.website_url.clone(),
        token_expires_at: cfg.token_expires_at().unwrap_or(token.expires_at),
        created_at: now,
        updated_at: now,
        last_synchronized: None,
        last_full_refresh: None,
        last_sync: None,
        notification_secret_sha256: with_notifications.then(|| sha256_hex(notification_secret)),
        next_notification_secret_sha256: None,
        assignments_version: None,
        users_version: None,
        claimed_at: None,
        lifecycle: Lifecycle::Adding,
    };
    // The record exists (not listed) before Apple is told about us: Apple sends a test
    // notification while we claim, and it must find the account's secret.
    kv.set(&keys::token(id), inspected.sealed.as_bytes())?;
    set_json(kv, &keys::account(id), &account)?;
    let client = gw.client(id);
    let claimed = match &inspected.owner {
        // Another MDM owns it: record that (through the apple component) and do not take over.
        Owner::Foreign { .. } => client.client_config().await.map(|_| false),
        _ => client
            .set_client_config(&claim_request(identity, id, Some(notification_secret)))
            .await
            .map(|_| true),
    };
    let claimed = match claimed {
        Ok(c) => c,
        Err(e) => {
            discard(kv, gw, id).await;
            return Err(ApiError::from(e));
        }
    };
    if claimed {
        account.claimed_at = Some(now);
    }
    account.lifecycle = Lifecycle::Active;
    set_json(kv, &keys::account(id), &account)?;
    update::<Vec<String>, ()>(kv, &keys::accounts(), |cur| {
        let mut list = cur.unwrap_or_default();
        if !list.iter().any(|x| x == id) {
            list.push(id.to_string());
        }
        Ok((Some(list), ()))
    })?;
    Ok(account)
}

/// How an add's answer links to the account's first refresh: `refreshJob` (id, state,
/// progress, and `href`, the job's URL; `GET` it to follow, `POST {href}/resume` to continue).
pub fn refresh_job_link(job: &job::Job, href: &str) -> Value {
    json!({
        "id": job.id,
        "state": job.state,
        "progress": job.progress,
        "href": href,
    })
}

/// Undo a half-done add: best effort, every key of the account.
async fn discard<G: Gateway>(kv: &impl Kv, gw: &G, id: &str) {
    let _ = kv.delete(&keys::account(id));
    let _ = kv.delete(&keys::token(id));
    let _ = gw.forget(id).await;
}

/// Rename, or replace the token with a renewed one of the same location.
pub async fn edit<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    id: &str,
    input: EditAccount,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    let mut account = load(kv, id)?;
    if input.name.is_none() && input.token.is_none() {
        return Err(ApiError::invalid(
            "nothing to change: give name and/or token",
        ));
    }
    let name = input.name.as_deref().map(validate_name).transpose()?;
    if let Some(token_text) = input.token.as_deref() {
        let token = validate_token(token_text, now)?;
        let inspected = gw.inspect(id, token_text).await?;
        let uid = inspected.client_config.u_id.clone();
        if uid.is_none() || uid != account.location_id {
            return Err(ApiError::new(
                ErrorCode::LocationMismatch,
                "this token belongs to another location; add it as a new account instead",
            )
            .with_details(json!({"field": "token", "expectedLocationId": account.location_id, "tokenLocationId": uid})));
        }
        kv.set(&keys::token(id), inspected.sealed.as_bytes())?;
        account.organization = token.org_name.clone();
        account.token_expires_at = inspected
            .client_config
            .token_expires_at()
            .unwrap_or(token.expires_at);
        if let Some(loc) = inspected.client_config.location_name {
            account.location = Some(loc);
        }
    }
    if let Some(name) = name {
        account.name = name;
    }
    account.updated_at = now;
    update::<Account, ()>(kv, &keys::account(id), |cur| {
        // Keep what a refresh may have written meanwhile; change only what the edit changes.
        let mut cur = cur.ok_or_else(|| vpp_store::StoreError::Corrupt {
            key: keys::account(id),
            reason: "account vanished".into(),
        })?;
        cur.name = account.name.clone();
        cur.organization = account.organization.clone();
        cur.token_expires_at = account.token_expires_at;
        cur.location = account.location.clone();
        cur.updated_at = now;
        Ok((Some(cur), ()))
    })?;
    load(kv, id)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub message: String,
}

/// Check the token and the round trip to Apple now, one check at a time.
pub async fn test<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    id: &str,
    our_id: &str,
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    let account = load(kv, id)?;
    let mut checks = vec![
        Check {
            name: "tokenWellFormed",
            ok: kv.exists(&keys::token(id))?,
            message: "the sealed token is stored".into(),
        },
        Check {
            name: "tokenNotExpired",
            ok: account.token_expires_at > now,
            message: format!("expires {}", account.token_expires_at.format("%Y-%m-%d")),
        },
    ];
    let client = gw.client(id);
    let reachable = client.service_config().await;
    checks.push(Check {
        name: "appleReachable",
        ok: reachable.is_ok(),
        message: match &reachable {
            Ok(_) => "Apple answered".into(),
            Err(e) => e.to_string(),
        },
    });
    let config = client.client_config().await;
    checks.push(Check {
        name: "tokenAccepted",
        ok: config.is_ok(),
        message: match &config {
            Ok(_) => "Apple accepted the token".into(),
            Err(e) => e.to_string(),
        },
    });
    let owner = match &config {
        Ok(cfg) => crate::apple_state::owner_from(our_id, cfg.mdm_info.as_ref()),
        Err(_) => apple_state(kv, id)?.owner,
    };
    checks.push(Check {
        name: "ownsLocation",
        ok: owner == Owner::Ours,
        message: match &owner {
            Owner::Ours => "this instance owns the location".to_string(),
            Owner::Foreign { id, name } => format!("another MDM owns the location: {name} ({id})"),
            Owner::Unclaimed => "no MDM owns the location".to_string(),
            Owner::Unknown => "ownership unknown".to_string(),
        },
    });
    let ok = checks.iter().all(|c| c.ok);
    Ok(json!({"accountId": id, "ok": ok, "checks": checks, "testedAt": now}))
}

/// Write our mdmInfo (and notification settings) again: this instance owns the location.
///
/// With notifications, Apple sends a test notification carrying the new secret before it
/// answers, so the new secret's hash is stored (as the next secret, accepted beside the current
/// one) before Apple is asked. When Apple answers, the new secret replaces the old. When Apple
/// refuses (an error with its number), the next secret is dropped and the old one stays; when
/// the answer is lost, both stay valid, since Apple may have switched.
pub async fn reclaim<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    id: &str,
    identity: &Identity,
    notification_secret: &str,
    now: DateTime<Utc>,
) -> Result<Account, ApiError> {
    load(kv, id)?;
    let client = gw.client(id);
    let with_notifications = identity.notify && identity.public_url.is_some();
    let next_hash = sha256_hex(notification_secret);
    if with_notifications {
        update::<Account, ()>(kv, &keys::account(id), |cur| {
            let Some(mut a) = cur else {
                return Ok((None, ()));
            };
            a.next_notification_secret_sha256 = Some(next_hash.clone());
            Ok((Some(a), ()))
        })?;
    }
    let answer = client
        .set_client_config(&claim_request(identity, id, Some(notification_secret)))
        .await;
    update::<Account, ()>(kv, &keys::account(id), |cur| {
        let Some(mut a) = cur else {
            return Ok((None, ()));
        };
        let ours = a.next_notification_secret_sha256.as_deref() == Some(next_hash.as_str());
        match &answer {
            Ok(_) => {
                a.claimed_at = Some(now);
                a.updated_at = now;
                a.notification_secret_sha256 = with_notifications.then(|| next_hash.clone());
                if ours {
                    a.next_notification_secret_sha256 = None;
                }
            }
            Err(e) if e.number().is_some() && ours => a.next_notification_secret_sha256 = None,
            Err(_) => return Ok((None, ())),
        }
        Ok((Some(a), ()))
    })?;
    answer?;
    load(kv, id)
}

/// Delete an account and every key it owns; refused while an app policy uses it.
pub async fn delete<G: Gateway>(
    kv: &impl Kv,
    gw: &G,
    id: &str,
    policies: &PolicyNames<'_>,
) -> Result<(), ApiError> {
    let account = load(kv, id)?;
    let using = policies(id)?;
    if !using.is_empty() {
        return Err(ApiError::new(
            ErrorCode::AccountInUse,
            format!(
                "account \"{}\" is used by app policies: {}",
                account.name,
                using.join(", ")
            ),
        )
        .with_details(json!({"policies": using})));
    }
    if let Some(j) = job::running_of(kv, ACCOUNT_JOBS, Some(id))? {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "job {} is running on this account; try again when it ends",
                j.id
            ),
        )
        .with_details(json!({"jobId": j.id})));
    }
    // Unlist first: from here on nobody starts new work on it.
    update::<Vec<String>, ()>(kv, &keys::accounts(), |cur| {
        let mut list = cur.unwrap_or_default();
        list.retain(|x| x != id);
        Ok((Some(list), ()))
    })?;
    crate::copy::delete_all(kv, id)?;
    crate::ledger::delete_account(kv, id)?;
    let events: Vec<String> = get_json(kv, &keys::account_events(id))?.unwrap_or_default();
    for e in events {
        kv.delete(&keys::event(&e))?;
    }
    kv.delete(&keys::account_events(id))?;
    let done: Vec<String> = get_json(kv, &keys::account_events_done(id))?.unwrap_or_default();
    for e in done {
        kv.delete(&keys::event(&e))?;
    }
    kv.delete(&keys::account_events_done(id))?;
    kv.delete(&keys::notified(id))?;
    for shard in 0..keys::USER_SHARDS {
        kv.delete(&keys::user_shard(id, shard))?;
    }
    kv.delete(&keys::lease(id))?;
    let dropped = update::<Vec<job::JobSummary>, Vec<String>>(kv, &keys::jobs(), |cur| {
        let mut list = cur.unwrap_or_default();
        let dropped = list
            .iter()
            .filter(|j| j.account_id.as_deref() == Some(id))
            .map(|j| j.id.clone())
            .collect();
        list.retain(|j| j.account_id.as_deref() != Some(id));
        Ok((Some(list), dropped))
    })?;
    for j in dropped {
        crate::job::forget(kv, &j)?;
    }
    gw.forget(id).await?;
    kv.delete(&keys::token(id))?;
    kv.delete(&keys::account(id))?;
    Ok(())
}
