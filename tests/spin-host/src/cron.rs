//! Cron schedules as trigger-cron 0.4.x parses them: croner with seconds required and
//! day-of-month AND day-of-week (`with_dom_and_dow`), evaluated in UTC. So exactly 6 fields.

use anyhow::Context;
use chrono::{DateTime, Utc};

/// A parsed 6-field cron expression.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: croner::Cron,
}

impl Schedule {
    pub fn parse(expression: &str) -> anyhow::Result<Self> {
        let cron = croner::Cron::new(expression)
            .with_seconds_required()
            .with_dom_and_dow()
            .parse()
            .with_context(|| format!("invalid cron expression {expression:?}"))?;
        Ok(Self { cron })
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn six_fields_only() {
        assert!(Schedule::parse("0 0 3 * * *").is_ok());
        assert!(Schedule::parse("*/5 * * * * *").is_ok());
        assert!(Schedule::parse("0 3 * * *").is_err());
        assert!(Schedule::parse("0 0 3 * * * 2030").is_err());
        assert!(Schedule::parse("nonsense").is_err());
    }

    #[test]
    fn next_fire_time_is_utc() {
        let s = Schedule::parse("0 30 3 * * *").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 4, 0, 0).unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 30, 0).unwrap()
        );
    }
}
