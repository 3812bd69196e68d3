//! Checksums and plausibility checks that tell real identifiers from numbers that only look
//! like them: the Luhn check of bank cards, the ISO 7064 MOD 11-2 check character of Chinese
//! resident ID numbers (GB 11643-1999), calendar dates, and province codes.

/// Whether `digits` (ASCII digits only) passes the Luhn check.
pub fn luhn_valid(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(index, byte)| {
            let digit = u32::from(byte - b'0');
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The check character (`0`-`9` or `X`) of the first 17 digits of an 18-digit ID number.
pub fn id_check_char(first17: &[u8]) -> Option<u8> {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [u8; 11] = *b"10X98765432";
    if first17.len() != 17 || !first17.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = first17
        .iter()
        .zip(WEIGHTS)
        .map(|(byte, weight)| u32::from(byte - b'0') * weight)
        .sum();
    Some(CHECK[(sum % 11) as usize])
}

/// Whether the first two digits are a province-level code of the ID number system.
pub fn province_code_valid(code: &[u8]) -> bool {
    let Some(code) = parse_digits(code) else {
        return false;
    };
    matches!(code, 11..=15 | 21..=23 | 31..=37 | 41..=46 | 50..=54 | 61..=65 | 71 | 81 | 82 | 83)
}

/// Whether `year`-`month`-`day` is a calendar date.
pub fn date_valid(year: u32, month: u32, day: u32) -> bool {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// The value of a run of ASCII digits (up to 9 of them).
pub fn parse_digits(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0, |value, byte| value * 10 + u32::from(byte - b'0')),
    )
}

/// What an 18-digit candidate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdCheck {
    /// Province, birth date and check character all hold.
    Valid,
    /// Province and birth date hold, the check character does not: a look-alike.
    ChecksumMismatch,
    /// Not shaped like an ID number at all.
    NotAnId,
}

/// Classifies an 18-character candidate (17 digits and a digit or `X`).
pub fn check_id18(candidate: &[u8]) -> IdCheck {
    if candidate.len() != 18 || !candidate[..17].iter().all(u8::is_ascii_digit) {
        return IdCheck::NotAnId;
    }
    let year = parse_digits(&candidate[6..10]).unwrap_or(0);
    let month = parse_digits(&candidate[10..12]).unwrap_or(0);
    let day = parse_digits(&candidate[12..14]).unwrap_or(0);
    if !province_code_valid(&candidate[..2])
        || !(1900..=2099).contains(&year)
        || !date_valid(year, month, day)
    {
        return IdCheck::NotAnId;
    }
    let last = candidate[17].to_ascii_uppercase();
    if id_check_char(&candidate[..17]) == Some(last) {
        IdCheck::Valid
    } else {
        IdCheck::ChecksumMismatch
    }
}

/// Whether a 15-digit candidate is a legacy (first-generation) ID number: province code and a
/// 19YYMMDD birth date. These numbers carry no check digit.
pub fn check_id15(candidate: &[u8]) -> bool {
    if candidate.len() != 15 || !candidate.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let year = 1900 + parse_digits(&candidate[6..8]).unwrap_or(0);
    let month = parse_digits(&candidate[8..10]).unwrap_or(0);
    let day = parse_digits(&candidate[10..12]).unwrap_or(0);
    province_code_valid(&candidate[..2]) && date_valid(year, month, day)
}

/// Whether a card number's first digits belong to a card scheme (UnionPay 62/81, Visa 4,
/// Mastercard 51-55 and 2221-2720, Amex 34/37, JCB 35, Diners 30/36/38, Discover 6011/65).
pub fn card_prefix_valid(digits: &[u8]) -> bool {
    let Some(first4) = digits.get(..4).and_then(parse_digits) else {
        return false;
    };
    let first2 = first4 / 100;
    matches!(digits[0], b'4' | b'6')
        || (51..=55).contains(&first2)
        || (2221..=2720).contains(&first4)
        || matches!(first2, 30 | 34 | 35 | 36 | 37 | 38 | 81)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_valid_card_numbers_and_rejects_one_digit_off() {
        assert!(luhn_valid(b"4111111111111111"));
        assert!(luhn_valid(b"6222021234567890128"));
        assert!(!luhn_valid(b"4111111111111112"));
        assert!(!luhn_valid(b""));
    }

    #[test]
    fn id_check_character_follows_gb_11643() {
        // The standard's own example number.
        assert_eq!(id_check_char(b"11010519491231002"), Some(b'X'));
        assert_eq!(check_id18(b"11010519491231002X"), IdCheck::Valid);
        assert_eq!(check_id18(b"11010519491231002x"), IdCheck::Valid);
        assert_eq!(check_id18(b"110105194912310021"), IdCheck::ChecksumMismatch);
        // 30 February: not an ID number at all.
        assert_eq!(check_id18(b"110105194902300021"), IdCheck::NotAnId);
        // Province 99 does not exist.
        assert_eq!(check_id18(b"990105194912310021"), IdCheck::NotAnId);
    }

    #[test]
    fn legacy_ids_need_a_province_and_a_date() {
        assert!(check_id15(b"110105491231002"));
        assert!(!check_id15(b"110105491331002"));
        assert!(!check_id15(b"000105491231002"));
    }

    #[test]
    fn dates_know_leap_years() {
        assert!(date_valid(2000, 2, 29));
        assert!(!date_valid(1900, 2, 29));
        assert!(date_valid(2024, 2, 29));
        assert!(!date_valid(2023, 2, 29));
        assert!(!date_valid(2023, 13, 1));
    }

    #[test]
    fn card_prefixes() {
        assert!(card_prefix_valid(b"6222021234567890128"));
        assert!(card_prefix_valid(b"2221000000000009"));
        assert!(!card_prefix_valid(b"2020010112345678"));
        assert!(!card_prefix_valid(b"1234567890123456"));
    }
}
