//! The Porter stemmer (Porter 1980) in NLTK's default `NLTK_EXTENSIONS` mode, the stemmer
//! rouge-score uses: Martin Porter's later changes plus NLTK's (irregular forms, `ies`/`ied`
//! on four-letter words, `alli`, `fulli`, `logi`, the two-letter cvc rule).
//!
//! Words are ASCII lower case here (rouge-score only stems `[a-z0-9]+` tokens longer than
//! three characters); other words are returned lower-cased and otherwise unchanged.

/// NLTK's irregular forms: word → stem.
const IRREGULAR: [(&str, &str); 16] = [
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// The stem of `word`.
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some((_, stem)) = IRREGULAR.iter().find(|(form, _)| *form == lower) {
        return (*stem).to_owned();
    }
    if word.chars().count() <= 2 || !lower.is_ascii() {
        return lower;
    }
    let mut word = lower.into_bytes();
    for step in [step1a, step1b, step1c, step2, step3, step4, step5a, step5b] {
        word = step(word);
    }
    String::from_utf8(word).unwrap_or_default()
}

/// Consonant (true) or vowel per letter. A `y` is a consonant at the start of the word or
/// after a vowel, a vowel after a consonant.
fn consonant_flags(word: &[u8]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(word.len());
    for (index, letter) in word.iter().enumerate() {
        let consonant = match letter {
            b'a' | b'e' | b'i' | b'o' | b'u' => false,
            b'y' => index == 0 || !flags[index - 1],
            _ => true,
        };
        flags.push(consonant);
    }
    flags
}

fn is_consonant(word: &[u8], index: usize) -> bool {
    consonant_flags(&word[..=index])[index]
}

/// m in [C](VC)^m[V]: the number of vowel-consonant sequences.
fn measure(stem: &[u8]) -> usize {
    consonant_flags(stem)
        .windows(2)
        .filter(|pair| !pair[0] && pair[1])
        .count()
}

fn contains_vowel(stem: &[u8]) -> bool {
    consonant_flags(stem).iter().any(|consonant| !consonant)
}

fn ends_double_consonant(word: &[u8]) -> bool {
    let n = word.len();
    n >= 2 && word[n - 1] == word[n - 2] && is_consonant(word, n - 1)
}

/// *o: the stem ends consonant-vowel-consonant, the last not w, x or y (or, NLTK's addition, the
/// stem is vowel-consonant).
fn ends_cvc(word: &[u8]) -> bool {
    let n = word.len();
    let flags = consonant_flags(word);
    (n >= 3
        && flags[n - 3]
        && !flags[n - 2]
        && flags[n - 1]
        && !matches!(word[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !flags[0] && flags[1])
}

/// A rule: suffix, replacement, and the condition on the stem (the word without the suffix).
type Rule<'a> = (&'a str, &'a [u8], &'a dyn Fn(&[u8]) -> bool);

/// The first rule whose suffix ends the word decides: its replacement if the condition holds,
/// otherwise the word unchanged. The suffix `*d` means "ends in a double consonant".
fn apply_rules(word: Vec<u8>, rules: &[Rule<'_>]) -> Vec<u8> {
    for (suffix, replacement, condition) in rules {
        if *suffix == "*d" {
            if ends_double_consonant(&word) {
                let stem = &word[..word.len() - 2];
                return if condition(stem) {
                    [stem, replacement].concat()
                } else {
                    word
                };
            }
            continue;
        }
        if word.ends_with(suffix.as_bytes()) {
            let stem = &word[..word.len() - suffix.len()];
            return if condition(stem) {
                [stem, replacement].concat()
            } else {
                word
            };
        }
    }
    word
}

fn replace_suffix(word: &[u8], suffix_len: usize, replacement: &[u8]) -> Vec<u8> {
    [&word[..word.len() - suffix_len], replacement].concat()
}

fn always(_: &[u8]) -> bool {
    true
}

fn positive_measure(stem: &[u8]) -> bool {
    measure(stem) > 0
}

fn measure_above_one(stem: &[u8]) -> bool {
    measure(stem) > 1
}

fn step1a(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"ies") && word.len() == 4 {
        return replace_suffix(&word, 3, b"ie");
    }
    apply_rules(
        word,
        &[
            ("sses", b"ss", &always),
            ("ies", b"i", &always),
            ("ss", b"ss", &always),
            ("s", b"", &always),
        ],
    )
}

fn step1b(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"ied") {
        return replace_suffix(&word, 3, if word.len() == 4 { b"ie" } else { b"i" });
    }
    if word.ends_with(b"eed") {
        let stem = &word[..word.len() - 3];
        return if measure(stem) > 0 {
            [stem, b"ee"].concat()
        } else {
            word
        };
    }
    let mut intermediate = None;
    for suffix in [&b"ed"[..], b"ing"] {
        if word.ends_with(suffix) {
            let stem = &word[..word.len() - suffix.len()];
            if contains_vowel(stem) {
                intermediate = Some(stem.to_vec());
                break;
            }
        }
    }
    let Some(stem) = intermediate else {
        return word;
    };
    let last = stem[stem.len() - 1];
    let keep_double = move |_: &[u8]| !matches!(last, b'l' | b's' | b'z');
    let add_e = |stem: &[u8]| measure(stem) == 1 && ends_cvc(stem);
    apply_rules(
        stem,
        &[
            ("at", b"ate", &always),
            ("bl", b"ble", &always),
            ("iz", b"ize", &always),
            ("*d", &[last], &keep_double),
            ("", b"e", &add_e),
        ],
    )
}

fn step1c(word: Vec<u8>) -> Vec<u8> {
    let condition = |stem: &[u8]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(word, &[("y", b"i", &condition)])
}

fn step2(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"alli") && positive_measure(&word[..word.len() - 4]) {
        return step2(replace_suffix(&word, 4, b"al"));
    }
    let whole = word.clone();
    let logi = move |_: &[u8]| positive_measure(&whole[..whole.len() - 3]);
    let m: &dyn Fn(&[u8]) -> bool = &positive_measure;
    apply_rules(
        word,
        &[
            ("ational", b"ate", m),
            ("tional", b"tion", m),
            ("enci", b"ence", m),
            ("anci", b"ance", m),
            ("izer", b"ize", m),
            ("bli", b"ble", m),
            ("alli", b"al", m),
            ("entli", b"ent", m),
            ("eli", b"e", m),
            ("ousli", b"ous", m),
            ("ization", b"ize", m),
            ("ation", b"ate", m),
            ("ator", b"ate", m),
            ("alism", b"al", m),
            ("iveness", b"ive", m),
            ("fulness", b"ful", m),
            ("ousness", b"ous", m),
            ("aliti", b"al", m),
            ("iviti", b"ive", m),
            ("biliti", b"ble", m),
            ("fulli", b"ful", m),
            ("logi", b"log", &logi),
        ],
    )
}

fn step3(word: Vec<u8>) -> Vec<u8> {
    let m: &dyn Fn(&[u8]) -> bool = &positive_measure;
    apply_rules(
        word,
        &[
            ("icate", b"ic", m),
            ("ative", b"", m),
            ("alize", b"al", m),
            ("iciti", b"ic", m),
            ("ical", b"ic", m),
            ("ful", b"", m),
            ("ness", b"", m),
        ],
    )
}

fn step4(word: Vec<u8>) -> Vec<u8> {
    let m: &dyn Fn(&[u8]) -> bool = &measure_above_one;
    let ion = |stem: &[u8]| measure(stem) > 1 && matches!(stem.last(), Some(b's' | b't'));
    apply_rules(
        word,
        &[
            ("al", b"", m),
            ("ance", b"", m),
            ("ence", b"", m),
            ("er", b"", m),
            ("ic", b"", m),
            ("able", b"", m),
            ("ible", b"", m),
            ("ant", b"", m),
            ("ement", b"", m),
            ("ment", b"", m),
            ("ent", b"", m),
            ("ion", b"", &ion),
            ("ou", b"", m),
            ("ism", b"", m),
            ("ate", b"", m),
            ("iti", b"", m),
            ("ous", b"", m),
            ("ive", b"", m),
            ("ize", b"", m),
        ],
    )
}

fn step5a(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"e") {
        let stem = &word[..word.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    word
}

fn step5b(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"ll") && measure(&word[..word.len() - 1]) > 1 {
        return word[..word.len() - 1].to_vec();
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porters_own_examples() {
        let cases = [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("filing", "file"),
            ("relational", "relat"),
            ("generalizations", "gener"),
            ("oscillators", "oscil"),
            ("skies", "sky"),
        ];
        for (word, expected) in cases {
            assert_eq!(stem(word), expected, "{word}");
        }
    }

    #[test]
    fn y_is_a_vowel_after_a_consonant() {
        assert_eq!(
            consonant_flags(b"syzygy"),
            vec![true, false, true, false, true, false]
        );
        assert_eq!(consonant_flags(b"toy"), vec![true, false, true]);
    }
}
