//! The order in which Azure Storage sorts `x-ms-*` header names when it builds a Shared Key
//! string-to-sign. It is not byte order: punctuation such as `-` is ignored at the first
//! level and only breaks ties, so `x-ms-meta-test_z` sorts before `x-ms-meta-test-a`. The
//! weights are those azure-storage-blob (Python) uses to emulate the service; the service's
//! own order for a set of `x-ms-meta-*` names is recorded in azure-sdk-for-python PR #33951,
//! and `proxy/tests/fixtures/blob/collation.json` checks this module against the SDK.

use std::cmp::Ordering;

/// Weight of a string's end: below every real weight, so a prefix sorts first.
const END: u16 = 1;
/// Weight of a byte outside ASCII. Header names are ASCII tokens (the `http` crate refuses
/// anything else), so this only keeps the function total: such bytes sort after all ASCII.
const NON_ASCII: u16 = 0xF000;
/// First-level weights of `a`..`z` (and `A`..`Z`: case does not count at this level).
const LETTERS: [u16; 26] = [
    0xE02, 0xE09, 0xE0A, 0xE1A, 0xE21, 0xE23, 0xE25, 0xE2C, 0xE32, 0xE35, 0xE36, 0xE48, 0xE51,
    0xE70, 0xE7C, 0xE7E, 0xE89, 0xE8A, 0xE91, 0xE99, 0xE9F, 0xEA2, 0xEA4, 0xEA6, 0xEA7, 0xEA9,
];

/// First level: letters, digits and some symbols weigh; `-`, `'`, `/`, `:` and other
/// punctuation weigh 0 and are skipped.
fn primary(b: u8) -> u16 {
    match b {
        b'!' => 0x71C,
        b'#' => 0x71F,
        b'$' => 0x721,
        b'%' => 0x723,
        b'&' => 0x725,
        b'*' => 0x72D,
        b'+' => 0x803,
        b'.' => 0x733,
        b'0' => 0xD03,
        b'1'..=b'9' => 0xD1A + 2 * u16::from(b - b'1'),
        b'^' => 0x743,
        b'_' => 0x744,
        b'`' => 0x748,
        b'|' => 0x74C,
        b'~' => 0x750,
        b'a'..=b'z' => LETTERS[usize::from(b - b'a')],
        b'A'..=b'Z' => LETTERS[usize::from(b - b'A')],
        0x80.. => NON_ASCII,
        _ => 0,
    }
}

/// Second level: only `'` and `-` weigh; it decides between names equal at the first level.
fn secondary(b: u8) -> u16 {
    match b {
        b'\'' => 0x8012,
        b'-' => 0x8212,
        _ => 0,
    }
}

/// Compares two header names the way the service does. Names equal at both levels (they
/// differ only in fully ignored bytes) fall back to byte order, so sorting is deterministic.
pub fn service_order(a: &str, b: &str) -> Ordering {
    compare_levels(a.as_bytes(), b.as_bytes()).then_with(|| a.cmp(b))
}

/// The two-level walk: at the first level, bytes of weight 0 are skipped on either side and
/// the first differing weight decides; at the second level the position of the first
/// weighing byte decides, a later one sorting first.
fn compare_levels(a: &[u8], b: &[u8]) -> Ordering {
    let weight = |table: fn(u8) -> u16, s: &[u8], i: usize| s.get(i).map_or(END, |&c| table(c));
    for (level, table) in [primary as fn(u8) -> u16, secondary]
        .into_iter()
        .enumerate()
    {
        let last = level == 1;
        let (mut i, mut j) = (0, 0);
        loop {
            if last && i != j {
                return j.cmp(&i);
            }
            let (wa, wb) = (weight(table, a, i), weight(table, b, j));
            if wa == END && wb == END {
                break;
            }
            if wa == wb {
                i += 1;
                j += 1;
            } else if wa == 0 {
                i += 1;
            } else if wb == 0 {
                j += 1;
            } else {
                return wa.cmp(&wb);
            }
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_only_breaks_ties() {
        assert_eq!(
            service_order("x-ms-meta-test_z", "x-ms-meta-test-a"),
            Ordering::Less
        );
        assert_eq!(
            service_order("x-ms-meta-ab", "x-ms-meta-a-b"),
            Ordering::Less
        );
        assert_eq!(service_order("x-ms-date", "x-ms-date"), Ordering::Equal);
        assert_eq!(service_order("x-ms-date", "x-ms-version"), Ordering::Less);
        assert_eq!(service_order("x-ms-meta-a", "x-ms-meta-a1"), Ordering::Less);
    }

    #[test]
    fn every_pair_is_antisymmetric() {
        let names = [
            "a", "a-", "a--", "a_-", "a-_", "a__", "a_a", "a'", "-a", "A", "a(b", "ab",
        ];
        for x in names {
            for y in names {
                assert_eq!(
                    service_order(x, y),
                    service_order(y, x).reverse(),
                    "{x} {y}"
                );
            }
        }
    }
}
