//! Managed users: users registered with Apple for user-based licenses (clientUserId, email or
//! managed Apple ID, status Registered / Associated / Retired, and the invitation link).
//!
//! Layout: `users/{account}/{shard}` (clientUserId → user), shard =
//! `shard_of(clientUserId, USER_SHARDS)`; a page of the list is a shard.
//!
//! Served under `/api/accounts/{id}/users` by the accounts component through [`handle`].

use crate::assignment::load_account;
use crate::error::{apple_error, ApiError};
use crate::model::Failure;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use vpp_apple::{Client, Clock, RequestUser, Transport, UserFilter};
use vpp_store::keys::{self, shard_of, USER_SHARDS};
use vpp_store::{get_json, update, Kv, StoreError};

pub const MAX_USERS_PER_CALL: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedUser {
    pub client_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_apple_id: Option<String>,
    /// `Registered`, `Associated`, `Retired`; `Creating`/`Retiring` while Apple works on it.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    pub updated_at: DateTime<Utc>,
}

type UserShard = BTreeMap<String, ManagedUser>;

fn shard_key(account: &str, cid: &str) -> String {
    keys::user_shard(account, shard_of(cid, USER_SHARDS))
}

/// Upsert users as Apple reports them (refresh, `USER_MANAGEMENT`, `USER_ASSOCIATED`).
/// `failed`: the operation failed for these users (their state stays, the error is kept).
pub fn apply_from_apple(
    kv: &impl Kv,
    account_id: &str,
    users: &[vpp_apple::User],
    failed: bool,
    retire: bool,
    error: Option<Failure>,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let mut by_shard: BTreeMap<u32, Vec<&vpp_apple::User>> = BTreeMap::new();
    for u in users {
        by_shard
            .entry(shard_of(&u.client_user_id, USER_SHARDS))
            .or_default()
            .push(u);
    }
    for (shard, list) in by_shard {
        update::<UserShard, ()>(kv, &keys::user_shard(account_id, shard), |cur| {
            let mut s = cur.unwrap_or_default();
            for u in &list {
                let prev = s.get(&u.client_user_id).cloned();
                let mut rec = prev.unwrap_or(ManagedUser {
                    client_user_id: u.client_user_id.clone(),
                    email: None,
                    managed_apple_id: None,
                    status: "Registered".into(),
                    invite_code: None,
                    id_hash: None,
                    event_id: None,
                    error: None,
                    updated_at: now,
                });
                if failed {
                    rec.error = error.clone();
                    if rec.status == "Creating" {
                        rec.status = "Failed".into();
                    } else if rec.status == "Retiring" {
                        rec.status = "Registered".into();
                    }
                } else {
                    rec.error = None;
                    rec.email = u.email.clone().or(rec.email);
                    rec.managed_apple_id = u.managed_apple_id.clone().or(rec.managed_apple_id);
                    rec.invite_code = u.invite_code.clone().or(rec.invite_code);
                    rec.id_hash = u.id_hash.clone().or(rec.id_hash);
                    rec.status = match &u.status {
                        Some(st) => st.as_str().to_string(),
                        None if retire => "Retired".into(),
                        None => rec.status,
                    };
                }
                rec.updated_at = now;
                s.insert(u.client_user_id.clone(), rec);
            }
            Ok((Some(s), ()))
        })?;
    }
    Ok(users.len())
}

/// The invitation link: Apple's `invitationEmail` URL with the user's invite code.
pub fn invitation_link(template: &str, invite_code: &str) -> String {
    template
        .replace("%25inviteCode%25", invite_code)
        .replace("%inviteCode%", invite_code)
}

fn view(u: &ManagedUser, template: Option<&str>) -> Value {
    let mut v = serde_json::to_value(u).unwrap_or_default();
    if let (Some(t), Some(code)) = (template, &u.invite_code) {
        if u.status == "Registered" {
            v["invitationUrl"] = invitation_link(t, code).into();
        }
    }
    v
}

/// A page of users (page = shard); empty shards are skipped so a page has users when any remain.
pub fn list(
    kv: &impl Kv,
    account_id: &str,
    page: Option<u64>,
    template: Option<&str>,
) -> Result<Value, ApiError> {
    load_account(kv, account_id)?;
    let mut page = page.unwrap_or(0);
    if page >= u64::from(USER_SHARDS) {
        return Err(ApiError::invalid_field(
            "page",
            format!("page must be below {USER_SHARDS}"),
        ));
    }
    let mut users = Vec::new();
    while page < u64::from(USER_SHARDS) {
        let s: UserShard =
            get_json(kv, &keys::user_shard(account_id, page as u32))?.unwrap_or_default();
        page += 1;
        if !s.is_empty() {
            users.extend(s.values().map(|u| view(u, template)));
            break;
        }
    }
    Ok(json!({
        "users": users,
        "nextPage": (page < u64::from(USER_SHARDS)).then_some(page),
    }))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewUser {
    pub client_user_id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub managed_apple_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CreateBody {
    Many { users: Vec<NewUser> },
    One(NewUser),
}

fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn validate_cid(cid: &str) -> Result<(), ApiError> {
    if cid.trim().is_empty() || cid.chars().count() > 128 || cid.chars().any(char::is_control) {
        return Err(ApiError::invalid_field(
            "clientUserId",
            "clientUserId must be 1 to 128 printable characters",
        ));
    }
    Ok(())
}

/// `POST /api/accounts/{id}/users`: register users with Apple (asynchronous; the invite code
/// arrives with `USER_MANAGEMENT` or the next read).
pub async fn create<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    load_account(kv, account_id)?;
    let parsed: CreateBody = crate::error::parse_json(body)?;
    let users = match parsed {
        CreateBody::Many { users } => users,
        CreateBody::One(u) => vec![u],
    };
    if users.is_empty() || users.len() > MAX_USERS_PER_CALL {
        return Err(ApiError::invalid_field(
            "users",
            format!("name 1 to {MAX_USERS_PER_CALL} users"),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for u in &users {
        validate_cid(&u.client_user_id)?;
        if !seen.insert(u.client_user_id.clone()) {
            return Err(ApiError::invalid_field(
                "clientUserId",
                format!("{} is listed twice", u.client_user_id),
            ));
        }
        if let Some(e) = &u.email {
            if !valid_email(e) {
                return Err(ApiError::invalid_field(
                    "email",
                    format!("{e} is not an email address"),
                ));
            }
        }
    }
    let req: Vec<RequestUser> = users
        .iter()
        .map(|u| RequestUser {
            client_user_id: u.client_user_id.clone(),
            email: u.email.clone(),
            managed_apple_id: u.managed_apple_id.clone(),
        })
        .collect();
    // Apple takes at most `maxUsers` a request: the client sends batches in order, one event
    // each. When a later batch fails, the ones Apple accepted before it are still created there,
    // so they are recorded here too and the answer says which users failed.
    let (events, failure) = match client.create_users(&req).await {
        Ok(events) => (events, None),
        Err(e) if e.submitted.is_empty() => return Err(apple_error(&e.error)),
        Err(e) => (e.submitted, Some(e.error)),
    };
    let limits = client.limits().await.unwrap_or_default();
    let batches = vpp_apple::split_users(&req, &limits);
    let mut accepted: Vec<(&NewUser, String)> = Vec::new();
    for (batch, event) in batches.iter().zip(&events) {
        for ru in &batch.users {
            if let Some(u) = users.iter().find(|u| u.client_user_id == ru.client_user_id) {
                accepted.push((u, event.event_id.clone()));
            }
        }
    }
    for (u, event_id) in &accepted {
        update::<UserShard, ()>(kv, &shard_key(account_id, &u.client_user_id), |cur| {
            let mut s = cur.unwrap_or_default();
            if s.get(&u.client_user_id)
                .is_some_and(|x| x.status != "Failed" && x.status != "Retired")
            {
                return Ok((None, ()));
            }
            s.insert(
                u.client_user_id.clone(),
                ManagedUser {
                    client_user_id: u.client_user_id.clone(),
                    email: u.email.clone(),
                    managed_apple_id: u.managed_apple_id.clone(),
                    status: "Creating".into(),
                    invite_code: None,
                    id_hash: None,
                    event_id: Some(event_id.clone()),
                    error: None,
                    updated_at: now,
                },
            );
            Ok((Some(s), ()))
        })?;
    }
    let mut out = json!({
        "eventIds": events.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
        "users": accepted.iter().map(|(u, e)| json!({"clientUserId": u.client_user_id, "status": "Creating", "eventId": e})).collect::<Vec<_>>(),
    });
    if let Some(error) = failure {
        let taken: std::collections::BTreeSet<&str> = accepted
            .iter()
            .map(|(u, _)| u.client_user_id.as_str())
            .collect();
        let e = apple_error(&error);
        // Only an Apple error with its number is a definite "no"; without one, Apple may have
        // created them: a refresh or Apple's USER_MANAGEMENT notification will show them.
        let outcome = if error.number().is_some() {
            "rejected"
        } else {
            "unknown"
        };
        out["failed"] = users
            .iter()
            .filter(|u| !taken.contains(u.client_user_id.as_str()))
            .map(|u| json!({"clientUserId": u.client_user_id, "outcome": outcome}))
            .collect();
        out["error"] = json!({"code": e.code.as_str(), "message": e.message, "details": e.details});
    }
    Ok(out)
}

/// The invitation link template from the service config the apple component keeps
/// (`apple/service-config`), without calling Apple.
fn stored_invitation_template(kv: &impl Kv) -> Option<String> {
    let cached: Value = get_json(kv, &keys::service_config()).ok().flatten()?;
    cached["config"]["urls"]["invitationEmail"]
        .as_str()
        .map(str::to_string)
}

/// `GET /api/accounts/{id}/users/{clientUserId}`: our record. With `may_call_apple` (an admin
/// asking) a record still being created, retired, or without its invite code is read again from
/// Apple first; a reader's request stays local. An id we do not have is 404 without asking Apple.
pub async fn get<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    cid: &str,
    template: Option<&str>,
    may_call_apple: bool,
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    load_account(kv, account_id)?;
    validate_cid(cid)?;
    let key = shard_key(account_id, cid);
    let mut current = get_json::<UserShard>(kv, &key)?.and_then(|s| s.get(cid).cloned());
    let stale = current.as_ref().is_some_and(|u| {
        matches!(u.status.as_str(), "Creating" | "Retiring")
            || (u.status == "Registered" && u.invite_code.is_none())
    });
    if stale && may_call_apple {
        let filter = UserFilter {
            client_user_id: Some(cid.to_string()),
            ..UserFilter::default()
        };
        if let Ok(page) = client.users_page(&filter, None, 0).await {
            let found: Vec<vpp_apple::User> = page
                .users
                .into_iter()
                .filter(|u| u.client_user_id == cid)
                .collect();
            if !found.is_empty() {
                apply_from_apple(kv, account_id, &found, false, false, None, now)?;
                current = get_json::<UserShard>(kv, &key)?.and_then(|s| s.get(cid).cloned());
            }
        }
    }
    let u = current
        .ok_or_else(|| ApiError::not_found(format!("user {cid} in account {account_id}")))?;
    Ok(view(&u, template))
}

/// `POST /api/accounts/{id}/users/{clientUserId}/retire`: Apple frees the user's licenses.
pub async fn retire<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    cid: &str,
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    load_account(kv, account_id)?;
    validate_cid(cid)?;
    let events = client
        .retire_users(&[cid.to_string()])
        .await
        .map_err(|e| apple_error(&e.error))?;
    let event_id = events.first().map(|e| e.event_id.clone());
    update::<UserShard, ()>(kv, &shard_key(account_id, cid), |cur| {
        let mut s = cur.unwrap_or_default();
        let rec = s.entry(cid.to_string()).or_insert_with(|| ManagedUser {
            client_user_id: cid.to_string(),
            email: None,
            managed_apple_id: None,
            status: "Registered".into(),
            invite_code: None,
            id_hash: None,
            event_id: None,
            error: None,
            updated_at: now,
        });
        rec.status = "Retiring".into();
        rec.event_id = event_id.clone();
        rec.updated_at = now;
        Ok((Some(s), ()))
    })?;
    Ok(json!({"clientUserId": cid, "status": "Retiring", "eventId": event_id}))
}

/// The whole `/api/accounts/{id}/users...` surface for the accounts component. `rest` is the
/// path after `users` (`[]`, `[clientUserId]` or `[clientUserId, "retire"]`). Returns the status
/// and JSON body. The caller checks the API key's role (admin for POST) and says whether the
/// caller is an admin: only an admin's request may reach Apple; a reader's stays local.
#[allow(clippy::too_many_arguments)]
pub async fn handle<T: Transport, C: Clock>(
    kv: &impl Kv,
    client: &Client<T, C>,
    account_id: &str,
    method: &str,
    rest: &[&str],
    page: Option<u64>,
    body: &[u8],
    is_admin: bool,
    now: DateTime<Utc>,
) -> Result<(u16, Value), ApiError> {
    let template = || async {
        match stored_invitation_template(kv) {
            Some(t) => Some(t),
            None if is_admin => client
                .service_config()
                .await
                .ok()
                .and_then(|c| c.urls.invitation_email),
            None => None,
        }
    };
    match (method, rest) {
        ("GET", []) => {
            let t = template().await;
            Ok((200, list(kv, account_id, page, t.as_deref())?))
        }
        ("POST", []) => Ok((202, create(kv, client, account_id, body, now).await?)),
        ("GET", [cid]) => {
            let t = template().await;
            Ok((
                200,
                get(kv, client, account_id, cid, t.as_deref(), is_admin, now).await?,
            ))
        }
        ("POST", [cid, "retire"]) => Ok((202, retire(kv, client, account_id, cid, now).await?)),
        (_, []) => Err(ApiError::method_not_allowed(
            method,
            "users",
            &["GET", "POST"],
        )),
        (_, [_]) => Err(ApiError::method_not_allowed(
            method,
            "users/{clientUserId}",
            &["GET"],
        )),
        (_, [_, "retire"]) => Err(ApiError::method_not_allowed(
            method,
            "users/{clientUserId}/retire",
            &["POST"],
        )),
        _ => Err(ApiError::no_route(
            method,
            &format!("/api/accounts/{account_id}/users/{}", rest.join("/")),
        )),
    }
}
