//! The mutation fuzz suite: every reader and loader driven through the library API with
//! seeded mutations of small valid files (bit flips, truncation, huge lengths, wrong dtypes,
//! non-UTF-8 names, NaN/Inf). No input may panic, and memory must stay bounded.
//! `OCTET_FUZZ_CASES` sets the number of cases (default 20,000), `OCTET_FUZZ_SEED` the seed.
use super::common::{copy_dir, fixture};
use super::fuzz_support::{peak_rss_kib, run, Style, Target};
use octet::io::gguf::GgufFile;
use octet::io::safetensors::{save_tensors, SafetensorsFile};
use octet::io::sharded::ShardedStore;
use octet::io::torch_bin::TorchBinFile;
use octet::io::TensorStore;
use octet::load::{load_model, LoadOptions};
use octet::nn::LoraConfig;
use octet::peft::{attach_lora, load_adapter, save_adapter, AdapterConfig, Targets};
use octet::train::adam8bit::Adam8bit;
use octet::train::data::{Batcher, BatcherState};
use octet::train::optim::{AdamConfig, Optimizer};
use std::path::Path;
use tch::{Kind, Tensor};

/// Reads every tensor of a store (the bytes, then as a tensor).
fn read_all(store: &dyn TensorStore) -> octet::Result<()> {
    for name in store.names() {
        store.meta(&name);
        let _ = store.tensor(&name)?;
    }
    Ok(())
}

fn load(dir: &Path) -> octet::Result<octet::load::LoadedModel> {
    load_model(dir, &LoadOptions::default())
}

/// Loads the model in `dir` and runs it on a few tokens.
fn load_and_run(dir: &Path) -> octet::Result<()> {
    let m = load(dir)?;
    // Callers (eval, generate, train) keep sequences within the model's positions.
    let t = m.model.info().max_positions.min(3);
    let ids = Tensor::from_slice(&[1i64, 2, 3][..t]).reshape([1, t as i64]);
    let _logits = m.model.forward(&ids)?;
    Ok(())
}

fn targets(work: &Path) -> Vec<Target> {
    let sub = |name: &str| {
        let d = work.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut t = Vec::new();

    let st = sub("safetensors");
    std::fs::copy(
        fixture("torch_bin/state.safetensors"),
        st.join("x.safetensors"),
    )
    .unwrap();
    t.push(Target::new(
        "safetensors",
        st,
        "x.safetensors",
        Style::Safetensors,
        12,
        |d| read_all(&SafetensorsFile::open(&d.join("x.safetensors"))?),
    ));

    let sharded = sub("sharded");
    copy_dir(&fixture("tiny_gptj/hf_sharded_safetensors"), &sharded);
    t.push(Target::new(
        "sharded index",
        sharded,
        "model.safetensors.index.json",
        Style::Text,
        6,
        |d| {
            let s = ShardedStore::open(&d.join("model.safetensors.index.json"))?;
            for n in s.names() {
                s.meta(&n);
            }
            Ok(())
        },
    ));

    for (name, file) in [
        ("torch .bin", "torch_bin/state.bin"),
        ("torch .bin deflated", "torch_bin/state_deflated.bin"),
    ] {
        let d = sub(&name.replace(' ', "_"));
        std::fs::copy(fixture(file), d.join("x.bin")).unwrap();
        t.push(Target::new(name, d, "x.bin", Style::Binary, 12, |d| {
            read_all(&TorchBinFile::open(&d.join("x.bin"))?)
        }));
    }

    let j8 = sub("gptj8bit");
    copy_dir(&fixture("tiny_gptj/gptj8bit"), &j8);
    t.push(Target::new(
        "GPT-J 8-bit .bin",
        j8.clone(),
        "pytorch_model.bin",
        Style::Binary,
        3,
        load_and_run,
    ));
    let j8c = sub("gptj8bit_config");
    copy_dir(&j8, &j8c);
    t.push(Target::new(
        "config.json",
        j8c,
        "config.json",
        Style::Text,
        3,
        load_and_run,
    ));

    let gguf = sub("gguf");
    std::fs::copy(fixture("tiny_llama/tied.gguf"), gguf.join("m.gguf")).unwrap();
    t.push(Target::new(
        "GGUF",
        gguf,
        "m.gguf",
        Style::Binary,
        10,
        |d| {
            let p = d.join("m.gguf");
            let g = GgufFile::open(&p)?;
            g.config()?;
            read_all(&g)?;
            g.hf_tokenizer()?;
            Ok(())
        },
    ));
    // One tensor of every quantized type octet reads, K-quants included.
    let kq = sub("gguf_kquants");
    std::fs::copy(fixture("ggml_vectors/kquants.gguf"), kq.join("k.gguf")).unwrap();
    t.push(Target::new(
        "GGUF K-quants",
        kq,
        "k.gguf",
        Style::Binary,
        4,
        |d| read_all(&GgufFile::open(&d.join("k.gguf"))?),
    ));

    // An octet folder, its manifest and a PEFT adapter, made by the library from the tiny GPT-J.
    let octet_dir = work.join("octet_seed");
    octet::convert::convert(
        &fixture("tiny_gptj/hf_safetensors"),
        &octet_dir,
        &Default::default(),
    )
    .expect("convert the tiny GPT-J");
    let adapter_seed = work.join("adapter_seed");
    {
        let _rng = super::common::global_rng();
        let mut m = load(&octet_dir).unwrap();
        let targets = Targets::parse("q_proj,v_proj").unwrap();
        let cfg = LoraConfig {
            r: 4,
            ..Default::default()
        };
        attach_lora(m.model.as_mut(), &targets, cfg).unwrap();
        std::fs::create_dir_all(&adapter_seed).unwrap();
        save_adapter(
            m.model.as_mut(),
            &AdapterConfig::new(cfg, &targets, "tiny", false),
            &adapter_seed,
        )
        .unwrap();
    }
    for (name, file, style) in [
        (
            "octet model.safetensors",
            "model.safetensors",
            Style::Safetensors,
        ),
        ("octet.toml", "octet.toml", Style::Text),
    ] {
        let d = sub(&name.replace([' ', '.'], "_"));
        copy_dir(&octet_dir, &d);
        t.push(Target::new(name, d, file, style, 3, load_and_run));
    }
    let model_dir = octet_dir.clone();
    for (name, file, style) in [
        (
            "PEFT adapter weights",
            "adapter_model.safetensors",
            Style::Safetensors,
        ),
        ("adapter_config.json", "adapter_config.json", Style::Text),
    ] {
        let d = sub(&name.replace([' ', '.'], "_"));
        copy_dir(&adapter_seed, &d);
        let model_dir = model_dir.clone();
        t.push(Target::new(name, d, file, style, 3, move |d| {
            let mut m = load(&model_dir)?;
            load_adapter(m.model.as_mut(), d)?;
            Ok(())
        }));
    }

    let tok = sub("tokenizer");
    std::fs::copy(
        fixture("tiny_gptj/hf_safetensors/tokenizer.json"),
        tok.join("tokenizer.json"),
    )
    .unwrap();
    t.push(Target::new(
        "tokenizer.json",
        tok,
        "tokenizer.json",
        Style::Text,
        8,
        |d| {
            let t = octet::tokenizer::Tokenizer::from_dir(d)?;
            let ids = t.encode("Hello, world! ünïcode")?;
            t.decode(&ids)?;
            Ok(())
        },
    ));

    // Resume state: the optimizer's saved state and the batcher position.
    let opt_dir = sub("optimizer");
    let params = || {
        vec![
            Tensor::ones([4, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
            Tensor::ones([300], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
        ]
    };
    {
        let ps = params();
        let mut opt = Adam8bit::new(
            ps.iter().map(|p| p.shallow_clone()).collect(),
            AdamConfig::default(),
        )
        .unwrap();
        for p in &ps {
            (p * p).sum(Kind::Float).backward();
        }
        opt.step(1e-3).unwrap();
        save_tensors(
            &opt_dir.join("optimizer.safetensors"),
            &opt.state_dict(),
            &[],
        )
        .unwrap();
    }
    t.push(Target::new(
        "resume optimizer state",
        opt_dir,
        "optimizer.safetensors",
        Style::Safetensors,
        8,
        move |d| {
            let store = SafetensorsFile::open(&d.join("optimizer.safetensors"))?;
            let state: Vec<(String, Tensor)> = store
                .names()
                .into_iter()
                .map(|n| Ok((n.clone(), store.tensor(&n)?)))
                .collect::<octet::Result<_>>()?;
            let ps = params();
            let mut opt = Adam8bit::new(ps, AdamConfig::default())?;
            opt.load_state_dict(&state)
        },
    ));
    let batcher = sub("batcher");
    std::fs::write(
        batcher.join("state.json"),
        serde_json::to_string(&BatcherState {
            epoch: 3,
            cursor: 5,
            seed: 7,
            within: 0,
        })
        .unwrap(),
    )
    .unwrap();
    t.push(Target::new(
        "resume batcher state",
        batcher,
        "state.json",
        Style::Text,
        8,
        |d| {
            let text =
                std::fs::read(d.join("state.json")).map_err(|e| octet::OctetError::io(d, e))?;
            let st: BatcherState = serde_json::from_slice(&text)
                .map_err(|e| octet::OctetError::bad_file(d, e.to_string()))?;
            let mut b = Batcher::restore(st, 10, 3)?;
            b.next_indices();
            Ok(())
        },
    ));
    t
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs the ignored test `name` of this binary in a child process (so its peak memory is its
/// own, not that of tests running alongside); returns its stderr, failing when it fails.
pub fn run_isolated(name: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("run the test binary");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{err}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

#[test]
fn no_input_panics_or_exhausts_memory() {
    use std::io::Write;
    let err = run_isolated("fuzz::fuzz_every_reader");
    // Straight to stderr, past the test harness's capture: the totals show in `make test`.
    let summary: String = err
        .lines()
        .filter(|l| l.starts_with("fuzz:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let _ = std::io::stderr().write_all(summary.as_bytes());
}

#[test]
#[ignore = "run in its own process by no_input_panics_or_exhausts_memory"]
fn fuzz_every_reader() {
    let cases = env_or("OCTET_FUZZ_CASES", 20_000usize);
    let seed = env_or("OCTET_FUZZ_SEED", 0x0c7e_7f22u64);
    let work = tempfile::tempdir().unwrap();
    let targets = targets(work.path());
    let keep = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-panics");
    let rss_start = peak_rss_kib();
    let report = run(&targets, cases, seed, &keep);
    eprintln!(
        "fuzz: {} cases in {:.1} s (seed {seed:#x}): {} refused with an error, {} panics; peak RSS {} MiB (+{} MiB during the run)",
        report.cases,
        report.seconds,
        report.errors,
        report.findings.len(),
        peak_rss_kib() / 1024,
        report.rss_growth_kib / 1024
    );
    for (name, n) in &report.per_target {
        eprintln!("fuzz:   {name:<26} {n:>7} cases");
    }
    for f in &report.findings {
        eprintln!(
            "fuzz: PANIC in {} (case {}): {} [input kept at {}]",
            f.target,
            f.case,
            f.message,
            f.input.display()
        );
    }
    assert!(
        report.findings.is_empty(),
        "{} inputs panicked (listed above)",
        report.findings.len()
    );
    // Every input here is under 1 MB; a reader that trusts a declared size would blow this.
    assert!(
        report.rss_growth_kib < 512 << 10,
        "peak RSS grew by {} MiB during the run (from {} MiB)",
        report.rss_growth_kib / 1024,
        rss_start / 1024
    );
    assert!(
        report.errors > cases / 4,
        "most mutations should be refused"
    );
}
