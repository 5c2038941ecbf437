//! Output safety and honest flags, command by command: outputs never touch inputs or folders
//! octet did not write, one writer per output, leftovers of killed runs cleaned up, crash-safe
//! checkpoints, resumes that refuse changed settings, and every numeric flag checked. Each
//! refusal asserts the exit code, the message (what and where) and that nothing changed on
//! disk.
use crate::common;
use crate::common::s;

use octet::nn::Layer;
use octet::outdir::{lock, OutputLock, MARKER};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn tiny(dir: &str) -> PathBuf {
    common::fixture(&format!("tiny_gptj/{dir}"))
}

/// One run of the binary.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn octet_in(cwd: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_octet"));
    cmd.args(args);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run octet");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn octet(args: &[&str]) -> Run {
    octet_in(None, args)
}

/// Every file and folder under `root` with the SHA-256 of each file's bytes.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_symlink() {
                out.insert(
                    rel,
                    format!("-> {}", std::fs::read_link(&p).unwrap().display()),
                );
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                stack.push(p);
            } else {
                out.insert(rel, octet::manifest::sha256_file(&p).unwrap());
            }
        }
    }
    out
}

/// Runs `args` and asserts a refusal with `code` whose stderr holds every `needle`, and that
/// nothing under `root` changed.
fn refused(root: &Path, cwd: Option<&Path>, args: &[&str], code: i32, needles: &[&str]) -> Run {
    let before = snapshot(root);
    let r = octet_in(cwd, args);
    assert_eq!(
        r.code, code,
        "{args:?}\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    for n in needles {
        assert!(r.stderr.contains(n), "{args:?}: no {n:?} in: {}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_eq!(before, snapshot(root), "{args:?} changed files");
    r
}

/// `root/p/model` (a copy of the tiny GPT-J) beside an unrelated file `root/p/notes.txt`.
fn model_in_project(root: &Path) -> PathBuf {
    let model = root.join("p/model");
    common::copy_dir(&tiny("hf_safetensors"), &model);
    std::fs::write(root.join("p/notes.txt"), "the user's own notes").unwrap();
    model
}

fn data_file(dir: &Path) -> PathBuf {
    let p = dir.join("data.txt");
    std::fs::write(
        &p,
        "the quick brown fox jumps over the lazy dog. ".repeat(60),
    )
    .unwrap();
    p
}

/// `train` on the tiny model: 2 steps of 16 tokens, rank 4, unless `extra` sets those flags
/// itself (clap refuses a flag given twice).
fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--model", model, "--data", data, "--out", out];
    for (flag, value) in [("--steps", "2"), ("--seq-len", "16"), ("--lora-r", "4")] {
        if !extra.iter().any(|e| e.split('=').next() == Some(flag)) {
            a.extend([flag, value]);
        }
    }
    a.extend_from_slice(extra);
    a
}

/// A process id that is certainly not running: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

// ---- outputs never touch inputs ----

#[test]
fn convert_out_parent_of_the_model_with_force_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_in_project(tmp.path());
    let p = tmp.path().join("p");
    let args = ["convert", "--model", s(&model), "--out", s(&p), "--force"];
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &["--out", "contains the input", "nothing was written"],
    );
}

#[test]
fn convert_out_equal_to_or_inside_the_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_in_project(tmp.path());
    let same = [
        "convert",
        "--model",
        s(&model),
        "--out",
        s(&model),
        "--force",
    ];
    refused(tmp.path(), None, &same, 1, &["is the input"]);
    let inside = model.join("sub");
    let args = ["convert", "--model", s(&model), "--out", s(&inside)];
    refused(tmp.path(), None, &args, 1, &["lies inside the input"]);
}

#[test]
fn convert_out_dot_with_force_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_in_project(tmp.path());
    let p = tmp.path().join("p");
    let model_abs = model.canonicalize().unwrap();
    // Run from an unrelated folder that holds a user file.
    let cwd = tmp.path().join("work");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(cwd.join("keep.txt"), "x").unwrap();
    let args = ["convert", "--model", s(&model_abs), "--out", ".", "--force"];
    refused(
        tmp.path(),
        Some(&cwd),
        &args,
        1,
        &["--out .", "is the current folder"],
    );
    // And `..` from inside the project: it contains both the model and the current folder.
    let args = ["convert", "--model", "model", "--out", "..", "--force"];
    refused(tmp.path(), Some(&p), &args, 1, &["--out .."]);
}

#[test]
fn convert_out_through_a_symlink_to_the_models_parent_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_in_project(tmp.path());
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("p"), &link).unwrap();
    let args = [
        "convert",
        "--model",
        s(&model),
        "--out",
        s(&link),
        "--force",
    ];
    refused(tmp.path(), None, &args, 1, &["contains the input"]);
}

#[test]
fn merge_out_parent_of_model_and_adapter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_in_project(tmp.path());
    let data = data_file(tmp.path());
    let adapter = tmp.path().join("p/adapter");
    let r = octet(&train_args(s(&model), s(&data), s(&adapter), &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let p = tmp.path().join("p");
    let args = [
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&p),
        "--force",
    ];
    refused(tmp.path(), None, &args, 1, &["contains the input"]);
    let args = [
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&adapter),
        "--force",
    ];
    refused(tmp.path(), None, &args, 1, &["is the input"]);
}

#[test]
fn train_out_containing_its_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    std::fs::create_dir(&d).unwrap();
    let data = data_file(&d);
    let model = tiny("hf_safetensors");
    let args = train_args(s(&model), s(&data), s(&d), &["--force"]);
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &["contains the input", "data.txt"],
    );
}

// ---- --force replaces only octet's own outputs ----

#[test]
fn force_over_a_folder_octet_did_not_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("photos");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("holiday.jpg"), "jpeg").unwrap();
    let model = tiny("hf_safetensors");
    let args = ["convert", "--model", s(&model), "--out", s(&out), "--force"];
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &["not written by octet", MARKER],
    );
    let data = data_file(tmp.path());
    let args = train_args(s(&model), s(&data), s(&out), &["--force"]);
    refused(tmp.path(), None, &args, 1, &["not written by octet"]);
}

#[test]
fn force_over_an_octet_output_holding_a_user_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let out = tmp.path().join("q");
    let r = octet(&["convert", "--model", s(&model), "--out", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(out.join(MARKER).is_file());
    std::fs::write(out.join("my-notes.md"), "mine").unwrap();
    let args = ["convert", "--model", s(&model), "--out", s(&out), "--force"];
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &["holds my-notes.md", "nothing was touched"],
    );
}

#[test]
fn force_replaces_octets_own_output_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let out = tmp.path().join("q");
    assert_eq!(
        octet(&["convert", "--model", s(&model), "--out", s(&out)]).code,
        0
    );
    let args = ["convert", "--model", s(&model), "--out", s(&out)];
    refused(tmp.path(), None, &args, 1, &["not empty", "--force"]);
    let r = octet(&[
        "convert",
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--force",
        "--block-size",
        "64",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let manifest = std::fs::read_to_string(out.join("octet.toml")).unwrap();
    assert!(manifest.contains("block_size = 64"), "{manifest}");
    // Only the output and its parent's other entries: no temporary or lock left.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["q"], "{names:?}");
}

#[test]
fn train_force_replaces_its_own_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let out = tmp.path().join("run");
    assert_eq!(
        octet(&train_args(s(&model), s(&data), s(&out), &[])).code,
        0
    );
    let args = train_args(s(&model), s(&data), s(&out), &[]);
    refused(tmp.path(), None, &args, 1, &["not empty"]);
    let r = octet(&train_args(s(&model), s(&data), s(&out), &["--force"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
}

// ---- one writer per output ----

fn resolved(p: &Path) -> PathBuf {
    octet::outdir::target::resolve(p).unwrap()
}

#[test]
fn convert_into_a_locked_output_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let out = tmp.path().join("q");
    let held = OutputLock::acquire(&resolved(&out)).unwrap();
    let pid = format!("PID {}", std::process::id());
    let args = ["convert", "--model", s(&model), "--out", s(&out)];
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &[pid.as_str(), "another octet process"],
    );
    drop(held);
    assert_eq!(octet(&args).code, 0);
}

#[test]
fn a_second_train_into_the_same_out_is_refused_and_metrics_stay_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let out = tmp.path().join("run");
    assert_eq!(
        octet(&train_args(
            s(&model),
            s(&data),
            s(&out),
            &["--stop-after", "1"]
        ))
        .code,
        0
    );
    // The first writer is still running (it holds the lock): a resume, or a --force
    // restart, must not write beside it.
    let held = OutputLock::acquire(&resolved(&out)).unwrap();
    let pid = format!("PID {}", std::process::id());
    for extra in [vec!["--resume", s(&out)], vec!["--force", "--seed", "3"]] {
        let args = train_args(s(&model), s(&data), s(&out), &extra);
        refused(tmp.path(), None, &args, 1, &[pid.as_str()]);
    }
    drop(held);
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&out),
        &["--resume", s(&out)],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2]);
}

#[test]
fn a_lock_left_by_a_dead_process_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let out = tmp.path().join("q");
    let dead = dead_pid();
    let lock_file = lock::lock_path(&resolved(&out));
    std::fs::write(&lock_file, format!("{dead}\n")).unwrap();
    let r = octet(&["convert", "--model", s(&model), "--out", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("left by PID {dead}")),
        "{}",
        r.stderr
    );
    assert!(!lock_file.exists(), "the lock file is removed at the end");
}

// ---- leftovers of killed runs ----

#[test]
fn temp_folders_of_dead_runs_are_removed_and_live_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let out = tmp.path().join("q");
    let dead = dead_pid();
    let stale = tmp.path().join(format!(".q.tmp-{dead}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    std::fs::write(stale.join(".octet-output"), "").unwrap();
    // Named like a leftover of another dead PID, but not octet's: it must survive.
    let lookalike = tmp.path().join(format!(".q.tmp-{}", dead_pid()));
    std::fs::create_dir(&lookalike).unwrap();
    std::fs::write(lookalike.join("notes.txt"), "mine").unwrap();
    let live = tmp.path().join(format!(".q.tmp-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    let other = tmp.path().join(format!(".other.tmp-{dead}"));
    std::fs::create_dir(&other).unwrap();
    let r = octet(&["convert", "--model", s(&model), "--out", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!stale.exists(), "the dead run's temporary folder stays");
    assert!(
        r.stderr.contains("removed") && r.stderr.contains(&format!("PID {dead}")),
        "{}",
        r.stderr
    );
    assert!(live.exists(), "a live process's folder was removed");
    assert!(
        lookalike.join("notes.txt").exists(),
        "a folder octet did not write was removed"
    );
    assert!(
        other.exists(),
        "another output's leftovers are not this run's business"
    );
}

#[test]
fn an_old_output_moved_aside_by_an_interrupted_swap_is_put_back() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let out = tmp.path().join("q");
    assert_eq!(
        octet(&["convert", "--model", s(&model), "--out", s(&out)]).code,
        0
    );
    let before = snapshot(&out);
    // A replacement killed between its two renames: the old output sits aside, none in place.
    let aside = tmp.path().join(format!(".q.tmp-{}.old", dead_pid()));
    std::fs::rename(&out, &aside).unwrap();
    // Any later run writing q notices and puts it back before refusing to replace it.
    let args = ["convert", "--model", s(&model), "--out", s(&out)];
    let r = octet(&args);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("put back"), "{}", r.stderr);
    assert_eq!(snapshot(&out), before);
    assert!(!aside.exists());
}

// ---- crash-safe checkpoints ----

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_missing_or_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let full = tmp.path().join("full");
    let r = octet(&train_args(s(&model), s(&data), s(&full), &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);

    // A crash between the two renames of a save: resume/ gone, .resume-old holds step 1.
    let part = tmp.path().join("part");
    assert_eq!(
        octet(&train_args(
            s(&model),
            s(&data),
            s(&part),
            &["--stop-after", "1"]
        ))
        .code,
        0
    );
    std::fs::rename(part.join("resume"), part.join(".resume-old")).unwrap();
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&part),
        &["--resume", s(&part)],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("resuming from the previous one"),
        "{}",
        r.stderr
    );
    assert_eq!(
        losses(&part),
        losses(&full),
        "the fallback resume is not exact"
    );
    assert!(!part.join(".resume-old").exists());

    // A latest checkpoint whose optimizer file was cut short: the previous one is used.
    let cut = tmp.path().join("cut");
    assert_eq!(
        octet(&train_args(
            s(&model),
            s(&data),
            s(&cut),
            &["--stop-after", "1"]
        ))
        .code,
        0
    );
    common::copy_dir(&cut.join("resume"), &cut.join(".resume-old"));
    let opt = cut.join("resume/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&cut),
        &["--resume", s(&cut)],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("optimizer.safetensors"), "{}", r.stderr);
    assert_eq!(losses(&cut), losses(&full));

    // A crash after the swap but before the old one was removed: both complete, the
    // newest is used and the old one goes at the next save.
    let both = tmp.path().join("both");
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&both),
        &["--stop-after", "1"],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    common::copy_dir(&both.join("resume"), &both.join(".resume-old"));
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&both),
        &["--resume", s(&both)],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("previous one"), "{}", r.stderr);
    assert_eq!(losses(&both), losses(&full));
    assert!(!both.join(".resume-old").exists() && both.join("resume/state.json").is_file());

    // Neither complete: refused, naming both, nothing changed.
    std::fs::remove_dir_all(cut.join("resume")).unwrap();
    let args = train_args(s(&model), s(&data), s(&cut), &["--resume", s(&cut)]);
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &[
            "no complete checkpoint",
            "resume/ is missing",
            ".resume-old/ is missing",
        ],
    );
}

// ---- resume is honest ----

#[test]
fn resume_with_changed_shape_settings_is_refused_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let run = tmp.path().join("run");
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&run),
        &["--stop-after", "1"],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let other_data = tmp.path().join("other.txt");
    std::fs::write(
        &other_data,
        "a completely different text about rivers. ".repeat(60),
    )
    .unwrap();
    let rr = s(&run);
    let cases: [(&str, Vec<&str>, &str); 7] = [
        ("seq len", vec!["--seq-len", "24"], "--seq-len 24"),
        ("batch size", vec!["--batch-size", "2"], "--batch-size 2"),
        ("targets", vec!["--targets", "q_proj"], "--targets"),
        ("rank", vec!["--lora-r", "8"], "--lora-r 8"),
        ("alpha", vec!["--lora-alpha", "16"], "--lora-alpha 16"),
        ("seed", vec!["--seed", "9"], "--seed 9"),
        ("data", vec![], "--data"),
    ];
    for (name, extra, needle) in cases {
        let d = if name == "data" {
            s(&other_data)
        } else {
            s(&data)
        };
        let mut extra = extra.clone();
        extra.extend(["--resume", rr]);
        let args = train_args(s(&model), d, rr, &extra);
        let r = refused(
            tmp.path(),
            None,
            &args,
            1,
            &[needle, "state.json", "cannot resume"],
        );
        assert!(r.stderr.contains("differs"), "{name}: {}", r.stderr);
    }
    // Steps and learning rate may change: allowed and logged.
    let r = octet(&train_args(
        s(&model),
        s(&data),
        rr,
        &["--resume", rr, "--lr", "1e-3"],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("changed settings") && r.stderr.contains("--lr"),
        "{}",
        r.stderr
    );
}

// ---- flags in range ----

#[test]
fn out_of_range_train_flags_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let out = tmp.path().join("run");
    let cases: [(&[&str], &str); 17] = [
        (
            &["--lora-dropout", "2"],
            "--lora-dropout 2: must be in [0, 1)",
        ),
        (
            &["--lora-dropout=-0.5"],
            "--lora-dropout -0.5: must be in [0, 1)",
        ),
        (
            &["--lora-dropout", "1"],
            "--lora-dropout 1: must be in [0, 1)",
        ),
        (&["--lora-dropout", "NaN"], "--lora-dropout NaN"),
        (&["--steps", "0"], "--steps 0: must be at least 1"),
        (&["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (&["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
        (&["--lr", "0"], "--lr 0: must be a finite number > 0"),
        (&["--lr", "inf"], "--lr inf"),
        (&["--lora-alpha", "0"], "--lora-alpha 0"),
        (
            &["--eval-fraction", "1"],
            "--eval-fraction 1: must be in [0, 1)",
        ),
        (&["--weight-decay=-1"], "--weight-decay -1"),
        (&["--max-grad-norm=-1"], "--max-grad-norm -1"),
        (
            &["--warmup", "5"],
            "--warmup 5: must not exceed --steps (2)",
        ),
        (&["--stop-after", "0"], "--stop-after 0: must be at least 1"),
        (&["--batch-size", "100000000"], "lower --batch-size"),
        (
            &[
                "--eval-every",
                "1",
                "--save-every",
                "1",
                "--seed",
                "1",
                "--targets",
                "zz",
            ],
            "match no module",
        ),
    ];
    for (extra, needle) in cases {
        let args = train_args(s(&model), s(&data), s(&out), extra);
        let started = std::time::Instant::now();
        refused(tmp.path(), None, &args, 1, &[needle]);
        assert!(started.elapsed().as_secs() < 30, "{extra:?} took too long");
    }
    // The same checks hold for a value from --config.
    let config = tmp.path().join("train.toml");
    std::fs::write(&config, "lora-dropout = 2.0\n").unwrap();
    let args = train_args(s(&model), s(&data), s(&out), &["--config", s(&config)]);
    refused(
        tmp.path(),
        None,
        &args,
        1,
        &["--lora-dropout 2: must be in [0, 1)"],
    );
    // Shape flags below their minimum or beyond the model.
    for (extra, needle) in [
        (&["--seq-len", "1"][..], "--seq-len 1: must be at least 2"),
        (&["--lora-r", "0"][..], "--lora-r 0: must be at least 1"),
        (
            &["--lora-r", "100000"][..],
            "--lora-r 100000: larger than the model's hidden width",
        ),
    ] {
        let args = train_args(s(&model), s(&data), s(&out), extra);
        refused(tmp.path(), None, &args, 1, &[needle]);
    }
}

#[test]
fn out_of_range_flags_of_the_other_commands_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let m = s(&model);
    let d = s(&data);
    let out = tmp.path().join("q");
    let o = s(&out);
    let clap = 2;
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["quant-report", "--rows", "0", "--cols", "0"],
            clap,
            "--rows",
        ),
        (
            vec!["quant-report", "--rows", "64", "--cols", "0"],
            clap,
            "--cols",
        ),
        (vec!["quant-report", "--rows=-3"], clap, "--rows"),
        (
            vec!["quant-report", "--rows", "16777216", "--cols", "16777216"],
            1,
            "lower --rows or --cols",
        ),
        (
            vec!["quant-report", "--block-size", "100"],
            1,
            "invalid block size 100",
        ),
        (
            vec![
                "convert",
                "--model",
                m,
                "--out",
                o,
                "--shard-mib",
                "1073741825",
            ],
            clap,
            "--shard-mib",
        ),
        (
            vec!["convert", "--model", m, "--out", o, "--block-size", "3"],
            1,
            "invalid block size 3",
        ),
        (
            vec!["eval", "--model", m, "--data", d, "--batch-size", "0"],
            clap,
            "--batch-size",
        ),
        (
            vec!["eval", "--model", m, "--data", d, "--max-tokens", "0"],
            1,
            "at least 2 are needed",
        ),
        (
            vec!["eval", "--model", m, "--data", d, "--ctx", "1"],
            1,
            "--ctx 1",
        ),
        (
            vec![
                "eval", "--model", m, "--data", d, "--ctx", "16", "--stride", "0",
            ],
            1,
            "--stride 0",
        ),
        (
            vec![
                "eval", "--model", m, "--data", d, "--ctx", "16", "--stride", "17",
            ],
            1,
            "--stride 17",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--max-new-tokens",
                "0",
            ],
            clap,
            "--max-new-tokens",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--temperature=-1",
            ],
            1,
            "--temperature -1",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--top-p", "0"],
            1,
            "--top-p 0",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--top-p", "1.5"],
            1,
            "--top-p 1.5",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "a",
                "--repetition-penalty",
                "0",
            ],
            1,
            "--repetition-penalty 0",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "a", "--top-k=-1"],
            clap,
            "--top-k",
        ),
    ];
    for (args, code, needle) in cases {
        refused(tmp.path(), None, &args, code, &[needle]);
    }
}

// ---- messages ----

#[test]
fn stop_after_reports_itself_not_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("hf_safetensors");
    let data = data_file(tmp.path());
    let out = tmp.path().join("run");
    let r = octet(&train_args(
        s(&model),
        s(&data),
        s(&out),
        &["--stop-after", "1"],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("stopped at --stop-after 1 after 1 steps"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("Ctrl-C"), "{}", r.stderr);
    // Resumed past its --stop-after: no step is run and nothing is written.
    let args = train_args(
        s(&model),
        s(&data),
        s(&out),
        &["--stop-after", "1", "--resume", s(&out)],
    );
    let before = snapshot(&out);
    let r = octet(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("(0 this run)") && !r.stderr.contains("Ctrl-C"),
        "{}",
        r.stderr
    );
    assert_eq!(before, snapshot(&out));
}

#[test]
fn an_os_error_is_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.txt");
    let model = tiny("hf_safetensors");
    let args = ["eval", "--model", s(&model), "--data", s(&missing)];
    let r = refused(tmp.path(), None, &args, 1, &["missing.txt", "(os error 2)"]);
    assert_eq!(r.stderr.matches("(os error 2)").count(), 1, "{}", r.stderr);
    // A library I/O error quotes its cause itself; the cause is not printed again.
    let args = ["inspect", s(&missing)];
    let r = refused(tmp.path(), None, &args, 1, &["missing.txt", "(os error 2)"]);
    assert_eq!(r.stderr.matches("(os error 2)").count(), 1, "{}", r.stderr);
}

#[test]
fn eval_generate_and_train_without_a_model_say_the_model_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_file(tmp.path());
    let missing = tmp.path().join("no-model");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (m, why) in [
        (&missing, "no such model folder"),
        (&empty, "not a model folder"),
    ] {
        for args in [
            vec!["eval", "--model", s(m), "--data", s(&data)],
            vec!["generate", "--model", s(m), "--prompt", "hello"],
            train_args(s(m), s(&data), "unused-out", &[]),
        ] {
            let r = refused(tmp.path(), None, &args, 1, &["--model", why]);
            assert!(!r.stderr.contains("tokenizer"), "{}", r.stderr);
        }
    }
}

#[test]
fn a_non_finite_perplexity_is_an_error_naming_the_window() {
    let mut m = octet::load::load_model(&tiny("hf_safetensors"), &Default::default()).unwrap();
    m.model.visit_norms(&mut |path, l| {
        if path.ends_with("ln_f") {
            for (_, t) in l.tensors() {
                let _ = tch::no_grad(|| t.shallow_clone().fill_(f64::NAN));
            }
        }
    });
    let ids: Vec<i64> = (0..40).collect();
    let err = octet::eval::perplexity(m.model.as_ref(), &ids, 16, 16, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("window 1") && err.contains("tokens 0..16"),
        "{err}"
    );
}
