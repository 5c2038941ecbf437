//! Real weights: SmolLM2-135M-Instruct from its llama.cpp GGUF (Q4_1 + Q8_0), on real English
//! (the 1911 Britannica article on Shakespeare): perplexity against transformers on the same
//! de-quantized weights and against bitsandbytes' 8-bit quantization of them, a short LoRA run,
//! greedy generation, and the GGUF tokenizer against transformers'. Fixtures: `make fixtures`
//! (scripts/fetch_smollm2.sh, scripts/gen_tokenizer_vectors.py --gguf).
use crate::common;

use crate::common::{convert_ok, script_json};

use octet::io::gguf::GgufFile;
use octet::load::{load_model, LoadOptions};
use octet::model::CausalLm;
use octet::tokenizer::Tokenizer;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Tokens per window; windows do not overlap and carry no context.
const WINDOW: usize = 1024;
/// Bytes of the article scored.
const TEXT_BYTES: usize = 8192;

fn gguf() -> PathBuf {
    common::fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The whole article.
fn article() -> &'static str {
    static A: OnceLock<String> = OnceLock::new();
    A.get_or_init(|| {
        std::fs::read_to_string(common::fixture("smollm2/britannica-11th.txt")).unwrap()
    })
}

/// Bytes `start..end` of the article, both cut back to a character boundary.
fn slice(start: usize, end: usize) -> &'static str {
    let full = article();
    let back = |mut i: usize| {
        i = i.min(full.len());
        while !full.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    &full[back(start)..back(end)]
}

/// The first `TEXT_BYTES` bytes of the article.
fn text() -> &'static str {
    slice(0, TEXT_BYTES)
}

fn elapsed(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// exp(mean NLL) of each window predicting its tokens 2..len, as scripts/hf_window_ppl.py.
fn perplexity(model: &dyn CausalLm, ids: &[i64]) -> f64 {
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in ids.chunks(WINDOW).filter(|c| c.len() >= 2) {
        let x = Tensor::from_slice(chunk).unsqueeze(0);
        let logits = tch::no_grad(|| model.forward(&x).unwrap()).squeeze_dim(0);
        let n = chunk.len() as i64 - 1;
        let logp = logits.narrow(0, 0, n).log_softmax(-1, Kind::Float);
        let target = Tensor::from_slice(&chunk[1..]).unsqueeze(1);
        nll -= logp
            .gather(1, &target, false)
            .to_kind(Kind::Double)
            .sum(Kind::Double)
            .double_value(&[]);
        count += n as usize;
    }
    (nll / count as f64).exp()
}

/// Folder for what the tests here share, under cargo's per-target scratch directory; each run
/// starts it afresh (it is several hundred MB, so it is not a leaked temp dir per run).
fn scratch() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// The GGUF converted as bitsandbytes rounds (dynamic code, the spec's block 256, f32
/// scales, to nearest), once per test run.
fn octet8() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let t0 = Instant::now();
        let d = scratch().join("octet8");
        convert_ok(
            &gguf(),
            &d,
            &common::nearest_dynamic(&["--block-size", "256"]),
        );
        eprintln!("[{:6.1} s] converted to 8-bit", elapsed(t0));
        d
    })
}

/// The GGUF's de-quantized f32 weights as a Hugging Face folder (converted with nothing
/// quantized, then exported), for transformers.
fn hf_f32() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let t0 = Instant::now();
        let float_dir = scratch().join("float");
        convert_ok(
            &gguf(),
            &float_dir,
            &["--skip", "model.embed_tokens", "--skip", "*_proj"],
        );
        let hf = scratch().join("hf");
        octet::export::export_hf(&float_dir, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
        std::fs::remove_dir_all(&float_dir).unwrap();
        eprintln!("[{:6.1} s] converted (float) and exported", elapsed(t0));
        hf
    })
}

#[derive(serde::Deserialize)]
struct Vector {
    text: String,
    ids: Vec<u32>,
}

/// transformers' ids for SmolLM2's GGUF tokenizer (scripts/gen_tokenizer_vectors.py --gguf).
#[derive(serde::Deserialize)]
struct GgufVectors {
    gguf: String,
    /// `tokenizer.ggml.pre`.
    pre: String,
    /// How many strings transformers alone (without llama.cpp's digit split) gets wrong.
    digit_split_changes: usize,
    eos_token_id: u32,
    bos_token_id: u32,
    vectors: Vec<Vector>,
}

fn gguf_vectors() -> GgufVectors {
    let p = common::fixture("smollm2/tokenizer_vectors.json");
    let v: GgufVectors = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(v.gguf, "SmolLM2-135M-Instruct.Q4_1.gguf", "{}", p.display());
    v
}

#[test]
fn perplexity_matches_transformers_and_8bit_is_no_worse_than_bitsandbytes() {
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("[{:6.1} s] {what}", elapsed(t0));
    let gguf = gguf();
    let text = text();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
    let ids32 = tok.encode(text).unwrap();
    assert_eq!(
        tok.decode(&ids32).unwrap(),
        text,
        "byte-level BPE round trip"
    );
    assert_eq!(tok.eos_id(), Some(2));
    let ids: Vec<i64> = ids32.iter().map(|&i| i as i64).collect();
    assert!((1000..4000).contains(&ids.len()), "{} tokens", ids.len());

    // octet, f32, straight from the GGUF.
    let m = load_model(&gguf, &LoadOptions::default()).unwrap();
    let info = m.model.info();
    assert_eq!(
        (info.blocks, info.hidden, info.vocab_size),
        (30, 576, 49152)
    );
    let ppl_f32 = perplexity(m.model.as_ref(), &ids);
    drop(m);
    lap("octet f32 from the GGUF");

    // octet, 8-bit (the spec's defaults).
    let q_dir = octet8();
    let m = load_model(q_dir, &LoadOptions::default()).unwrap();
    let quantized: Vec<String> = m
        .graph
        .nodes
        .iter()
        .filter(|n| n.kind.starts_with("Bnb8"))
        .map(|n| n.path.clone())
        .collect();
    // The embedding (also the tied head) and the 7 projections of each of the 30 blocks.
    assert_eq!(quantized.len(), 1 + 30 * 7, "{quantized:?}");
    assert!(quantized.iter().any(|p| p == "model.embed_tokens"));
    let ppl_8bit = perplexity(m.model.as_ref(), &ids);
    let manifest = octet::manifest::Manifest::read(q_dir).unwrap().unwrap();
    drop(m);
    lap("octet 8-bit");

    // transformers on exactly the f32 weights, then with bitsandbytes' blockwise 8-bit round
    // trip of the same modules at the same block size (the llama spec's default).
    let block = octet::arch::find("llama").unwrap().spec().block_size;
    assert_eq!(
        manifest.block_size,
        block.get() as i64,
        "octet.toml's block size"
    );
    let hf = hf_f32();
    let ids_file = scratch().join("ppl_ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &Tensor::from_slice(&ids))], &ids_file).unwrap();
    let modules_file = scratch().join("quantized_modules.json");
    std::fs::write(&modules_file, serde_json::to_string(&quantized).unwrap()).unwrap();
    let r = script_json(
        "bnb_window_ppl.py",
        &[
            hf.as_os_str(),
            ids_file.as_os_str(),
            WINDOW.to_string().as_ref(),
            block.get().to_string().as_ref(),
            modules_file.as_os_str(),
        ],
    );
    lap("transformers f32 and bitsandbytes 8-bit");
    let ppl_hf = r["f32"]["ppl"].as_f64().unwrap();
    let ppl_bnb = r["bnb"]["ppl"].as_f64().unwrap();
    // Tied embeddings: the head is the embedding's table, quantized once.
    assert_eq!(r["modules"], 1 + 30 * 7, "{r}");
    assert_eq!(r["f32"]["tokens"], ids.len() - ids.len().div_ceil(WINDOW));

    let rel = |a: f64, b: f64| a / b - 1.0;
    eprintln!(
        "SmolLM2-135M, {} tokens, {WINDOW}-token windows, block {}: octet f32 {ppl_f32:.6}, \
         transformers f32 {ppl_hf:.6}; octet 8-bit {ppl_8bit:.6} ({:+.4}% vs f32), \
         bitsandbytes 8-bit {ppl_bnb:.6} ({:+.4}% vs f32; weight rel-MSE {:.3e})",
        ids.len(),
        block.get(),
        100.0 * rel(ppl_8bit, ppl_f32),
        100.0 * rel(ppl_bnb, ppl_hf),
        r["weight_rel_mse"].as_f64().unwrap(),
    );
    let drift = rel(ppl_f32, ppl_hf).abs();
    assert!(drift < 1e-3, "octet {ppl_f32} vs transformers {ppl_hf}");
    assert!(
        rel(ppl_8bit, ppl_f32).abs() < 5e-3,
        "8-bit {ppl_8bit} vs f32 {ppl_f32}"
    );
    // octet rounds every weight to its nearest code; bitsandbytes' CPU kernel rounds through
    // a lookup table and lands one code off on ~0.2% of them, so octet should lose no more
    // perplexity to 8 bits than bitsandbytes does (here +0.184% vs +0.193%). Each side is
    // measured against its own f32 run so the two implementations' drift cancels; what is
    // left allowed is twice that drift as measured on identical f32 weights (octet vs
    // transformers, < 1e-7 here), with a 1e-5 floor: well below the 9e-5 octet is ahead by.
    let tol = (2.0 * drift).max(1e-5);
    let loss_octet = ppl_8bit / ppl_f32;
    let loss_bnb = ppl_bnb / ppl_hf;
    assert!(
        loss_octet <= loss_bnb * (1.0 + tol),
        "octet 8-bit loses {:+.4}% perplexity, bitsandbytes {:+.4}% (tolerance {tol:.1e})",
        100.0 * (loss_octet - 1.0),
        100.0 * (loss_bnb - 1.0)
    );
    // The same on the raw numbers, with the f32 drift allowed on top.
    assert!(
        ppl_8bit <= ppl_bnb * (1.0 + tol + drift),
        "octet 8-bit {ppl_8bit} vs bitsandbytes 8-bit {ppl_bnb} (tolerance {tol:.1e} + {drift:.1e})"
    );
    // A sane language model on English prose (llama.cpp reports ≈21.7 here). transformers'
    // own GGUF reader (`hf_window_ppl.py DIR IDS 1024 FILE`) also gives 21.704; it is left out
    // for time (≈45 s): gen_tiny_llama.py checks it agrees with our reading on tied.gguf.
    assert!((10.0..40.0).contains(&ppl_f32), "{ppl_f32}");
}

/// Bits per weight of a folder's 8-bit weights: their bytes, block scales and codes.
fn bits_per_weight(dir: &Path) -> f64 {
    let t = common::load_safetensors(&dir.join("model.safetensors"));
    let (mut elems, mut bytes) = (0usize, 0usize);
    for (name, w) in &t {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if w.kind() != Kind::Uint8 {
            continue;
        }
        elems += w.numel();
        for p in [
            "weight",
            "absmax",
            "absmax_q",
            "absmax_scale",
            "absmax_offset",
            "code",
        ] {
            if let Some(x) = t.get(&format!("{module}.{p}")) {
                bytes += x.numel() * x.kind().elt_size_in_bytes();
            }
        }
    }
    8.0 * bytes as f64 / elems as f64
}

/// The default conversion (linear code, block 64, double-quantized scales, GPTQ on the
/// built-in text) against the f32 model on both quality texts. The target is 0.15% on the long
/// texts (README, "8-bit codes"); these 8 KB excerpts are allowed twice that.
#[test]
fn default_8bit_conversion_stays_within_the_quality_target() {
    let dir = scratch().join("octet8-default");
    convert_ok(&gguf(), &dir, &[]);
    let manifest = octet::manifest::Manifest::read(&dir).unwrap().unwrap();
    let cal = manifest.calibration.expect("calibrated by default");
    assert_eq!(
        (cal.weights, cal.data.name.as_str()),
        (1 + 30 * 7, "builtin")
    );
    let bits = bits_per_weight(&dir);
    assert!(bits <= 8.15, "{bits} bits per weight");
    let tok = Tokenizer::from_gguf(&GgufFile::open(&gguf()).unwrap()).unwrap();
    let wiki = std::fs::read_to_string(common::fixture("quant8/wiki.txt")).unwrap();
    let mut cut = 8192.min(wiki.len());
    while !wiki.is_char_boundary(cut) {
        cut -= 1;
    }
    let texts = [("Britannica", text()), ("Wikipedia", &wiki[..cut])];
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|(_, t)| tok.encode(t).unwrap().iter().map(|&i| i as i64).collect())
        .collect();
    let ppl = |model: &Path| -> Vec<f64> {
        let m = load_model(model, &LoadOptions::default()).unwrap();
        ids.iter()
            .map(|i| perplexity(m.model.as_ref(), i))
            .collect()
    };
    let (f32, eight) = (ppl(&gguf()), ppl(&dir));
    for (((name, _), a), b) in texts.iter().zip(&f32).zip(&eight) {
        let rel = b / a - 1.0;
        eprintln!(
            "{name}: f32 {a:.4}, default 8-bit {b:.4} ({:+.3}%), {bits:.3} bits",
            100.0 * rel
        );
        assert!(rel.abs() < 3e-3, "{name}: default 8-bit {b} vs f32 {a}");
    }
}

/// `octet eval --json` perplexity of `model` (+ `adapter`) on `data`.
fn octet_eval(model: &Path, adapter: Option<&Path>, data: &Path, ctx: usize) -> f64 {
    let ctx = ctx.to_string();
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        &ctx,
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend_from_slice(&["--adapter", a.to_str().unwrap()]);
    }
    let (ok, stdout, stderr) = common::octet(&args);
    assert!(ok, "eval: {stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("eval --json printed no JSON ({e}): {stdout}"));
    v["perplexity"].as_f64().unwrap()
}

#[test]
fn short_lora_run_on_part_of_the_article_lowers_perplexity_on_the_rest() {
    let t0 = Instant::now();
    let q_dir = octet8();
    let work = scratch().join("lora");
    std::fs::create_dir_all(&work).unwrap();
    // Held out: the article's first 4 KB. Trained on: the 16 KB after it.
    let (held, train) = (slice(0, 4096), slice(4096, 4096 + 16384));
    let held_file = work.join("held_out.txt");
    let train_file = work.join("train.txt");
    std::fs::write(&held_file, held).unwrap();
    std::fs::write(&train_file, train).unwrap();
    let before = octet_eval(q_dir, None, &held_file, 512);
    eprintln!("[{:6.1} s] base perplexity {before:.4}", elapsed(t0));

    let adapter = work.join("adapter");
    let (ok, _, stderr) = common::octet(&[
        "train",
        "--model",
        q_dir.to_str().unwrap(),
        "--data",
        train_file.to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--seq-len",
        "128",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--targets",
        "q_proj,k_proj,v_proj,o_proj",
        "--eval-fraction",
        "0.05",
        "--seed",
        "0",
    ]);
    assert!(ok, "train: {stderr}");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    eprintln!("[{:6.1} s] trained", elapsed(t0));
    let after = octet_eval(q_dir, Some(&adapter), &held_file, 512);
    eprintln!(
        "[{:6.1} s] held-out perplexity {before:.4} → {after:.4} ({:+.2}%)",
        elapsed(t0),
        100.0 * (after / before - 1.0)
    );
    // Six steps (1,536 tokens) of adapting to the article's style help on the rest of it:
    // -4.4% here (-7.6% after ten steps). Training and eval are seeded and deterministic, so
    // the 2% asked for is a margin for other CPUs' float rounding, not for noise.
    assert!(
        after < before * 0.98,
        "held-out perplexity went {before:.4} → {after:.4}"
    );
}

/// Words (runs of ASCII letters, lower-cased) of `s`.
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Share of `s`'s words that occur in `vocab`, and how many distinct words `s` has.
fn english_score(s: &str, vocab: &HashSet<String>) -> (f64, usize) {
    let ws = words(s);
    let known = ws.iter().filter(|w| vocab.contains(*w)).count();
    let distinct = ws.iter().collect::<HashSet<_>>().len();
    (known as f64 / ws.len().max(1) as f64, distinct)
}

/// stdout of a greedy `octet generate` (prompt + continuation).
fn octet_greedy(model: &Path, prompt: &str, new_tokens: usize) -> String {
    let n = new_tokens.to_string();
    let (ok, stdout, stderr) = common::octet(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n,
        "--temperature",
        "0",
        "--ignore-eos",
    ]);
    assert!(ok, "generate: {stderr}");
    stdout
}

#[test]
fn greedy_generation_matches_transformers_and_reads_as_english() {
    const PROMPT: &str = "William Shakespeare, the English poet and dramatist, was born at";
    const NEW: usize = 32;
    let t0 = Instant::now();
    let gguf = gguf();
    let tok = Tokenizer::from_dir(&gguf).unwrap();
    let prompt_ids: Vec<u32> = tok.encode(PROMPT).unwrap();

    // f32: octet from the GGUF against transformers' greedy `generate` on the same weights.
    let ours = octet_greedy(&gguf, PROMPT, NEW);
    eprintln!("[{:6.1} s] octet f32: {ours:?}", elapsed(t0));
    let hf = hf_f32();
    let r = script_json(
        "hf_generate.py",
        &[
            hf.as_os_str(),
            serde_json::to_string(&[&prompt_ids]).unwrap().as_ref(),
            NEW.to_string().as_ref(),
            "--no-eos".as_ref(),
        ],
    );
    let hf_new: Vec<u32> = serde_json::from_value(r[0].clone()).unwrap();
    assert_eq!(hf_new.len(), NEW);
    let all: Vec<u32> = prompt_ids.iter().chain(&hf_new).copied().collect();
    let theirs = tok.decode(&all).unwrap();
    eprintln!("[{:6.1} s] transformers: {theirs:?}", elapsed(t0));
    assert_eq!(ours, theirs, "greedy f32 continuations differ");

    // 8-bit: the continuation is English, i.e. made of words the article uses, and not one
    // word repeated. The same score on random tokens shows the threshold can fail.
    let vocab: HashSet<String> = words(article()).into_iter().collect();
    let q = octet_greedy(octet8(), PROMPT, NEW);
    eprintln!("[{:6.1} s] octet 8-bit: {q:?}", elapsed(t0));
    let cont = q
        .strip_prefix(PROMPT)
        .unwrap_or_else(|| panic!("generate did not echo the prompt: {q:?}"));
    let (known, distinct) = english_score(cont, &vocab);
    let (known_f32, _) = english_score(&ours[PROMPT.len()..], &vocab);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u32> = (0..NEW)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 49152) as u32
        })
        .collect();
    let (known_random, _) = english_score(&tok.decode(&random).unwrap(), &vocab);
    eprintln!(
        "known-word share: 8-bit {known:.2} ({distinct} distinct words), f32 {known_f32:.2}, \
         random tokens {known_random:.2}"
    );
    assert!(
        known_random < 0.8,
        "the score does not tell random tokens apart"
    );
    assert!(
        known >= 0.8 && known_f32 >= 0.8 && distinct >= 8,
        "not English: 8-bit {cont:?} ({known:.2} known, {distinct} distinct), f32 {known_f32:.2}"
    );
}

#[test]
fn gguf_tokenizer_matches_transformers_on_test_strings() {
    let v = gguf_vectors();
    assert!(v.vectors.len() >= 30, "{} vectors", v.vectors.len());
    // The set holds strings where splitting off each digit first ("smollm") matters.
    assert_eq!(v.pre, "smollm");
    assert!(v.digit_split_changes > 0);
    let tok = Tokenizer::from_gguf(&GgufFile::open(&gguf()).unwrap()).unwrap();
    for x in &v.vectors {
        assert_eq!(tok.encode(&x.text).unwrap(), x.ids, "{:?}", x.text);
        assert_eq!(tok.decode(&x.ids).unwrap(), x.text, "decode {:?}", x.text);
    }
    // The strings exercise what they claim: specials kept whole, digits split one by one.
    let ids = |s: &str| tok.encode(s).unwrap();
    assert_eq!(ids("<|im_start|>")[..], [v.bos_token_id]);
    assert_eq!(ids("<|im_end|>")[..], [v.eos_token_id]);
    assert_eq!(ids("1564").len(), 4);
}

#[test]
fn converted_folder_keeps_the_gguf_eos_and_bos() {
    let v = gguf_vectors();
    let g = GgufFile::open(&gguf()).unwrap();
    let meta = |k: &str| g.get(k).and_then(|x| x.as_u64()).unwrap() as u32;
    let (eos, bos) = (
        meta("tokenizer.ggml.eos_token_id"),
        meta("tokenizer.ggml.bos_token_id"),
    );
    // transformers reads the same ids from the file (<|im_end|>, <|im_start|>).
    assert_eq!((eos, bos), (v.eos_token_id, v.bos_token_id));
    let from_gguf = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(
        (from_gguf.eos_id(), from_gguf.bos_id()),
        (Some(eos), Some(bos))
    );

    let dir = octet8();
    // SmolLM2's vocabulary starts with <|endoftext|> (id 0), which a guess would pick.
    let tok = Tokenizer::from_dir(dir).unwrap();
    assert_eq!(tok.eos_id(), Some(eos), "EOS of the converted folder");
    assert_eq!(tok.bos_id(), Some(bos), "BOS of the converted folder");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["eos_token_id"], eos);
    assert_eq!(cfg["bos_token_id"], bos);
    // And the folder's tokenizer is the GGUF's.
    for x in &v.vectors {
        assert_eq!(tok.encode(&x.text).unwrap(), x.ids, "{:?}", x.text);
    }
}
