//! The internal API's work: unseal, pace, call Apple with bounded retries, record what Apple
//! said about ownership, errors and backoff, and answer in Apple's own terms.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;
use vpp_apple::{
    send_with_retry_raw, AppleError, AppleRequest, AppleResponse, Clock, MdmInfo, Method, Pacer,
    RetryPolicy, ServerToken, ServiceConfig, Target, Transport,
};
use vpp_licensing::apple_state::{owner_from, AppleFailure, AppleState, Owner};
use vpp_licensing::instance::{self, Instance};
use vpp_licensing::{ApiError, ErrorCode};
use vpp_seal::SealKey;
use vpp_spin_bridge::apple_http::{random_id, AppleTransport, SpinClock};
use vpp_spin_bridge::{vars, ApiRequest, ApiResponse, SpinKv};
use vpp_store::{get_json, keys, set_json, update, Kv};

/// Apple asks to re-read service config every 5 minutes.
const SERVICE_CONFIG_TTL_SECONDS: i64 = 300;
/// Names and icons change rarely.
const METADATA_TTL_DAYS: i64 = 7;
/// Requests per second per token when service config is not known yet.
const DEFAULT_MAX_PER_SECOND: usize = 15;

/// Bounded retries that fit the 30 s a request may take on managed platforms. A Retry-After
/// longer than what is left is not waited out early: the backoff is recorded and returned.
fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        max_retry_after: Duration::from_secs(3600),
        base_backoff: Duration::from_secs(1),
        max_total_wait: Duration::from_secs(12),
    }
}

pub struct Ctx {
    kv: SpinKv,
    seal: SealKey,
    origin: String,
    instance: Instance,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedServiceConfig {
    fetched_at: DateTime<Utc>,
    config: Value,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedMetadata {
    fetched_at: DateTime<Utc>,
    metadata: vpp_apple::AssetMetadata,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InspectRequest {
    account_id: String,
    token: String,
}

impl Ctx {
    pub fn load(kv: SpinKv) -> Result<Ctx, ApiError> {
        let seal = SealKey::from_base64(&vars::required("token_seal_key")?)
            .map_err(|e| ApiError::new(ErrorCode::Misconfigured, e.to_string()))?;
        let origin = vars::required("apple_base_url")?
            .trim_end_matches('/')
            .to_string();
        let candidate = random_id().map_err(ApiError::internal)?;
        let instance = instance::ensure(&kv, &candidate, Utc::now())?;
        Ok(Ctx {
            kv,
            seal,
            origin,
            instance,
        })
    }

    /// `POST /tokens/inspect {accountId, token}`: read client config with a token that is not
    /// stored yet and hand back the token sealed for that account. Nothing is stored.
    pub async fn inspect(&self, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let body: InspectRequest = req.json()?;
        let token = ServerToken::parse(&body.token)
            .map_err(|e| ApiError::new(ErrorCode::TokenMalformed, e.to_string()))?;
        let transport = PacedTransport {
            inner: AppleTransport {
                origin: self.origin.clone(),
                bearer: token.bearer().to_string(),
            },
            kv: &self.kv,
            account: body.account_id.clone(),
            max_per_second: self.max_per_second().await,
        };
        let areq = AppleRequest::get("client/config", Vec::new());
        let done = send_with_retry_raw(
            &transport,
            &SpinClock,
            &Pacer::unlimited(),
            &policy(),
            &areq,
        )
        .await;
        let resp = match (&done.error, done.last) {
            (None, Ok(resp)) => resp,
            (_, Ok(resp)) => return Ok(apple_answer(&resp, None)),
            (_, Err(e)) => return Err(unreachable_apple(&e)),
        };
        let config: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        let mdm: Option<MdmInfo> = serde_json::from_value(config["mdmInfo"].clone()).ok();
        let owner = owner_from(&self.instance.id, mdm.as_ref());
        let sealed = self
            .seal
            .seal(&body.account_id, token.bearer())
            .map_err(ApiError::internal)?;
        Ok(ApiResponse::ok(&json!({
            "sealed": sealed,
            "clientConfig": config,
            "owner": owner,
            "instanceId": self.instance.id,
        })))
    }

    /// `ANY /accounts/{id}/mdm/v2/{rest}`: forward to Apple with the account's token.
    pub async fn forward(
        &self,
        account: &str,
        rest: &str,
        req: &ApiRequest,
    ) -> Result<ApiResponse, ApiError> {
        let now = Utc::now();
        let state: AppleState =
            get_json(&self.kv, &keys::apple_state(account))?.unwrap_or_default();
        if let Some(wait) = state.backing_off(now) {
            let body = json!({"errorNumber": 9646, "errorMessage": "backing off as Apple asked"});
            return Ok(ApiResponse::json(429, &body).with_header("retry-after", &wait.to_string()));
        }
        let sealed = self
            .kv
            .get(&keys::token(account))?
            .ok_or_else(|| ApiError::not_found(format!("token of account {account}")))?;
        let bearer = self
            .seal
            .open(account, &String::from_utf8_lossy(&sealed))
            .map_err(|e| ApiError::new(ErrorCode::Misconfigured, e.to_string()))?;
        let method = match req.method.as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            other => {
                return Err(ApiError::method_not_allowed(
                    other,
                    &req.path,
                    &["GET", "POST"],
                ))
            }
        };
        let areq = AppleRequest {
            method,
            target: Target::Api {
                path: rest.to_string(),
                query: req.query.clone(),
            },
            body: (method == Method::Post).then(|| req.body.clone()),
        };
        let transport = PacedTransport {
            inner: AppleTransport {
                origin: self.origin.clone(),
                bearer,
            },
            kv: &self.kv,
            account: account.to_string(),
            max_per_second: self.max_per_second().await,
        };
        let done = send_with_retry_raw(
            &transport,
            &SpinClock,
            &Pacer::unlimited(),
            &policy(),
            &areq,
        )
        .await;
        let resp = match done.last {
            Ok(resp) => resp,
            Err(e) => {
                let lost = AppleError::Transport(e.clone());
                self.record(account, rest, done.attempts, None, Some(&lost))?;
                return Err(unreachable_apple(&e));
            }
        };
        let owner = self.record(
            account,
            rest,
            done.attempts,
            Some(&resp),
            done.error.as_ref(),
        )?;
        Ok(apple_answer(&resp, Some(owner)))
    }

    /// Remember what Apple said: owner (from `mdmInfo`), last error, backoff, token expiry, and
    /// count the requests (`attempts`) and the error.
    fn record(
        &self,
        account: &str,
        path: &str,
        attempts: u32,
        resp: Option<&AppleResponse>,
        error: Option<&AppleError>,
    ) -> Result<Owner, ApiError> {
        let now = Utc::now();
        let body: Value = resp
            .and_then(|r| serde_json::from_slice(&r.body).ok())
            .unwrap_or(Value::Null);
        let mdm: Option<MdmInfo> = serde_json::from_value(body["mdmInfo"].clone()).ok();
        let is_client_config = path.trim_matches('/') == "client/config";
        let our_id = self.instance.id.clone();
        let owner = update::<AppleState, Owner>(&self.kv, &keys::apple_state(account), |cur| {
            let mut st = cur.unwrap_or_default();
            // Most responses echo mdmInfo once someone set it; only client config proves its absence.
            if mdm.is_some() || (is_client_config && error.is_none()) {
                st.owner = owner_from(&our_id, mdm.as_ref());
                st.owner_seen_at = Some(now);
            }
            if let Some(exp) = body["tokenExpirationDate"]
                .as_str()
                .and_then(vpp_apple::parse_apple_date)
            {
                st.token_expires_at = Some(exp);
            }
            let error_key = error.map(|e| match body["errorNumber"].as_i64() {
                Some(n) => n.to_string(),
                None => e.code().to_string(),
            });
            st.count_call(path, attempts, error_key.as_deref());
            match error {
                None => {
                    st.last_ok_at = Some(now);
                    st.last_error = None;
                    st.backoff_until = None;
                }
                Some(e) => {
                    st.last_error = Some(AppleFailure {
                        code: e.code().to_string(),
                        message: e.to_string(),
                        number: body["errorNumber"].as_i64(),
                        at: now,
                    });
                    if let Some(ra) = e.retry_after() {
                        st.backoff_until = ChronoDuration::from_std(ra).ok().map(|d| now + d);
                    }
                }
            }
            let owner = st.owner.clone();
            Ok((Some(st), owner))
        })?;
        Ok(owner)
    }

    async fn max_per_second(&self) -> usize {
        match self.service_config().await {
            Ok(cfg) => cfg.limits.max_request_per_second.max(1) as usize,
            Err(_) => DEFAULT_MAX_PER_SECOND,
        }
    }

    /// Apple's service config, cached for five minutes in the key-value store.
    async fn service_config_raw(&self) -> Result<Value, ApiError> {
        let now = Utc::now();
        if let Some(c) = get_json::<CachedServiceConfig>(&self.kv, &keys::service_config())? {
            if (now - c.fetched_at).num_seconds() < SERVICE_CONFIG_TTL_SECONDS {
                return Ok(c.config);
            }
        }
        let transport = AppleTransport {
            origin: self.origin.clone(),
            bearer: String::new(),
        };
        let areq = AppleRequest::get("service/config", Vec::new());
        let resp = transport
            .send(&areq)
            .await
            .map_err(|e| unreachable_apple(&e))?;
        if let Some(e) = AppleError::from_response(&resp, now) {
            return Err(ApiError::new(
                ErrorCode::AppleUnavailable,
                format!("service config: {e}"),
            ));
        }
        let config: Value = serde_json::from_slice(&resp.body).map_err(|e| {
            ApiError::new(ErrorCode::AppleUnavailable, format!("service config: {e}"))
        })?;
        set_json(
            &self.kv,
            &keys::service_config(),
            &CachedServiceConfig {
                fetched_at: now,
                config: config.clone(),
            },
        )?;
        Ok(config)
    }

    async fn service_config(&self) -> Result<ServiceConfig, ApiError> {
        let raw = self.service_config_raw().await?;
        serde_json::from_value(raw)
            .map_err(|e| ApiError::new(ErrorCode::AppleUnavailable, format!("service config: {e}")))
    }

    pub async fn service_config_response(&self) -> Result<ApiResponse, ApiError> {
        Ok(ApiResponse::ok(&self.service_config_raw().await?))
    }

    /// `GET /metadata?account=..&ids=1,2&cc=us&platform=enterprisestore`: names and icons.
    pub async fn metadata(&self, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let now = Utc::now();
        let ids: Vec<String> = req
            .query("ids")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for id in &ids {
            match get_json::<CachedMetadata>(&self.kv, &keys::metadata(id))? {
                Some(c) if (now - c.fetched_at).num_days() < METADATA_TTL_DAYS => {
                    found.push(c.metadata)
                }
                _ => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            let cfg = self.service_config().await?;
            let Some(base) = cfg.urls.content_metadata_lookup.clone() else {
                return Ok(ApiResponse::ok(&found));
            };
            let bearer = match req.query("account") {
                Some(a) => self
                    .kv
                    .get(&keys::token(a))?
                    .and_then(|s| self.seal.open(a, &String::from_utf8_lossy(&s)).ok())
                    .unwrap_or_default(),
                None => String::new(),
            };
            let url = vpp_apple::client::metadata_url(
                &base,
                req.query("platform").unwrap_or("enterprisestore"),
                req.query("cc").unwrap_or("us"),
                &missing,
            );
            let transport = AppleTransport {
                origin: self.origin.clone(),
                bearer,
            };
            let areq = AppleRequest {
                method: Method::Get,
                target: Target::Absolute(url),
                body: None,
            };
            // A lookup failure leaves names empty; it never fails the caller.
            if let Ok(resp) = transport.send(&areq).await {
                if resp.status == 200 {
                    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                    for m in vpp_apple::client::parse_metadata(&body) {
                        set_json(
                            &self.kv,
                            &keys::metadata(&m.adam_id),
                            &CachedMetadata {
                                fetched_at: now,
                                metadata: m.clone(),
                            },
                        )?;
                        found.push(m);
                    }
                }
            }
        }
        Ok(ApiResponse::ok(&found))
    }

    /// `GET /accounts/{id}/lookup?url=...`: Apple's content metadata lookup for an account. Only
    /// the lookup URL that Apple's service config names is fetched, with the token as cookie.
    pub async fn lookup(&self, account: &str, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let url = req
            .query("url")
            .ok_or_else(|| ApiError::invalid_field("url", "url is required"))?;
        let cfg = self.service_config().await?;
        let base = cfg.urls.content_metadata_lookup.clone().unwrap_or_default();
        let base_path = base.split('?').next().unwrap_or_default();
        if base_path.is_empty() || url.split('?').next() != Some(base_path) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only Apple's content lookup can be fetched",
            ));
        }
        let bearer = self
            .kv
            .get(&keys::token(account))?
            .and_then(|s| self.seal.open(account, &String::from_utf8_lossy(&s)).ok())
            .unwrap_or_default();
        let transport = AppleTransport {
            origin: self.origin.clone(),
            bearer,
        };
        let areq = AppleRequest {
            method: Method::Get,
            target: Target::Absolute(url.to_string()),
            body: None,
        };
        let resp = transport
            .send(&areq)
            .await
            .map_err(|e| unreachable_apple(&e))?;
        Ok(apple_answer(&resp, None))
    }

    /// `DELETE /accounts/{id}`: drop the keys this component keeps for an account.
    pub fn forget(&self, account: &str) -> Result<ApiResponse, ApiError> {
        self.kv.delete(&keys::apple_state(account))?;
        self.kv.delete(&keys::apple_pace(account))?;
        Ok(ApiResponse::no_content())
    }
}

/// Apple's answer, passed through: status, body, Retry-After, plus who owns the location.
fn apple_answer(resp: &AppleResponse, owner: Option<Owner>) -> ApiResponse {
    let mut r = ApiResponse {
        status: resp.status,
        content_type: "application/json",
        headers: Vec::new(),
        body: resp.body.clone(),
    };
    if let Some(ra) = &resp.retry_after {
        r.headers.push(("retry-after".into(), ra.clone()));
    }
    if let Some(owner) = owner {
        let tag = match owner {
            Owner::Ours => "ours",
            Owner::Foreign { .. } => "foreign",
            Owner::Unclaimed => "unclaimed",
            Owner::Unknown => "unknown",
        };
        r.headers.push(("x-vpp-owner".into(), tag.into()));
    }
    r
}

fn unreachable_apple(e: &str) -> ApiError {
    ApiError::new(
        ErrorCode::AppleUnavailable,
        format!("Apple is unreachable: {e}"),
    )
}

/// Paces requests per token across every instance of every component: at most
/// `max_per_second` requests start in any one-second window, counted in the key-value store.
struct PacedTransport<'a> {
    inner: AppleTransport,
    kv: &'a SpinKv,
    account: String,
    max_per_second: usize,
}

impl PacedTransport<'_> {
    async fn acquire(&self) -> Result<(), String> {
        let key = keys::apple_pace(&self.account);
        // Bounded: at worst a few seconds of waiting under a storm of concurrent callers.
        for _ in 0..50 {
            let now_ms = Utc::now().timestamp_millis();
            let wait_ms = update::<Vec<i64>, i64>(self.kv, &key, |cur| {
                let mut sent: Vec<i64> = cur
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| *t > now_ms - 1000)
                    .collect();
                if sent.len() < self.max_per_second {
                    sent.push(now_ms);
                    return Ok((Some(sent), 0));
                }
                let oldest = sent.iter().copied().min().unwrap_or(now_ms);
                Ok((None, (oldest + 1000 - now_ms).max(1)))
            })
            .map_err(|e| e.to_string())?;
            if wait_ms == 0 {
                return Ok(());
            }
            SpinClock.sleep(Duration::from_millis(wait_ms as u64)).await;
        }
        Err("could not get a request slot for Apple".into())
    }
}

impl Transport for PacedTransport<'_> {
    async fn send(&self, req: &AppleRequest) -> Result<AppleResponse, String> {
        self.acquire().await?;
        self.inner.send(req).await
    }
}
