//! Human sizes: `512MiB`, `2GiB`, `1.5GiB`, `536870912` (bytes) in, `512 MiB` out.

/// Why a size was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a size: give bytes or a number with B, KiB, MiB, GiB or TiB (e.g. 512MiB)")]
pub struct BadSize(pub String);

const UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// Parses `text` into bytes. Units are binary (`MiB` is 2^20); the short forms `K`, `M`,
/// `G`, `T` (and `KB`...) are read as binary too, as memory sizes are. A fraction must
/// come out at a whole number of bytes.
pub fn parse(text: &str) -> Result<u64, BadSize> {
    let bad = || BadSize(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1u64 << 40,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut bytes = whole.checked_mul(factor).ok_or_else(bad)?;
    if !fraction.is_empty() {
        // fraction / 10^digits of `factor`, which must be whole.
        let digits = u32::try_from(fraction.len()).map_err(|_| bad())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(bad)?;
        let f: u128 = fraction.parse().map_err(|_| bad())?;
        let part = f * u128::from(factor);
        if !part.is_multiple_of(scale) {
            return Err(bad());
        }
        let part = u64::try_from(part / scale).map_err(|_| bad())?;
        bytes = bytes.checked_add(part).ok_or_else(bad)?;
    }
    Ok(bytes)
}

/// `bytes` in the largest binary unit that shows it exactly (`512 MiB`, `1.5 GiB` is
/// shown as `1536 MiB`), or in bytes.
pub fn format(bytes: u64) -> String {
    for (unit, factor) in UNITS {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{} {unit}", bytes / factor);
        }
    }
    format!("{bytes} B")
}

/// `bytes` for a person when it need not be exact (a guest's meminfo): `512 MiB` when it
/// is a whole number of a unit, else one decimal of the largest unit it reaches
/// (`21.8 GiB`).
pub fn approx(bytes: u64) -> String {
    let exact = format(bytes);
    if !exact.ends_with(" KiB") && !exact.ends_with(" B") || bytes < 1 << 20 {
        return exact;
    }
    match UNITS.iter().find(|(_, factor)| bytes >= *factor) {
        Some((unit, factor)) => format!("{:.1} {unit}", bytes as f64 / *factor as f64),
        None => exact,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximate_sizes_keep_whole_units_and_round_the_rest() {
        assert_eq!(approx(512 << 20), "512 MiB");
        assert_eq!(approx(23_434_727_424), "21.8 GiB");
        assert_eq!(approx(1_278_173_184), "1.2 GiB");
        assert_eq!(approx(90_112), "88 KiB");
        assert_eq!(approx(0), "0 B");
    }

    #[test]
    fn sizes_in_every_unit_and_fractions_that_are_whole() {
        assert_eq!(parse("536870912"), Ok(512 << 20));
        assert_eq!(parse("512MiB"), Ok(512 << 20));
        assert_eq!(parse("512 mib"), Ok(512 << 20));
        assert_eq!(parse("2GiB"), Ok(2 << 30));
        assert_eq!(parse("2G"), Ok(2 << 30));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse("0.5K"), Ok(512));
        assert_eq!(parse("1TiB"), Ok(1 << 40));
        assert_eq!(parse("4096B"), Ok(4096));
    }

    #[test]
    fn garbage_is_refused_with_the_text() {
        for bad in [
            "",
            "MiB",
            "12 parsecs",
            "-1",
            "1.0000000001KiB",
            "1e9",
            "99999999999TiB",
            ".",
        ] {
            assert_eq!(parse(bad), Err(BadSize(bad.to_string())), "{bad}");
        }
    }

    #[test]
    fn formatted_in_the_largest_exact_unit() {
        assert_eq!(format(512 << 20), "512 MiB");
        assert_eq!(format(3 << 29), "1536 MiB");
        assert_eq!(format(2 << 30), "2 GiB");
        assert_eq!(format(1000), "1000 B");
        assert_eq!(format(0), "0 B");
    }
}
