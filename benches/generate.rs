//! `make bench`, inference part: KV-cached greedy generation on a true-width GPT-J (random
//! weights, fixed seed) with (a) frozen 8-bit weights and (b) f32 weights, beside (c)
//! transformers on the same shape, at batch 1 and 8. Each configuration runs in its own
//! process (so its peak resident set is its own) and reports medians over repeats of a
//! prefill-only run (one new token) and a full run; the decode rate is the difference, so the
//! prompt's cost is reported separately.
//!
//! Environment: `OCTET_BENCH_LAYERS` (default 2), `OCTET_BENCH_VOCAB` (16384),
//! `OCTET_BENCH_PROMPT` (32), `OCTET_BENCH_NEW` (32), `OCTET_BENCH_REPEATS` (3),
//! `OCTET_BENCH_BATCHES` (comma-separated, default `1,8`), `OCTET_BENCH_SKIP_HF` (set: no
//! transformers column), `OCTET_BENCH_DEVICE` (cpu), `OCTET_BENCH_EMBD` (4096),
//! `OCTET_BENCH_FLOAT` (`f32` or `bf16`: the float weights of (b) and the compute dtype of both).
mod common;

use common::{bench_device, env_or, peak_rss_mib, python, script, sync};
use octet::archs::gptj::{random_layers, Gptj, GptjConfig, RandomFrozen};
use octet::generate::generate_batch;
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One measured configuration, as every child (octet or transformers) reports it.
#[derive(Clone, Copy)]
struct Measured {
    prefill_s: f64,
    decode_tok_s: f64,
    peak_rss_mib: f64,
}

impl Measured {
    fn parse(stdout: &[u8]) -> Option<Self> {
        let text = String::from_utf8_lossy(stdout);
        let v: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
        Some(Measured {
            prefill_s: v["prefill_s"].as_f64()?,
            decode_tok_s: v["decode_tok_s"].as_f64()?,
            peak_rss_mib: v["peak_rss_mib"].as_f64()?,
        })
    }
}

#[derive(Clone, Copy)]
struct Shape {
    embd: usize,
    bf16: bool,
    device: Device,
    layers: usize,
    vocab: usize,
    batch: i64,
    prompt: i64,
    new: usize,
    repeats: usize,
}

impl Shape {
    /// The positional arguments shared by the octet child and the transformers script.
    fn args(&self) -> Vec<String> {
        [
            self.layers,
            self.vocab,
            self.batch as usize,
            self.prompt as usize,
            self.new,
            self.repeats,
        ]
        .iter()
        .map(|v| v.to_string())
        .collect()
    }

    fn kind(&self) -> Kind {
        if self.bf16 {
            Kind::BFloat16
        } else {
            Kind::Float
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn child(s: Shape, eight_bit: bool) {
    tch::manual_seed(0);
    let cfg = GptjConfig::from_json(&serde_json::json!({
        "n_embd": s.embd, "n_head": (s.embd / 256).max(1), "rotary_dim": 64, "n_layer": s.layers,
        "vocab_size": s.vocab, "n_positions": 2048
    }))
    .expect("bench config");
    let frozen = if eight_bit {
        RandomFrozen::EightBit
    } else {
        RandomFrozen::Float
    };
    let mut layers = random_layers(&cfg, frozen, (s.kind(), s.device)).expect("random layers");
    let model = Gptj::new(cfg, &mut layers, s.kind()).expect("model");
    let ids = Tensor::randint(
        s.vocab as i64,
        [s.batch, s.prompt],
        (Kind::Int64, Device::Cpu),
    );
    let run = |n: usize| {
        let t = Instant::now();
        let out = generate_batch(&model, &ids, n, true).expect("generate");
        sync(s.device);
        assert_eq!(out.size(), [s.batch, n as i64]);
        t.elapsed().as_secs_f64()
    };
    run(2); // warm-up: first-touch of buffers, libtorch's lazy initialisation
    let prefill = median((0..s.repeats).map(|_| run(1)).collect());
    let total = median((0..s.repeats).map(|_| run(s.new)).collect());
    println!(
        "{}",
        serde_json::json!({
            "prefill_s": prefill,
            "total_s": total,
            "decode_tok_s": (s.batch as f64) * (s.new - 1) as f64 / (total - prefill).max(1e-9),
            "peak_rss_mib": peak_rss_mib(),
        })
    );
}

fn report(what: &str, out: std::io::Result<std::process::Output>) -> Option<Measured> {
    match out {
        Ok(o) if o.status.success() => Measured::parse(&o.stdout).or_else(|| {
            eprintln!("{what}: no result line in its output");
            None
        }),
        Ok(o) => {
            eprintln!("{what} failed: {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("{what} could not start: {e}");
            None
        }
    }
}

fn run_octet(s: Shape, eight_bit: bool) -> Option<Measured> {
    let exe = std::env::current_exe().ok()?;
    let weights = if eight_bit { "8bit" } else { "float" };
    let out = Command::new(exe)
        .arg("--child")
        .args(s.args())
        .arg(weights)
        .args([
            s.embd.to_string(),
            (if s.bf16 { "bf16" } else { "f32" }).to_string(),
            octet::device::name(s.device),
        ])
        .output();
    report(&format!("octet {weights} child"), out)
}

fn run_hf(s: Shape) -> Option<Measured> {
    let out = Command::new(python())
        .arg(script("bench_hf_generate.py"))
        .args(s.args())
        .output();
    report("transformers bench", out)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let n = |i: usize| args[i].parse::<usize>().expect("number");
        let s = Shape {
            embd: n(8),
            bf16: args[9] == "bf16",
            device: octet::device::from_flag(&args[10]).expect("child device"),
            layers: n(1),
            vocab: n(2),
            batch: n(3) as i64,
            prompt: n(4) as i64,
            new: n(5),
            repeats: n(6),
        };
        return child(s, args[7] == "8bit");
    }
    let float = std::env::var("OCTET_BENCH_FLOAT").unwrap_or_else(|_| "f32".into());
    let base = Shape {
        embd: env_or("OCTET_BENCH_EMBD", 4096),
        bf16: float == "bf16",
        device: bench_device(),
        layers: env_or("OCTET_BENCH_LAYERS", 2),
        vocab: env_or("OCTET_BENCH_VOCAB", 16384),
        batch: 1,
        prompt: env_or("OCTET_BENCH_PROMPT", 32),
        new: env_or::<usize>("OCTET_BENCH_NEW", 32).max(2),
        repeats: env_or::<usize>("OCTET_BENCH_REPEATS", 3).max(1),
    };
    let batches: Vec<i64> = std::env::var("OCTET_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    // The transformers script runs f32 on the CPU only.
    let skip_hf = std::env::var_os("OCTET_BENCH_SKIP_HF").is_some()
        || base.bf16
        || base.device != Device::Cpu;
    let float = if base.bf16 { "bf16" } else { "f32" };
    println!(
        "\nKV-cached greedy generation on {}, GPT-J width (n_embd {}, rotary 64), {} layers, \
         vocab {}, prompt {} tokens, {} new; decode tokens/s (all rows) = median full run minus \
         median prefill, {} repeats; (a) octet 8-bit, (b) octet {float} weights, {float} compute{}",
        octet::device::name(base.device),
        base.embd,
        base.layers,
        base.vocab,
        base.prompt,
        base.new,
        base.repeats,
        if skip_hf {
            ""
        } else {
            ", (c) transformers f32"
        }
    );
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>8} {:>8}   {:>22}   {:>20}",
        "batch",
        "(a) tok/s",
        "(b) tok/s",
        "(c) tok/s",
        "a/b",
        "b/c",
        "prefill ms (a/b/c)",
        "peak RSS MiB (a/b/c)"
    );
    for batch in batches {
        let s = Shape { batch, ..base };
        let a = run_octet(s, true);
        let b = run_octet(s, false);
        let c = if skip_hf { None } else { run_hf(s) };
        let rate =
            |m: Option<Measured>| m.map_or("n/a".into(), |m| format!("{:.2}", m.decode_tok_s));
        let ratio = |x: Option<Measured>, y: Option<Measured>| match (x, y) {
            (Some(x), Some(y)) => format!("{:.3}", x.decode_tok_s / y.decode_tok_s),
            _ => "n/a".into(),
        };
        let triple = |f: &dyn Fn(Measured) -> f64| {
            [a, b, c]
                .iter()
                .map(|m| m.map_or("n/a".into(), |m| format!("{:.0}", f(m))))
                .collect::<Vec<String>>()
                .join("/")
        };
        println!(
            "{:>5} {:>9} {:>9} {:>9} {:>8} {:>8}   {:>22}   {:>20}",
            batch,
            rate(a),
            rate(b),
            rate(c),
            ratio(a, b),
            ratio(b, c),
            triple(&|m| m.prefill_s * 1e3),
            triple(&|m| m.peak_rss_mib),
        );
    }
}
