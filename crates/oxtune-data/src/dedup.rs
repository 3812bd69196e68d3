//! `oxtune data dedup`: drops exact and near-duplicate records, keeping the first of each.
//!
//! A record's text is its conversation (`role: text` lines) when its format is known, else
//! every string in it. Exact duplicates have the same text after collapsing whitespace (a
//! 128-bit hash is kept per record). Near duplicates are found with MinHash over character
//! 5-grams of the lower-cased text (works for Chinese, which has no spaces) and LSH banding:
//! records that share a band are compared on their whole signature, and a record whose
//! estimated Jaccard similarity to a kept record reaches the threshold is dropped.
//!
//! One pass; signatures are computed on all cores batch by batch, decisions are made in file
//! order. Memory per kept record: `num_perm × 4` bytes of signature plus one bucket entry per
//! band (about 0.7 KiB with the defaults).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::format::{Format, conversation};
use crate::reader::{RawRecord, RecordReader, parse_record};
use crate::split::{SplitMix64, mix64};
use crate::writer::{RecordWriter, ensure_distinct};

/// How to deduplicate.
#[derive(Debug, Clone, Copy)]
pub struct DedupOptions {
    /// Also drop near duplicates (not only exact ones).
    pub near: bool,
    /// Estimated Jaccard similarity at or above which a record is a near duplicate.
    pub threshold: f64,
    /// MinHash permutations.
    pub num_perm: usize,
    /// Characters per shingle.
    pub shingle_chars: usize,
    pub seed: u64,
    pub batch_records: usize,
}

impl Default for DedupOptions {
    fn default() -> Self {
        Self {
            near: true,
            threshold: 0.85,
            num_perm: 128,
            shingle_chars: 5,
            seed: 1,
            batch_records: 4096,
        }
    }
}

/// A dropped record and the kept one it duplicates.
#[derive(Debug, Clone, Serialize)]
pub struct DuplicatePair {
    pub line: u64,
    pub kept_line: u64,
    /// `exact` or `near`.
    pub kind: &'static str,
    /// Estimated Jaccard similarity (1 for exact duplicates).
    pub similarity: f64,
}

/// What was dropped.
#[derive(Debug, Clone, Serialize)]
pub struct DedupReport {
    pub input: String,
    pub output: String,
    pub records_in: u64,
    pub exact_duplicates: u64,
    pub near_duplicates: u64,
    pub records_out: u64,
    pub threshold: f64,
    pub num_perm: usize,
    pub bands: usize,
    pub rows_per_band: usize,
    /// The first duplicates found.
    pub examples: Vec<DuplicatePair>,
}

const MAX_EXAMPLES: usize = 50;

/// The (bands, rows) split of `num_perm` whose LSH S-curve midpoint `(1/b)^(1/r)` is closest
/// to `threshold`.
pub fn lsh_parameters(num_perm: usize, threshold: f64) -> (usize, usize) {
    (1..=num_perm)
        .map(|rows| (num_perm / rows, rows))
        .filter(|(bands, _)| *bands >= 1)
        .min_by(|a, b| {
            let midpoint =
                |(bands, rows): (usize, usize)| (1.0 / bands as f64).powf(1.0 / rows as f64);
            (midpoint(*a) - threshold)
                .abs()
                .total_cmp(&(midpoint(*b) - threshold).abs())
        })
        .unwrap_or((1, num_perm))
}

/// FNV-1a over bytes, then the SplitMix64 finalizer: a stable 64-bit hash.
fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xCBF2_9CE4_8422_2325_u64 ^ seed;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(hash)
}

/// The text a record is compared by.
fn record_text(path: &Path, headers: &[String], record: &RawRecord) -> Result<String> {
    let row = parse_record(path, headers, record)?;
    if let Some(format) = Format::detect(&row.value) {
        let turns = conversation(format, &row.value);
        if !turns.is_empty() {
            return Ok(turns
                .iter()
                .map(|t| format!("{}: {}", t.role.name(), t.text))
                .collect::<Vec<_>>()
                .join("\n"));
        }
    }
    let mut parts = Vec::new();
    collect_strings(&Value::Object(row.value), &mut parts);
    Ok(parts.join("\n"))
}

fn collect_strings(value: &Value, parts: &mut Vec<String>) {
    match value {
        Value::String(text) => parts.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|item| collect_strings(item, parts)),
        Value::Object(map) => map.values().for_each(|item| collect_strings(item, parts)),
        _ => {}
    }
}

/// Per-record work done in parallel.
struct Fingerprint {
    exact: (u64, u64),
    signature: Vec<u32>,
}

struct MinHasher {
    seeds: Vec<u64>,
    shingle_chars: usize,
}

impl MinHasher {
    fn new(options: &DedupOptions) -> Self {
        let mut rng = SplitMix64::new(options.seed);
        Self {
            seeds: (0..options.num_perm).map(|_| rng.next_u64()).collect(),
            shingle_chars: options.shingle_chars.max(1),
        }
    }

    fn fingerprint(&self, text: &str, near: bool) -> Fingerprint {
        let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let exact = (
            hash_bytes(collapsed.as_bytes(), 1),
            hash_bytes(collapsed.as_bytes(), 2),
        );
        if !near {
            return Fingerprint {
                exact,
                signature: Vec::new(),
            };
        }
        let chars: Vec<char> = collapsed.to_lowercase().chars().collect();
        let mut shingles: Vec<u64> = if chars.len() <= self.shingle_chars {
            vec![hash_bytes(collapsed.to_lowercase().as_bytes(), 0)]
        } else {
            let mut buffer = String::new();
            chars
                .windows(self.shingle_chars)
                .map(|window| {
                    buffer.clear();
                    buffer.extend(window);
                    hash_bytes(buffer.as_bytes(), 0)
                })
                .collect()
        };
        shingles.sort_unstable();
        shingles.dedup();
        let signature = self
            .seeds
            .iter()
            .map(|seed| {
                shingles
                    .iter()
                    .map(|s| (mix64(s ^ seed) >> 32) as u32)
                    .min()
                    .unwrap_or(u32::MAX)
            })
            .collect();
        Fingerprint { exact, signature }
    }
}

fn estimated_similarity(a: &[u32], b: &[u32]) -> f64 {
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len().max(1) as f64
}

/// Deduplicates `input` into `output`; `progress(bytes_done, bytes_total)` after each batch.
pub fn dedup_file(
    input: &Path,
    output: &Path,
    options: &DedupOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DedupReport> {
    if !(0.0..=1.0).contains(&options.threshold) || options.num_perm == 0 {
        return Err(Error::Invalid {
            message: format!(
                "threshold {} / num_perm {} out of range",
                options.threshold, options.num_perm
            ),
            hint: "use a threshold in [0, 1] (e.g. 0.85) and num_perm ≥ 16".to_owned(),
        });
    }
    ensure_distinct(input, output)?;
    let mut reader = RecordReader::open(input)?;
    let headers: Vec<String> = reader.headers().map(<[String]>::to_vec).unwrap_or_default();
    let mut writer = RecordWriter::create(output, reader.kind(), reader.headers())?;
    let (bands, rows_per_band) = lsh_parameters(options.num_perm, options.threshold);
    let hasher = MinHasher::new(options);
    let mut report = DedupReport {
        input: input.display().to_string(),
        output: output.display().to_string(),
        records_in: 0,
        exact_duplicates: 0,
        near_duplicates: 0,
        records_out: 0,
        threshold: options.threshold,
        num_perm: options.num_perm,
        bands,
        rows_per_band,
        examples: Vec::new(),
    };
    let mut exact_seen: HashMap<(u64, u64), u64> = HashMap::new();
    let mut buckets: HashMap<(u32, u64), Vec<u32>> = HashMap::new();
    let mut kept_signatures: Vec<Vec<u32>> = Vec::new();
    let mut kept_lines: Vec<u64> = Vec::new();
    loop {
        let batch = reader.next_batch(options.batch_records.max(1))?;
        if batch.is_empty() {
            break;
        }
        let fingerprints: Vec<Result<Fingerprint>> = batch
            .par_iter()
            .map(|record| {
                record_text(input, &headers, record)
                    .map(|text| hasher.fingerprint(&text, options.near))
            })
            .collect();
        for (record, fingerprint) in batch.iter().zip(fingerprints) {
            let fingerprint = fingerprint?;
            report.records_in += 1;
            if let Some(&kept_line) = exact_seen.get(&fingerprint.exact) {
                report.exact_duplicates += 1;
                if report.examples.len() < MAX_EXAMPLES {
                    report.examples.push(DuplicatePair {
                        line: record.line,
                        kept_line,
                        kind: "exact",
                        similarity: 1.0,
                    });
                }
                continue;
            }
            if options.near {
                let band_keys: Vec<(u32, u64)> = fingerprint
                    .signature
                    .chunks(rows_per_band)
                    .take(bands)
                    .enumerate()
                    .map(|(band, rows)| {
                        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
                        (band as u32, hash_bytes(&bytes, 3))
                    })
                    .collect();
                let mut checked: HashSet<u32> = HashSet::new();
                let mut duplicate_of = None;
                'bands: for key in &band_keys {
                    for &candidate in buckets.get(key).into_iter().flatten() {
                        if !checked.insert(candidate) {
                            continue;
                        }
                        let similarity = estimated_similarity(
                            &fingerprint.signature,
                            &kept_signatures[candidate as usize],
                        );
                        if similarity >= options.threshold {
                            duplicate_of = Some((candidate, similarity));
                            break 'bands;
                        }
                    }
                }
                if let Some((candidate, similarity)) = duplicate_of {
                    report.near_duplicates += 1;
                    if report.examples.len() < MAX_EXAMPLES {
                        report.examples.push(DuplicatePair {
                            line: record.line,
                            kept_line: kept_lines[candidate as usize],
                            kind: "near",
                            similarity,
                        });
                    }
                    continue;
                }
                let index = kept_signatures.len() as u32;
                for key in band_keys {
                    buckets.entry(key).or_default().push(index);
                }
                kept_signatures.push(fingerprint.signature);
                kept_lines.push(record.line);
            }
            exact_seen.insert(fingerprint.exact, record.line);
            writer.write_raw(&record.body)?;
        }
        progress(reader.bytes_read(), reader.total_bytes());
    }
    report.records_out = writer.finish()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsh_parameters_put_the_curve_near_the_threshold() {
        let (bands, rows) = lsh_parameters(128, 0.85);
        assert!(bands * rows <= 128);
        let midpoint = (1.0 / bands as f64).powf(1.0 / rows as f64);
        assert!(
            (midpoint - 0.85).abs() < 0.02,
            "{bands}x{rows} → {midpoint}"
        );
    }

    #[test]
    fn signatures_estimate_jaccard_similarity() {
        let hasher = MinHasher::new(&DedupOptions {
            num_perm: 256,
            ..DedupOptions::default()
        });
        let a = hasher.fingerprint("用户登录支持手机号加验证码的方式，验证码有效期为五分钟，超过三次失败后锁定账号十分钟。", true);
        let b = hasher.fingerprint("用户登录支持手机号加验证码的方式，验证码有效期为五分钟，超过三次失败后锁定账号十五分钟。", true);
        let c = hasher.fingerprint(
            "订单列表页支持按时间、状态和金额筛选，并可导出为Excel文件。",
            true,
        );
        assert!(estimated_similarity(&a.signature, &b.signature) > 0.7);
        assert!(estimated_similarity(&a.signature, &c.signature) < 0.1);
    }

    #[test]
    fn drops_exact_and_near_duplicates_keeping_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("d.jsonl");
        let long = "根据功能描述生成PRD章节：用户登录支持手机号加验证码，验证码有效期五分钟，连续失败三次锁定十分钟，并记录登录日志用于审计。";
        let lines = [
            format!("{{\"instruction\": \"{long}\", \"output\": \"好的\"}}"),
            format!("{{\"instruction\": \"{long}\",  \"output\": \"好的\"}}"),
            format!(
                "{{\"instruction\": \"{}\", \"output\": \"好的\"}}",
                long.replace("审计", "审计。")
            ),
            "{\"instruction\": \"完全不同的需求：订单导出\", \"output\": \"好的\"}".to_owned(),
        ];
        std::fs::write(&input, lines.join("\n") + "\n").expect("write");
        let output = dir.path().join("out.jsonl");
        let report =
            dedup_file(&input, &output, &DedupOptions::default(), &|_, _| {}).expect("dedup");
        assert_eq!(
            (
                report.records_in,
                report.exact_duplicates,
                report.near_duplicates,
                report.records_out
            ),
            (4, 1, 1, 2)
        );
        let kept: Vec<String> = std::fs::read_to_string(&output)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(kept, vec![lines[0].clone(), lines[3].clone()]);
    }
}
