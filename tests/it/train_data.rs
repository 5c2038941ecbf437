//! Training data at the command line: `--pack` (the first step equals the unpacked run over
//! the same records; resume stays exact), folders of JSONL shards, and streamed data.
use crate::common;
use octet::chat::ChatTemplate;
use octet::tokenizer::Tokenizer;
use octet::train::data::{load_sequences_with, pad_id, ReadOptions};
use octet::train::pack::pack;
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    common::fixture("tiny_gptj/hf_safetensors")
}

/// `n` chat records of varied lengths (a short question, an answer of 1 to 4 letters).
pub fn chat_records(n: usize) -> String {
    let words = ["a", "b", "c", "d", "e", "f", "g"];
    (0..n)
        .map(|i| {
            let answer: Vec<&str> = (0..1 + (i * 5) % 4).map(|k| words[(i + k) % 7]).collect();
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("{}?", words[i % 7])},
                {"role": "assistant", "content": answer.join(" ")},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// A compact chat template, so that several records fit the tiny models' 64 positions.
const TEMPLATE: &str = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}";

pub fn template_file(dir: &Path) -> PathBuf {
    write(dir, "chat.jinja", TEMPLATE)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn train(args: &[String]) -> (bool, String, String) {
    let mut a = vec!["train"];
    a.extend(args.iter().map(String::as_str));
    common::octet(&a)
}

fn flags(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--model",
        common::s(&model()),
        "--data",
        common::s(data),
        "--out",
        common::s(out),
        "--seq-len",
        "64",
        "--lora-r",
        "4",
        "--targets",
        "q_proj,v_proj,fc_in",
        "--eval-fraction",
        "0",
        "--seed",
        "3",
    ]
    .map(String::from)
    .to_vec();
    let template = template_file(data.parent().unwrap());
    a.extend([
        "--chat-template".to_string(),
        common::s(&template).to_string(),
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn adapter(out: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    common::load_safetensors(&out.join("adapter_model.safetensors"))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// How many sequences the trainer's packer makes of `data` at `seq_len` (the ChatML
/// template of [`TEMPLATE`]).
fn packed_count(data: &Path, seq_len: usize) -> (usize, usize) {
    let tok = Tokenizer::from_dir(model()).unwrap();
    let file = template_file(data.parent().unwrap());
    let template = ChatTemplate::load(&model(), Some(&file), tok.clone()).unwrap();
    let read = ReadOptions {
        template: Some(&template),
        ..ReadOptions::default()
    };
    let (records, _) = load_sequences_with(data, &tok, seq_len, &read).unwrap();
    let (packed, _, _) = pack(&records, pad_id(&tok));
    (records.len(), packed.len())
}

#[test]
fn a_packed_first_step_equals_the_unpacked_one_over_the_same_records() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write(tmp.path(), "chat.jsonl", &chat_records(12));
    let (n, m) = packed_count(&data, 64);
    assert!(m < n, "the records pack ({n} into {m})");
    // One step over every record: n rows alone, or m packed rows.
    let common = [
        "--steps",
        "1",
        "--optim",
        "adamw",
        "--lr",
        "1e-3",
        "--lora-dropout",
        "0",
        "--max-grad-norm",
        "0",
    ];
    let (plain, packed) = (tmp.path().join("plain"), tmp.path().join("packed"));
    let bs = n.to_string();
    let mut extra = common.to_vec();
    extra.extend(["--batch-size", &bs]);
    let (ok, _, err) = train(&flags(&data, &plain, &extra));
    assert!(ok, "{err}");
    let bs = m.to_string();
    let mut extra = common.to_vec();
    extra.extend(["--batch-size", &bs, "--pack"]);
    let (ok, _, err) = train(&flags(&data, &packed, &extra));
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("packing: {n} training records into {m} sequences")),
        "{err}"
    );
    let (a, b) = (&metrics(&plain)[0], &metrics(&packed)[0]);
    for key in ["loss", "grad_norm"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!(rel(y, x) < 1e-5, "{key}: packed {y} vs unpacked {x}");
    }
    assert!(a.get("packing_efficiency").is_none());
    let eff = b["packing_efficiency"].as_f64().unwrap();
    assert!(eff > 0.5 && eff <= 1.0, "{b}");
    // The update after one step: the same adapters.
    let (wa, wb) = (adapter(&plain), adapter(&packed));
    for (k, t) in &wa {
        let d = common::max_abs_diff(t, &wb[k]);
        assert!(d < 1e-6, "{k}: adapters differ by {d:e}");
    }
}

#[test]
fn a_resumed_packed_run_reproduces_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write(tmp.path(), "chat.jsonl", &chat_records(20));
    let run = |out: &Path, extra: &[&str]| {
        let mut e = vec![
            "--pack",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--lr",
            "2e-3",
            "--lora-dropout",
            "0.1",
        ];
        e.extend_from_slice(extra);
        let (ok, _, err) = train(&flags(&data, out, &e));
        assert!(ok, "{err}");
    };
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    run(&full, &[]);
    run(&part, &["--stop-after", "3"]);
    assert_eq!(metrics(&part).len(), 3);
    run(&part, &["--resume", common::s(&part)]);
    // Everything but the speed.
    let without_speed = |out: &Path| {
        let mut m = metrics(out);
        m.iter_mut().for_each(|l| {
            let l = l.as_object_mut().unwrap();
            l.remove("tokens_per_s");
            l.remove("trained_tokens_per_s");
        });
        m
    };
    assert_eq!(
        without_speed(&full),
        without_speed(&part),
        "resumed metrics differ"
    );
    let wa = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(part.join("adapter_model.safetensors")).unwrap();
    assert!(wa == wb, "final adapters differ");
    // Resuming without --pack is refused by name, writing nothing.
    let before = std::fs::read(part.join("metrics.jsonl")).unwrap();
    let mut a = flags(&data, &part, &["--steps", "8", "--batch-size", "2"]);
    a.extend(["--grad-accum", "2", "--lr", "2e-3", "--lora-dropout", "0.1"].map(String::from));
    a.extend(["--resume".to_string(), common::s(&part).to_string()]);
    let (ok, _, err) = train(&a);
    assert!(!ok && err.contains("--pack"), "{err}");
    assert_eq!(std::fs::read(part.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn a_folder_of_jsonl_shards_reads_as_their_concatenation_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let records = chat_records(9);
    let lines: Vec<&str> = records.lines().collect();
    let shards = tmp.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    // Written out of order: read by name.
    write(&shards, "part-2.jsonl", &(lines[5..].join("\n") + "\n"));
    write(&shards, "part-1.jsonl", &(lines[..5].join("\n") + "\n\n"));
    write(&shards, "README.txt", "not data");
    let whole = write(tmp.path(), "whole.jsonl", &records);
    let tok = Tokenizer::from_dir(model()).unwrap();
    let file = template_file(tmp.path());
    let template = ChatTemplate::load(&model(), Some(&file), tok.clone()).unwrap();
    let read = ReadOptions {
        template: Some(&template),
        ..ReadOptions::default()
    };
    let (a, sa) = load_sequences_with(&shards, &tok, 64, &read).unwrap();
    let (b, sb) = load_sequences_with(&whole, &tok, 64, &read).unwrap();
    assert_eq!((a, sa), (b, sb));

    // A bad record is named by its shard and line, and nothing is written.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    write(&bad, "a.jsonl", &records);
    write(
        &bad,
        "b.jsonl",
        &format!("{}\n{{\"messages\": 3}}\n", lines[0]),
    );
    let out = tmp.path().join("run");
    let (ok, _, err) = train(&flags(&bad, &out, &["--steps", "1"]));
    assert!(
        !ok && err.contains("b.jsonl") && err.contains("line 2"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = train(&flags(&empty, &out, &["--steps", "1"]));
    assert!(
        !ok && err.contains("empty") && err.contains("JSON Lines shards"),
        "{err}"
    );
    // The folder trains.
    let (ok, _, err) = train(&flags(
        &shards,
        &out,
        &["--steps", "1", "--batch-size", "2"],
    ));
    assert!(ok && err.contains("9 records"), "{err}");
}

#[test]
fn a_streamed_run_trains_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write(tmp.path(), "chat.jsonl", &chat_records(20));
    let run = |out: &Path, extra: &[&str]| {
        let mut e = vec!["--stream", "--pack", "--steps", "6", "--batch-size", "2"];
        e.extend_from_slice(&["--eval-fraction", "0.1", "--lora-dropout", "0.1"]);
        e.extend_from_slice(extra);
        let mut a = flags(&data, out, &[]);
        // --eval-fraction given twice would be refused: drop the default pair.
        let i = a.iter().position(|x| x == "--eval-fraction").unwrap();
        a.drain(i..i + 2);
        a.extend(e.iter().map(|s| s.to_string()));
        train(&a)
    };
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let (ok, _, err) = run(&full, &[]);
    assert!(
        ok && err.contains("streamed: 18 training records, 2 held-out"),
        "{err}"
    );
    assert!(metrics(&full).last().unwrap()["eval_loss"]
        .as_f64()
        .is_some());
    let (ok, _, err) = run(&part, &["--stop-after", "3"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&part, &["--resume", common::s(&part)]);
    assert!(ok, "{err}");
    let strip = |out: &Path| {
        let mut m = metrics(out);
        m.iter_mut().for_each(|l| {
            let l = l.as_object_mut().unwrap();
            l.remove("tokens_per_s");
            l.remove("trained_tokens_per_s");
        });
        m
    };
    assert_eq!(strip(&full), strip(&part), "resumed metrics differ");
    let wa = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(part.join("adapter_model.safetensors")).unwrap();
    assert!(wa == wb, "final adapters differ");
    // A bad record is named by file and line when its unit is read; the run fails.
    let bad = write(
        tmp.path(),
        "bad.jsonl",
        &format!("{}\n\n{{\"messages\": 3}}\n", chat_records(3)),
    );
    let mut a = flags(
        &bad,
        &tmp.path().join("bad-run"),
        &["--stream", "--steps", "1"],
    );
    a.extend(["--batch-size".to_string(), "2".to_string()]);
    let (ok, _, err) = train(&a);
    assert!(
        !ok && err.contains("bad.jsonl") && err.contains("line 6"),
        "{err}"
    );
}
