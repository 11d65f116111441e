//! Retention policies: which snapshots `forget` keeps.
//!
//! As restic and kopia users expect: `keep_last` keeps the newest N; `keep_hourly`,
//! `keep_daily`, `keep_weekly` and `keep_monthly` keep the newest snapshot of each of the
//! N most recent hours, days, weeks (Monday to Sunday, UTC) and months that have one. A
//! snapshot any rule keeps is kept. Policies apply per tag.

use std::collections::HashSet;

/// How many snapshots of each kind to keep. All zero keeps nothing, so callers must
/// refuse an empty policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// Days since 1970-01-01 of an RFC 3339 date prefix (`YYYY-MM-DD`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn week_of(time: &str) -> Option<i64> {
    let y = time.get(0..4)?.parse().ok()?;
    let m = time.get(5..7)?.parse().ok()?;
    let d = time.get(8..10)?.parse().ok()?;
    // 1970-01-01 was a Thursday: shift so weeks start on Monday.
    Some((days_from_civil(y, m, d) + 3).div_euclid(7))
}

/// Given snapshot times (RFC 3339, UTC), returns the indexes to keep.
pub fn keep(times: &[&str], policy: &Policy) -> HashSet<usize> {
    let mut order: Vec<usize> = (0..times.len()).collect();
    // Newest first; RFC 3339 UTC strings of one format sort chronologically.
    order.sort_by(|a, b| times[*b].cmp(times[*a]).then(b.cmp(a)));
    let mut kept = HashSet::new();
    for &i in order.iter().take(policy.keep_last as usize) {
        kept.insert(i);
    }
    let bucketed = |n: u32, bucket: &dyn Fn(&str) -> Option<String>, kept: &mut HashSet<usize>| {
        let mut seen = Vec::new();
        for &i in &order {
            if seen.len() >= n as usize {
                break;
            }
            let Some(b) = bucket(times[i]) else { continue };
            if !seen.contains(&b) {
                seen.push(b);
                kept.insert(i);
            }
        }
    };
    bucketed(
        policy.keep_hourly,
        &|t| t.get(0..13).map(String::from),
        &mut kept,
    );
    bucketed(
        policy.keep_daily,
        &|t| t.get(0..10).map(String::from),
        &mut kept,
    );
    bucketed(
        policy.keep_weekly,
        &|t| week_of(t).map(|w| w.to_string()),
        &mut kept,
    );
    bucketed(
        policy.keep_monthly,
        &|t| t.get(0..7).map(String::from),
        &mut kept,
    );
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMES: &[&str] = &[
        "2026-01-01T10:00:00Z", // 0 Thu
        "2026-01-01T11:00:00Z", // 1
        "2026-01-01T11:30:00Z", // 2
        "2026-01-02T09:00:00Z", // 3 Fri
        "2026-01-05T09:00:00Z", // 4 Mon (next week)
        "2026-02-01T09:00:00Z", // 5
        "2026-02-01T09:10:00Z", // 6
    ];

    fn k(p: Policy) -> Vec<usize> {
        let mut v: Vec<usize> = keep(TIMES, &p).into_iter().collect();
        v.sort();
        v
    }

    #[test]
    fn last() {
        assert_eq!(
            k(Policy {
                keep_last: 2,
                ..Default::default()
            }),
            vec![5, 6]
        );
        assert_eq!(
            k(Policy {
                keep_last: 100,
                ..Default::default()
            })
            .len(),
            7
        );
        assert!(k(Policy::default()).is_empty());
    }

    #[test]
    fn buckets() {
        assert_eq!(
            k(Policy {
                keep_daily: 3,
                ..Default::default()
            }),
            vec![3, 4, 6]
        );
        assert_eq!(
            k(Policy {
                keep_hourly: 3,
                ..Default::default()
            }),
            vec![3, 4, 6]
        );
        assert_eq!(
            k(Policy {
                keep_monthly: 5,
                ..Default::default()
            }),
            vec![4, 6]
        );
        // Weeks: 2026-01-01/02 share a week, 01-05 starts the next, 02-01 is a Sunday.
        assert_eq!(
            k(Policy {
                keep_weekly: 10,
                ..Default::default()
            }),
            vec![3, 4, 6]
        );
        assert_eq!(
            k(Policy {
                keep_last: 1,
                keep_monthly: 2,
                ..Default::default()
            }),
            vec![4, 6]
        );
    }

    #[test]
    fn weeks_start_on_monday() {
        assert_eq!(week_of("2026-01-04"), week_of("2025-12-29")); // Sun, Mon of one week
        assert_ne!(week_of("2026-01-04"), week_of("2026-01-05"));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }
}
