//! Data-parallel training over c10d's Gloo backend with two CPU ranks: the same adapters as
//! one rank at twice the batch, ranks in step, rank 0 alone writing, a dead rank stopping the
//! other, torchrun's restart resuming by itself, and a differing base refused.
use crate::common;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tiny() -> PathBuf {
    common::fixture("tiny_gptj/hf_safetensors")
}

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("data.txt");
    std::fs::write(
        &p,
        "a stitch in time saves nine, said the tailor. ".repeat(80),
    )
    .unwrap();
    p
}

/// The training flags of every run here (the global batch is set by the caller).
fn args(model: &Path, data: &Path, out: &Path, optim: &str, steps: usize) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--model"].map(String::from).to_vec();
    a.push(common::s(model).into());
    for (k, v) in [
        ("--data", common::s(data)),
        ("--out", common::s(out)),
        ("--optim", optim),
        ("--seq-len", "16"),
        ("--lora-r", "4"),
        ("--lora-dropout", "0"),
        ("--targets", "q_proj,v_proj"),
        ("--lr", "3e-3"),
        ("--seed", "5"),
    ] {
        a.extend([k.to_string(), v.to_string()]);
    }
    a.extend(["--steps".into(), steps.to_string()]);
    a
}

fn with(mut a: Vec<String>, extra: &[&str]) -> Vec<String> {
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `a` with each `(flag, value)` set: replaced where `a` has the flag, else added (an empty
/// value: a switch).
fn setting(mut a: Vec<String>, flags: &[(&str, &str)]) -> Vec<String> {
    for (flag, value) in flags {
        match a.iter().position(|x| x == flag) {
            Some(i) => a[i + 1] = value.to_string(),
            None if value.is_empty() => a.push(flag.to_string()),
            None => a.extend([flag.to_string(), value.to_string()]),
        }
    }
    a
}

fn octet_cmd(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_octet"));
    c.args(args).env("OMP_NUM_THREADS", "1");
    for v in octet::dist::env::VARS {
        c.env_remove(v);
    }
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("run octet")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout)
}

/// Rank `rank` of `world`, meeting the others through a FileStore at `store`.
fn spawn_rank(args: &[String], rank: usize, world: usize, store: &Path) -> Child {
    let mut c = octet_cmd(&with(
        args.to_vec(),
        &["--dist-init", &format!("file:{}", common::s(store))],
    ));
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("start a rank")
}

fn adapter(out: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    common::load_safetensors(&out.join("adapter_model.safetensors"))
}

fn max_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (adapter(a), adapter(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| common::max_abs_diff(t, &b[k]))
        .fold(0.0, f64::max)
}

/// The adapter digest each rank printed at the end, by rank.
fn digests(log: &str) -> Vec<(usize, String)> {
    let mut d: Vec<(usize, String)> = log
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("rank ")?;
            let (rank, rest) = rest.split_once(" of ")?;
            let digest = rest.split_once(": adapter digest ")?.1;
            Some((rank.parse().ok()?, digest.trim().to_string()))
        })
        .collect();
    d.sort();
    d
}

fn files(dir: &Path) -> Vec<String> {
    let mut f: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    f.sort();
    f
}

/// 2 ranks at batch b through the launcher against 1 rank at batch 2b: `tol` on the final
/// adapters; both ranks hold bitwise-equal adapters; rank 0 alone wrote (one metrics line
/// per step, the world size in it).
fn two_ranks_match_one(optim: &str, tol: f64) {
    let tmp = tempfile::tempdir().unwrap();
    two_ranks_match_one_on(&tmp, &text_file(tmp.path()), &[], optim, tol);
}

/// [`two_ranks_match_one`] on `data` with the `extra` flags set.
fn two_ranks_match_one_on(
    tmp: &tempfile::TempDir,
    data: &Path,
    extra: &[(&str, &str)],
    optim: &str,
    tol: f64,
) {
    let steps = 4;
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let o = run(octet_cmd(&with(
        setting(args(&tiny(), data, &one, optim, steps), extra),
        &["--batch-size", "4"],
    )));
    assert!(o.status.success(), "{}", text(&o));
    let o = run(octet_cmd(&with(
        setting(args(&tiny(), data, &two, optim, steps), extra),
        &["--batch-size", "2", "--nproc-per-node", "2"],
    )));
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    let d = digests(&log);
    assert_eq!(d.len(), 2, "{log}");
    assert_eq!(
        d[0].1, d[1].1,
        "ranks ended with different adapters:\n{log}"
    );
    let diff = max_diff(&one, &two);
    assert!(
        diff <= tol,
        "{optim}: 2 ranks x 2 vs 1 rank x 4 differ by {diff:e}"
    );
    assert_eq!(files(&one), files(&two));
    let metrics = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), steps, "{metrics}");
    assert!(
        metrics.lines().all(|l| l.contains("\"world_size\":2")),
        "{metrics}"
    );
}

#[test]
fn two_ranks_at_batch_b_equal_one_rank_at_2b_with_adamw() {
    two_ranks_match_one("adamw", 1e-5);
}

/// 8-bit Adam rounds its states to a 256-entry code, so gradients that differ in the last
/// bit could land on neighbouring codes and move a weight by up to lr × one code step. On this
/// fixture none does: seeds 5, 6 and 7 differ by at most 8.2e-8 (adamw: 3.0e-7), so the
/// tolerance is adamw's. The run is deterministic (one thread, a fixed two-rank reduction
/// order), so the bound cannot flake.
#[test]
fn two_packed_ranks_at_batch_b_equal_one_rank_at_2b() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::write(&data, crate::train_data::chat_records(24)).unwrap();
    let template = crate::train_data::template_file(tmp.path());
    let extra = [
        ("--pack", ""),
        ("--seq-len", "64"),
        ("--chat-template", common::s(&template)),
    ];
    two_ranks_match_one_on(&tmp, &data, &extra, "adamw", 1e-5);
}

#[test]
fn two_ranks_at_batch_b_match_one_rank_at_2b_with_adam8bit() {
    two_ranks_match_one("adam8bit", 1e-5);
}

#[test]
fn a_killed_rank_makes_the_other_exit_non_zero_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("out");
    let a = with(
        args(&tiny(), &data, &out, "adamw", 100_000),
        &["--batch-size", "1", "--dist-timeout", "60"],
    );
    let store = tmp.path().join("store");
    let mut r0 = spawn_rank(&a, 0, 2, &store);
    let mut r1 = spawn_rank(&a, 1, 2, &store);
    // Wait until the ranks train together (rank 0 logs every step).
    let started = Instant::now();
    while !std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 2)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the ranks never trained"
        );
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 stopped early");
        std::thread::sleep(Duration::from_millis(100));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            r0.kill().unwrap();
            panic!("rank 0 still ran 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = text(&r0.wait_with_output().unwrap());
    assert!(!status.success(), "rank 0 exited 0:\n{log}");
    assert!(log.contains("distributed training"), "{log}");
}

#[test]
fn torchrun_restart_resumes_and_ends_with_the_uninterrupted_adapter() {
    let torchrun = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(
        torchrun.exists(),
        "missing {} (make build)",
        torchrun.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let (full, crashed) = (tmp.path().join("full"), tmp.path().join("crashed"));
    let base = |out: &Path| {
        with(
            args(&tiny(), &data, out, "adamw", 6),
            &["--batch-size", "2", "--save-every", "2"],
        )
    };
    let o = run(octet_cmd(&with(base(&full), &["--nproc-per-node", "2"])));
    assert!(o.status.success(), "{}", text(&o));
    let mut c = Command::new(&torchrun);
    c.args([
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--no-python",
    ])
    .arg(env!("CARGO_BIN_EXE_octet"))
    .args(base(&crashed))
    .env("OMP_NUM_THREADS", "1")
    .env("OCTET_TEST_CRASH_AT_STEP", "3")
    .env("OCTET_TEST_CRASH_RANK", "1");
    let o = run(c);
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("crashing at step 3"), "{log}");
    assert!(log.contains("resuming from the last checkpoint"), "{log}");
    assert_eq!(max_diff(&full, &crashed), 0.0, "{log}");
}

#[test]
fn a_different_base_on_one_rank_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let other = tmp.path().join("other");
    common::copy_dir(&tiny(), &other);
    let mut w = common::load_safetensors(&other.join("model.safetensors"));
    let (name, t) = w.iter_mut().find(|(n, _)| n.contains("q_proj")).unwrap();
    let name = name.clone();
    *t = &*t + 0.01;
    let pairs: Vec<(String, tch::Tensor)> = w.into_iter().collect();
    tch::Tensor::write_safetensors(&pairs, other.join("model.safetensors")).unwrap();
    assert!(!name.is_empty());
    let store = tmp.path().join("store");
    let out = tmp.path().join("out");
    let a0 = with(
        args(&tiny(), &data, &out, "adamw", 2),
        &["--batch-size", "1"],
    );
    let a1 = with(
        args(&other, &data, &out, "adamw", 2),
        &["--batch-size", "1"],
    );
    let r0 = spawn_rank(&a0, 0, 2, &store);
    let r1 = spawn_rank(&a1, 1, 2, &store);
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    assert!(!o0.status.success() && !o1.status.success());
    for o in [&o0, &o1] {
        common::assert_mentions(
            &text(o),
            &["rank 1 loaded a different base model than rank 0"],
        );
    }
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn nccl_on_a_machine_without_gpus_says_it_needs_them() {
    if tch::Cuda::device_count() > 0 {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let mut c = octet_cmd(&with(
        args(&tiny(), &data, &tmp.path().join("out"), "adamw", 1),
        &["--dist-backend", "nccl"],
    ));
    c.env("RANK", "0").env("WORLD_SIZE", "1");
    let o = run(c);
    assert!(!o.status.success());
    let log = text(&o);
    assert!(log.contains("NCCL") || log.contains("nccl"), "{log}");
    assert!(
        log.contains("needs GPUs") || log.contains("without NCCL"),
        "{log}"
    );
    assert!(!tmp.path().join("out").exists(), "{log}");
}
