//! `cargo bench --bench allreduce`: what data-parallel training adds to a step, the gradient
//! all-reduce of LoRA adapters of the GPT-J-6B shape (28 layers, width 4096) over Gloo on
//! loopback between 2 ranks: r=8 on q_proj, v_proj (3.7M f32 parameters) and r=16 on every
//! linear (33M). The bench starts its own two ranks (this binary again) with a file store.
//!
//! Environment: `OCTET_BENCH_REPEATS` (5), `OCTET_BENCH_STEP_S` (a measured step time in
//! seconds to print the all-reduce as a fraction of; the 6B step itself takes tens of minutes
//! on a small CPU box, so it is not run here).
use octet::dist::env::LaunchEnv;
use octet::dist::{BackendChoice, Dist, DistOptions, Init};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const CHILD: &str = "OCTET_ALLREDUCE_RANK";
const LAYERS: i64 = 28;
const WIDTH: i64 = 4096;

/// The LoRA A and B gradients of `r` on each named linear (in, out) of every layer.
fn adapter_grads(r: i64, linears: &[(i64, i64)]) -> Vec<Tensor> {
    let mut v = Vec::new();
    for _ in 0..LAYERS {
        for &(i, o) in linears {
            v.push(Tensor::randn([r, i], (Kind::Float, Device::Cpu)));
            v.push(Tensor::randn([o, r], (Kind::Float, Device::Cpu)));
        }
    }
    v
}

fn rank_main(rank: usize, store: &str) {
    let repeats: usize = std::env::var("OCTET_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let launch = LaunchEnv {
        rank,
        world: 2,
        local_rank: rank,
        local_world: 2,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
        restart_count: 0,
        agent_store: false,
    };
    let opts = DistOptions {
        backend: BackendChoice::Gloo,
        init: Init::File(store.into()),
        timeout: Duration::from_secs(120),
    };
    let dist = Dist::init(&opts, Some(launch), Device::Cpu).expect("join the group");
    let qv = [(WIDTH, WIDTH); 2];
    let all = [
        (WIDTH, WIDTH),
        (WIDTH, WIDTH),
        (WIDTH, WIDTH),
        (WIDTH, WIDTH),
        (WIDTH, 4 * WIDTH),
        (4 * WIDTH, WIDTH),
    ];
    let step_s: Option<f64> = std::env::var("OCTET_BENCH_STEP_S")
        .ok()
        .and_then(|v| v.parse().ok());
    for (name, grads) in [
        ("r=8 on q_proj, v_proj", adapter_grads(8, &qv)),
        ("r=16 on every linear", adapter_grads(16, &all)),
    ] {
        let n: i64 = grads.iter().map(|g| g.numel() as i64).sum();
        dist.sum_all(&grads).expect("warm-up");
        let mut times: Vec<f64> = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                dist.sum_all(&grads).expect("all-reduce");
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        if rank == 0 {
            let frac = step_s.map_or(String::new(), |s| {
                format!(", {:.2}% of a {s} s step", 100.0 * median / s)
            });
            println!(
                "{name:<24} {:>6.1}M params {:>6.1} MB f32  all-reduce (2 ranks, Gloo, loopback) median {:>7.1} ms over {repeats}{frac}",
                n as f64 / 1e6,
                n as f64 * 4.0 / 1e6,
                median * 1e3
            );
        }
    }
}

fn main() {
    if let Ok(rank) = std::env::var(CHILD) {
        let store = std::env::var("OCTET_ALLREDUCE_STORE").expect("store path");
        rank_main(rank.parse().expect("rank"), &store);
        return;
    }
    if !octet::dist::AVAILABLE {
        println!("allreduce: this build has no distributed training (run `make build`)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let exe = std::env::current_exe().expect("bench binary");
    let children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&exe)
                .env(CHILD, r.to_string())
                .env("OCTET_ALLREDUCE_STORE", &store)
                .env("OMP_NUM_THREADS", "1")
                .spawn()
                .expect("start a rank")
        })
        .collect();
    for mut c in children {
        let s = c.wait().expect("wait for a rank");
        assert!(s.success(), "a rank failed: {s}");
    }
}
