//! tessera-units: byte sizes as people write and read them.
//!
//! One spelling of sizes for every Tessera tool (`tessera`, `tessera-store`), so a size
//! that works on one command line works on all of them. Pure functions, no I/O.
//!
//! # What [`parse_size`] accepts
//!
//! A whole number of bytes, optionally followed (with or without spaces in between) by a
//! unit. Units are case-insensitive and **always binary** (powers of 1024):
//!
//! | unit | also written | bytes |
//! |---|---|---|
//! | none | `B` | 1 |
//! | `K` | `KB`, `Ki`, `KiB` | 2^10 |
//! | `M` | `MB`, `Mi`, `MiB` | 2^20 |
//! | `G` | `GB`, `Gi`, `GiB` | 2^30 |
//! | `T` | `TB`, `Ti`, `TiB` | 2^40 |
//!
//! So `512`, `4096B`, `64K`, `64KiB`, `1m`, `1MiB`, `1G`, `1gib`, `1T`, `1TiB` all parse.
//! `GB` means the same as `GiB`: disks and memory are sized in powers of two here, and our
//! tools accepted `10GB` as 10 GiB before this crate existed, so it keeps that meaning
//! rather than silently shrinking a disk by 7 %. Fractions (`1.5G`), signs, and other
//! units are refused with a message that says what would work.
//!
//! # What [`format_size`] writes
//!
//! Bytes below 1 KiB as `512 B`; above, one decimal and the largest binary unit that keeps
//! the number below 1024: `1.0 GiB`, `1.5 KiB`, `64.0 TiB`.

#![forbid(unsafe_code)]

/// Why a size was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// It does not start with a whole number.
    #[error("{0:?} is not a size (try 10G, 512M, 1T or a number of bytes)")]
    NotANumber(String),
    /// The unit after the number is not one we know.
    #[error("{input:?}: unknown unit {unit:?} (use B, K, M, G or T; units are powers of 1024)")]
    UnknownUnit {
        /// What was given.
        input: String,
        /// The part after the number.
        unit: String,
    },
    /// It does not fit in 64 bits of bytes.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a size as people write it (see the crate documentation for the spellings).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::NotANumber(s.to_string()));
    }
    let shift = unit_shift(unit.trim_start()).ok_or_else(|| {
        // "1.5G" and "1,5G" are numbers the user meant; say so rather than blame the unit.
        if unit.starts_with(['.', ',']) {
            SizeError::NotANumber(s.to_string())
        } else {
            SizeError::UnknownUnit {
                input: s.to_string(),
                unit: unit.trim().to_string(),
            }
        }
    })?;
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::TooLarge(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

/// The power of two a unit stands for, or `None` if it is not a unit.
fn unit_shift(unit: &str) -> Option<u32> {
    let u = unit.to_ascii_uppercase();
    if u.is_empty() || u == "B" {
        return Some(0);
    }
    let mut chars = u.chars();
    let shift = match chars.next()? {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    };
    match chars.as_str() {
        "" | "B" | "I" | "IB" => Some(shift),
        _ => None,
    }
}

/// Binary units for [`format_size`], each 1024 times the one before.
const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Formats a number of bytes for people: `512 B`, `1.5 KiB`, `1.0 GiB`.
pub fn format_size(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    // Stop where the number, rounded to one decimal as printed, stays below 1024, so
    // 1 MiB - 1 reads `1.0 MiB` and not `1024.0 KiB`.
    while u < UNITS.len() - 1 && (v * 10.0).round() / 10.0 >= 1024.0 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documented_spellings_parse() {
        let cases: &[(&str, u64)] = &[
            ("512", 512),
            ("0", 0),
            ("4096B", 4096),
            ("4096b", 4096),
            ("64K", 64 << 10),
            ("64KB", 64 << 10),
            ("64Ki", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("1M", 1 << 20),
            ("1m", 1 << 20),
            ("1MiB", 1 << 20),
            ("512MiB", 512 << 20),
            ("1G", 1 << 30),
            ("10G", 10 << 30),
            ("10GB", 10 << 30),
            ("1GiB", 1 << 30),
            ("1gib", 1 << 30),
            ("1T", 1 << 40),
            ("1t", 1 << 40),
            ("1TiB", 1 << 40),
            ("  20 G ", 20 << 30),
            ("16384T", 1 << 54),
        ];
        for &(s, n) in cases {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
    }

    #[test]
    fn what_is_refused_says_why() {
        for s in ["", "ten", "G", "-1", "+5", " ", "0x10"] {
            assert!(
                matches!(
                    parse_size(s),
                    Err(SizeError::NotANumber(_)) | Err(SizeError::UnknownUnit { .. })
                ),
                "{s:?}: {:?}",
                parse_size(s)
            );
        }
        assert_eq!(
            parse_size("1.5G"),
            Err(SizeError::NotANumber("1.5G".into()))
        );
        for s in ["5X", "5P", "5KBB", "5iB", "5GBi", "5 G B", "1kilo"] {
            assert!(
                matches!(parse_size(s), Err(SizeError::UnknownUnit { .. })),
                "{s:?}: {:?}",
                parse_size(s)
            );
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        let msg = parse_size("5X").unwrap_err().to_string();
        assert!(msg.contains("\"X\"") && msg.contains("1024"), "{msg}");
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(64 << 40), "64.0 TiB");
        assert_eq!(format_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    proptest! {
        #[test]
        fn bytes_parse_as_themselves(n: u64) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }

        #[test]
        fn every_unit_spelling_means_the_same(
            n in 0u64..1 << 20,
            unit in 0usize..5,
            form in 0usize..4,
            lower: bool,
            space: bool,
        ) {
            let letter = ["", "K", "M", "G", "T"][unit];
            let suffix = if letter.is_empty() {
                ["", "B", "", "B"][form].to_string()
            } else {
                format!("{letter}{}", ["", "B", "i", "iB"][form])
            };
            let suffix = if lower { suffix.to_lowercase() } else { suffix };
            let s = format!("{n}{}{suffix}", if space { " " } else { "" });
            prop_assert_eq!(parse_size(&s), Ok(n << (10 * unit)));
        }

        #[test]
        fn overflow_is_refused_not_wrapped(n in 1u64 << 24.., unit in 4usize..5) {
            let s = format!("{n}{}", ["", "K", "M", "G", "T"][unit]);
            prop_assert!(matches!(parse_size(&s), Err(SizeError::TooLarge(_))));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,12}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn formatted_sizes_are_close_and_below_1024(n in 1024u64..) {
            let text = format_size(n);
            let (num, unit) = text.split_once(' ').unwrap();
            let v: f64 = num.parse().unwrap();
            let i = UNITS.iter().position(|u| *u == unit).unwrap();
            prop_assert!((1.0..1024.0).contains(&v), "{}", text);
            let back = v * 1024f64.powi(i as i32);
            // One decimal of the printed unit: at most 0.05 off out of at least 1.0.
            prop_assert!((back - n as f64).abs() <= n as f64 * 0.051, "{} -> {}", n, text);
        }
    }
}
