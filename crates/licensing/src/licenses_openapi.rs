//! The OpenAPI description of the licenses routes (and the managed-users routes served by the
//! accounts component). Merge [`paths`] into the document's `paths` and [`schemas`] into
//! `components.schemas`; [`crate::openapi::document`] adds the shared responses (401, 403, 400 and
//! 413 for bodies, 503, Apple's errors for operations marked `x-apple`).

use crate::openapi::{account_id_param, err, r};
use serde_json::{json, Value};

fn ok(schema: Value) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": r(name)}}})
}

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "schema": schema, "description": description})
}

fn path(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": schema, "description": description})
}

fn page(description: &str) -> Value {
    query(
        "page",
        json!({"type": "integer", "minimum": 0, "maximum": crate::openapi::MAX_QUERY_INT}),
        description,
    )
}

fn policy_id() -> Value {
    path(
        "id",
        json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}),
        "1 to 64 letters, digits, '.', '_' or '-'",
    )
}

fn event_links() -> Value {
    json!({"GetEvent": {"operationId": "getEvent", "parameters": {"id": "$response.body#/eventId"}}})
}

fn job_links(pointer: &str) -> Value {
    json!({"GetJob": {"operationId": "getJob", "parameters": {"id": pointer}}})
}

pub fn paths() -> Value {
    let submitted = |status: &str| {
        json!({"description": status, "content": {"application/json": {"schema": r("Submitted")}},
               "links": event_links()})
    };
    json!({
        "/api/licenses": {"get": {
            "operationId": "listLicenses",
            "summary": "One row per asset with counts and a low-license flag (reader key allowed)",
            "description": "Paged: a page holds at most `limit` rows (default 50) and reads a bounded part of the store whatever the number of assets; when more rows follow, `nextCursor` is set: send it back as `cursor` for the next page (a page may hold fewer rows than `limit`, even none, while `nextCursor` is set, when `search` or `low` filter rows out). A request without `cursor` returns the first page. The CSV export (`format=csv`) is not paged: it holds every row (`cursor` and `limit`, when given, are still checked).",
            "parameters": [
                query("accountId", json!({"type": "string"}), "only this account (404 when there is none)"),
                query("search", json!({"type": "string"}), "case-insensitive part of the name or adamId"),
                query("low", json!({"type": "string", "enum": ["true", "false"]}), "only assets at or below the low-license threshold"),
                query("format", json!({"type": "string", "enum": ["json", "csv"]}), "csv for a CSV export of every row (or send Accept: text/csv)"),
                query("cursor", json!({"type": "string", "pattern": "^$|^[0-9a-f]{32}~[0-9]{1,9}(\\.[0-9]{1,9}\\.[0-9]{1,9})?~"}), "where this page starts: the previous page's nextCursor (`<accountId>~<page>.<base>.<pages>~<last key>`; empty, as without it: the first page). A walk by cursor returns each asset at most once, and every asset the list held throughout the walk, whatever synchronizations happen meanwhile (one added or removed meanwhile may or may not be returned). A cursor whose account this list no longer holds (deleted, or another accountId), or whose account's licenses a full synchronization laid out anew since (after the account lost most of its assets), is 409: start again without a cursor"),
                query("limit", json!({"type": "integer", "minimum": 1, "maximum": 1000}), "rows per page, 1 to 1000 (default 50)"),
            ],
            "responses": {
                "200": {"description": "OK", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["licenses"], "properties": {
                        "licenses": {"type": "array", "items": r("LicenseRow")},
                        "nextCursor": {"type": ["string", "null"], "description": "send as cursor for the next page; null on the last page"}}}},
                    "text/csv": {"schema": {"type": "string"}}},
                    "links": {
                        "ListAssignments": {"operationId": "listAssignments", "parameters": {
                            "accountId": "$response.body#/licenses/0/accountId", "adamId": "$response.body#/licenses/0/adamId"}},
                        "Assign": {"operationId": "assign", "requestBody": {
                            "accountId": "$response.body#/licenses/0/accountId", "adamId": "$response.body#/licenses/0/adamId",
                            "pricingParam": "$response.body#/licenses/0/pricingParam", "clientUserIds": ["contract-user-1"]}},
                        "Revoke": {"operationId": "revoke", "requestBody": {
                            "accountId": "$response.body#/licenses/0/accountId", "adamId": "$response.body#/licenses/0/adamId",
                            "pricingParam": "$response.body#/licenses/0/pricingParam", "clientUserIds": ["contract-user-1"]}}}},
                "400": err(&["invalid_request"]), "404": err(&["not_found"]), "409": err(&["conflict"])}}},
        "/api/licenses/{accountId}/{adamId}/assignments": {"get": {
            "operationId": "listAssignments",
            "summary": "A page of an asset's assignments, each with who made it; page 0 also lists our ledger entries not yet settled (`pending`, with their state)",
            "parameters": [
                account_id_param("accountId"), path("adamId", r("AdamId"), "Apple's numeric product id"),
                query("pricingParam", r("PricingParam"), "STDQ (default) or PLUS"),
                page("0-based; follow nextPage; a page past the last is 404"),
            ],
            "responses": {"200": ok(r("AssignmentsPage")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/assignments": {"post": {
            "operationId": "assign", "x-apple": true,
            "summary": "Assign an asset to devices or users (ledger first; all fit or nothing is asked: the check and the reservation are one atomic step). 202 when anything went to Apple, is unknown (answer lost: verified later) or queued (sent by the linked ledger job)",
            "requestBody": body("AssignRequest"),
            "responses": {"202": submitted("Apple accepted; follow the event"), "200": submitted("nothing to ask Apple (every subject already held the license)"),
                "404": err(&["not_found"]),
                "409": err(&["no_licenses_available", "conflict"]), "422": err(&["unprocessable", "apple_rejected"]), "429": err(&["apple_rate_limited"]), "502": err(&["apple_unavailable"])}}},
        "/api/assignments/revoke": {"post": {
            "operationId": "revoke", "x-apple": true,
            "summary": "Take an asset from devices or users (Apple's disassociate; other assets stay). What is not sent, or whose answer is lost, stays revoking and is sent again by reconcile",
            "requestBody": body("AssignRequest"),
            "responses": {"202": submitted("Apple accepted; follow the event"), "200": submitted("nothing to ask Apple"),
                "404": err(&["not_found"]), "409": err(&["conflict"]), "422": err(&["unprocessable"])}}},
        "/api/events/{id}": {"get": {
            "operationId": "getEvent",
            "summary": "Apple's outcome of an event, per device or user. With the admin key a pending event is polled at Apple when due (>= 30 s apart); it is never sent again from here, and the reader key never reaches Apple. Records of ended events are kept for the account's last 500",
            "parameters": [path("id", json!({"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,128}$"}), "Apple's eventId")],
            "responses": {"200": ok(r("Event")), "404": err(&["not_found"])}}},
        "/api/policies": {"get": {"operationId": "listPolicies", "summary": "All app policies",
            "responses": {"200": {"description": "OK",
                "content": {"application/json": {"schema": {"type": "object", "required": ["policies"], "properties": {"policies": {"type": "array", "items": r("PolicySummary")}}}}},
                "links": {
                    "GetPolicy": {"operationId": "getPolicy", "parameters": {"id": "$response.body#/policies/0/id"}},
                    "DeletePolicy": {"operationId": "deletePolicy", "parameters": {"id": "$response.body#/policies/0/id"}}}}}}},
        "/api/policies/{id}": {
            "parameters": [policy_id()],
            "get": {"operationId": "getPolicy", "summary": "One app policy",
                "responses": {"200": ok(r("Policy")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}},
            "put": {"operationId": "putPolicy", "x-apple": true,
                "summary": "Create or replace a policy (the desired state); assigns what is missing as far as licenses allow. What is not sent within the request stays queued in the ledger and goes on in the linked ledger job (`job`). A policy names up to 200 assets and 20,000 devices or users and takes at most 450 KB stored (413 `payload_too_large` beyond); at most 1,000 policies (409)",
                "requestBody": body("PolicyRequest"),
                "responses": {"200": ok(r("PolicyResult")), "201": ok(r("PolicyResult")),
                    "404": err(&["not_found"]), "409": err(&["conflict"]), "422": err(&["unprocessable"])}},
            "delete": {"operationId": "deletePolicy", "summary": "Delete a policy (its licenses stay until reconcile)",
                "responses": {"204": {"description": "deleted"}, "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/reconcile": {"post": {
            "operationId": "reconcile", "x-apple": true,
            "summary": "Start (or continue) the reconcile job over all accounts; see GET /api/jobs/{id}. Each account is settled first (due events polled, entries a refresh saw at Apple confirmed, unknown outcomes looked up), then what no policy wants is taken back",
            "responses": {"202": {"description": "the job", "content": {"application/json": {"schema": r("Job")}},
                "headers": {"Location": {"description": "the job", "schema": {"type": "string"}}},
                "links": job_links("$response.body#/id")}}}},
        "/api/settings": {
            "get": {"operationId": "getSettings", "summary": "License settings", "responses": {"200": ok(r("Settings"))}},
            "put": {"operationId": "putSettings", "summary": "Change settings (fields left out keep their value)",
                "requestBody": body("SettingsRequest"),
                "responses": {"200": ok(r("Settings")), "422": err(&["unprocessable"])}}},
        "/api/notices": {"get": {
            "operationId": "listNotices",
            "summary": "License-removal notices, newest first, a page at a time",
            "parameters": [page("follow nextPage; a page that does not exist yet is 404")],
            "responses": {"200": ok(r("NoticePage")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/notices/deliver": {"post": {
            "operationId": "deliverNotices",
            "summary": "Deliver pending notices to the webhook now. Body sent: {notices:[Notice]}; header X-VPP-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>",
            "responses": {"200": ok(r("DeliveryReport"))}}},
        "/api/daily": {
            "get": {"operationId": "getDaily", "summary": "The current or last daily run and when the next one starts",
                "responses": {"200": ok(json!({"type": "object"}))}},
            "post": {"operationId": "runDaily", "x-apple": true,
                "summary": "One bounded slice of the daily work (refresh, event polling, reconcile, notices). Scheduler or admin key; force=true (admin) starts a run now.",
                "security": [{"scheduler": []}, {"bearer": []}],
                "parameters": [query("force", json!({"type": "string", "enum": ["true", "false", "1"]}), "start a run now (admin key only)")],
                "responses": {
                    "200": {"description": "idle, or the run finished (then with its job)", "content": {"application/json": {"schema": r("DailyTick")}}},
                    "202": {"description": "busy, or the run goes on (then with its job)", "content": {"application/json": {"schema": r("DailyTick")}}},
                    "400": err(&["invalid_request"])}}},
        "/api/apple/notifications/{accountId}": {"post": {
            "operationId": "appleNotification",
            "summary": "Apple's notifications. Authorization: Bearer <the account's notification token> (no API key). Deduplicated on notificationId.",
            "security": [{"appleNotification": []}],
            "parameters": [account_id_param("accountId")],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object",
                "required": ["notificationId", "notificationType", "notification"],
                "properties": {"notificationId": {"type": "string", "minLength": 1}, "notificationType": {"type": "string"}, "notification": {"type": "object"}}}}}},
            "responses": {"200": ok(json!({"type": "object"})), "404": err(&["not_found"])}}},
        "/api/accounts/{id}/users": {
            "parameters": [account_id_param("id")],
            "get": {"operationId": "listUsers", "summary": "Managed users, a page at a time (with invitation links)",
                "parameters": [query("page", json!({"type": "integer", "minimum": 0, "maximum": 63}), "follow nextPage")],
                "responses": {"200": ok(r("UserPage")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}},
            "post": {"operationId": "createUsers", "x-apple": true,
                "summary": "Register users with Apple: {clientUserId, email?, managedAppleId?} or {users:[...]}",
                "requestBody": body("UsersRequest"),
                "responses": {"202": ok(r("UsersCreated")), "404": err(&["not_found"])}}},
        "/api/accounts/{id}/users/{clientUserId}": {
            "parameters": [account_id_param("id"), path("clientUserId", json!({"type": "string", "pattern": "^[A-Za-z0-9._~@+-]{1,128}$"}), "the user's clientUserId (other characters are never found: 404)")],
            "get": {"operationId": "getUser", "summary": "One managed user with its invitation link (an admin's request re-reads a user still being created from Apple; a reader's stays local)", "x-apple": true,
                "responses": {"200": ok(r("User")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/accounts/{id}/users/{clientUserId}/retire": {
            "parameters": [account_id_param("id"), path("clientUserId", json!({"type": "string", "pattern": "^[A-Za-z0-9._~@+-]{1,128}$"}), "the user's clientUserId (other characters are never found: 404)")],
            "post": {"operationId": "retireUser", "summary": "Retire a user (Apple frees its licenses)", "x-apple": true,
                "responses": {"202": ok(json!({"type": "object"})), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
    })
}

pub fn schemas() -> Value {
    let s = |t: &str| json!({"type": t});
    let n = |t: &str| json!({"type": [t, "null"]});
    let date = json!({"type": "string", "format": "date-time"});
    let subject = json!({"type": "object", "properties": {"serialNumber": s("string"), "clientUserId": s("string")}});
    let subjects = |max: usize| json!({"type": "array", "maxItems": max, "items": r("SubjectId")});
    json!({
        "AdamId": {"type": "string", "pattern": "^[0-9]{1,32}$", "description": "Apple's numeric product id, e.g. \"408709785\""},
        "PricingParam": {"type": "string", "enum": ["STDQ", "PLUS"]},
        "SubjectId": {"type": "string", "pattern": "^[!-~]([ -~]{0,126}[!-~])?$",
            "description": "a serial number or clientUserId: 1 to 128 printable ASCII characters, no surrounding space"},
        "LicenseRow": {"type": "object", "required": ["accountId", "adamId", "pricingParam", "total", "available", "inUse", "pending", "lowLicenses"], "properties": {
            "accountId": s("string"), "accountName": s("string"), "adamId": s("string"), "pricingParam": s("string"),
            "name": n("string"), "iconUrl": n("string"), "productType": s("string"), "total": s("integer"), "available": s("integer"),
            "inUse": s("integer"), "retired": s("integer"), "pending": s("integer"), "unlimited": s("boolean"),
            "lowLicenses": s("boolean"), "deviceAssignable": s("boolean"), "revocable": s("boolean"),
            "syncedAt": {"type": ["string", "null"], "format": "date-time"}}},
        "AssignmentsPage": {"type": "object", "required": ["license", "page", "pages", "assignments"], "properties": {
            "license": {"allOf": [r("LicenseRow")], "description": "the asset's row of the licenses list (its counts, and `pending`: our ledger entries not yet settled), as of this read"},
            "accountId": s("string"), "adamId": s("string"), "pricingParam": s("string"), "inUse": s("integer"),
            "page": s("integer"), "pages": s("integer"), "nextPage": n("integer"),
            "assignments": {"type": "array", "items": {"type": "object", "required": ["madeBy"], "properties": {
                "serialNumber": s("string"), "clientUserId": s("string"),
                "madeBy": {"type": "string", "enum": ["thisInstance", "foreign"]}, "eventId": s("string"), "at": s("string")}}},
            "pending": {"type": "array", "description": "our ledger entries of this asset not yet settled (page 0 only)", "items": {"type": "object", "properties": {
                "serialNumber": s("string"), "clientUserId": s("string"),
                "madeBy": {"type": "string", "enum": ["thisInstance"]},
                "state": {"type": "string", "enum": ["queued", "unknown", "pending"]},
                "eventIds": {"type": "array", "items": s("string")}, "since": s("string")}}}}},
        "AssignRequest": {"type": "object", "required": ["accountId", "adamId"], "additionalProperties": false,
            "description": "Name at least one device or user; at most 10000 in all.",
            "anyOf": [{"required": ["serialNumbers"], "properties": {"serialNumbers": {"minItems": 1}}},
                      {"required": ["clientUserIds"], "properties": {"clientUserIds": {"minItems": 1}}}],
            "properties": {
                "accountId": {"type": "string", "minLength": 1}, "adamId": r("AdamId"), "pricingParam": r("PricingParam"),
                "serialNumbers": subjects(10_000), "clientUserIds": subjects(10_000)}},
        "Submitted": {"type": "object", "properties": {
            "eventId": n("string"), "events": {"type": "array", "items": r("Event")},
            "alreadyAssigned": {"type": "array", "items": subject}, "shortfall": {"type": "array", "items": subject},
            "rejected": {"type": "array", "items": subject},
            "unknown": {"type": "array", "items": subject, "description": "sent, answer lost: held as unknown until Apple's assignments show what happened"},
            "queued": {"type": "integer", "description": "admitted, not yet sent: the ledger job sends them"},
            "waiting": {"type": "array", "items": subject, "description": "revoke only: not sent, their assignment's answer was lost and Apple does not hold it yet; revoke again once the ledger settles it"},
            "job": r("JobLink"), "error": {}}},
        "JobLink": {"type": "object", "properties": {"id": s("string"), "kind": s("string"), "state": s("string"), "href": s("string")}},
        "Event": {"type": "object", "required": ["id", "state"], "properties": {
            "id": s("string"), "accountId": s("string"), "kind": {"type": "string", "enum": ["associate", "disassociate", "revoke"]},
            "source": s("string"), "state": {"type": "string", "enum": ["pending", "complete", "failed"]},
            "numRequested": n("integer"), "numCompleted": n("integer"),
            "resentAs": {"type": "string", "description": "still pending after 10 minutes, sent again as this event (both stay tracked)"},
            "results": {"type": "array", "items": {"type": "object", "properties": {
                "serialNumber": s("string"), "clientUserId": s("string"),
                "state": {"type": "string", "enum": ["pending", "succeeded", "failed"]},
                "error": {"type": ["object", "null"], "properties": {"appleErrorNumber": n("integer"), "message": s("string")}}}}}}},
        "PolicyAsset": {"type": "object", "required": ["adamId"], "properties": {"adamId": r("AdamId"), "pricingParam": r("PricingParam")}},
        "PolicyRequest": {"type": "object", "required": ["name", "accountId", "assets"], "additionalProperties": false,
            "description": "At most 20000 serial numbers and clientUserIds in all.",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"}, "accountId": {"type": "string", "minLength": 1},
                "assets": {"type": "array", "minItems": 1, "maxItems": 200, "items": r("PolicyAsset")},
                "serialNumbers": subjects(20_000), "clientUserIds": subjects(20_000)}},
        "PolicySummary": {"type": "object", "required": ["id", "name", "accountId"], "properties": {"id": s("string"), "name": s("string"), "accountId": s("string")}},
        "Policy": {"type": "object", "required": ["id", "name", "accountId", "assets"], "properties": {
            "id": s("string"), "name": s("string"), "accountId": s("string"),
            "assets": {"type": "array", "items": r("PolicyAsset")},
            "serialNumbers": {"type": "array", "items": s("string")}, "clientUserIds": {"type": "array", "items": s("string")},
            "createdAt": date, "updatedAt": date}},
        "PolicyResult": {"type": "object", "properties": {"policy": r("Policy"), "assignments": {"type": "array", "items": {"type": "object", "properties": {
            "adamId": s("string"), "wanted": s("integer"), "alreadyAssigned": s("integer"), "requested": s("integer"),
            "shortfall": s("integer"), "shortfallSubjects": {"type": "array", "items": subject}, "eventIds": {"type": "array", "items": s("string")}}}}}},
        "Settings": {"type": "object", "required": ["licenseRemovalNotification", "lowLicenseThreshold", "noticeWebhookUrl", "noticeWebhookSecretSet"], "properties": {
            "licenseRemovalNotification": s("boolean"), "lowLicenseThreshold": s("integer"),
            "noticeWebhookUrl": n("string"), "noticeWebhookSecretSet": s("boolean")}},
        "SettingsRequest": {"type": "object", "additionalProperties": false, "properties": {
            "licenseRemovalNotification": s("boolean"),
            "lowLicenseThreshold": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
            "noticeWebhookUrl": {"type": ["string", "null"], "maxLength": 2048,
                "pattern": "^\\s*([hH][tT][tT][pP][sS]?://[^\\s\\x00-\\x1f\\x7f-\\x9f/?#:][^\\s\\x00-\\x1f\\x7f-\\x9f]*)?\\s*$",
                "description": "https:// to a public host (not loopback, private, link-local, *.internal, *.local); http:// and private hosts only where the operator lists them in notice_webhook_http_hosts; null or blank removes it. A URL of this pattern the app will not call (such a host, an invalid port, credentials in it, http:// to a host not listed) is 422"},
            "noticeWebhookSecret": {"type": "string", "minLength": 16, "maxLength": 256, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}}},
        "Notice": {"type": "object", "required": ["id", "accountId", "adamId", "pricingParam", "reason", "at"], "properties": {
            "id": s("string"), "accountId": s("string"), "adamId": s("string"), "pricingParam": s("string"),
            "serialNumber": s("string"), "clientUserId": s("string"), "reason": s("string"), "at": date, "deliveredAt": date}},
        "NoticePage": {"type": "object", "required": ["notices", "undelivered"], "properties": {
            "notices": {"type": "array", "items": r("Notice")},
            "nextPage": s("integer"), "undelivered": s("integer"), "lastDeliveryError": s("string"), "nextDeliveryAt": date,
            "dropped": {"type": "integer", "description": "undelivered notices that left the kept pages (a ring) before delivery, in total"},
            "lastDrop": {"type": "object", "properties": {"at": date, "count": s("integer"), "reason": s("string")}}}},
        "DeliveryReport": {"type": "object"},
        "DailyTick": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["idle", "busy", "started", "running", "finished"]},
            "job": r("Job"), "nextRunAt": date, "message": s("string")}},
        "NewUser": {"type": "object", "required": ["clientUserId"], "additionalProperties": false, "properties": {
            "clientUserId": r("SubjectId"), "email": {"type": "string", "format": "email", "maxLength": 254}, "managedAppleId": s("string")}},
        "UsersRequest": {"oneOf": [
            {"type": "object", "required": ["users"], "additionalProperties": false, "properties": {
                "users": {"type": "array", "minItems": 1, "maxItems": 1000, "uniqueItems": true, "items": r("NewUser")}}},
            r("NewUser")]},
        "User": {"type": "object", "required": ["clientUserId"], "properties": {
            "clientUserId": s("string"), "email": n("string"), "status": s("string"), "invitationUrl": s("string")}},
        "UsersCreated": {"type": "object", "description": "users Apple accepted (Creating, with their eventId); when a later batch failed, also failed: [{clientUserId, outcome: rejected|unknown}] and error",
            "properties": {"eventIds": {"type": "array", "items": s("string")}, "users": {"type": "array", "items": {"type": "object"}},
                "failed": {"type": "array", "items": {"type": "object", "properties": {"clientUserId": s("string"), "outcome": {"type": "string", "enum": ["rejected", "unknown"]}}}},
                "error": {"type": "object", "properties": {"code": s("string"), "message": s("string"), "details": {}}}}},
        "UserPage": {"type": "object", "required": ["users"], "properties": {"users": {"type": "array", "items": r("User")}, "nextPage": n("integer")}},
    })
}
