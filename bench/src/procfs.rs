//! What the harness reads about processes and the machine from /proc.

/// Linux reports CPU times in clock ticks of 1/100 s (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;

/// User + system CPU seconds and resident set size of one process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// utime + stime, in seconds.
    pub cpu_s: f64,
    /// VmRSS, in KiB.
    pub rss_kib: f64,
}

/// The usage of process `pid`, or None when it is gone or /proc cannot be parsed.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Usage {
        cpu_s: cpu_seconds(&stat)?,
        rss_kib: rss_kib(&status)?,
    })
}

/// utime + stime from the text of /proc/PID/stat, in seconds.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the parenthesised command name (which may hold spaces); utime and stime
    // are the 12th and 13th of them.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// VmRSS from the text of /proc/PID/status, in KiB.
fn rss_kib(status: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The one-minute load average, so every result says how busy the machine was.
pub fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 1 0";
        assert_eq!(cpu_seconds(stat), Some(4.0));
    }

    #[test]
    fn parses_rss() {
        assert_eq!(rss_kib("Name:\tx\nVmRSS:\t  1234 kB\n"), Some(1234.0));
        assert_eq!(rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn reads_own_usage() {
        assert!(usage(std::process::id()).is_some_and(|u| u.rss_kib > 0.0));
    }
}
