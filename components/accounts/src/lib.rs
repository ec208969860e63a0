//! The accounts component: App Store License accounts, jobs, the audit log, health, metrics, and the
//! JSON 404 for unknown `/api` routes. The route table is here; the work is in the domain
//! (`vpp_licensing::account`, `refresh`, `cleanup`, `runner`).

mod health;

use chrono::Utc;
use serde_json::json;
use spin_sdk::http::{Request, Response};
use spin_sdk::http_component;
use vpp_licensing::account::{self, AddAccount, EditAccount, Identity};
use vpp_licensing::job::{self, Job};
use vpp_licensing::{audit, cleanup, instance, refresh, runner, users, ApiError};
use vpp_spin_bridge::apple_http::{random_id, SpinGateway};
use vpp_spin_bridge::{http_api, vars, ApiRequest, ApiResponse, SpinKv};

#[http_component]
async fn handle(req: Request) -> Response {
    http_api::serve(req, is_public, route).await
}

/// The health check and the API's own description (clients generate from it) need no key.
fn is_public(req: &ApiRequest) -> bool {
    // Any method: a wrong one is answered 405 by the route, not 401.
    req.path == "/api/health" || req.path == "/api/openapi.json"
}

async fn route(kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments = req.segments();
    let m = req.method.as_str();
    match segments.as_slice() {
        ["api", "health"] => match m {
            "GET" => Ok(health::check(kv).await),
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "openapi.json"] => match m {
            "GET" => Ok(ApiResponse::ok(&vpp_licensing::openapi::document())),
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "metrics"] => match m {
            "GET" => Ok(ApiResponse {
                status: 200,
                content_type: vpp_licensing::metrics::CONTENT_TYPE,
                headers: Vec::new(),
                body: vpp_licensing::metrics::render(kv, Utc::now())?.into_bytes(),
            }),
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "session"] => match m {
            "GET" => {
                let caller = req.caller()?;
                Ok(ApiResponse::ok(
                    &json!({"role": caller.role, "caller": caller.name}),
                ))
            }
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "audit"] => match m {
            "GET" => {
                req.caller()?.require_admin("read the audit log")?;
                Ok(ApiResponse::ok(&audit::list(kv, req.query_u64("page")?)?))
            }
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "accounts"] => match m {
            "GET" => Ok(ApiResponse::ok(
                &json!({"accounts": account::list(kv, &policy_names(kv), Utc::now())?}),
            )),
            "POST" => add(kv, req).await,
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET", "POST"])),
        },
        ["api", "accounts", id] => match m {
            "GET" => view(kv, id),
            "PATCH" => {
                admin(req, "edit accounts")?;
                let input: EditAccount = req.json()?;
                account::edit(kv, &SpinGateway, id, input, Utc::now()).await?;
                view(kv, id)
            }
            "DELETE" => {
                admin(req, "delete accounts")?;
                account::delete(kv, &SpinGateway, id, &policy_names(kv)).await?;
                Ok(ApiResponse::no_content())
            }
            _ => Err(ApiError::method_not_allowed(
                m,
                &req.path,
                &["GET", "PATCH", "DELETE"],
            )),
        },
        ["api", "accounts", id, "users", rest @ ..] => {
            let is_admin = req.caller()?.role == vpp_licensing::auth::Role::Admin;
            if m != "GET" && !is_admin {
                admin(req, "manage users")?;
            }
            account::load(kv, id)?;
            let client = vpp_licensing::account::Gateway::client(&SpinGateway, id);
            let (status, body) = users::handle(
                kv,
                &client,
                id,
                m,
                rest,
                req.query_u64("page")?,
                &req.body,
                is_admin,
                Utc::now(),
            )
            .await?;
            Ok(ApiResponse::json(status, &body))
        }
        ["api", "accounts", id, action] => {
            if m != "POST" {
                return Err(ApiError::method_not_allowed(m, &req.path, &["POST"]));
            }
            admin(req, "act on accounts")?;
            match *action {
                "test" => {
                    let our = instance_id(kv)?;
                    Ok(ApiResponse::ok(
                        &account::test(kv, &SpinGateway, id, &our, Utc::now()).await?,
                    ))
                }
                "refresh" => {
                    let full = match req.query("full") {
                        None | Some("true") | Some("1") => true,
                        Some("false") | Some("0") => false,
                        Some(_) => {
                            return Err(ApiError::invalid_field(
                                "full",
                                "full must be true or false",
                            ))
                        }
                    };
                    start_job(kv, req, id, "refresh", full).await
                }
                "cleanup" => start_job(kv, req, id, "cleanup", true).await,
                "reclaim" => {
                    let secret = random_id().map_err(ApiError::internal)?;
                    account::reclaim(kv, &SpinGateway, id, &identity(kv)?, &secret, Utc::now())
                        .await?;
                    view(kv, id)
                }
                _ => Err(ApiError::no_route(m, &req.path)),
            }
        }
        ["api", "jobs"] => match m {
            "GET" => {
                let limit = req
                    .query_u64("limit")?
                    .unwrap_or(50)
                    .clamp(1, job::KEPT_JOBS as u64) as usize;
                Ok(ApiResponse::ok(&json!({"jobs": job::recent(kv, limit)?})))
            }
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "jobs", id] => match m {
            "GET" => {
                let j =
                    job::load(kv, id)?.ok_or_else(|| ApiError::not_found(format!("job {id}")))?;
                Ok(ApiResponse::ok(&j))
            }
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["GET"])),
        },
        ["api", "jobs", id, "resume"] => match m {
            "POST" => {
                admin(req, "run jobs")?;
                let j =
                    job::load(kv, id)?.ok_or_else(|| ApiError::not_found(format!("job {id}")))?;
                if !["refresh", "cleanup", vpp_licensing::ledger::JOB_KIND]
                    .contains(&j.kind.as_str())
                {
                    // The request is fine; the job's kind is what does not allow it here.
                    return Err(ApiError::new(
                        vpp_licensing::ErrorCode::Conflict,
                        format!("{} jobs continue through POST /api/daily", j.kind),
                    ));
                }
                let ran = run(kv, id).await?;
                Ok(ApiResponse::json(
                    if ran.job.is_running() { 202 } else { 200 },
                    &ran.job,
                ))
            }
            _ => Err(ApiError::method_not_allowed(m, &req.path, &["POST"])),
        },
        _ => Err(ApiError::no_route(m, &req.path)),
    }
}

fn admin(req: &ApiRequest, what: &str) -> Result<(), ApiError> {
    req.caller()?.require_admin(what)
}

fn view(kv: &SpinKv, id: &str) -> Result<ApiResponse, ApiError> {
    let a = account::load(kv, id)?;
    Ok(ApiResponse::ok(&account::view(
        kv,
        &a,
        &policy_names(kv),
        Utc::now(),
    )?))
}

/// The names of the app policies that use an account.
fn policy_names(kv: &SpinKv) -> impl Fn(&str) -> Result<Vec<String>, ApiError> + '_ {
    move |account_id| vpp_licensing::policy::names_using_account(kv, account_id)
}

fn instance_id(kv: &SpinKv) -> Result<String, ApiError> {
    let candidate = random_id().map_err(ApiError::internal)?;
    Ok(instance::ensure(kv, &candidate, Utc::now())?.id)
}

fn identity(kv: &SpinKv) -> Result<Identity, ApiError> {
    let candidate = random_id().map_err(ApiError::internal)?;
    Ok(Identity {
        instance: instance::ensure(kv, &candidate, Utc::now())?,
        name: vars::optional("instance_name").unwrap_or_else(|| "vpp-spin".into()),
        public_url: vars::public_url(),
        notify: vars::notifications_enabled(),
    })
}

async fn add(kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    admin(req, "add accounts")?;
    let started = Utc::now();
    let input: AddAccount = req.json()?;
    // Check the token before anything (even this instance's identity) is written.
    account::validate_add(&input, started)?;
    // The first refresh's slice counts from the start of this request.
    let mut budget = vars::job_budget(started)?;
    let id = random_id().map_err(ApiError::internal)?;
    let secret = random_id().map_err(ApiError::internal)?;
    let a = account::add(
        kv,
        &SpinGateway,
        input,
        &identity(kv)?,
        &id,
        &secret,
        Utc::now(),
    )
    .await?;
    // The first full refresh starts now, as a job: a first slice runs within what is left of
    // this request's budget; the job continues through POST /api/jobs/{id}/resume or the daily
    // run. The account is added whatever becomes of it.
    let caller = req.caller()?.name.clone();
    let refresh = match new_job(kv, &a, "refresh", true, &caller) {
        Ok(j) => {
            let our = instance_id(kv)?;
            match runner::run(kv, &SpinGateway, &j.id, &our, &mut budget, Utc::now()).await {
                Ok(ran) => Some(ran.job),
                Err(e) => {
                    eprintln!("first refresh of account {id}: {}", e.message);
                    job::load(kv, &j.id)?.or(Some(j))
                }
            }
        }
        Err(e) => {
            eprintln!("first refresh of account {id} not started: {}", e.message);
            None
        }
    };
    let a = account::load(kv, &id)?;
    let mut v = serde_json::to_value(account::view(kv, &a, &policy_names(kv), Utc::now())?)
        .map_err(ApiError::internal)?;
    let link = refresh.as_ref().map(|j| {
        let url = req.url_for(&format!("/api/jobs/{}", j.id));
        v["refreshJob"] = account::refresh_job_link(j, &url);
        format!("<{url}>; rel=\"refresh-job\"")
    });
    let mut resp = ApiResponse::json(201, &v)
        .with_header("location", &req.url_for(&format!("/api/accounts/{id}")));
    if let Some(link) = link {
        resp = resp.with_header("link", &link);
    }
    Ok(resp)
}

/// Start a refresh or clean-up (or join the one already running: one job per account and kind,
/// even when two requests come at once), do a first slice now, and answer 202 with the job.
async fn start_job(
    kv: &SpinKv,
    req: &ApiRequest,
    id: &str,
    kind: &str,
    full: bool,
) -> Result<ApiResponse, ApiError> {
    let account = account::load(kv, id)?;
    let caller = req.caller()?.name.clone();
    let job = match job::running(kv, kind, Some(id))? {
        Some(j) => j,
        None => {
            if kind == "cleanup" {
                cleanup::check_allowed(kv, id)?;
            }
            new_job(kv, &account, kind, full, &caller)?
        }
    };
    let ran = run(kv, &job.id).await?;
    Ok(ApiResponse::json(202, &ran.job)
        .with_header("location", &req.url_for(&format!("/api/jobs/{}", job.id))))
}

/// Create a refresh or clean-up job of `account` unless one is running (then that one).
fn new_job(
    kv: &SpinKv,
    account: &vpp_licensing::model::Account,
    kind: &str,
    full: bool,
    caller: &str,
) -> Result<Job, ApiError> {
    let checkpoint = match kind {
        "refresh" => serde_json::to_value(refresh::initial_state(kv, account, full, Utc::now())?),
        _ => serde_json::to_value(cleanup::initial_state(kv, &account.id)?),
    }
    .map_err(ApiError::internal)?;
    let mut j = Job::new(
        &random_id().map_err(ApiError::internal)?,
        kind,
        Some(&account.id),
        caller,
        Utc::now(),
    );
    j.checkpoint = checkpoint;
    Ok(job::start(kv, &j)?.into_job())
}

async fn run(kv: &SpinKv, job_id: &str) -> Result<runner::Ran, ApiError> {
    let our = instance_id(kv)?;
    let now = Utc::now();
    let mut budget = vars::job_budget(now)?;
    runner::run(kv, &SpinGateway, job_id, &our, &mut budget, now).await
}
