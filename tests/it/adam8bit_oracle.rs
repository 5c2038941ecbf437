//! Adam8bit against bitsandbytes 0.50.2 and AdamW against torch.optim.AdamW, both on the CPU,
//! fed the same gradients (vectors from scripts/gen_adam8bit_vectors.py).
//!
//! Tolerances, and why:
//! * 8-bit states with the default `StateRounding::BitsandbytesCpu`: bit-identical every step.
//!   The moments depend only on the previous state and the gradient, never on the parameter,
//!   so nothing can drift them; any difference would be an arithmetic-order bug.
//! * The libtorch-op path (CUDA and non-contiguous parameters) runs bitsandbytes' own ops: on
//!   the CPU, parameters too are bit-identical.
//! * f32-state tensors (fewer than 4096 elements): bit-identical parameters and moments (same
//!   libtorch ops in the same order).
//! * 8-bit parameters: the fused CPU kernel takes IEEE √v where libtorch's vectorised sqrt is a
//!   ulp off on ~1% of inputs. That perturbs an update u by ~2⁻²³·|u| and can flip the rounding
//!   of p + u by one ulp of p; so per step at most ulp(p) + 4·ε·lr·(|m̂|/√v̂ ≤ 4), and the
//!   errors add up over steps (the states stay identical, so they cannot grow otherwise):
//!   |Δp_t| ≤ t·(2·ulp(p_t) + 16·ε·lr).
//! * `StateRounding::Nearest` (bitsandbytes' CUDA rounding): the states differ from the CPU
//!   table wherever the table rounds differently (counted: <1% of m bytes, <5% of v bytes);
//!   parameters stay within lr·t/4 except on the few elements (<0.1%) where v rounded to 0 and
//!   a zero gradient followed, which then take an lr·m/eps step, as bitsandbytes' CUDA
//!   kernel would.
//! * AdamW: bit-identical to torch (same ops); asserted within 1e-6 absolute as specified.
use octet::train::adam8bit::{Adam8bit, StateRounding, MIN_8BIT_SIZE, STATE_BLOCK};
use octet::train::adamw::AdamW;
use octet::train::optim::{AdamConfig, Optimizer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const FIXTURE: &str = "fixtures/generated/adam8bit_vectors.safetensors";

/// The fixture's path, generated with the project venv's Python first if it is missing (once
/// per test binary: the tests run in parallel threads).
fn fixture_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = root.join(FIXTURE);
        if !path.exists() {
            let tmp = path.with_extension("safetensors.tmp");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let status = std::process::Command::new(root.join(".venv/bin/python"))
                .arg(root.join("scripts/gen_adam8bit_vectors.py"))
                .arg(&tmp)
                .status();
            match status {
                Ok(s) if s.success() => std::fs::rename(&tmp, &path).unwrap(),
                other => panic!(
                    "missing {} and generating it failed ({other:?}); run \
                     `.venv/bin/python scripts/gen_adam8bit_vectors.py {FIXTURE}`",
                    path.display()
                ),
            }
        }
        path
    })
}

/// Loads the fixture (tensors are not `Sync`, so each test reads its own copy).
fn fixture() -> Fixture {
    {
        let path = fixture_path();
        let t: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .expect("read adam8bit fixture")
            .into_iter()
            .collect();
        let n_params = (0..)
            .take_while(|k| t.contains_key(&format!("p{k}.init")))
            .count();
        let steps = (1..)
            .take_while(|s| t.contains_key(&format!("p0.grad.{s}")))
            .count();
        let scalar = |k: &str| t[k].double_value(&[0]);
        let cfg = AdamConfig {
            betas: (scalar("config.beta1"), scalar("config.beta2")),
            eps: scalar("config.eps"),
            weight_decay: scalar("config.weight_decay"),
        };
        let lr = scalar("config.lr");
        assert!(n_params >= 4 && steps >= 10, "fixture looks truncated");
        Fixture {
            t,
            n_params,
            steps,
            cfg,
            lr,
        }
    }
}

struct Fixture {
    t: BTreeMap<String, Tensor>,
    n_params: usize,
    steps: usize,
    cfg: AdamConfig,
    lr: f64,
}

impl Fixture {
    fn get(&self, k: &str) -> &Tensor {
        self.t.get(k).unwrap_or_else(|| panic!("fixture lacks {k}"))
    }
    fn grad(&self, k: usize, t: usize) -> &Tensor {
        self.get(&format!("p{k}.grad.{t}"))
    }
    /// Fresh leaf parameters at the fixture's initial values, on `dev`.
    fn params(&self, dev: Device) -> Vec<Tensor> {
        (0..self.n_params)
            .map(|k| {
                self.get(&format!("p{k}.init"))
                    .to_device(dev)
                    .detach()
                    .copy()
                    .set_requires_grad(true)
            })
            .collect()
    }
    fn is_8bit(&self, k: usize) -> bool {
        self.get(&format!("p{k}.init")).numel() >= MIN_8BIT_SIZE
    }
}

/// Puts gradient `t` into every parameter's `.grad()` through autograd: after `zero_grad`,
/// d(Σ p·g)/dp = g exactly.
fn feed(opt: &mut dyn Optimizer, params: &[Tensor], fx: &Fixture, t: usize) {
    opt.zero_grad();
    for (k, p) in params.iter().enumerate() {
        let g = fx.grad(k, t).to_device(p.device());
        (p * g).sum(Kind::Float).backward();
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

fn ulp(x: f32) -> f32 {
    let a = x.abs();
    f32::from_bits(a.to_bits() + 1) - a
}

fn state_of<'a>(sd: &'a [(String, Tensor)], k: usize, field: &str) -> &'a Tensor {
    let name = format!("state.{k}.{field}");
    &sd.iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("state dict lacks {name}"))
        .1
}

/// The optimizer's state and bitsandbytes' state in its own state-dict layout, for step `t`.
fn bnb_state(fx: &Fixture, t: usize) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for k in 0..fx.n_params {
        out.push((format!("state.{k}.step"), Tensor::from_slice(&[t as i64])));
        for f in ["state1", "state2", "absmax1", "absmax2"] {
            if let Some(x) = fx.t.get(&format!("bnb.p{k}.{f}.{t}")) {
                out.push((format!("state.{k}.{f}"), x.shallow_clone()));
            }
        }
    }
    out
}

/// Counts elements whose bytes differ between our state and bitsandbytes'.
fn byte_diffs(ours: &Tensor, theirs: &Tensor) -> usize {
    let a = Vec::<u8>::try_from(&ours.flatten(0, -1)).unwrap();
    let b = Vec::<u8>::try_from(&theirs.flatten(0, -1)).unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).filter(|(x, y)| x != y).count()
}

/// Worst |Δp| / allowance over the elements, and how many elements are bit-identical.
fn param_error(ours: &[f32], theirs: &[f32], allowance: impl Fn(f32) -> f32) -> (f32, usize) {
    let mut worst = 0f32;
    let mut same = 0;
    for (&a, &b) in ours.iter().zip(theirs) {
        assert!(a.is_finite(), "non-finite parameter");
        if a.to_bits() == b.to_bits() {
            same += 1;
        }
        worst = worst.max((a - b).abs() / allowance(b));
    }
    (worst, same)
}

#[test]
fn default_rounding_reproduces_bitsandbytes_bit_for_bit() {
    let fx = &fixture();
    let params = fx.params(Device::Cpu);
    let mut opt =
        Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg).unwrap();
    assert_eq!(opt.rounding(), StateRounding::BitsandbytesCpu);
    let eps_lr = f32::EPSILON * fx.lr as f32;
    for t in 1..=fx.steps {
        feed(&mut opt, &params, fx, t);
        opt.step(fx.lr).unwrap();
        let sd = opt.state_dict();
        for (k, p) in params.iter().enumerate() {
            let theirs = fx.get(&format!("bnb.p{k}.param.{t}"));
            for f in ["state1", "state2", "absmax1", "absmax2"] {
                if let Some(b) = fx.t.get(&format!("bnb.p{k}.{f}.{t}")) {
                    assert!(
                        state_of(&sd, k, f).equal(b),
                        "p{k} {f} differs from bitsandbytes after step {t}"
                    );
                }
            }
            if fx.is_8bit(k) {
                let tf = t as f32;
                let (worst, same) = param_error(&f32s(p), &f32s(theirs), |b| {
                    tf * (2.0 * ulp(b) + 16.0 * eps_lr)
                });
                if t == fx.steps {
                    println!(
                        "p{k} ({} elements, 8-bit): after {t} steps {same} params bit-identical, worst |Δp| = {worst:.3} of the allowance",
                        p.numel()
                    );
                }
                assert!(
                    worst <= 1.0,
                    "p{k} step {t}: |Δp| at {worst} of the allowance"
                );
            } else {
                assert!(p.equal(theirs), "f32-state p{k} differs after step {t}");
            }
        }
    }
}

/// Non-contiguous parameters take the libtorch-op path (the one CUDA parameters use). On the
/// CPU those are the very ops bitsandbytes runs, so everything, parameters included, must be
/// bit-identical.
#[test]
fn torch_op_path_reproduces_bitsandbytes_bit_for_bit() {
    let fx = &fixture();
    let params: Vec<Tensor> = (0..fx.n_params)
        .map(|k| {
            let init = fx.get(&format!("p{k}.init"));
            let n = init.numel() as i64;
            // Every other element of a buffer twice the size: a strided, non-contiguous leaf.
            let base = Tensor::zeros([2 * n], (Kind::Float, Device::Cpu));
            let mut view = base.slice(0, 0, 2 * n, 2).view(init.size().as_slice());
            view.copy_(init);
            assert!(!view.is_contiguous());
            view.set_requires_grad(true)
        })
        .collect();
    let mut opt =
        Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg).unwrap();
    for t in 1..=fx.steps {
        feed(&mut opt, &params, fx, t);
        opt.step(fx.lr).unwrap();
        let sd = opt.state_dict();
        for (k, p) in params.iter().enumerate() {
            for f in ["state1", "state2", "absmax1", "absmax2"] {
                if let Some(b) = fx.t.get(&format!("bnb.p{k}.{f}.{t}")) {
                    assert!(state_of(&sd, k, f).equal(b), "p{k} {f} step {t}");
                }
            }
            let theirs = fx.get(&format!("bnb.p{k}.param.{t}"));
            assert!(
                p.equal(theirs),
                "p{k} differs from bitsandbytes after step {t}"
            );
        }
    }
}

#[test]
fn loading_bitsandbytes_state_continues_identically() {
    // bitsandbytes' own (state1, state2, absmax1, absmax2) load as-is: resume from its step 6.
    let fx = &fixture();
    let start = fx.steps / 2;
    let params: Vec<Tensor> = (0..fx.n_params)
        .map(|k| {
            fx.get(&format!("bnb.p{k}.param.{start}"))
                .detach()
                .copy()
                .set_requires_grad(true)
        })
        .collect();
    let mut opt = Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg)
        .unwrap()
        .with_rounding(StateRounding::BitsandbytesCpu);
    opt.load_state_dict(&bnb_state(fx, start)).unwrap();
    for t in start + 1..=fx.steps {
        feed(&mut opt, &params, fx, t);
        opt.step(fx.lr).unwrap();
    }
    let ours = opt.state_dict();
    for (name, theirs) in bnb_state(fx, fx.steps) {
        let mine = &ours.iter().find(|(n, _)| *n == name).unwrap().1;
        assert!(mine.equal(&theirs), "{name} differs after resuming");
    }
}

#[test]
fn nearest_rounding_differs_from_bitsandbytes_cpu_only_where_expected() {
    let fx = &fixture();
    let params = fx.params(Device::Cpu);
    let mut opt = Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg)
        .unwrap()
        .with_rounding(StateRounding::Nearest);
    let (mut m_diff, mut v_diff, mut total) = (0usize, 0usize, 0usize);
    for t in 1..=fx.steps {
        feed(&mut opt, &params, fx, t);
        opt.step(fx.lr).unwrap();
        let sd = opt.state_dict();
        for (k, p) in params.iter().enumerate() {
            let theirs = fx.get(&format!("bnb.p{k}.param.{t}"));
            if !fx.is_8bit(k) {
                assert!(p.equal(theirs), "f32-state p{k} differs after step {t}");
                continue;
            }
            m_diff += byte_diffs(
                state_of(&sd, k, "state1"),
                fx.get(&format!("bnb.p{k}.state1.{t}")),
            );
            v_diff += byte_diffs(
                state_of(&sd, k, "state2"),
                fx.get(&format!("bnb.p{k}.state2.{t}")),
            );
            total += p.numel();
        }
    }
    // Parameters after the last step: most stay within lr·t/4 of bitsandbytes'; the rest are
    // the elements where v rounded to 0 and a zero gradient followed (see the module docs).
    let allowance = 0.25 * fx.lr as f32 * fx.steps as f32;
    let (mut far, mut n8, mut worst) = (0usize, 0usize, 0f32);
    for (k, p) in params.iter().enumerate().filter(|(k, _)| fx.is_8bit(*k)) {
        let theirs = f32s(fx.get(&format!("bnb.p{k}.param.{}", fx.steps)));
        for (a, b) in f32s(p).iter().zip(&theirs) {
            let d = (a - b).abs() / allowance;
            worst = worst.max(d);
            far += (d > 1.0) as usize;
        }
        n8 += theirs.len();
    }
    let (mf, vf) = (m_diff as f64 / total as f64, v_diff as f64 / total as f64);
    println!(
        "Nearest vs bitsandbytes' CPU table over {} steps: m bytes differ on {:.3}%, v bytes \
         on {:.3}%; {far} of {n8} params beyond lr·t/4 (worst {worst:.0}×)",
        fx.steps,
        100.0 * mf,
        100.0 * vf
    );
    assert!(mf < 0.01, "m differs on {mf}");
    assert!(vf < 0.05, "v differs on {vf}");
    assert!(far as f64 / (n8 as f64) < 1e-3, "{far} parameters far off");
}

#[test]
fn adamw_matches_torch() {
    let fx = &fixture();
    let params = fx.params(Device::Cpu);
    let mut opt = AdamW::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg).unwrap();
    let mut worst = 0f64;
    let mut identical = true;
    for t in 1..=fx.steps {
        feed(&mut opt, &params, fx, t);
        opt.step(fx.lr).unwrap();
        for (k, p) in params.iter().enumerate() {
            let theirs = fx.get(&format!("adamw.p{k}.param.{t}"));
            identical &= p.equal(theirs);
            worst = worst.max((p - theirs).abs().max().double_value(&[]));
        }
    }
    let sd = opt.state_dict();
    for k in 0..fx.n_params {
        for (f, key) in [("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")] {
            let d = (state_of(&sd, k, f) - fx.get(&format!("adamw.p{k}.{key}")))
                .abs()
                .max()
                .double_value(&[]);
            assert!(d <= 1e-6, "p{k} {f} differs by {d}");
        }
    }
    println!("AdamW vs torch: max |Δp| = {worst:e} (bit-identical: {identical})");
    assert!(worst <= 1e-6);
}

#[test]
fn state_bytes_are_about_two_bytes_per_parameter() {
    let fx = &fixture();
    let params = fx.params(Device::Cpu);
    let mut opt =
        Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg).unwrap();
    assert_eq!(opt.state_bytes(), 0, "state is allocated lazily");
    feed(&mut opt, &params, fx, 1);
    opt.step(fx.lr).unwrap();
    let (mut n8, mut expect) = (0usize, 0usize);
    let mut n_all = 0usize;
    for (k, p) in params.iter().enumerate() {
        let n = p.numel();
        n_all += n;
        if fx.is_8bit(k) {
            assert!(opt.is_8bit(k));
            n8 += n;
            expect += 2 * n + 2 * 4 * n.div_ceil(STATE_BLOCK);
        } else {
            assert!(!opt.is_8bit(k));
            expect += 8 * n;
        }
    }
    assert_eq!(opt.state_bytes(), expect);
    let eight_bit = expect - 8 * (n_all - n8);
    let per8 = eight_bit as f64 / n8 as f64;
    println!(
        "Adam8bit state: {} bytes for {n_all} params = {:.4} B/param overall, {per8:.4} B/param \
         on the 8-bit tensors (f32 Adam: 8)",
        opt.state_bytes(),
        opt.state_bytes() as f64 / n_all as f64
    );
    assert!((2.0..2.05).contains(&per8));

    let mut w = AdamW::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg).unwrap();
    feed(&mut w, &params, fx, 1);
    w.step(fx.lr).unwrap();
    assert_eq!(w.state_bytes(), 8 * n_all);
}

/// Runs `first` steps, checkpoints (through a safetensors file), restores into a fresh
/// optimizer over copies of the parameters, and checks both take the same next step.
fn round_trip(make: &dyn Fn(Vec<Tensor>) -> Box<dyn Optimizer>) {
    let fx = &fixture();
    let first = 5;
    let params = fx.params(Device::Cpu);
    let mut a = make(params.iter().map(|p| p.shallow_clone()).collect());
    for t in 1..=first {
        feed(a.as_mut(), &params, fx, t);
        a.step(fx.lr).unwrap();
    }
    let saved = a.state_dict();
    assert!(saved
        .iter()
        .any(|(n, t)| n == "state.0.step" && t.int64_value(&[0]) == first as i64));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("optimizer.safetensors");
    Tensor::write_safetensors(&saved, &file).unwrap();
    let loaded = Tensor::read_safetensors(&file).unwrap();

    let copies: Vec<Tensor> = params
        .iter()
        .map(|p| p.detach().copy().set_requires_grad(true))
        .collect();
    let mut b = make(copies.iter().map(|p| p.shallow_clone()).collect());
    b.load_state_dict(&loaded).unwrap();
    assert_eq!(a.state_bytes(), b.state_bytes());
    // The snapshot must not alias the live state: stepping `a` leaves `saved` as it was.
    feed(a.as_mut(), &params, fx, first + 1);
    a.step(fx.lr).unwrap();
    feed(b.as_mut(), &copies, fx, first + 1);
    b.step(fx.lr).unwrap();
    for (x, y) in params.iter().zip(&copies) {
        assert!(x.equal(y), "parameters diverge after restoring the state");
    }
    let (sa, sb) = (a.state_dict(), b.state_dict());
    assert_eq!(sa.len(), sb.len());
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} diverges after restoring");
    }
    // (read_safetensors returns the tensors in its own order)
    for (n, before) in &saved {
        let reread = &loaded.iter().find(|(m, _)| m == n).unwrap().1;
        assert!(
            before.equal(reread),
            "{n}: snapshot changed under a later step"
        );
    }
}

#[test]
fn state_dict_round_trip_gives_an_identical_next_step() {
    let fx = &fixture();
    let cfg = fx.cfg;
    round_trip(&|p| Box::new(Adam8bit::new(p, cfg).unwrap()));
    round_trip(&|p| {
        Box::new(
            Adam8bit::new(p, cfg)
                .unwrap()
                .with_rounding(StateRounding::BitsandbytesCpu),
        )
    });
    round_trip(&|p| Box::new(AdamW::new(p, cfg).unwrap()));
}

#[test]
fn bad_state_dicts_are_rejected_and_leave_the_state_alone() {
    let fx = &fixture();
    let params = fx.params(Device::Cpu);
    let mut opt =
        Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg).unwrap();
    feed(&mut opt, &params, fx, 1);
    opt.step(fx.lr).unwrap();
    let good = opt.state_dict();
    let with = |name: &str, t: Tensor| -> Vec<(String, Tensor)> {
        good.iter()
            .map(|(n, x)| {
                if n == name {
                    (n.clone(), t.shallow_clone())
                } else {
                    (n.clone(), x.shallow_clone())
                }
            })
            .collect()
    };
    let cases: Vec<(&str, Vec<(String, Tensor)>)> = vec![
        (
            "short absmax",
            with(
                "state.0.absmax1",
                Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            ),
        ),
        (
            "f32 in place of bytes",
            with(
                "state.0.state1",
                Tensor::zeros([5000], (Kind::Float, Device::Cpu)),
            ),
        ),
        (
            "wrong shape",
            with(
                "state.2.state1",
                Tensor::zeros([33, 64], (Kind::Float, Device::Cpu)),
            ),
        ),
        (
            "negative step",
            with("state.1.step", Tensor::from_slice(&[-1i64])),
        ),
        ("unknown field", {
            let mut v = with("", Tensor::zeros([1], (Kind::Float, Device::Cpu)));
            v.push((
                "state.0.qmap1".into(),
                Tensor::zeros([256], (Kind::Float, Device::Cpu)),
            ));
            v
        }),
        ("index out of range", {
            let mut v = with("", Tensor::zeros([1], (Kind::Float, Device::Cpu)));
            v.push(("state.99.step".into(), Tensor::from_slice(&[1i64])));
            v
        }),
    ];
    for (what, sd) in cases {
        assert!(opt.load_state_dict(&sd).is_err(), "accepted: {what}");
        assert_eq!(opt.step_count(0), Some(1), "{what} changed the state");
    }
    assert!(opt.step(-1.0).is_err());
    assert!(opt.step(f64::NAN).is_err());
    let bad = AdamConfig {
        betas: (0.9, 1.0),
        ..AdamConfig::default()
    };
    assert!(Adam8bit::new(vec![], bad).is_err());
    let half = Tensor::zeros([8], (Kind::Half, Device::Cpu)).set_requires_grad(true);
    assert!(AdamW::new(vec![half], AdamConfig::default()).is_err());
}

/// The libtorch-op path on an accelerator: the default rounding against bitsandbytes' CPU
/// vectors, and `Nearest` against octet's own CPU kernel. Runs only where CUDA is available
/// (`OCTET_REQUIRE_CUDA=1` turns its absence into a failure).
#[test]
fn cuda_path_tracks_the_cpu_results() {
    if !tch::Cuda::is_available() {
        assert!(
            std::env::var_os("OCTET_REQUIRE_CUDA").is_none(),
            "OCTET_REQUIRE_CUDA is set but CUDA is not available"
        );
        eprintln!("skipped: no CUDA device");
        return;
    }
    let fx = &fixture();
    for rounding in [StateRounding::BitsandbytesCpu, StateRounding::Nearest] {
        let make = |dev| {
            let params = fx.params(dev);
            let opt = Adam8bit::new(params.iter().map(|p| p.shallow_clone()).collect(), fx.cfg)
                .unwrap()
                .with_rounding(rounding);
            (params, opt)
        };
        let (gpu_params, mut gpu) = make(Device::Cuda(0));
        let (cpu_params, mut cpu) = make(Device::Cpu);
        let (mut diffs, mut total, mut worst) = (0usize, 0usize, 0f64);
        for t in 1..=fx.steps {
            feed(&mut gpu, &gpu_params, fx, t);
            gpu.step(fx.lr).unwrap();
            feed(&mut cpu, &cpu_params, fx, t);
            cpu.step(fx.lr).unwrap();
            let (sg, sc) = (gpu.state_dict(), cpu.state_dict());
            for (k, p) in gpu_params.iter().enumerate() {
                // The default mode is held to bitsandbytes itself, Nearest to octet's CPU kernel.
                let reference = match rounding {
                    StateRounding::BitsandbytesCpu => {
                        fx.get(&format!("bnb.p{k}.param.{t}")).shallow_clone()
                    }
                    StateRounding::Nearest => cpu_params[k].detach(),
                };
                let d = (p.to_device(Device::Cpu) - reference)
                    .abs()
                    .max()
                    .double_value(&[]);
                worst = worst.max(d / (fx.lr * t as f64));
                if fx.is_8bit(k) {
                    for f in ["state1", "state2"] {
                        let theirs = match rounding {
                            StateRounding::BitsandbytesCpu => {
                                fx.get(&format!("bnb.p{k}.{f}.{t}")).shallow_clone()
                            }
                            StateRounding::Nearest => state_of(&sc, k, f).shallow_clone(),
                        };
                        diffs += byte_diffs(state_of(&sg, k, f), &theirs);
                        total += p.numel();
                    }
                }
            }
        }
        let frac = diffs as f64 / total as f64;
        println!(
            "CUDA {rounding:?}: state bytes differ on {:.4}%, worst |Δp| = {worst:.2e}·lr·t",
            100.0 * frac
        );
        // Same arithmetic on another device: a different sqrt or fused multiply-add may move a
        // moment across a rounding boundary now and then, nothing more.
        assert!(frac < 1e-3, "{rounding:?}: {frac}");
        assert!(worst < 1e-3, "{rounding:?}: {worst}");
    }
}
