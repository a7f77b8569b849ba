//! Quantities as people read them in the CLI's output and the monitor's pages.

/// A size in bytes: `512 B`, `1.5 KiB`, `3.0 GiB`.
#[allow(clippy::cast_precision_loss)] // a display rounded to one decimal
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(super::bytes(0), "0 B");
        assert_eq!(super::bytes(1023), "1023 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(26_650_200), "25.4 MiB");
        assert_eq!(super::bytes(3 << 30), "3.0 GiB");
    }
}
