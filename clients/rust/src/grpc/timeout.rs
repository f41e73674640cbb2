//! The `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n).

use std::time::Duration;

const MAX_DIGITS_VALUE: u128 = 99_999_999;

/// Encodes `timeout` in the finest unit whose value fits 8 digits, rounding up
/// so that a positive timeout never reads as zero.
pub fn encode(timeout: Duration) -> String {
    let nanos = timeout.as_nanos();
    // (nanoseconds per unit, unit letter), finest first.
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in UNITS {
        let value = (nanos + per - 1) / per;
        if value <= MAX_DIGITS_VALUE {
            return format!("{}{}", value, unit);
        }
    }
    format!("{}H", MAX_DIGITS_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_finest_unit_that_fits() {
        assert_eq!(encode(Duration::from_nanos(0)), "0n");
        assert_eq!(encode(Duration::from_nanos(999)), "999n");
        assert_eq!(encode(Duration::from_millis(1)), "1000000n");
        assert_eq!(encode(Duration::from_millis(99)), "99000000n");
        assert_eq!(encode(Duration::from_millis(100)), "100000u");
        assert_eq!(encode(Duration::from_secs(30)), "30000000u");
        assert_eq!(encode(Duration::from_secs(1000)), "1000000m");
        assert_eq!(encode(Duration::from_secs(100_000)), "100000S");
        assert_eq!(encode(Duration::from_secs(1_000_000_000)), "16666667M");
        assert_eq!(encode(Duration::from_secs(u64::MAX)), "99999999H");
    }

    #[test]
    fn rounds_up_never_down_to_zero() {
        // 100 ms + 1 ns does not fit in nanoseconds; microseconds round it up.
        assert_eq!(encode(Duration::from_nanos(100_000_001)), "100001u");
    }

    #[test]
    fn always_at_most_eight_digits() {
        for secs in [0u64, 1, 59, 3_600, 86_400, 10u64.pow(9), 10u64.pow(12)] {
            let s = encode(Duration::from_secs(secs));
            assert!(s.len() <= 9, "{}", s);
        }
    }
}
