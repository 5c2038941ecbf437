//! Tokenizer against transformers' ids (scripts/gen_tokenizer_vectors.py), then the data
//! pipeline: chunking, JSONL, prompt masking, seeded shuffling, batcher resume, input errors.
use crate::common;

use octet::tokenizer::Tokenizer;
use octet::train::data::{
    self, Batcher, BatcherState, DataFormat, Dataset, Sequence, IGNORE_INDEX,
};
use octet::OctetError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const GPT2_EOS: i64 = 50256;

fn tokenizer_dir() -> PathBuf {
    common::fixture("tiny_gptj/gpt2_tokenizer")
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_dir(tokenizer_dir()).expect("load tokenizer"))
}

#[derive(serde::Deserialize)]
struct Vector {
    text: String,
    ids: Vec<u32>,
}

/// The reference vectors, generated with the venv's transformers when missing.
fn vectors() -> &'static [Vector] {
    static V: OnceLock<Vec<Vector>> = OnceLock::new();
    V.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("fixtures/generated/tokenizer_vectors.json");
        if !out.exists() {
            let python = root.join(".venv/bin/python");
            assert!(
                python.exists(),
                "{} missing and no venv to generate it (run `make fixtures`)",
                out.display()
            );
            let status = std::process::Command::new(python)
                .arg(root.join("scripts/gen_tokenizer_vectors.py"))
                .arg(tokenizer_dir())
                .arg(&out)
                .status()
                .expect("run gen_tokenizer_vectors.py");
            assert!(status.success(), "gen_tokenizer_vectors.py failed");
        }
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
    })
}

fn check_against_vectors(tok: &Tokenizer, how: &str) {
    let vs = vectors();
    assert!(vs.len() >= 10);
    for v in vs {
        assert_eq!(tok.encode(&v.text).unwrap(), v.ids, "{how}: {:?}", v.text);
        // Byte-level BPE is lossless.
        assert_eq!(
            tok.decode(&v.ids).unwrap(),
            v.text,
            "{how} decode: {:?}",
            v.text
        );
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok = tokenizer();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(tok.eos_id(), Some(50256));
    assert_eq!(tok.vocab_size(), 50257);
    check_against_vectors(tok, "tokenizer.json");
}

#[test]
fn vocab_and_merges_match_transformers() {
    // Only vocab.json + merges.txt: the GPT-2 rebuild path.
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(tokenizer_dir().join(f), dir.path().join(f)).unwrap();
    }
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_id(), Some(50256));
    assert_eq!(tok.vocab_size(), 50257);
    check_against_vectors(&tok, "vocab+merges");
    // from_tokenizers wraps a tokenizer built by the caller.
    let wrapped = Tokenizer::from_tokenizers(tok.inner().clone());
    assert_eq!(wrapped.encode("Hello world").unwrap(), vec![15496, 995]);
    assert!(tok
        .decode(&[60000])
        .unwrap_err()
        .to_string()
        .contains("60000"));
}

#[test]
fn special_tokens_named_by_the_folder_win_over_the_guess() {
    // tokenizer_config.json names the specials as transformers reads them: a string, or an
    // AddedToken object with `content`; special_tokens_map.json is the fallback.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tokenizer_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        (tok.eos_id(), tok.bos_id()),
        (Some(50256), None),
        "the guess"
    );
    let hello = tok.encode("Hello").unwrap()[0];
    let hello_token = tok.inner().id_to_token(hello).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config,
        serde_json::json!({"eos_token": hello_token, "bos_token": {"content": "<|endoftext|>"}})
            .to_string(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!((tok.eos_id(), tok.bos_id()), (Some(hello), Some(50256)));

    std::fs::remove_file(&config).unwrap();
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        serde_json::json!({"eos_token": hello_token}).to_string(),
    )
    .unwrap();
    assert_eq!(
        Tokenizer::from_dir(dir.path()).unwrap().eos_id(),
        Some(hello)
    );

    std::fs::write(&config, r#"{"eos_token": "<|no such token|>"}"#).unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("<|no such token|>"),
        "{err}"
    );
}

#[test]
fn tokenizer_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("tokenizer.json"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("vocab.json"),
        r#"{"a": 0, "b": 1, "ab": 2}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\na b\nthis is bad\n",
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 3"),
        "{err}"
    );

    std::fs::write(dir.path().join("vocab.json"), "[1, 2]").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// Writes `contents` to `name` in a fresh temp dir (kept alive by the returned guard).
fn temp_file(name: &str, contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    (dir, path)
}

fn ids(text: &str) -> Vec<i64> {
    tokenizer()
        .encode(text)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect()
}

fn flatten(seqs: &[Sequence]) -> Vec<i64> {
    seqs.iter()
        .flat_map(|s| s.input_ids.iter().copied())
        .collect()
}

const PROSE: &str = "The quick brown fox jumps over the lazy dog. It was the best of times, it \
was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the \
epoch of belief, it was the epoch of incredulity, it was the season of Light.\n";

#[test]
fn text_is_packed_into_windows() {
    let (_d, path) = temp_file("corpus.txt", PROSE);
    let all = ids(PROSE);
    let seq_len = 16;
    let (seqs, stats) = data::load_sequences(&path, tokenizer(), seq_len, None).unwrap();
    assert_eq!(stats.format, DataFormat::Text);
    assert_eq!(stats.tokens, all.len());
    let full = all.len() / seq_len;
    let tail = all.len() % seq_len;
    let expect_n = full + usize::from(tail >= seq_len / 2);
    assert_eq!(seqs.len(), expect_n, "{} tokens", all.len());
    for s in &seqs {
        assert_eq!(s.input_ids.len(), seq_len);
        assert_eq!(s.labels.len(), seq_len);
    }
    // Full windows: labels == inputs, and they are the token stream in order.
    assert_eq!(flatten(&seqs[..full]), all[..full * seq_len]);
    for s in &seqs[..full] {
        assert_eq!(s.labels, s.input_ids);
    }
    if expect_n > full {
        // A kept tail is padded with EOS and masked.
        let last = &seqs[full];
        assert_eq!(last.input_ids[..tail], all[full * seq_len..]);
        assert!(last.input_ids[tail..].iter().all(|&t| t == GPT2_EOS));
        assert!(last.labels[tail..].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(last.labels[..tail], last.input_ids[..tail]);
    }
    // Tail rule with a length where it is known to drop: pick seq_len so the tail is tiny.
    let n = all.len();
    let (seqs, _) = data::load_sequences(&path, tokenizer(), n - 1, None).unwrap();
    assert_eq!(seqs.len(), 1, "a 1-token tail is dropped");
    let (seqs, _) = data::load_sequences(&path, tokenizer(), n / 2 + 1, None).unwrap();
    assert_eq!(seqs.len(), 2, "a tail of about half a window is kept");
}

#[test]
fn jsonl_documents_are_joined_with_eos() {
    let docs = [
        "First document here.",
        "Second, with ünïcode 🙂.",
        "Third and last.",
    ];
    let mut body = String::new();
    for d in &docs {
        body.push_str(&serde_json::json!({ "text": d, "meta": 1 }).to_string());
        body.push_str("\n\n"); // blank lines are skipped
    }
    body.push_str(&serde_json::json!({ "text": "" }).to_string()); // empty docs are skipped
    let (_d, path) = temp_file("docs.jsonl", &body);

    let mut stream = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            stream.push(GPT2_EOS);
        }
        stream.extend(ids(d));
    }
    let seq_len = 4;
    let (seqs, stats) = data::load_sequences(&path, tokenizer(), seq_len, None).unwrap();
    assert_eq!(
        stats.format,
        DataFormat::JsonlText {
            field: "text".into()
        }
    );
    assert_eq!(stats.documents, 3);
    assert_eq!(stats.tokens, stream.len());
    let full = stream.len() / seq_len * seq_len;
    assert_eq!(flatten(&seqs)[..full], stream[..full]);

    // Another field, by override (and the detector is not consulted).
    let (_d2, path2) = temp_file(
        "other.json",
        "{\"body\": \"Hello world\"}\n{\"body\": \"Hello world\"}\n",
    );
    let (seqs, _) =
        data::load_sequences(&path2, tokenizer(), 5, Some("jsonl:body".parse().unwrap())).unwrap();
    assert_eq!(seqs.len(), 1);
    assert_eq!(seqs[0].input_ids, vec![15496, 995, GPT2_EOS, 15496, 995]);
    assert_eq!(
        DataFormat::detect(&path2).unwrap(),
        DataFormat::JsonlText {
            field: "text".into()
        }
    );
}

#[test]
fn prompt_completion_masks_the_prompt() {
    let recs = [
        ("Translate to French: cheese =>", " fromage"),
        ("Q: What is 2+2?\nA:", " 4"),
        ("Say hi.", " Hello world"),
    ];
    let body: String = recs
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n")
        .collect();
    let (_d, path) = temp_file("pc.jsonl", &body);
    assert_eq!(
        DataFormat::detect(&path).unwrap(),
        DataFormat::PromptCompletion
    );
    let seq_len = 24;
    let (seqs, stats) = data::load_sequences(&path, tokenizer(), seq_len, None).unwrap();
    assert_eq!(stats.format, DataFormat::PromptCompletion);
    assert_eq!(seqs.len(), recs.len());
    for ((p, c), s) in recs.iter().zip(&seqs) {
        let (p, mut c) = (ids(p), ids(c));
        c.push(GPT2_EOS);
        let n = p.len() + c.len();
        assert_eq!(s.input_ids.len(), seq_len);
        assert_eq!(s.input_ids[..p.len()], p[..]);
        assert_eq!(s.input_ids[p.len()..n], c[..]);
        assert!(
            s.labels[..p.len()].iter().all(|&l| l == IGNORE_INDEX),
            "prompt masked"
        );
        assert_eq!(s.labels[p.len()..n], c[..], "completion + EOS labelled");
        assert!(
            s.input_ids[n..].iter().all(|&t| t == GPT2_EOS),
            "EOS padding"
        );
        assert!(
            s.labels[n..].iter().all(|&l| l == IGNORE_INDEX),
            "padding masked"
        );
    }

    // Truncation keeps the prompt start; a prompt filling the window leaves nothing to learn.
    let long_prompt = "word ".repeat(40);
    let body =
        serde_json::json!({"prompt": "Hi", "completion": " there friend, how are you today?"})
            .to_string()
            + "\n"
            + &serde_json::json!({"prompt": long_prompt, "completion": " x"}).to_string();
    let (_d, path) = temp_file("pc2.jsonl", &body);
    let (seqs, stats) = data::load_sequences(&path, tokenizer(), 4, None).unwrap();
    assert_eq!((seqs.len(), stats.truncated, stats.dropped), (1, 2, 1));
    assert_eq!(seqs[0].labels[0], IGNORE_INDEX);
    assert_eq!(seqs[0].labels[1..], seqs[0].input_ids[1..]);
}

fn corpus_file() -> (tempfile::TempDir, PathBuf) {
    temp_file("corpus.txt", &PROSE.repeat(6))
}

#[test]
fn shuffling_is_seeded() {
    let (_d, path) = corpus_file();
    let load = |seed| Dataset::load(&path, tokenizer(), 8, 0.2, seed, None).unwrap();
    let (a, b, c) = (load(7), load(7), load(8));
    assert_eq!(a.train, b.train);
    assert_eq!(a.eval, b.eval);
    let n = a.train.len() + a.eval.len();
    assert!(n > 20, "{n}");
    assert_eq!(a.eval.len(), (n as f64 * 0.2).round() as usize);
    assert_ne!(a.train, c.train, "another seed, another order");
    // The split is a permutation of the unshuffled sequences.
    let (mut orig, _) = data::load_sequences(&path, tokenizer(), 8, None).unwrap();
    let mut got: Vec<Sequence> = a.train.iter().chain(&a.eval).cloned().collect();
    assert_ne!(got, orig, "shuffled");
    let key = |s: &Sequence| s.input_ids.clone();
    orig.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, orig);
    // No eval fraction: everything trains.
    let all = Dataset::load(&path, tokenizer(), 8, 0.0, 7, None).unwrap();
    assert!(all.eval.is_empty() && all.train.len() == n);
}

#[test]
fn batcher_resumes_exactly() {
    let (_d, path) = corpus_file();
    let ds = Dataset::load(&path, tokenizer(), 8, 0.0, 1, None).unwrap();
    let n = ds.train.len();
    // A batch size that does not divide n, so some batches straddle two epochs.
    let bs = (3..n).find(|b| !n.is_multiple_of(*b)).unwrap();

    let mut straight = Batcher::new(n, bs, 99).unwrap();
    let steps = 3 * n / bs + 2; // about three epochs
    let reference: Vec<_> = (0..steps)
        .map(|_| straight.next_batch(&ds.train).unwrap())
        .collect();
    let (x, y) = &reference[0];
    assert_eq!(x.size(), vec![bs as i64, 8]);
    assert_eq!(x.kind(), tch::Kind::Int64);
    assert_eq!(y.size(), vec![bs as i64, 8]);
    assert!(straight.epoch() >= 3);

    for stop in [1, n / bs, n / bs + 1, 2 * n / bs + 1] {
        let mut first = Batcher::new(n, bs, 99).unwrap();
        for (i, (rx, ry)) in reference.iter().enumerate().take(stop) {
            let (x, y) = first.next_batch(&ds.train).unwrap();
            assert!(x.equal(rx) && y.equal(ry), "batch {i} before the stop");
        }
        // Through JSON, as a checkpoint would carry it.
        let saved = serde_json::to_string(&first.state()).unwrap();
        let state: BatcherState = serde_json::from_str(&saved).unwrap();
        assert_eq!(state.seed, 99);
        let mut resumed = Batcher::restore(state, n, bs).unwrap();
        for (i, (rx, ry)) in reference.iter().enumerate().skip(stop) {
            let (x, y) = resumed.next_batch(&ds.train).unwrap();
            assert!(
                x.equal(rx) && y.equal(ry),
                "batch {i} after resuming at {stop}"
            );
        }
    }

    // A state that does not fit the data is refused, as is the wrong data.
    let bad = BatcherState {
        epoch: 0,
        cursor: n,
        seed: 1,
        within: 0,
    };
    assert!(Batcher::restore(bad, n, bs).is_err());
    let mut b = Batcher::new(n, bs, 0).unwrap();
    assert!(b.next_batch(&ds.train[1..]).is_err());
}

/// Asserts `err` is a BadFile naming `path` and containing every `needle`.
fn assert_bad_file(err: OctetError, path: &Path, needles: &[&str]) {
    let msg = err.to_string();
    assert!(matches!(err, OctetError::BadFile { .. }), "{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "no file name in: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "{n:?} missing from: {msg}");
    }
}

fn load_err(
    name: &str,
    contents: &str,
    seq_len: usize,
) -> (OctetError, tempfile::TempDir, PathBuf) {
    let (d, path) = temp_file(name, contents);
    let err = Dataset::load(&path, tokenizer(), seq_len, 0.1, 0, None).unwrap_err();
    (err, d, path)
}

#[test]
fn bad_inputs_are_named() {
    let (e, _d, p) = load_err("empty.txt", "", 8);
    assert_bad_file(e, &p, &["empty"]);

    let (e, _d, p) = load_err("blank.txt", " \n\t\n", 8);
    assert_bad_file(e, &p, &["no usable text"]);

    let (e, _d, p) = load_err("blank.jsonl", "\n\n", 8);
    assert_bad_file(e, &p, &["no usable text"]);

    let (e, _d, p) = load_err(
        "emptydocs.jsonl",
        "{\"text\": \"\"}\n{\"text\": \"  \"}\n",
        8,
    );
    assert_bad_file(e, &p, &["no usable text"]);

    let (e, _d, p) = load_err(
        "broken.jsonl",
        "{\"text\": \"ok\"}\n{\"text\": \"oops\"\n",
        8,
    );
    assert_bad_file(e, &p, &["line 2", "not valid JSON"]);

    let (e, _d, p) = load_err("broken_first.json", "[\n{\"text\": \"a\"}\n]\n", 8);
    assert_bad_file(e, &p, &["line 1", "not valid JSON"]);

    let (e, _d, p) = load_err(
        "nofield.jsonl",
        "{\"text\": \"one\"}\n\n{\"content\": \"two\"}\n",
        8,
    );
    assert_bad_file(e, &p, &["line 3", "\"text\""]);

    let (e, _d, p) = load_err("notstring.jsonl", "{\"text\": \"one\"}\n{\"text\": 5}\n", 8);
    assert_bad_file(e, &p, &["line 2", "\"text\"", "not a string"]);

    let (e, _d, p) = load_err(
        "pc.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\"}\n",
        8,
    );
    assert_bad_file(e, &p, &["line 2", "\"completion\""]);

    // "Hello world" is 2 tokens; seq_len 64 needs at least 32.
    let (e, _d, p) = load_err("short.txt", "Hello world", 64);
    assert_bad_file(e, &p, &["too few tokens", "2 tokens", "seq_len 64", "32"]);

    let (e, _d, p) = load_err(
        "longprompts.jsonl",
        "{\"prompt\": \"one two three four five\", \"completion\": \" six\"}\n",
        3,
    );
    assert_bad_file(e, &p, &["seq_len 3"]);

    // Arguments.
    let (_d, path) = temp_file("ok.txt", PROSE);
    for (seq_len, frac) in [(1, 0.1), (8, 1.0), (8, -0.1)] {
        let err = Dataset::load(&path, tokenizer(), seq_len, frac, 0, None).unwrap_err();
        assert!(matches!(err, OctetError::InvalidArgument(_)), "{err}");
    }
    let missing = path.with_file_name("missing.txt");
    let err = Dataset::load(&missing, tokenizer(), 8, 0.1, 0, None).unwrap_err();
    assert!(err.to_string().contains("missing.txt"), "{err}");
    let err = "csv".parse::<DataFormat>().unwrap_err().to_string();
    assert!(
        err.contains("\"csv\"") && err.contains("prompt-completion"),
        "{err}"
    );
}
