//! GPU readiness: CUDA linked into the binaries (ELF NEEDED), `octet env`, `--device`
//! refusals, the generic tensor-op path (what a GPU runs) held to the CPU kernels, and
//! CUDA-marked tests (`cuda_*`) that run when a GPU is present and print why they skip
//! otherwise.
use crate::common;

use octet::eval::perplexity;
use octet::generate::{generate, GenerateOptions};
use octet::load::{load_model, LoadOptions, LoadedModel, QuantizeOptions};
use octet::quant::{self, with_generic_ops, BlockSize, QuantCode};
use octet::train::adam8bit::{Adam8bit, StateRounding};
use octet::train::optim::{AdamConfig, Optimizer};
use octet::train::trainer::{train, OptimKind, TrainOptions};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TEXT: &str = "It was a bright cold day in April, and the clocks were striking thirteen. \
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my \
purse, I thought I would sail about a little and see the watery part of the world. ";

/// libtorch's lib dir this crate was built against (`LIBTORCH`), else the project venv's.
fn torch_lib_dir() -> PathBuf {
    option_env!("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".venv/lib/python3.11/site-packages/torch")
        })
        .join("lib")
}

/// The DT_NEEDED entries of an ELF file (parsed with `object`, so no binutils needed).
fn needed(path: &Path) -> Vec<String> {
    use object::read::elf::{Dyn, FileHeader};
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&*data).unwrap();
    let endian = header.endian().unwrap();
    let sections = header.sections(endian, &*data).unwrap();
    let (dynamic, strings_index) = sections
        .dynamic(endian, &*data)
        .unwrap()
        .expect("a dynamically linked binary");
    let strings = sections.strings(endian, &*data, strings_index).unwrap();
    dynamic
        .iter()
        .filter(|d| d.tag32(endian) == Some(object::elf::DT_NEEDED))
        .map(|d| String::from_utf8_lossy(d.string(endian, strings).unwrap()).into_owned())
        .collect()
}

/// Regression guard: the linker's `--as-needed` silently dropped libtorch_cuda.so, leaving
/// CUDA unregistered even on a GPU machine.
#[test]
fn binaries_link_libtorch_cuda_when_libtorch_has_it() {
    let lib = torch_lib_dir();
    let has_cuda = lib.join("libtorch_cuda.so").is_file();
    let this_test = std::env::current_exe().unwrap();
    for bin in [PathBuf::from(env!("CARGO_BIN_EXE_octet")), this_test] {
        let n = needed(&bin);
        assert!(
            n.iter().any(|l| l == "libtorch_cpu.so"),
            "{}: {n:?}",
            bin.display()
        );
        let linked = n.iter().any(|l| l == "libtorch_cuda.so");
        if has_cuda {
            assert!(
                linked && n.iter().any(|l| l == "libc10_cuda.so"),
                "{} does not link libtorch_cuda.so/libc10_cuda.so although {} has them: {n:?}",
                bin.display(),
                lib.display()
            );
        } else {
            println!(
                "{} has no libtorch_cuda.so: CPU-only libtorch",
                lib.display()
            );
        }
    }
}

#[test]
fn env_reports_cuda_linkage_availability_and_kernels() {
    let (ok, stdout, stderr) = common::octet(&["env", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let has_cuda = torch_lib_dir().join("libtorch_cuda.so").is_file();
    assert_eq!(v["cuda"]["linked"], has_cuda, "{v}");
    let available = tch::Cuda::is_available();
    assert_eq!(v["cuda"]["available"], available, "{v}");
    if available {
        assert_eq!(
            v["cuda"]["devices"].as_array().unwrap().len() as i64,
            tch::Cuda::device_count()
        );
    } else {
        let why = v["cuda"]["unavailable_reason"].as_str().unwrap();
        assert!(!why.is_empty(), "{v}");
        assert_eq!(v["cuda"]["device_count"], 0);
    }
    assert!(v["libtorch"]["built_against"]
        .as_str()
        .unwrap()
        .starts_with("2.11.0"));
    let kernel = v["cpu"]["dequantize_kernel"].as_str().unwrap();
    assert!(
        ["avx512-vbmi", "avx512-gather", "portable"].contains(&kernel),
        "{kernel}"
    );
    assert!(v["cpu"]["torch_threads"].as_i64().unwrap() >= 1);
    assert_eq!(v["octet"]["version"], env!("CARGO_PKG_VERSION"));

    let (ok, text, _) = common::octet(&["env"]);
    assert!(ok);
    let yes_no = if has_cuda { "yes" } else { "no" };
    assert!(
        text.contains(&format!("CUDA linked      {yes_no}")),
        "{text}"
    );
    if !available {
        assert!(text.contains("CUDA available   no: "), "{text}");
    }
    // `--device auto` (the default) says what it picked.
    let (ok, _, stderr) = common::octet(&[
        "quant-report",
        "--rows",
        "64",
        "--cols",
        "64",
        "--block-size",
        "64",
    ]);
    assert!(ok, "{stderr}");
    let picked = if available { "cuda:0" } else { "cpu" };
    assert!(
        stderr.contains(&format!("device: {picked} (auto)")),
        "{stderr}"
    );
    // Forcing the kernels to the portable path is visible.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_octet"))
        .args(["env", "--json"])
        .env("OCTET_NO_SIMD", "1")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cpu"]["dequantize_kernel"], "portable");
}

/// A CUDA device index no machine running this test has.
fn missing_cuda() -> String {
    format!("cuda:{}", tch::Cuda::device_count().max(0) + 3)
}

#[test]
fn unusable_devices_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny_gptj/hf_safetensors");
    let model = model.to_str().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT.repeat(10)).unwrap();
    let data = data.to_str().unwrap();
    let adapter = tmp.path().join("no-adapter");
    let mut devices = vec!["tpu".to_string(), missing_cuda()];
    if !tch::Cuda::is_available() {
        devices.push("cuda".into());
    }
    for dev in &devices {
        let out = tmp.path().join(format!("out-{}", dev.replace(':', "-")));
        let o = out.to_str().unwrap();
        let commands: Vec<Vec<&str>> = vec![
            vec![
                "train", "--model", model, "--data", data, "--out", o, "--steps", "1",
            ],
            vec!["eval", "--model", model, "--data", data],
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "2",
            ],
            vec![
                "merge",
                "--model",
                model,
                "--adapter",
                adapter.to_str().unwrap(),
                "--out",
                o,
            ],
            vec![
                "quant-report",
                "--rows",
                "64",
                "--cols",
                "64",
                "--block-size",
                "64",
            ],
        ];
        for mut args in commands {
            args.extend_from_slice(&["--device", dev]);
            let (ok, stdout, stderr) = common::octet(&args);
            let what = format!("octet {}", args.join(" "));
            assert!(!ok, "{what} succeeded");
            assert!(stderr.contains("octet env"), "{what}: {stderr}");
            assert!(!stderr.contains("panicked"), "{what}: {stderr}");
            assert!(stdout.is_empty(), "{what} printed {stdout}");
            assert!(!out.exists(), "{what} created {}", out.display());
        }
    }
}

/// Random weight-like values with an all-zero block, a partial last block and outliers.
fn awkward(n: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let x = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.02;
    let _ = x.narrow(0, 64, 64).fill_(0.0);
    let _ = x.narrow(0, 7, 1).fill_(1.5);
    x
}

fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size()
        && a.kind() == b.kind()
        && a.view_dtype(Kind::Uint8).equal(&b.view_dtype(Kind::Uint8))
}

/// Quantize and de-quantize through the generic path on CPU tensors: bit-identical to the
/// CPU kernels (q, absmax, and every output dtype), embedding rows included.
#[test]
fn generic_path_quantizes_and_dequantizes_like_the_cpu_kernels() {
    let code = QuantCode::dynamic_signed();
    for (n, block, shape) in [
        (4096 * 3 + 100, 4096, vec![4096 * 3 + 100]),
        (64 * 37, 64, vec![37, 64]),
        (256 * 10 + 3, 256, vec![256 * 10 + 3]),
    ] {
        let block = BlockSize::new(block).unwrap();
        let x = awkward(n, 11).reshape(shape.as_slice());
        let cpu = quant::quantize(&x, block, &code).unwrap();
        let gen = with_generic_ops(|| quant::quantize(&x, block, &code)).unwrap();
        assert!(
            cpu.q.equal(&gen.q),
            "q differs, {n} values, block {}",
            block.get()
        );
        assert!(bits_equal(&cpu.absmax, &gen.absmax), "absmax differs");
        let from_bf16 = x.to_kind(Kind::BFloat16);
        let (c16, g16) = (
            quant::quantize(&from_bf16, block, &code).unwrap(),
            with_generic_ops(|| quant::quantize(&from_bf16, block, &code)).unwrap(),
        );
        assert!(c16.q.equal(&g16.q) && bits_equal(&c16.absmax, &g16.absmax));
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let a = cpu.dequantize(kind).unwrap();
            let b = with_generic_ops(|| cpu.dequantize(kind)).unwrap();
            assert!(bits_equal(&a, &b), "dequantize to {kind:?} differs");
        }
        if shape.len() == 2 {
            let ids = Tensor::from_slice(&[3i64, 0, 36, 3]).reshape([2, 2]);
            let a = cpu.dequantize_rows(&ids, Kind::Float).unwrap();
            let b = with_generic_ops(|| cpu.dequantize_rows(&ids, Kind::Float)).unwrap();
            assert!(bits_equal(&a, &b), "embedding rows differ");
            let bad = Tensor::from_slice(&[37i64]);
            let e = with_generic_ops(|| cpu.dequantize_rows(&bad, Kind::Float)).unwrap_err();
            assert!(e.to_string().contains("37"), "{e}");
        }
    }
}

fn load_8bit(device: Device) -> LoadedModel {
    let mut m = load_model(
        &common::fixture("tiny_gptj/hf_safetensors"),
        &LoadOptions {
            quantize: Some(QuantizeOptions::default()),
            device,
            ..Default::default()
        },
    )
    .unwrap();
    m.model.visit_layers(&mut |_, l| l.set_training(false));
    m
}

fn ids_of(n: usize) -> Vec<i64> {
    TEXT.bytes().take(n).map(i64::from).collect()
}

fn greedy(m: &LoadedModel, prompt: &[i64]) -> Vec<i64> {
    let opts = GenerateOptions {
        max_new_tokens: 12,
        temperature: 0.0,
        ..Default::default()
    };
    generate(m.model.as_ref(), prompt, &opts, |_| true).unwrap()
}

/// The tiny 8-bit GPT-J evaluated and decoded through the generic path (de-quantize, then
/// multiply, as on a GPU) agrees with the CPU kernels (fused few-row decode included).
#[test]
fn generic_path_evaluates_and_decodes_like_the_cpu_kernels() {
    let ids = ids_of(120);
    let cpu = load_8bit(Device::Cpu);
    let base = perplexity(cpu.model.as_ref(), &ids, 64, 32, 4).unwrap();
    let tokens = greedy(&cpu, &ids[..10]);
    let (gen_ppl, gen_tokens) = with_generic_ops(|| {
        let m = load_8bit(Device::Cpu);
        (
            perplexity(m.model.as_ref(), &ids, 64, 32, 4).unwrap(),
            greedy(&m, &ids[..10]),
        )
    });
    let rel = (gen_ppl.perplexity - base.perplexity).abs() / base.perplexity;
    println!(
        "generic vs CPU kernels, tiny GPT-J 8-bit: perplexity {} vs {} (rel diff {rel:.2e}), greedy tokens identical: {}",
        gen_ppl.perplexity,
        base.perplexity,
        tokens == gen_tokens
    );
    assert!(
        rel < 1e-5,
        "perplexity {} vs {}",
        gen_ppl.perplexity,
        base.perplexity
    );
    assert_eq!(tokens, gen_tokens);
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn set_grad(p: &Tensor, g: &Tensor) {
    let mut p = p.shallow_clone();
    p.zero_grad();
    (&p * g).sum(Kind::Float).backward();
}

/// Runs `steps` 8-bit Adam steps on `device` (generic path when `generic`); returns the
/// parameter and the state dict.
fn adam_run(
    device: Device,
    generic: bool,
    rounding: StateRounding,
    steps: i32,
) -> (Tensor, Vec<(String, Tensor)>) {
    tch::manual_seed(5);
    let init = Tensor::randn([3, 4000], (Kind::Float, Device::Cpu)) * 0.02;
    let grads: Vec<Tensor> = (0..steps)
        .map(|t| Tensor::randn([3, 4000], (Kind::Float, Device::Cpu)) * 10f64.powi(t - 2))
        .collect();
    let run = || {
        let p = leaf(&init.to_device(device));
        let cfg = AdamConfig {
            weight_decay: 0.01,
            ..AdamConfig::default()
        };
        let mut opt = Adam8bit::new(vec![p.shallow_clone()], cfg)
            .unwrap()
            .with_rounding(rounding);
        for g in &grads {
            set_grad(&p, &g.to_device(device));
            opt.step(1e-3).unwrap();
        }
        (p.detach().to_device(Device::Cpu), opt.state_dict())
    };
    if generic {
        with_generic_ops(run)
    } else {
        run()
    }
}

fn assert_adam_close(
    a: &(Tensor, Vec<(String, Tensor)>),
    b: &(Tensor, Vec<(String, Tensor)>),
    what: &str,
) {
    for ((na, ta), (nb, tb)) in a.1.iter().zip(&b.1) {
        assert_eq!(na, nb);
        if ta.kind() == Kind::Uint8 {
            // √v may differ by an ulp between libtorch's vectorised sqrt and the kernel's.
            let differ = ta.ne_tensor(tb).sum(Kind::Int64).int64_value(&[]);
            println!("{what}: {na}: {differ} of {} codes differ", ta.numel());
            assert!(
                differ as f64 <= 1e-3 * ta.numel() as f64,
                "{what}: {na}: {differ} codes differ"
            );
        } else {
            let d = (ta - tb).abs().max().double_value(&[]);
            assert!(
                d <= 1e-6 * (1.0 + ta.abs().max().double_value(&[])),
                "{what}: {na} differs by {d}"
            );
        }
    }
    let d = (&a.0 - &b.0).abs().max().double_value(&[]);
    println!("{what}: parameters differ by at most {d:.2e}");
    assert!(d < 1e-7, "{what}: parameters differ by {d}");
}

/// 8-bit Adam through the generic path (what a GPU runs) against the fused CPU kernel, in
/// both rounding modes.
#[test]
fn generic_path_adam8bit_matches_the_fused_cpu_kernel() {
    for rounding in [StateRounding::Nearest, StateRounding::BitsandbytesCpu] {
        let fused = adam_run(Device::Cpu, false, rounding, 5);
        let generic = adam_run(Device::Cpu, true, rounding, 5);
        assert_adam_close(&fused, &generic, &format!("{rounding:?}"));
    }
}

fn train_losses(dir: &Path, device: Device, optim: OptimKind, steps: usize) -> Vec<f64> {
    let data = dir.join("data.txt");
    std::fs::write(&data, TEXT.repeat(12)).unwrap();
    let opts = TrainOptions {
        model: common::fixture("tiny_gptj/hf_safetensors"),
        data,
        out: dir.join(format!(
            "out-{}",
            octet::device::name(device).replace(':', "-")
        )),
        steps,
        batch_size: 2,
        seq_len: 32,
        lr: 1e-3,
        warmup: 0,
        optim,
        device: octet::device::name(device),
        force: true,
        ..TrainOptions::default()
    };
    let _rng = common::global_rng();
    train(&opts)
        .unwrap()
        .metrics
        .iter()
        .map(|m| m.loss)
        .collect()
}

/// `octet train` with the generic path forced (OCTET_FORCE_GENERIC=1) follows the CPU
/// kernels' loss curve.
#[test]
fn generic_path_training_follows_the_cpu_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT.repeat(12)).unwrap();
    let model = common::fixture("tiny_gptj/hf_safetensors");
    let run = |name: &str, generic: bool| -> Vec<f64> {
        let out = tmp.path().join(name);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_octet"));
        cmd.args(["train", "--model", model.to_str().unwrap()])
            .args([
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args([
                "--steps",
                "6",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--lr",
                "1e-3",
            ])
            .args(["--device", "cpu"]);
        if generic {
            cmd.env("OCTET_FORCE_GENERIC", "1");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let cpu = run("cpu", false);
    let generic = run("generic", true);
    assert_eq!(cpu.len(), 6);
    let worst = cpu
        .iter()
        .zip(&generic)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("generic vs CPU kernels, 6 training steps: losses {cpu:?} vs {generic:?}, max diff {worst:.2e}");
    for (s, (a, b)) in cpu.iter().zip(&generic).enumerate() {
        assert!((a - b).abs() < 1e-4, "step {}: {a} vs {b}", s + 1);
    }
}

/// Whether the CUDA-marked tests can run; prints why not.
fn cuda_or_skip() -> bool {
    if tch::Cuda::is_available() {
        return true;
    }
    // The harness prints the test's name just before this line (with --nocapture).
    println!(
        "SKIPPED (no usable CUDA device: {})",
        octet::device::cuda_unavailable_reason()
    );
    false
}

#[test]
fn cuda_quantize_and_dequantize_are_bit_identical_to_the_cpu() {
    if !cuda_or_skip() {
        return;
    }
    let cuda = Device::Cuda(0);
    let code = QuantCode::dynamic_signed();
    for (n, block) in [(4096 * 5 + 17, 4096), (256 * 33, 256), (64 * 9 + 1, 64)] {
        let block = BlockSize::new(block).unwrap();
        let x = awkward(n, 21);
        let cpu = quant::quantize(&x, block, &code).unwrap();
        let gpu = quant::quantize(&x.to_device(cuda), block, &code).unwrap();
        assert_eq!(gpu.q.device(), cuda);
        assert!(
            cpu.q.equal(&gpu.q.to_device(Device::Cpu)),
            "q, block {}",
            block.get()
        );
        assert!(
            bits_equal(&cpu.absmax, &gpu.absmax.to_device(Device::Cpu)),
            "absmax"
        );
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let a = cpu.dequantize(kind).unwrap();
            let b = gpu.dequantize(kind).unwrap();
            assert_eq!(b.device(), cuda);
            assert!(
                bits_equal(&a, &b.to_device(Device::Cpu)),
                "dequantize {kind:?}"
            );
        }
    }
    println!("cuda quantize/dequantize: bit-identical to the CPU kernels");
}

#[test]
fn cuda_tiny_gptj_forward_perplexity_and_greedy_tokens_match_the_cpu() {
    if !cuda_or_skip() {
        return;
    }
    let ids = ids_of(120);
    let cpu = load_8bit(Device::Cpu);
    let gpu = load_8bit(Device::Cuda(0));
    let x = Tensor::from_slice(&ids[..48]).reshape([2, 24]);
    let (lc, lg) = tch::no_grad(|| {
        (
            cpu.model.forward(&x).unwrap(),
            gpu.model.forward(&x).unwrap().to_device(Device::Cpu),
        )
    });
    let d = (&lc - &lg).abs().max().double_value(&[]) / lc.abs().max().double_value(&[]);
    assert!(d < 1e-4, "logits differ by {d} (relative to the largest)");
    let pc = perplexity(cpu.model.as_ref(), &ids, 64, 32, 4)
        .unwrap()
        .perplexity;
    let pg = perplexity(gpu.model.as_ref(), &ids, 64, 32, 4)
        .unwrap()
        .perplexity;
    let rel = (pc - pg).abs() / pc;
    assert!(rel < 1e-4, "perplexity {pg} (cuda) vs {pc} (cpu)");
    assert_eq!(greedy(&cpu, &ids[..10]), greedy(&gpu, &ids[..10]));
    println!("cuda tiny GPT-J: logits rel diff {d:.2e}, perplexity rel diff {rel:.2e}, greedy tokens identical");
}

#[test]
fn cuda_twenty_training_steps_follow_the_cpu_loss_curve() {
    if !cuda_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cpu = train_losses(tmp.path(), Device::Cpu, OptimKind::Adamw, 20);
    let gpu = train_losses(tmp.path(), Device::Cuda(0), OptimKind::Adamw, 20);
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert_eq!(gpu.len(), 20);
    assert!(
        worst < 1e-3,
        "loss curves differ by up to {worst}: {cpu:?} vs {gpu:?}"
    );
    println!("cuda 20 training steps (f32, adamw): loss curves within {worst:.2e} of the CPU's");
}

#[test]
fn cuda_adam8bit_matches_the_cpu_with_nearest_rounding() {
    if !cuda_or_skip() {
        return;
    }
    let cpu = adam_run(Device::Cpu, false, StateRounding::Nearest, 5);
    let gpu = adam_run(Device::Cuda(0), false, StateRounding::Nearest, 5);
    let gpu = (
        gpu.0,
        gpu.1
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu)))
            .collect(),
    );
    assert_adam_close(&cpu, &gpu, "cuda vs cpu");
    println!("cuda 8-bit Adam (nearest rounding): states and parameters match the CPU kernel");
}

/// The Python for reference scripts: `OCTET_PYTHON` (a GPU machine's), else the venv's.
fn reference_python() -> PathBuf {
    std::env::var_os("OCTET_PYTHON").map_or_else(common::python, PathBuf::from)
}

/// A reference script: under `OCTET_SCRIPTS` when set, else the project's scripts/.
fn reference_script(name: &str) -> PathBuf {
    std::env::var_os("OCTET_SCRIPTS")
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts"),
            PathBuf::from,
        )
        .join(name)
}

#[test]
fn cuda_adam8bit_matches_bitsandbytes_cuda() {
    if !cuda_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bnb.safetensors");
    let o = std::process::Command::new(reference_python())
        .arg(reference_script("bnb_cuda_adam8bit.py"))
        .arg(&out)
        .output()
        .unwrap();
    if o.status.code() == Some(3) {
        println!("SKIPPED ({})", String::from_utf8_lossy(&o.stderr).trim());
        return;
    }
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = common::load_safetensors(&out);
    let cuda = Device::Cuda(0);
    let p = leaf(&t["init"].to_device(cuda));
    let mut opt = Adam8bit::new(vec![p.shallow_clone()], AdamConfig::default())
        .unwrap()
        .with_rounding(StateRounding::Nearest);
    for step in 1..=5 {
        set_grad(&p, &t[&format!("grad.{step}")].to_device(cuda));
        opt.step(1e-3).unwrap();
    }
    let sd: std::collections::BTreeMap<String, Tensor> = opt
        .state_dict()
        .into_iter()
        .map(|(n, v)| (n.rsplit('.').next().unwrap().to_string(), v))
        .collect();
    for key in ["state1", "state2"] {
        let differ = sd[key].ne_tensor(&t[key]).sum(Kind::Int64).int64_value(&[]);
        let frac = differ as f64 / t[key].numel() as f64;
        assert!(
            frac < 0.01,
            "{key}: {differ} codes differ from bitsandbytes' CUDA optimizer"
        );
        println!(
            "cuda 8-bit Adam vs bitsandbytes CUDA: {key} {:.3}% codes differ",
            100.0 * frac
        );
    }
    let d = (p.detach().to_device(Device::Cpu) - &t["param"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-5, "parameters differ from bitsandbytes' by {d}");
    println!("cuda 8-bit Adam vs bitsandbytes CUDA: parameters within {d:.2e}");
}

#[test]
fn f16_training_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, TEXT.repeat(10)).unwrap();
    let out = tmp.path().join("out");
    let model = common::fixture("tiny_gptj/hf_safetensors");
    let (ok, _, stderr) = common::octet(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
        "--device",
        "cpu",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("f16")
            && stderr.contains("--dtype bf16")
            && stderr.contains("loss scaling"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists());
}
