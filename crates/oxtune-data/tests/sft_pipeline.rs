//! The sft / pt data pipeline end to end on the tiny fixture tokenizer (ChatML template with a
//! default system prompt): files in every format -> prepare -> packing -> loader -> resume.

use std::path::{Path, PathBuf};

use oxtune_data::sft::{
    Batch, DataCursor, DataLoader, DataOptions, Encoder, IGNORE_INDEX, LoaderOptions, PreparedData,
    Sequence, Task, TruncationStrategy, prepare,
};
use oxtune_models::{BatchLayout, ChatTemplate, Tokenizer};

struct Model {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

fn model() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2");
    let tokenizer = Tokenizer::load(&dir).expect("fixture tokenizer");
    let template = ChatTemplate::load(&dir, tokenizer.special_tokens())
        .expect("template")
        .expect("fixture has a chat template");
    Model {
        tokenizer,
        template,
    }
}

fn encoder(model: &Model) -> Encoder<'_> {
    Encoder::new(&model.tokenizer, Some(&model.template), "tiny-qwen2", &[]).expect("encoder")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path.display().to_string()
}

/// Four files, one per format, with 12 good rows in all and one broken row.
fn datasets(dir: &Path) -> Vec<String> {
    let messages: String = (0..4)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"hello {i}\"}}, {{\"role\": \"assistant\", \"content\": \"hi {i}\"}}, {{\"role\": \"user\", \"content\": \"more\"}}, {{\"role\": \"assistant\", \"content\": \"sure {i}\"}}]}}\n"))
        .collect();
    let sharegpt = "[\n{\"conversations\": [{\"from\": \"human\", \"value\": \"name?\"}, {\"from\": \"gpt\", \"value\": \"tiny\"}]},\n{\"conversations\": [{\"from\": \"human\", \"value\": \"age?\"}, {\"from\": \"gpt\", \"value\": \"new\"}]}\n]\n";
    let alpaca = "instruction,input,output\nadd,1 2,3\nsay hi,,hi\nbroken\n";
    let query: String = (0..4)
        .map(|i| {
            format!("{{\"query\": \"q{i}\", \"response\": \"r{i}\", \"system\": \"be brief\"}}\n")
        })
        .collect();
    vec![
        write(dir, "messages.jsonl", &messages),
        write(dir, "sharegpt.json", sharegpt),
        write(dir, "alpaca.csv", alpaca),
        write(dir, "query.jsonl", &query),
    ]
}

/// The labelled tokens of a sequence, one decoded string per contiguous run.
fn labelled_runs(tokenizer: &Tokenizer, sequence: &Sequence) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for (&id, &label) in sequence.input_ids.iter().zip(&sequence.labels) {
        if label != IGNORE_INDEX {
            if !previous {
                runs.push(Vec::new());
            }
            runs.last_mut().expect("a run was started").push(id);
        }
        previous = label != IGNORE_INDEX;
    }
    runs.iter()
        .map(|run| tokenizer.decode(run, false).expect("decode"))
        .collect()
}

fn options(dataset: Vec<String>) -> DataOptions {
    DataOptions {
        dataset,
        strict: false,
        max_length: Some(96),
        ..DataOptions::default()
    }
}

#[test]
fn every_format_is_read_encoded_and_labelled_on_the_replies() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let data = prepare(&options(datasets(dir.path())), &encoder(&model)).expect("prepare");
    let report = &data.report;
    let formats: Vec<Option<&str>> = report.sources.iter().map(|s| s.format).collect();
    assert_eq!(
        formats,
        vec![
            Some("messages"),
            Some("sharegpt"),
            Some("alpaca"),
            Some("query-response")
        ]
    );
    assert_eq!(
        report.sources[2].dropped_malformed, 1,
        "the CSV row with one cell"
    );
    assert_eq!(data.train.len(), 12);
    let summary = report.summary();
    assert!(summary.contains("alpaca.csv:4: not valid CSV"), "{summary}");

    let mut runs: Vec<String> = data
        .train
        .iter()
        .flat_map(|s| labelled_runs(&model.tokenizer, s))
        .collect();
    runs.sort();
    let mut expected: Vec<String> = [
        "hi 0", "hi 1", "hi 2", "hi 3", "sure 0", "sure 1", "sure 2", "sure 3", "tiny", "new", "3",
        "hi", "r0", "r1", "r2", "r3",
    ]
    .iter()
    .map(|reply| format!("{reply}<|im_end|>"))
    .collect();
    expected.sort();
    assert_eq!(runs, expected);
    // The rows' own system prompt replaces the template's default one.
    let query_row = model
        .tokenizer
        .decode(&data.train[11].input_ids, false)
        .expect("decode");
    assert!(
        query_row.starts_with("<|im_start|>system\nbe brief<|im_end|>"),
        "{query_row}"
    );
}

#[test]
fn strict_mode_stops_at_the_broken_row() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let strict = DataOptions {
        strict: true,
        ..options(datasets(dir.path()))
    };
    let error = prepare(&strict, &encoder(&model))
        .expect_err("strict")
        .to_string();
    assert!(error.contains("alpaca.csv:4: not valid CSV"), "{error}");
    assert!(error.contains("hint:"), "{error}");
}

#[test]
fn split_and_sampling_are_reproducible() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let files = datasets(dir.path());
    let with = |seed, sample: &str| {
        let dataset = vec![format!("{}{sample}", files[0]), files[3].clone()];
        prepare(
            &DataOptions {
                split_dataset_ratio: 0.25,
                data_seed: seed,
                ..options(dataset)
            },
            &encoder(&model),
        )
        .expect("prepare")
    };
    let ids = |data: &PreparedData| {
        (
            data.train
                .iter()
                .map(|s| s.input_ids.clone())
                .collect::<Vec<_>>(),
            data.val
                .iter()
                .map(|s| s.input_ids.clone())
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(ids(&with(1, "#10")), ids(&with(1, "#10")));
    assert!(
        (2..8).any(|seed| ids(&with(seed, "#10")) != ids(&with(1, "#10"))),
        "another seed holds out other rows"
    );
    let data = with(1, "#10");
    // messages.jsonl#10: 1 held out of its 4 rows, the other 3 sampled up to 9; query.jsonl:
    // 1 of 4 held out.
    assert_eq!((data.train.len(), data.val.len()), (9 + 3, 2));
    assert_eq!(
        (data.report.sources[0].train, data.report.sources[0].val),
        (9, 1)
    );
}

#[test]
fn packing_fills_rows_and_masks_each_first_token() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let encoder = encoder(&model);
    let unpacked = prepare(&options(datasets(dir.path())), &encoder).expect("unpacked");
    let packed = prepare(
        &DataOptions {
            packing: true,
            ..options(datasets(dir.path()))
        },
        &encoder,
    )
    .expect("packed");
    assert!(packed.train.len() < unpacked.train.len());
    let packing = packed
        .report
        .train_packing
        .as_ref()
        .expect("packing report");
    assert_eq!((packing.samples, packing.rows), (12, packed.train.len()));

    let mut pieces: Vec<Vec<u32>> = Vec::new();
    for row in &packed.train {
        assert!(row.len() <= 96);
        assert_eq!(row.sample_lengths.iter().sum::<usize>(), row.len());
        let mut start = 0;
        for &length in &row.sample_lengths {
            assert_eq!(
                row.labels[start], IGNORE_INDEX,
                "first token of a packed sample"
            );
            pieces.push(row.input_ids[start..start + length].to_vec());
            start += length;
        }
    }
    let mut originals: Vec<Vec<u32>> = unpacked.train.iter().map(|s| s.input_ids.clone()).collect();
    pieces.sort();
    originals.sort();
    assert_eq!(pieces, originals, "packing keeps every sample whole");
    let targets = |rows: &[Sequence]| rows.iter().map(Sequence::target_tokens).sum::<usize>();
    assert_eq!(targets(&packed.train), targets(&unpacked.train));

    // The trainer's attention layout accepts the batch as it is.
    let mut loader = DataLoader::new(
        packed.train,
        LoaderOptions {
            batch_size: 2,
            shuffle: true,
            seed: 5,
            num_epochs: Some(1),
            pad_id: encoder.pad_id(),
        },
    )
    .expect("loader");
    let batch = loader.next_batch().expect("a batch");
    BatchLayout::packed(
        &batch.sample_lengths,
        batch.seq_len(),
        None,
        &oxtune_tensor::Device::Cpu,
    )
    .expect("layout");
}

#[test]
fn pt_reads_txt_lines_packed_with_eos() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let text = write(
        dir.path(),
        "corpus.txt",
        "the first document\n\nthe second one\nand a third\n",
    );
    let encoder = Encoder::new(&model.tokenizer, None, "tiny-qwen2 (base)", &[]).expect("encoder");
    let data = prepare(
        &DataOptions {
            task: Task::Pt,
            dataset: vec![text],
            packing: true,
            max_length: Some(64),
            ..DataOptions::default()
        },
        &encoder,
    )
    .expect("pt");
    assert_eq!(data.train.len(), 1);
    let row = &data.train[0];
    assert_eq!(row.sample_lengths.len(), 3);
    let decoded = model
        .tokenizer
        .decode(&row.input_ids, false)
        .expect("decode");
    assert_eq!(decoded.matches("<|im_end|>").count(), 3, "{decoded}");
    assert_eq!(row.target_tokens(), row.len() - 3);
    let error = prepare(
        &DataOptions {
            dataset: vec!["corpus.jsonl".into()],
            ..DataOptions::default()
        },
        &encoder,
    )
    .expect_err("sft without a template")
    .to_string();
    assert!(
        error.contains("has no chat template") && error.contains("oxtune pt"),
        "{error}"
    );
}

#[test]
fn truncation_left_keeps_the_reply_right_may_drop_it() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let long_prompt = "word ".repeat(60);
    let file = write(
        dir.path(),
        "long.jsonl",
        &format!("{{\"query\": \"{long_prompt}\", \"response\": \"short answer\"}}\n"),
    );
    let encoder = encoder(&model);
    let run = |strategy| {
        prepare(
            &DataOptions {
                dataset: vec![file.clone()],
                max_length: Some(40),
                truncation_strategy: strategy,
                ..options(Vec::new())
            },
            &encoder,
        )
    };
    let left = run(TruncationStrategy::Left).expect("left");
    assert_eq!(left.train[0].len(), 40);
    assert_eq!(
        labelled_runs(&model.tokenizer, &left.train[0]),
        vec!["short answer<|im_end|>"]
    );
    let error = run(TruncationStrategy::Right)
        .expect_err("right keeps only the prompt")
        .to_string();
    assert!(
        error.contains("no training samples left") && error.contains("1 without targets"),
        "{error}"
    );
    let error = run(TruncationStrategy::Delete)
        .expect_err("delete")
        .to_string();
    assert!(error.contains("dropped 1 too long"), "{error}");
}

#[test]
fn a_rebuilt_loader_resumes_exactly() {
    let (model, dir) = (model(), tempfile::tempdir().expect("tempdir"));
    let files = datasets(dir.path());
    let build = || {
        let encoder = encoder(&model);
        let data = prepare(
            &DataOptions {
                packing: true,
                max_length: Some(64),
                ..options(files.clone())
            },
            &encoder,
        )
        .expect("prepare");
        DataLoader::new(
            data.train,
            LoaderOptions {
                batch_size: 2,
                shuffle: true,
                seed: 9,
                num_epochs: Some(3),
                pad_id: encoder.pad_id(),
            },
        )
        .expect("loader")
    };
    let straight: Vec<Batch> = build().collect();
    let mut first = build();
    let head: Vec<Batch> = first.by_ref().take(5).collect();
    let saved = serde_json::to_value(first.cursor()).expect("cursor to json");
    let cursor: DataCursor = serde_json::from_value(saved).expect("cursor from json");
    let mut resumed = build();
    resumed.seek(&cursor).expect("seek");
    let tail: Vec<Batch> = resumed.collect();
    assert_eq!([head, tail].concat(), straight);
    assert!(
        straight
            .iter()
            .all(|b| b.labels.iter().all(|row| row[0] == IGNORE_INDEX))
    );
}
