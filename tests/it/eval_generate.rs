//! `octet eval` and `octet generate` on the tiny GPT-J: perplexity and greedy tokens against
//! transformers, the KV cache against full recomputation, streaming output, and bad inputs.
use crate::common;
use crate::common::script_json;

use octet::eval::{perplexity, windows, Window};
use octet::generate::{generate, generate_batch, GenerateOptions, Sampler, TextStream};
use octet::load::{load_model, LoadOptions, LoadedModel, QuantizeOptions};
use octet::model::LayerCache;
use octet::tokenizer::Tokenizer;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use tch::Tensor;

const TEXT: &str = "The quick brown fox jumps over the lazy dog. It was a bright cold day in \
April, and the clocks were striking thirteen. Call me Ishmael. Some years ago, never mind how \
long precisely, having little or no money in my purse, and nothing particular to interest me \
on shore, I thought I would sail about a little and see the watery part of the world.";

fn hf() -> PathBuf {
    common::fixture("tiny_gptj/hf_safetensors")
}

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("eval.txt");
    std::fs::write(&p, TEXT).unwrap();
    p
}

fn load(dir: &Path) -> LoadedModel {
    load_model(dir, &LoadOptions::default()).unwrap()
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["eval", "--json"];
    a.extend_from_slice(args);
    let (ok, stdout, stderr) = common::octet(&a);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

/// A peft-made adapter on the tiny model in `dir/name` (make_peft_adapter.py with `extra`),
/// and peft's logits for `ids` with it applied.
fn peft_adapter(dir: &Path, name: &str, ids: &Tensor, extra: &[&str]) -> (PathBuf, Tensor) {
    let model = hf();
    let adapter = dir.join(name);
    let ids_file = dir.join(format!("{name}_ids.safetensors"));
    Tensor::write_safetensors(&[("input_ids", ids)], &ids_file).unwrap();
    let logits_file = dir.join(format!("{name}_logits.safetensors"));
    let mut args = vec![
        model.as_os_str(),
        adapter.as_os_str(),
        ids_file.as_os_str(),
        logits_file.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    common::run_script("make_peft_adapter.py", &args);
    let logits = common::load_safetensors(&logits_file)["logits"].shallow_clone();
    (adapter, logits)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn windows_score_each_token_once() {
    assert_eq!(
        windows(10, 4, 2),
        vec![
            Window {
                begin: 0,
                end: 4,
                labelled: 4
            },
            Window {
                begin: 2,
                end: 6,
                labelled: 2
            },
            Window {
                begin: 4,
                end: 8,
                labelled: 2
            },
            Window {
                begin: 6,
                end: 10,
                labelled: 2
            },
        ]
    );
    assert_eq!(
        windows(10, 4, 4),
        vec![
            Window {
                begin: 0,
                end: 4,
                labelled: 4
            },
            Window {
                begin: 4,
                end: 8,
                labelled: 4
            },
            Window {
                begin: 8,
                end: 10,
                labelled: 2
            },
        ]
    );
    for (n, ctx, stride) in [
        (100, 64, 64),
        (100, 64, 32),
        (100, 32, 8),
        (7, 16, 16),
        (65, 8, 3),
    ] {
        let w = windows(n, ctx, stride);
        assert_eq!(w.iter().map(|w| w.labelled).sum::<usize>(), n);
        assert_eq!(w.last().unwrap().end, n);
        assert!(w
            .iter()
            .all(|w| w.end - w.begin <= ctx && w.labelled <= w.end - w.begin));
    }
}

#[test]
fn perplexity_matches_transformers_for_several_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let model = hf();
    let pairs = [(64, 64), (64, 32), (32, 8), (16, 16), (16, 5)];
    // transformers runs in parallel with octet; each script starts a fresh interpreter.
    let oracles: Vec<_> = pairs
        .iter()
        .map(|&(c, s)| {
            let (model, data) = (model.clone(), data.clone());
            std::thread::spawn(move || {
                let (c, s) = (c.to_string(), s.to_string());
                script_json(
                    "hf_perplexity.py",
                    &[
                        model.as_os_str(),
                        data.as_os_str(),
                        OsStr::new(&c),
                        OsStr::new(&s),
                    ],
                )
            })
        })
        .collect();
    let m = load(&model);
    let tok = Tokenizer::from_dir(&model).unwrap();
    let ids: Vec<i64> = tok
        .encode(TEXT)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    assert!(ids.len() > 200);
    for (&(c, s), oracle) in pairs.iter().zip(oracles) {
        let theirs = oracle.join().unwrap();
        let ours = eval_json(&[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--ctx",
            &c.to_string(),
            "--stride",
            &s.to_string(),
        ]);
        let p = ours["perplexity"].as_f64().unwrap();
        let hp = theirs["perplexity"].as_f64().unwrap();
        assert!(
            rel(p, hp) < 1e-4,
            "ctx {c} stride {s}: octet {p}, transformers {hp}"
        );
        assert!(
            rel(
                ours["nll"].as_f64().unwrap(),
                theirs["nll"].as_f64().unwrap()
            ) < 1e-4
        );
        assert_eq!(ours["tokens"], theirs["tokens"], "ctx {c} stride {s}");
        assert_eq!(ours["ctx"], c);
        assert_eq!(ours["stride"], s);
        // Every token after the first window's first is scored, except the first token of
        // each window that starts where the previous one ended.
        let w = windows(ids.len(), c, s);
        let fresh = w.iter().filter(|w| w.labelled == w.end - w.begin).count();
        assert_eq!(ours["tokens"].as_u64().unwrap() as usize, ids.len() - fresh);
        // The library, one window per batch, agrees with the CLI's batched windows.
        let lib = perplexity(m.model.as_ref(), &ids, c, s, 1).unwrap();
        assert!(rel(lib.perplexity, p) < 1e-5, "{} vs {p}", lib.perplexity);
    }
}

#[test]
fn defaults_max_tokens_and_adapter_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let model = hf();
    // A peft-made adapter (non-zero B, on wte too), applied by both sides.
    let ids = Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0);
    let (adapter, _) = peft_adapter(tmp.path(), "adapter", &ids, &[]);
    let theirs = script_json(
        "hf_perplexity.py",
        &[
            model.as_os_str(),
            data.as_os_str(),
            OsStr::new("64"),
            OsStr::new("24"),
            OsStr::new("--max-tokens"),
            OsStr::new("150"),
            OsStr::new("--adapter"),
            adapter.as_os_str(),
        ],
    );
    let ours = eval_json(&[
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--stride",
        "24",
        "--max-tokens",
        "150",
    ]);
    assert_eq!(ours["ctx"], 64, "ctx defaults to n_positions");
    assert_eq!(ours["tokens"], theirs["tokens"]);
    let (p, hp) = (
        ours["perplexity"].as_f64().unwrap(),
        theirs["perplexity"].as_f64().unwrap(),
    );
    assert!(rel(p, hp) < 1e-4, "octet {p}, transformers+peft {hp}");

    // Without the adapter the value differs: the adapter really was applied.
    let base = eval_json(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--stride",
        "24",
        "--max-tokens",
        "150",
    ]);
    assert!(rel(base["perplexity"].as_f64().unwrap(), p) > 1e-3);
    // stride defaults to ctx.
    let disjoint = eval_json(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(disjoint["stride"], 64);
}

#[test]
fn compare_reports_both_models_on_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let model = hf();
    let q = tmp.path().join("octet8");
    let (ok, _, stderr) = common::octet(&[
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let v = eval_json(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "32",
        "--stride",
        "16",
        "--compare",
        q.to_str().unwrap(),
    ]);
    let alone = eval_json(&[
        "--model",
        q.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "32",
        "--stride",
        "16",
    ]);
    let c = &v["compare"];
    assert_eq!(c["tokens"], v["tokens"]);
    assert_eq!(c["perplexity"], alone["perplexity"]);
    let (p, pc) = (
        v["perplexity"].as_f64().unwrap(),
        c["perplexity"].as_f64().unwrap(),
    );
    let d = c["relative_diff"].as_f64().unwrap();
    assert!((d - (pc - p) / p).abs() < 1e-12);
    // 8-bit weights move the perplexity a little, not a lot.
    assert!(d != 0.0 && d.abs() < 0.05, "relative difference {d}");

    let (ok, stdout, stderr) = common::octet(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--compare",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("perplexity") && stdout.contains("relative difference +0.0000%"),
        "{stdout}"
    );
}

#[test]
fn eval_refuses_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let model = hf();
    let m = model.to_str().unwrap();
    let d = data.to_str().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let one = tmp.path().join("one.txt");
    std::fs::write(&one, "a").unwrap();

    // A LoRA adapter with the wrong input width, and one for modules this model lacks.
    let write_adapter = |name: &str, tensors: &[(&str, Tensor)]| -> PathBuf {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#,
        )
        .unwrap();
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        Tensor::write_safetensors(&named, dir.join("adapter_model.safetensors")).unwrap();
        dir
    };
    let f = (tch::Kind::Float, tch::Device::Cpu);
    let wrong_shape = write_adapter(
        "wrong_shape",
        &[
            (
                "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight",
                Tensor::zeros([4, 50], f),
            ),
            (
                "base_model.model.transformer.h.0.attn.q_proj.lora_B.weight",
                Tensor::zeros([72, 4], f),
            ),
        ],
    );
    let other_base = write_adapter(
        "other_base",
        &[
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                Tensor::zeros([4, 72], f),
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                Tensor::zeros([72, 4], f),
            ),
        ],
    );
    let missing = tmp.path().join("missing.txt");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--data", empty.to_str().unwrap()], "empty"),
        (vec!["--data", one.to_str().unwrap()], "at least 2"),
        (
            vec!["--data", d, "--ctx", "16", "--stride", "17"],
            "--stride 17",
        ),
        (vec!["--data", d, "--stride", "0"], "--stride 0"),
        (vec!["--data", d, "--ctx", "65"], "64 positions"),
        (vec!["--data", d, "--ctx", "1"], "at least 2 tokens"),
        (vec!["--data", d, "--max-tokens", "1"], "at least 2"),
        (
            vec!["--data", d, "--adapter", wrong_shape.to_str().unwrap()],
            "shape mismatch",
        ),
        (
            vec!["--data", d, "--adapter", other_base.to_str().unwrap()],
            "matches no module",
        ),
        (vec!["--data", missing.to_str().unwrap()], "missing.txt"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["eval", "--model", m];
        args.extend(extra.iter().copied());
        let (ok, stdout, stderr) = common::octet(&args);
        assert!(!ok, "{extra:?} should fail; stdout {stdout}");
        assert!(
            stderr.contains(want),
            "{extra:?}: expected '{want}' in: {stderr}"
        );
        assert!(stdout.is_empty(), "{extra:?}: {stdout}");
    }
}

fn hf_greedy(prompts: &[Vec<i64>], n: usize, extra: &[&str]) -> Vec<Vec<i64>> {
    let ids = serde_json::to_string(prompts).unwrap();
    let model = hf();
    let n = n.to_string();
    let mut args: Vec<&OsStr> = vec![model.as_os_str(), OsStr::new(&ids), OsStr::new(&n)];
    args.extend(extra.iter().map(OsStr::new));
    serde_json::from_value(script_json("hf_generate.py", &args)).unwrap()
}

fn prompt(len: usize, salt: i64) -> Vec<i64> {
    (0..len as i64)
        .map(|i| (i * 37 + salt * 11 + 5) % 301)
        .collect()
}

#[test]
fn greedy_tokens_equal_transformers_generate() {
    let m = load(&hf());
    let model = m.model.as_ref();
    // Equal-length prompts go through transformers as one batch.
    let short: Vec<Vec<i64>> = (0..3).map(|s| prompt(5, s)).collect();
    let long: Vec<Vec<i64>> = vec![prompt(30, 7)];
    for (prompts, extra, penalty) in [
        (&short, vec!["--no-eos"], 1.0),
        (&long, vec!["--no-eos"], 1.0),
        (&short, vec!["--no-eos", "--repetition-penalty", "1.3"], 1.3),
        (&short, vec!["--no-eos", "--repetition-penalty", "0.8"], 0.8),
    ] {
        let theirs = hf_greedy(prompts, 20, &extra);
        for (p, t) in prompts.iter().zip(&theirs) {
            let opts = GenerateOptions {
                repetition_penalty: penalty,
                ..GenerateOptions::greedy(20)
            };
            let ours = generate(model, p, &opts, |_| true).unwrap();
            assert_eq!(&ours, t, "prompt {p:?}, {extra:?}");
            assert_eq!(ours.len(), 20);
        }
    }
    // With the model's EOS (id 0 in generation_config.json) both stop at the same place.
    let eos = octet::generate::model_eos_ids(&hf());
    assert_eq!(eos, vec![0]);
    let prompts: Vec<Vec<i64>> = (0..6).map(|s| prompt(4, 100 + s)).collect();
    let theirs = hf_greedy(&prompts, 40, &[]);
    for (p, t) in prompts.iter().zip(&theirs) {
        let opts = GenerateOptions {
            eos: eos.clone(),
            ..GenerateOptions::greedy(40)
        };
        assert_eq!(
            &generate(model, p, &opts, |_| true).unwrap(),
            t,
            "prompt {p:?}"
        );
    }
    // The batched greedy path gives the same rows.
    let batch = Tensor::from_slice2(&short);
    for use_cache in [true, false] {
        let rows: Vec<Vec<i64>> =
            Vec::try_from(generate_batch(model, &batch, 20, use_cache).unwrap()).unwrap();
        assert_eq!(rows, hf_greedy(&short, 20, &["--no-eos"]));
    }
}

#[test]
fn kv_cache_output_equals_recomputation() {
    let m = load(&hf());
    let model = m.model.as_ref();
    for (len, salt) in [(1, 0), (5, 1), (17, 2), (40, 3)] {
        let p = prompt(len, salt);
        for opts in [
            GenerateOptions::greedy(20),
            GenerateOptions {
                temperature: 0.9,
                top_k: 40,
                top_p: 0.9,
                repetition_penalty: 1.1,
                seed: 42 + salt as u64,
                max_new_tokens: 20,
                ..Default::default()
            },
        ] {
            let cached = generate(model, &p, &opts, |_| true).unwrap();
            let full = generate(
                model,
                &p,
                &GenerateOptions {
                    use_cache: false,
                    ..opts.clone()
                },
                |_| true,
            )
            .unwrap();
            assert_eq!(cached, full, "prompt of {len}, {opts:?}");
            assert_eq!(cached.len(), 20.min(64 - len));
        }
    }
}

#[test]
fn sampling_is_seeded_and_processors_follow_transformers() {
    let m = load(&hf());
    let model = m.model.as_ref();
    let p = prompt(6, 9);
    let sample = |seed: u64, top_k: usize, top_p: f64| {
        let opts = GenerateOptions {
            temperature: 1.0,
            top_k,
            top_p,
            seed,
            max_new_tokens: 30,
            ..Default::default()
        };
        generate(model, &p, &opts, |_| true).unwrap()
    };
    assert_eq!(sample(1, 0, 1.0), sample(1, 0, 1.0));
    assert_ne!(sample(1, 0, 1.0), sample(2, 0, 1.0));
    let greedy = generate(model, &p, &GenerateOptions::greedy(30), |_| true).unwrap();
    assert_eq!(sample(3, 1, 1.0), greedy, "top-k 1 is greedy");
    assert_eq!(sample(4, 0, 1e-6), greedy, "a tiny top-p is greedy");
    // on_token can stop generation; the token it refused is still returned.
    let mut seen = Vec::new();
    let out = generate(model, &p, &GenerateOptions::greedy(30), |t| {
        seen.push(t);
        seen.len() < 4
    })
    .unwrap();
    assert_eq!(out, greedy[..4]);
    assert_eq!(seen, out);

    // The processors on hand-made logits.
    let opts = |f: &dyn Fn(&mut GenerateOptions)| {
        let mut o = GenerateOptions {
            temperature: 1.0,
            ..Default::default()
        };
        f(&mut o);
        Sampler::new(&o)
    };
    let mut l = vec![2.0f32, -2.0, 1.0, 0.5];
    opts(&|o| o.repetition_penalty = 2.0).process(&mut l, &[0, 1, 1]);
    assert_eq!(l, vec![1.0, -4.0, 1.0, 0.5]);
    let mut l = vec![3.0f32, 1.0, 2.0, 2.0, 0.0];
    opts(&|o| o.top_k = 2).process(&mut l, &[]);
    // Ties with the 2nd largest are kept.
    assert_eq!(l, vec![3.0, f32::NEG_INFINITY, 2.0, 2.0, f32::NEG_INFINITY]);
    // Probabilities .5, .25, .125, .125: tokens go, least likely first, while the mass
    // removed stays ≤ 1 - p, so .7 and .74 keep the two largest and .8 keeps three.
    let base = [3.0f32, 2.0, 1.0, 1.0]
        .iter()
        .map(|x| x * std::f32::consts::LN_2)
        .collect::<Vec<_>>();
    for (p, kept) in [(0.7, 2), (0.74, 2), (0.8, 3), (1.0, 4)] {
        let mut l = base.clone();
        opts(&|o| o.top_p = p).process(&mut l, &[]);
        assert_eq!(
            l.iter().filter(|x| x.is_finite()).count(),
            kept,
            "top-p {p}: {l:?}"
        );
    }
    let mut l = vec![1.0f32, 4.0, 2.0];
    opts(&|o| o.temperature = 2.0).process(&mut l, &[]);
    assert_eq!(l, vec![0.5, 2.0, 1.0]);
    let mut l = vec![1.0f32, 4.0, 9.0];
    let mut s = opts(&|o| {
        o.temperature = 0.0;
        o.vocab_limit = Some(2)
    });
    assert_eq!(s.next_token(&mut l, &[]), 1);
    for bad in [
        GenerateOptions {
            temperature: -1.0,
            ..Default::default()
        },
        GenerateOptions {
            top_p: 0.0,
            ..Default::default()
        },
        GenerateOptions {
            repetition_penalty: 0.0,
            ..Default::default()
        },
    ] {
        assert!(generate(model, &p, &bad, |_| true).is_err());
    }
}

#[test]
fn text_stream_holds_back_partial_characters_and_stop_prefixes() {
    let mut s = TextStream::new(&[]);
    assert_eq!(s.push("a"), "a");
    assert_eq!(s.push("a\u{FFFD}"), "");
    assert_eq!(s.push("a\u{FFFD}"), "");
    assert_eq!(s.push("a€"), "€");
    assert_eq!(s.push("a€b\u{FFFD}"), "b");
    assert_eq!(s.finish("a€b\u{FFFD}"), "\u{FFFD}");

    let mut s = TextStream::new(&["\n\n".to_string(), "END".to_string()]);
    assert_eq!(s.push("x"), "x");
    assert_eq!(s.push("x\n"), "");
    assert_eq!(s.push("x\ny"), "\ny");
    assert_eq!(s.push("x\nyE"), "");
    assert_eq!(s.push("x\nyEN"), "");
    assert_eq!(s.push("x\nyENZ"), "ENZ");
    assert_eq!(s.push("x\nyENZ\n"), "");
    assert!(!s.stopped());
    assert_eq!(s.push("x\nyENZ\n\nmore"), "");
    assert!(s.stopped());
    assert_eq!(s.push("x\nyENZ\n\nmore and more"), "");
    assert_eq!(s.finish("x\nyENZ\n\nmore and more"), "");
}

fn gen_cli(prompt_text: &str, extra: &[&str]) -> (bool, String, String) {
    let model = hf();
    let mut a = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt_text,
    ];
    a.extend_from_slice(extra);
    common::octet(&a)
}

/// What the CLI should print: the prompt and the greedy continuation, decoded after the
/// prompt's ids and limited to ids the tokenizer knows, stopping at EOS.
fn expected_greedy(prompt_text: &str, n: usize) -> (String, usize) {
    let m = load(&hf());
    let tok = Tokenizer::from_dir(hf()).unwrap();
    let ids: Vec<u32> = tok.encode(prompt_text).unwrap();
    let mut eos = octet::generate::model_eos_ids(&hf());
    eos.push(i64::from(tok.eos_id().unwrap()));
    let opts = GenerateOptions {
        eos: eos.clone(),
        vocab_limit: Some(tok.vocab_size()),
        ..GenerateOptions::greedy(n)
    };
    let p: Vec<i64> = ids.iter().map(|&t| t.into()).collect();
    let new = generate(m.model.as_ref(), &p, &opts, |_| true).unwrap();
    let kept: Vec<u32> = new
        .iter()
        .filter(|t| !eos.contains(t))
        .map(|&t| t as u32)
        .collect();
    let prefix = tok.decode(&ids).unwrap();
    let all: Vec<u32> = ids.iter().chain(&kept).copied().collect();
    let full = tok.decode(&all).unwrap();
    (format!("{prompt_text}{}", &full[prefix.len()..]), new.len())
}

#[test]
fn cli_prints_prompt_then_continuation_with_and_without_cache() {
    for prompt_text in ["Hello, wörld", "The quick brown fox", "x"] {
        let (want, _) = expected_greedy(prompt_text, 20);
        for extra in [vec![], vec!["--no-cache"]] {
            let mut args = vec!["--temperature", "0", "--max-new-tokens", "20"];
            args.extend(extra.iter().copied());
            let (ok, stdout, stderr) = gen_cli(prompt_text, &args);
            assert!(ok, "{stderr}");
            assert_eq!(stdout, want, "{prompt_text:?} {extra:?}");
            assert!(stderr.contains("tokens/s"), "{stderr}");
        }
    }
    // --prompt-file reads the prompt verbatim; a seeded sample repeats.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("prompt.txt");
    std::fs::write(&f, "Once upon a time\n").unwrap();
    let model = hf();
    let run = |seed: &str| {
        common::octet(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-file",
            f.to_str().unwrap(),
            "--seed",
            seed,
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--max-new-tokens",
            "16",
        ])
    };
    let (ok, a, stderr) = run("5");
    assert!(ok, "{stderr}");
    assert!(a.starts_with("Once upon a time\n"), "{a}");
    assert_eq!(run("5").1, a);
}

#[test]
fn cli_stop_strings_cut_the_output_before_them() {
    let prompt_text = "The quick brown fox";
    let (full, _) = expected_greedy(prompt_text, 30);
    let cont = &full[prompt_text.len()..];
    let chars: Vec<(usize, char)> = cont.char_indices().collect();
    assert!(
        chars.len() > 8,
        "continuation too short to test stops: {cont:?}"
    );
    // A two-character stop taken from the middle of the greedy continuation.
    let (i, j) = (chars[5].0, chars.get(7).map_or(cont.len(), |c| c.0));
    let stop = &cont[i..j];
    let cut = cont.find(stop).unwrap();
    let (ok, stdout, stderr) = gen_cli(
        prompt_text,
        &[
            "--temperature",
            "0",
            "--max-new-tokens",
            "30",
            "--stop",
            "never-seen",
            "--stop",
            stop,
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout, format!("{prompt_text}{}", &cont[..cut]));
    assert!(stderr.contains("stop string"), "{stderr}");
}

#[test]
fn generate_refuses_prompts_that_fill_the_context() {
    for len in [64, 100] {
        let p = "a".repeat(len);
        let (ok, stdout, stderr) = gen_cli(&p, &["--temperature", "0"]);
        assert!(!ok, "a prompt of {len} tokens should fail");
        assert!(stderr.contains("64 positions"), "{stderr}");
        assert!(stdout.is_empty());
    }
    let (ok, _, stderr) = gen_cli("", &[]);
    assert!(!ok && stderr.contains("empty"), "{stderr}");
    let (ok, _, stderr) = gen_cli("hi", &["--top-p", "1.5"]);
    assert!(!ok && stderr.contains("--top-p"), "{stderr}");
    // Short of the limit, generation stops at the model's positions.
    let (ok, stdout, stderr) = gen_cli(&"b".repeat(60), &["--temperature", "0", "--ignore-eos"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("room for 4 new tokens"), "{stderr}");
    assert!(stdout.starts_with(&"b".repeat(60)));
    let m = load(&hf());
    let err = generate(
        m.model.as_ref(),
        &prompt(64, 0),
        &GenerateOptions::greedy(1),
        |_| true,
    );
    assert!(err.is_err());
    let out = generate(
        m.model.as_ref(),
        &prompt(60, 0),
        &GenerateOptions::greedy(20),
        |_| true,
    );
    assert_eq!(out.unwrap().len(), 4);
}

/// 8-bit models step token by token through the fused de-quantize-and-multiply kernels (few
/// rows: every Linear, and the tied 8-bit head of the Llama) while a whole sequence goes
/// through de-quantize-then-GEMM; both must give the same logits, for one row and a batch.
#[test]
fn eight_bit_decode_steps_match_the_full_forward() {
    let opts = LoadOptions {
        quantize: Some(QuantizeOptions::default()),
        ..Default::default()
    };
    for dir in [hf(), common::fixture("tiny_llama/tied")] {
        let m = load_model(&dir, &opts).unwrap();
        let model = m.model.as_ref();
        for batch in [1usize, 3] {
            let rows: Vec<Vec<i64>> = (0..batch).map(|b| prompt(30, 20 + b as i64)).collect();
            let ids = Tensor::from_slice2(&rows);
            let (prefill, total) = (20i64, 30i64);
            tch::no_grad(|| {
                let full = model.forward(&ids).unwrap();
                let n = model.info().blocks;
                let mut caches: Vec<LayerCache> =
                    (0..n).map(|_| LayerCache::with_capacity(30)).collect();
                let mut step = |from: i64, len: i64| {
                    let mut h = model.embed(&ids.narrow(1, from, len)).unwrap();
                    for (i, c) in caches.iter_mut().enumerate() {
                        h = model.block(i, &h, Some(c)).unwrap();
                    }
                    model.head(&h).unwrap()
                };
                let mut got = vec![step(0, prefill)];
                for t in prefill..total {
                    got.push(step(t, 1));
                }
                let got = Tensor::cat(&got, 1);
                let scale = full.abs().max().double_value(&[]);
                let err = (&got - &full).abs().max().double_value(&[]) / scale;
                assert!(err < 1e-4, "{}, batch {batch}: {err}", dir.display());
            });
        }
    }
}

/// `eval --adapter` takes the folders `merge` takes: a pickled `adapter_model.bin` holding a
/// `modules_to_save` copy of lm_head, as peft saves it and with the `.modules_to_save.`
/// wrapper some peft versions keep in the names. Logits and perplexity against peft's.
#[test]
fn bin_adapter_with_modules_to_save_matches_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let model = hf();
    let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3, 11, 4]).unsqueeze(0);
    let (adapter, theirs) = peft_adapter(
        tmp.path(),
        "adapter_bin",
        &ids,
        &["--bin", "--modules-to-save", "lm_head"],
    );
    assert!(adapter.join("adapter_model.bin").is_file());
    assert!(!adapter.join("adapter_model.safetensors").exists());

    let mut m = load(&model);
    let cfg = octet::peft::load_adapter(m.model.as_mut(), &adapter).unwrap();
    assert_eq!(cfg.modules_to_save, Some(vec!["lm_head".to_string()]));
    let ours = tch::no_grad(|| m.model.forward(&ids).unwrap());
    let d = common::max_abs_diff(&ours, &theirs);
    assert!(
        d < 1e-4,
        "logits with the adapter differ from peft's by {d}"
    );

    let ppl = |adapter: &Path| {
        eval_json(&[
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--stride",
            "24",
        ])["perplexity"]
            .as_f64()
            .unwrap()
    };
    let theirs = script_json(
        "hf_perplexity.py",
        &[
            model.as_os_str(),
            data.as_os_str(),
            OsStr::new("64"),
            OsStr::new("24"),
            OsStr::new("--adapter"),
            adapter.as_os_str(),
        ],
    )["perplexity"]
        .as_f64()
        .unwrap();
    let p = ppl(&adapter);
    assert!(
        rel(p, theirs) < 1e-4,
        "octet {p}, transformers+peft {theirs}"
    );

    // The same tensors as safetensors, lm_head's named inside the modules_to_save wrapper.
    let wrapped = tmp.path().join("adapter_wrapped");
    std::fs::create_dir_all(&wrapped).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        wrapped.join("adapter_config.json"),
    )
    .unwrap();
    let store = octet::io::open_file(&adapter.join("adapter_model.bin")).unwrap();
    let tensors: Vec<(String, Tensor)> = store
        .names()
        .into_iter()
        .map(|n| {
            let t = octet::peft::read_adapter_tensor(store.as_ref(), &n).unwrap();
            (n.replace("lm_head.", "lm_head.modules_to_save.default."), t)
        })
        .collect();
    assert!(tensors.iter().any(|(n, _)| n.contains(".modules_to_save.")));
    octet::io::safetensors::save_tensors(&wrapped.join("adapter_model.safetensors"), &tensors, &[])
        .unwrap();
    let pw = ppl(&wrapped);
    assert!(rel(pw, p) < 1e-9, "wrapped names {pw}, plain {p}");
}

#[test]
fn kl_divergence_of_a_compared_model_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    // A second model: the tiny one with every matrix perturbed by a few percent.
    let other = tmp.path().join("perturbed");
    common::copy_dir(&hf(), &other);
    let path = other.join("model.safetensors");
    let perturbed: Vec<(String, Tensor)> = {
        let _guard = common::global_rng();
        tch::manual_seed(11);
        common::load_safetensors(&path)
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dim() == 2 && t.is_floating_point() {
                    &t + t.randn_like() * t.std(true) * 0.2
                } else {
                    t
                };
                (k, t)
            })
            .collect()
    };
    Tensor::write_safetensors(&perturbed, &path).unwrap();
    let (model, data_s, other_s) = (
        hf(),
        data.display().to_string(),
        other.display().to_string(),
    );
    let v = eval_json(&[
        "--model",
        model.to_str().unwrap(),
        "--compare",
        &other_s,
        "--kl",
        "--data",
        &data_s,
        "--ctx",
        "32",
        "--stride",
        "16",
    ]);
    let want = script_json(
        "hf_perplexity.py",
        &[
            model.as_os_str(),
            data.as_os_str(),
            OsStr::new("32"),
            OsStr::new("16"),
            OsStr::new("--kl-against"),
            other.as_os_str(),
        ],
    )["kl"]
        .clone();
    let got = &v["compare"]["kl"];
    assert_eq!(got["tokens"], want["tokens"], "{got} vs {want}");
    assert_eq!(
        got["top1_agreement"], want["top1_agreement"],
        "{got} vs {want}"
    );
    for key in ["kl_mean", "kl_max"] {
        let (g, w) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
        assert!(
            w > 1e-3 && rel(g, w) < 1e-4,
            "{key}: octet {g} vs transformers {w}"
        );
    }
    // A model against itself: no divergence, the same top token everywhere.
    let same = eval_json(&[
        "--model",
        model.to_str().unwrap(),
        "--compare",
        model.to_str().unwrap(),
        "--kl",
        "--data",
        &data_s,
        "--ctx",
        "32",
    ]);
    assert_eq!(same["compare"]["kl"]["kl_max"].as_f64(), Some(0.0));
    assert_eq!(same["compare"]["kl"]["top1_agreement"].as_f64(), Some(1.0));
}
