//! Support for the `commands` benchmark: reading criterion's estimates back
//! to print one vtpm-core / libtpms ratio table at the end of a run.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where criterion keeps its results: `$CARGO_TARGET_DIR/criterion`, or the
/// workspace's `target/criterion`.
pub fn criterion_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("criterion");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/criterion")
}

/// The mean time in nanoseconds criterion estimated for `group/function`
/// (`new/estimates.json`), if it was written at or after `since`: a result
/// left by an earlier run is not this run's.
pub fn mean_ns(group: &str, function: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir().join(group).join(function).join("new/estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    // {"mean":{"confidence_interval":{...},"point_estimate":123.4,...},...}
    let mean = &text[text.find("\"mean\"")?..];
    let at = mean.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let rest = &mean[at..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim().parse().ok()
}

/// Formats nanoseconds for the table.
pub fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(512.0), "512 ns");
        assert_eq!(human(1500.0), "1.50 µs");
        assert_eq!(human(2_500_000.0), "2.50 ms");
    }

    #[test]
    fn reads_criterion_estimates() {
        let dir = std::env::temp_dir().join(format!("vtpm-bench-est-{}", std::process::id()));
        let at = dir.join("criterion/g/f/new");
        std::fs::create_dir_all(&at).unwrap();
        std::fs::write(
            at.join("estimates.json"),
            r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},"point_estimate":2.5,"standard_error":0.1},"median":{"point_estimate":9.0}}"#,
        )
        .unwrap();
        // This test alone reads CARGO_TARGET_DIR in this process.
        std::env::set_var("CARGO_TARGET_DIR", &dir);
        assert_eq!(mean_ns("g", "f", SystemTime::UNIX_EPOCH), Some(2.5));
        assert_eq!(mean_ns("g", "missing", SystemTime::UNIX_EPOCH), None);
        let later = SystemTime::now() + std::time::Duration::from_secs(60);
        assert_eq!(mean_ns("g", "f", later), None, "an older result is not reported");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
