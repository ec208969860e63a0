//! An account's status, derived on every read from the account record, what the apple
//! component last saw, and whether a job is running — never stored, so never stale.

use crate::apple_state::{AppleState, Owner};
use crate::model::Account;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Days before expiry when an account starts warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Stable machine code, e.g. `token_rejected`.
    pub code: &'static str,
    /// For the icon.
    pub severity: Severity,
    /// One line a person can read on hover.
    pub description: String,
}

fn status(code: &'static str, severity: Severity, description: String) -> Status {
    Status {
        code,
        severity,
        description,
    }
}

/// Derive the status. The first matching rule wins, most serious first.
pub fn derive(account: &Account, apple: &AppleState, syncing: bool, now: DateTime<Utc>) -> Status {
    if account.token_expires_at <= now {
        return status(
            "expired",
            Severity::Error,
            format!(
                "The server token expired on {}. Download a new token from Apple Business Manager or Apple School Manager and replace it.",
                account.token_expires_at.format("%Y-%m-%d")
            ),
        );
    }
    if let Some(err) = &apple.last_error {
        let which = match err.code.as_str() {
            "apple_token_expired" => Some("expired"),
            "apple_token_revoked" => Some("revoked"),
            "apple_token_invalid" => Some("invalid"),
            _ => None,
        };
        if let Some(which) = which {
            return status(
                "token_rejected",
                Severity::Error,
                format!(
                    "Apple rejected the server token as {which} ({}). Replace the token.",
                    err.message
                ),
            );
        }
    }
    if let Owner::Foreign { id, name } = &apple.owner {
        let who = if name.is_empty() {
            id.as_str()
        } else {
            name.as_str()
        };
        return status(
            "owned_by_another_mdm",
            Severity::Error,
            format!("Another MDM ({who}) manages this location. Reclaim ownership to manage its licenses here."),
        );
    }
    if syncing {
        return status(
            "syncing",
            Severity::Info,
            "Synchronizing with Apple now.".into(),
        );
    }
    if let Some(wait) = apple.backing_off(now) {
        return status(
            "apple_rate_limited",
            Severity::Warning,
            format!("Apple asked to slow down; calls resume in {wait} s."),
        );
    }
    if let Some(err) = &apple.last_error {
        if matches!(err.code.as_str(), "apple_unavailable" | "apple_transport") {
            return status(
                "apple_unreachable",
                Severity::Warning,
                format!(
                    "Apple could not be reached at {}: {}",
                    err.at.format("%Y-%m-%d %H:%M UTC"),
                    err.message
                ),
            );
        }
        if err.code == "apple_rate_limited" {
            return status(
                "apple_rate_limited",
                Severity::Warning,
                format!("Apple is rate limiting this token: {}", err.message),
            );
        }
    }
    if let Some(last) = &account.last_sync {
        if !last.ok {
            let reason = last
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "unknown reason".into());
            return status(
                "sync_failed",
                Severity::Error,
                format!(
                    "The last synchronization at {} failed: {reason}",
                    last.at.format("%Y-%m-%d %H:%M UTC")
                ),
            );
        }
    }
    if account.last_synchronized.is_none() {
        return status(
            "never_synced",
            Severity::Info,
            "Not synchronized with Apple yet.".into(),
        );
    }
    let days_left = (account.token_expires_at - now).num_days();
    if days_left <= EXPIRY_WARNING_DAYS {
        return status(
            "expiring_soon",
            Severity::Warning,
            format!(
                "The server token expires in {days_left} days, on {}. Renew it in Apple Business Manager or Apple School Manager.",
                account.token_expires_at.format("%Y-%m-%d")
            ),
        );
    }
    status("healthy", Severity::Ok, "In sync with Apple.".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apple_state::AppleFailure;
    use crate::model::{Failure, Lifecycle, SyncOutcome};
    use chrono::Duration;

    fn account(now: DateTime<Utc>) -> Account {
        Account {
            id: "a".into(),
            name: "Main".into(),
            organization: "Org".into(),
            location: Some("HQ".into()),
            location_id: Some("1".into()),
            country: None,
            default_platform: None,
            website_url: None,
            token_expires_at: now + Duration::days(200),
            created_at: now,
            updated_at: now,
            last_synchronized: Some(now),
            last_full_refresh: Some(now),
            last_sync: Some(SyncOutcome {
                at: now,
                ok: true,
                full: true,
                error: None,
            }),
            notification_secret_sha256: None,
            next_notification_secret_sha256: None,
            assignments_version: None,
            users_version: None,
            claimed_at: Some(now),
            lifecycle: Lifecycle::Active,
        }
    }

    fn failure(code: &str, now: DateTime<Utc>) -> AppleFailure {
        AppleFailure {
            code: code.into(),
            message: "m".into(),
            number: None,
            at: now,
        }
    }

    #[test]
    fn every_status() {
        let now = Utc::now();
        let ok = AppleState {
            owner: Owner::Ours,
            ..Default::default()
        };
        let a = account(now);
        assert_eq!(derive(&a, &ok, false, now).code, "healthy");
        assert_eq!(derive(&a, &ok, true, now).code, "syncing");

        let mut never = a.clone();
        never.last_synchronized = None;
        never.last_sync = None;
        assert_eq!(derive(&never, &ok, false, now).code, "never_synced");

        let mut soon = a.clone();
        soon.token_expires_at = now + Duration::days(30);
        let s = derive(&soon, &ok, false, now);
        assert_eq!((s.code, s.severity), ("expiring_soon", Severity::Warning));

        let mut expired = a.clone();
        expired.token_expires_at = now - Duration::days(1);
        assert_eq!(derive(&expired, &ok, false, now).code, "expired");

        for (code, word) in [
            ("apple_token_expired", "expired"),
            ("apple_token_revoked", "revoked"),
            ("apple_token_invalid", "invalid"),
        ] {
            let st = AppleState {
                last_error: Some(failure(code, now)),
                ..ok.clone()
            };
            let s = derive(&a, &st, false, now);
            assert_eq!(s.code, "token_rejected");
            assert!(s.description.contains(word), "{}", s.description);
        }

        let foreign = AppleState {
            owner: Owner::Foreign {
                id: "x".into(),
                name: "Other MDM".into(),
            },
            ..ok.clone()
        };
        let s = derive(&a, &foreign, false, now);
        assert_eq!(s.code, "owned_by_another_mdm");
        assert!(s.description.contains("Other MDM"));

        let limited = AppleState {
            backoff_until: Some(now + Duration::seconds(60)),
            ..ok.clone()
        };
        assert_eq!(derive(&a, &limited, false, now).code, "apple_rate_limited");

        let down = AppleState {
            last_error: Some(failure("apple_unavailable", now)),
            ..ok.clone()
        };
        assert_eq!(derive(&a, &down, false, now).code, "apple_unreachable");

        let mut failed = a.clone();
        failed.last_sync = Some(SyncOutcome {
            at: now,
            ok: false,
            full: true,
            error: Some(Failure {
                code: "x".into(),
                message: "disk on fire".into(),
            }),
        });
        let s = derive(&failed, &ok, false, now);
        assert_eq!(s.code, "sync_failed");
        assert!(s.description.contains("disk on fire"));
    }
}
