//! Summaries shared by the scenarios, the report and the plots.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// min / median / max of one figure over runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Spread {
    /// Lowest value over the runs.
    pub min: f64,
    /// Middle value (the upper middle for an even count): what tables and plots show.
    pub median: f64,
    /// Highest value over the runs.
    pub max: f64,
    /// How many runs the figure was taken in, so a reader can tell one run from three.
    pub runs: usize,
}

/// Summarises the values of one figure over runs.
pub fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    Spread {
        min: at(0),
        median: at(v.len() / 2),
        max: at(v.len().saturating_sub(1)),
        runs: v.len(),
    }
}

/// Percentile `p` (0..=1) of sorted latencies, in microseconds; NaN when there are none.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(i.min(sorted.len() - 1))
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_three() {
        let s = spread(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max, s.runs), (1.0, 2.0, 3.0, 3));
    }

    #[test]
    fn spread_of_none_is_nan() {
        assert!(spread(Vec::new()).median.is_nan());
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(pct(&v, 0.5), 51.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
