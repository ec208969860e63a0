//! The licenses component: counts, assignments, policies, reconcile, settings, notices, Apple's
//! notifications and the daily work. The route table is here; the work is in the domain.

use chrono::Utc;
use serde_json::json;
use spin_sdk::http::{Method, Request, Response, ResponseOutparam};
use spin_sdk::http_component;
use vpp_apple::Client;
use vpp_licensing::audit::{self, AuditRecord};
use vpp_licensing::auth::{constant_time_eq, Role};
use vpp_licensing::{
    assignment, daily, event, instance, ledger, licenses, notice, notification, policy, reconcile,
    settings, ApiError,
};
use vpp_spin_bridge::apple_http::{random_id, GatewayTransport, SpinClock, SpinGateway};
use vpp_spin_bridge::http_api::{BodyStream, Reply};
use vpp_spin_bridge::{http_api, vars, ApiRequest, ApiResponse, SpinKv};

#[http_component]
async fn handle(req: Request, out: ResponseOutparam) {
    http_api::serve_to(
        req,
        out,
        is_public,
        async |kv: &SpinKv, req: &ApiRequest| {
            let segments = req.segments();
            if req.method == "GET" && segments == ["api", "licenses"] {
                list_licenses(kv, req)
            } else {
                route(kv, req).await.map(Reply::Whole)
            }
        },
    )
    .await
}

/// Apple's notifications carry the account's notification secret instead of an API key;
/// `POST /api/daily` takes the scheduler's key (or the admin key), checked by [`daily_post`].
fn is_public(req: &ApiRequest) -> bool {
    req.path.starts_with("/api/apple/notifications/")
        || (req.method == "POST" && req.segments() == ["api", "daily"])
}

type AppleClient = Client<GatewayTransport, SpinClock>;

fn client_for(account: &str) -> AppleClient {
    Client::proxied(
        GatewayTransport {
            account: account.to_string(),
        },
        SpinClock,
    )
}

async fn route(kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments = req.segments();
    let m = req.method.as_str();
    match (m, segments.as_slice()) {
        ("GET", ["api", "licenses", account, adam, "assignments"]) => {
            let page = licenses::assignments(
                kv,
                account,
                adam,
                req.query("pricingParam"),
                req.query_u64("page")?,
            )?;
            Ok(ApiResponse::ok(&page))
        }
        ("POST", ["api", "assignments"]) => {
            req.caller()?.require_admin("assign licenses")?;
            let body: assignment::AssignBody = req.json()?;
            let client = client_for(&body.account_id);
            let now = Utc::now();
            let mut budget = vars::job_budget(now)?;
            let out = assignment::assign(kv, &client, &body, now, &mut budget).await?;
            let job = ledger_job(kv, req, &body.account_id, out.queued)?;
            Ok(submitted(out, job))
        }
        ("POST", ["api", "assignments", "revoke"]) => {
            req.caller()?.require_admin("revoke licenses")?;
            let body: assignment::AssignBody = req.json()?;
            let client = client_for(&body.account_id);
            let now = Utc::now();
            let mut budget = vars::job_budget(now)?;
            let out = assignment::revoke(kv, &client, &body, now, &mut budget).await?;
            Ok(submitted(out, None))
        }
        ("GET", ["api", "events", id]) => get_event(kv, req, id).await,
        ("GET", ["api", "policies"]) => Ok(ApiResponse::ok(&json!({
            "policies": policy::list(kv)?,
        }))),
        ("GET", ["api", "policies", id]) => {
            policy::validate_id(id)?;
            let p =
                policy::load(kv, id)?.ok_or_else(|| ApiError::not_found(format!("policy {id}")))?;
            Ok(ApiResponse::ok(&p))
        }
        ("PUT", ["api", "policies", id]) => {
            req.caller()?.require_admin("change app policies")?;
            let body: policy::PolicyBody = req.json()?;
            let client = client_for(&body.account_id);
            let now = Utc::now();
            let mut budget = vars::job_budget(now)?;
            let (created, mut out) = policy::put(kv, &client, id, &body, now, &mut budget).await?;
            let queued = out["queued"].as_u64().unwrap_or(0) as usize;
            if let Some(job) = ledger_job(kv, req, &body.account_id, queued)? {
                out["job"] = job;
            }
            Ok(ApiResponse::json(if created { 201 } else { 200 }, &out))
        }
        ("DELETE", ["api", "policies", id]) => {
            req.caller()?.require_admin("delete app policies")?;
            policy::delete(kv, id)?;
            Ok(ApiResponse::no_content())
        }
        ("POST", ["api", "reconcile"]) => {
            req.caller()?.require_admin("reconcile licenses")?;
            run_reconcile(kv, req).await
        }
        ("GET", ["api", "settings"]) => Ok(ApiResponse::ok(&settings::load(kv)?.view())),
        ("PUT", ["api", "settings"]) => {
            req.caller()?.require_admin("change settings")?;
            let rules = webhook_rules();
            Ok(ApiResponse::ok(
                &settings::put_with(kv, &req.body, &rules)?.view(),
            ))
        }
        ("GET", ["api", "notices"]) => {
            Ok(ApiResponse::ok(&notice::list(kv, req.query_u64("page")?)?))
        }
        ("POST", ["api", "notices", "deliver"]) => {
            req.caller()?.require_admin("deliver notices")?;
            let report = notice::deliver_due(kv, &Webhook, Utc::now(), 20, true).await?;
            Ok(ApiResponse::ok(&report))
        }
        ("POST", ["api", "daily"]) => daily_post(kv, req).await,
        ("GET", ["api", "daily"]) => Ok(ApiResponse::ok(&daily::view(
            kv,
            &daily_config()?,
            Utc::now(),
        )?)),
        ("POST", ["api", "apple", "notifications", account]) => {
            let out = notification::handle(
                kv,
                account,
                req.header("authorization"),
                &req.body,
                Utc::now(),
            )?;
            Ok(ApiResponse::ok(&out))
        }
        (_, ["api", "licenses"])
        | (_, ["api", "licenses", _, _, "assignments"])
        | (_, ["api", "events", _])
        | (_, ["api", "policies"])
        | (_, ["api", "notices"]) => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        (_, ["api", "assignments"])
        | (_, ["api", "assignments", "revoke"])
        | (_, ["api", "reconcile"])
        | (_, ["api", "notices", "deliver"])
        | (_, ["api", "apple", "notifications", _]) => {
            Err(ApiError::method_not_allowed(m, &req.path, &["POST"]))
        }
        (_, ["api", "policies", _]) => Err(ApiError::method_not_allowed(
            m,
            &req.path,
            &["GET", "PUT", "DELETE"],
        )),
        (_, ["api", "settings"]) => {
            Err(ApiError::method_not_allowed(m, &req.path, &["GET", "PUT"]))
        }
        (_, ["api", "daily"]) => Err(ApiError::method_not_allowed(m, &req.path, &["GET", "POST"])),
        _ => Err(ApiError::no_route(m, &req.path)),
    }
}

/// What was left queued in a request goes on in the account's ledger job (its link).
fn ledger_job(
    kv: &SpinKv,
    req: &ApiRequest,
    account: &str,
    queued: usize,
) -> Result<Option<serde_json::Value>, ApiError> {
    if queued == 0 {
        return Ok(None);
    }
    let id = random_id().map_err(ApiError::internal)?;
    let by = req.caller()?.name.clone();
    let (job, _) = ledger::start_job(kv, &id, account, &by, Utc::now())?;
    Ok(Some(json!({
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "href": req.url_for(&format!("/api/jobs/{}", job.id)),
    })))
}

fn submitted(out: assignment::Submitted, job: Option<serde_json::Value>) -> ApiResponse {
    let first = out.events.first().map(|e| e.id.clone());
    let mut v = serde_json::to_value(&out).unwrap_or_default();
    v["eventId"] = json!(first);
    v["events"] = json!(out.events.iter().map(event::view).collect::<Vec<_>>());
    let accepted = !out.events.is_empty() || !out.unknown.is_empty() || out.queued > 0;
    if let Some(j) = job {
        v["job"] = j;
    }
    ApiResponse::json(if accepted { 202 } else { 200 }, &v)
}

fn wants_csv(req: &ApiRequest) -> bool {
    req.query("format") == Some("csv")
        || req.header("accept").is_some_and(|a| a.contains("text/csv"))
}

/// The rest of a CSV export, one page of the list per chunk.
struct CsvRest(licenses::CsvExport);

impl BodyStream for CsvRest {
    fn next_chunk(&mut self, kv: &SpinKv) -> Result<Option<Vec<u8>>, ApiError> {
        Ok(self.0.next_chunk(kv)?.map(String::into_bytes))
    }
}

fn list_licenses(kv: &SpinKv, req: &ApiRequest) -> Result<Reply, ApiError> {
    let filter = licenses::Filter {
        account_id: req
            .query("accountId")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        search: req
            .query("search")
            .or_else(|| req.query("q"))
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        low_only: match req.query("low") {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(ApiError::invalid_field("low", "low must be true or false")),
        },
    };
    if let Some(f) = req.query("format") {
        if f != "csv" && f != "json" {
            return Err(ApiError::invalid_field(
                "format",
                "format must be csv or json",
            ));
        }
    }
    // Checked even for the CSV export, which does not use them: a parameter given is valid.
    let limit = match req.query_u64("limit")? {
        None => licenses::DEFAULT_LIMIT,
        Some(n) if n >= 1 && n <= licenses::MAX_LIMIT as u64 => n as usize,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "limit",
                format!("limit must be 1 to {}", licenses::MAX_LIMIT),
            ))
        }
    };
    let cursor = req.query("cursor");
    licenses::check_cursor(cursor)?;
    if wants_csv(req) {
        // Every row, streamed one bounded page of the list at a time: the first page is read
        // before the head is sent (an unknown account is still a clean 404), the rest as the
        // body is written.
        let mut export = licenses::CsvExport::new(filter);
        let first = export.next_chunk(kv)?.unwrap_or_default();
        let head = ApiResponse {
            status: 200,
            content_type: "text/csv; charset=utf-8",
            headers: vec![(
                "content-disposition".into(),
                "attachment; filename=\"licenses.csv\"".into(),
            )],
            body: first.into_bytes(),
        };
        return Ok(Reply::Stream(head, Box::new(CsvRest(export))));
    }
    // Each row written from its stored record's text (no decoding, no intermediate values).
    let body = licenses::list_page_json(kv, &filter, cursor, limit)?;
    Ok(Reply::Whole(ApiResponse {
        status: 200,
        content_type: "application/json",
        headers: Vec::new(),
        body,
    }))
}

/// The event as we know it. For the admin key, a pending event whose poll is due is polled at
/// Apple first (a read; Apple's spacing rules hold whoever polls); it is never sent again from
/// here. The reader key stays local: its requests never reach Apple.
async fn get_event(kv: &SpinKv, req: &ApiRequest, id: &str) -> Result<ApiResponse, ApiError> {
    // Apple's event ids are short tokens of [A-Za-z0-9._~-] (the documented pattern): anything
    // else was never stored, so it is not found.
    let well_formed = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
    if !well_formed {
        return Err(ApiError::not_found(format!("event {id}")));
    }
    let mut record =
        event::load(kv, id)?.ok_or_else(|| ApiError::not_found(format!("event {id}")))?;
    let now = Utc::now();
    let may_poll = req.caller()?.role == vpp_licensing::auth::Role::Admin;
    if may_poll
        && record.state == vpp_licensing::model::EventState::Pending
        && event::poll_due_at(&record) <= now
    {
        let client = client_for(&record.account_id);
        match event::poll_event(kv, &client, &record, now, false).await {
            Ok(r) if r.id == record.id => record = r,
            Ok(_) | Err(event::PollError::Apple(_)) => {
                record = event::load(kv, id)?.unwrap_or(record);
            }
            Err(event::PollError::Store(e)) => return Err(ApiError::store(e)),
        }
    }
    Ok(ApiResponse::ok(&event::view(&record)))
}

async fn run_reconcile(kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let now = Utc::now();
    let id = random_id().map_err(ApiError::internal)?;
    let requested_by = req.caller()?.name.clone();
    let (mut job, _created) = reconcile::start(kv, &id, &requested_by, now)?;
    let mut budget = vars::job_budget(now)?;
    reconcile::run_slice(kv, &mut job, client_for, now, &mut budget).await?;
    let location = req.url_for(&format!("/api/jobs/{}", job.id));
    Ok(ApiResponse::json(202, &job).with_header("location", &location))
}

/// `daily_at_utc` and `full_refresh_days`.
fn daily_config() -> Result<daily::Config, ApiError> {
    daily::Config::from_vars(
        vars::optional("daily_at_utc").as_deref(),
        vars::optional("full_refresh_days").as_deref(),
    )
}

/// Who may run the daily work: the scheduler's key (`scheduler_api_key`) or the admin key.
/// Returns the actor for the audit log and whether it is the admin.
fn daily_caller(req: &ApiRequest) -> Result<(String, bool), ApiError> {
    let presented = req
        .header("authorization")
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(ApiError::unauthorized)?;
    if let Some(key) = vars::optional("scheduler_api_key") {
        if constant_time_eq(presented.as_bytes(), key.as_bytes()) {
            return Ok(("scheduler".to_string(), false));
        }
    }
    let caller = vars::api_keys()?.authenticate(req.header("authorization"))?;
    match caller.role {
        Role::Admin => Ok((caller.name, true)),
        Role::Reader => Err(ApiError::forbidden("run the daily work")),
    }
}

/// `POST /api/daily[?force=true]`: one bounded slice of the daily work (see `vpp_licensing::daily`).
async fn daily_post(kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let (actor, is_admin) = daily_caller(req)?;
    let result = daily_tick(kv, req, &actor, is_admin).await;
    // The route is outside the API-key check, so it writes its own audit record; idle ticks
    // (every few minutes, nothing changed) and busy ones are not recorded.
    let (status, error, target) = match &result {
        Ok((r, target)) => (r.status, None, target.clone()),
        Err(e) => (e.status(), Some(e.code.as_str().to_string()), None),
    };
    if target.is_some() || error.is_some() {
        let rec = AuditRecord {
            at: Utc::now(),
            actor,
            action: format!("POST {}", req.path),
            target,
            status,
            error,
        };
        if let Err(e) = audit::record(kv, &rec) {
            eprintln!("audit record failed: {e}");
        }
    }
    result.map(|(r, _)| r)
}

async fn daily_tick(
    kv: &SpinKv,
    req: &ApiRequest,
    actor: &str,
    is_admin: bool,
) -> Result<(ApiResponse, Option<String>), ApiError> {
    let force = match req.query("force") {
        None | Some("false") => false,
        Some("true") | Some("1") => true,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "force",
                "force must be true or false",
            ))
        }
    };
    if force && !is_admin {
        return Err(ApiError::forbidden("force a daily run"));
    }
    let config = daily_config()?;
    let now = Utc::now();
    let candidate = random_id().map_err(ApiError::internal)?;
    let our_id = instance::ensure(kv, &candidate, now)?.id;
    let clock = Utc::now;
    let new_id = || random_id().map_err(ApiError::internal);
    let ctx = daily::Ctx {
        kv,
        gw: &SpinGateway,
        sender: &Webhook,
        config,
        our_id: &our_id,
        requested_by: actor,
        clock: &clock,
        new_id: &new_id,
    };
    let mut budget = vars::job_budget(now)?;
    Ok(match daily::tick(&ctx, force, &mut budget).await? {
        daily::Tick::Busy => (
            ApiResponse::json(
                202,
                &json!({
                    "status": "busy",
                    "message": "another invocation is working on the daily run right now",
                }),
            ),
            None,
        ),
        daily::Tick::Idle { next_run_at } => (
            ApiResponse::ok(&json!({"status": "idle", "nextRunAt": next_run_at})),
            None,
        ),
        daily::Tick::Ran {
            job,
            started,
            next_run_at,
        } => {
            let running = job.is_running();
            let status = match (running, started) {
                (false, _) => "finished",
                (true, true) => "started",
                (true, false) => "running",
            };
            let location = req.url_for(&format!("/api/jobs/{}", job.id));
            let id = job.id.clone();
            let body = json!({"status": status, "job": job, "nextRunAt": next_run_at});
            (
                ApiResponse::json(if running { 202 } else { 200 }, &body)
                    .with_header("location", &location),
                Some(id),
            )
        }
    })
}

/// The hosts an operator allows the notice webhook to reach over http (and at private
/// addresses): `notice_webhook_http_hosts`, comma-separated.
fn webhook_rules() -> settings::WebhookRules {
    settings::WebhookRules::from_var(vars::optional("notice_webhook_http_hosts").as_deref())
}

/// Notice deliveries over Spin's outbound HTTP.
struct Webhook;

impl notice::WebhookSender for Webhook {
    async fn post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<u16, String> {
        let mut b = Request::builder();
        b.method(Method::Post).uri(url);
        for (k, v) in headers {
            b.header(k.as_str(), v.as_str());
        }
        let resp: Response = spin_sdk::http::send(b.body(body.to_vec()).build())
            .await
            .map_err(|e| e.to_string())?;
        Ok(*resp.status())
    }

    fn rules(&self) -> settings::WebhookRules {
        webhook_rules()
    }
}
