//! `--model org/name[@revision]` from a Hugging Face cache laid out here as the hub's client
//! lays it out: blobs named by their hash, `snapshots/<commit>/` holding relative links into
//! `../../blobs`, `refs/<branch or tag>` holding a commit. Every command resolves the id to
//! the snapshot folder, an existing path wins, and an id that is not cached says how to get it.
use crate::common::{self, fixture, load_safetensors, s};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const REPO: &str = "tiny/llama";

/// A commit hash of 40 hex digits, made from a label.
fn commit(label: &str) -> String {
    hex(&Sha256::digest(label.as_bytes()))[..40].to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of a model revision: a fixture folder's files, plus the GPT-J fixture's
/// tokenizer (same 301-token vocabulary) so that eval, train and generate can run on it.
fn payload(model: &str) -> Vec<PathBuf> {
    let mut files = files_of(&fixture(model));
    files.push(fixture("tiny_gptj/hf_safetensors/tokenizer.json"));
    files
}

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Adds `files` to `cache` as revision `commit` of `repo`, and points each of `refs` at it.
fn add_revision(cache: &Path, repo: &str, commit: &str, files: &[PathBuf], refs: &[&str]) {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snapshot) = (dir.join("blobs"), dir.join("snapshots").join(commit));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        let hash = hex(&Sha256::digest(&bytes));
        std::fs::write(blobs.join(&hash), &bytes).unwrap();
        let link = snapshot.join(f.file_name().unwrap());
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&hash), &link).unwrap();
    }
    for r in refs {
        let path = dir.join("refs").join(r);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // huggingface_hub writes the bare hash, no newline.
        std::fs::write(path, commit).unwrap();
    }
}

/// A cache holding `tiny/llama` at two revisions: `main` the untied model, tag `v1` the tied.
struct Cache {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    tied: String,
    untied: String,
}

fn two_revision_cache() -> Cache {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    let (tied, untied) = (commit("tied"), commit("untied"));
    add_revision(&root, REPO, &tied, &payload("tiny_llama/tied"), &["v1"]);
    add_revision(
        &root,
        REPO,
        &untied,
        &payload("tiny_llama/untied"),
        &["main"],
    );
    Cache {
        _tmp: tmp,
        root,
        tied,
        untied,
    }
}

/// Runs `octet` in `cwd` with no Hugging Face variables but `env` (and HOME at `cwd`, so
/// the user's own cache is never read); returns (success, stdout, stderr).
fn octet_with(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> (bool, String, String) {
    let out = octet_output(cwd, env, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// As [`octet_with`], the whole output with the exit status.
fn octet_output(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_octet"));
    cmd.current_dir(cwd).args(args).env("HOME", cwd);
    for v in [
        "HF_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "HF_HUB_OFFLINE",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run octet")
}

/// `octet inspect MODEL` with the cache at HF_HUB_CACHE; its stdout.
fn inspect(cache: &Path, model: &str) -> String {
    let (ok, stdout, stderr) = octet_with(cache, &[("HF_HUB_CACHE", cache)], &["inspect", model]);
    assert!(ok, "inspect {model}: {stderr}");
    stdout
}

fn inspect_path(p: &Path) -> String {
    let (ok, stdout, stderr) = common::octet(&["inspect", s(p)]);
    assert!(ok, "{stderr}");
    stdout
}

/// A branch, a tag, a full and an abbreviated commit each pick their revision.
#[test]
fn ids_resolve_to_the_revision_they_name() {
    let c = two_revision_cache();
    let tied = inspect_path(&fixture("tiny_llama/tied"));
    let untied = inspect_path(&fixture("tiny_llama/untied"));
    assert_ne!(tied, untied, "the revisions must be told apart");
    let cases = [
        (REPO.to_string(), &untied),
        (format!("{REPO}@main"), &untied),
        (format!("{REPO}@v1"), &tied),
        (format!("{REPO}@{}", c.tied), &tied),
        (format!("{REPO}@{}", &c.tied[..8]), &tied),
        (format!("{REPO}@{}", c.untied.to_uppercase()), &untied),
    ];
    for (id, want) in cases {
        assert_eq!(&inspect(&c.root, &id), want, "{id}");
    }
}

/// `eval` through an id reads the snapshot's links: the perplexity of the folder itself.
#[test]
fn eval_through_an_id_equals_eval_of_the_folder() {
    let c = two_revision_cache();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("eval.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let folder = tmp.path().join("tied");
    common::copy_dir(&fixture("tiny_llama/tied"), &folder);
    std::fs::copy(
        fixture("tiny_gptj/hf_safetensors/tokenizer.json"),
        folder.join("tokenizer.json"),
    )
    .unwrap();
    let eval = |model: &str| -> serde_json::Value {
        let args = ["eval", "--json", "--model", model, "--data", s(&data)];
        let (ok, stdout, stderr) = octet_with(tmp.path(), &[("HF_HUB_CACHE", &c.root)], &args);
        assert!(ok, "eval {model}: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let want = eval(s(&folder));
    let got = eval(&format!("{REPO}@v1"));
    assert!(want["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(got["perplexity"], want["perplexity"]);
    assert_eq!(got["tokens"], want["tokens"]);
    let snapshot = c.root.join("models--tiny--llama/snapshots").join(&c.tied);
    assert_eq!(got["model"].as_str().unwrap(), s(&snapshot));
}

/// A sharded checkpoint (index + shards, all links into the blobs) converts through an id
/// to the same tensors as from its folder; outputs that would hold the snapshot or the blobs
/// it links to are refused, and the cache is left as it was.
#[test]
fn convert_reads_a_sharded_snapshot_and_never_writes_into_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let sharded = fixture("tiny_gptj/hf_sharded_safetensors");
    let rev = commit("sharded");
    add_revision(&cache, "tiny/gptj", &rev, &files_of(&sharded), &["main"]);
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let convert = |model: &str, out: &Path, extra: &[&str]| {
        let mut args = vec!["convert", "--model", model, "--out", s(out)];
        args.extend_from_slice(extra);
        octet_with(tmp.path(), &env, &args)
    };
    let (from_id, from_dir) = (tmp.path().join("from_id"), tmp.path().join("from_dir"));
    let (ok, _, stderr) = convert("tiny/gptj", &from_id, &[]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = convert(s(&sharded), &from_dir, &[]);
    assert!(ok, "{stderr}");
    let (a, b) = (
        load_safetensors(&from_id.join("model.safetensors")),
        load_safetensors(&from_dir.join("model.safetensors")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs");
    }

    let repo = cache.join("models--tiny--gptj");
    let before = tree(&repo);
    let snapshot = repo.join("snapshots").join(&rev);
    for (out, why) in [
        (snapshot.join("out"), "lies inside the input"),
        (repo.clone(), "contains the input"),
        (repo.join("blobs"), "a file the input"),
    ] {
        let (ok, _, stderr) = convert("tiny/gptj", &out, &["--force"]);
        assert!(!ok, "{} was accepted", out.display());
        assert!(stderr.contains(why), "{stderr}");
    }
    assert_eq!(tree(&repo), before, "the cache changed");
}

/// Every file under `dir` (links as their targets) with its bytes, sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>, Option<PathBuf>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let link = std::fs::read_link(&p).ok();
        if p.is_dir() && link.is_none() {
            out.extend(tree(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap(), link));
        }
    }
    out.sort();
    out
}

/// train, merge and generate take ids too (merge's base, generate's model).
#[test]
fn train_merge_and_generate_take_ids() {
    let c = two_revision_cache();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let env = [("HF_HUB_CACHE", c.root.as_path())];
    let run = |args: &[&str]| {
        let (ok, stdout, stderr) = octet_with(tmp.path(), &env, args);
        assert!(ok, "{args:?}: {stderr}");
        stdout
    };
    let id = format!("{REPO}@v1");
    run(&[
        "train",
        "--model",
        &id,
        "--data",
        s(&data),
        "--out",
        "adapter",
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
    ]);
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let snapshot = c.root.join("models--tiny--llama/snapshots").join(&c.tied);
    assert_eq!(
        adapter["base_model_name_or_path"].as_str(),
        Some(s(&snapshot))
    );
    run(&[
        "merge",
        "--model",
        &id,
        "--adapter",
        "adapter",
        "--out",
        "merged",
        "--format",
        "hf-f32",
    ]);
    assert!(tmp.path().join("merged/model.safetensors").is_file());
    let gen = |model: &str| {
        run(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "the quick",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ])
    };
    assert_eq!(gen(&id), gen(s(&fixture_with_tokenizer(tmp.path()))));
}

/// The tied fixture with the tokenizer beside it, as a plain folder.
fn fixture_with_tokenizer(dir: &Path) -> PathBuf {
    let folder = dir.join("plain_tied");
    common::copy_dir(&fixture("tiny_llama/tied"), &folder);
    std::fs::copy(
        fixture("tiny_gptj/hf_safetensors/tokenizer.json"),
        folder.join("tokenizer.json"),
    )
    .unwrap();
    folder
}

/// HF_HUB_CACHE is searched rather than HF_HOME/hub when both are set; HF_HOME/hub alone is
/// searched too.
#[test]
fn hf_hub_cache_wins_over_hf_home() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub_cache, hf_home) = (tmp.path().join("hub_cache"), tmp.path().join("hf_home"));
    add_revision(
        &hub_cache,
        REPO,
        &commit("tied"),
        &payload("tiny_llama/tied"),
        &["main"],
    );
    add_revision(
        &hf_home.join("hub"),
        REPO,
        &commit("untied"),
        &payload("tiny_llama/untied"),
        &["main"],
    );
    let inspect_with = |env: &[(&str, &Path)]| {
        let (ok, stdout, stderr) = octet_with(tmp.path(), env, &["inspect", REPO]);
        assert!(ok, "{stderr}");
        stdout
    };
    let both = [("HF_HUB_CACHE", hub_cache.as_path()), ("HF_HOME", &hf_home)];
    assert_eq!(
        inspect_with(&both),
        inspect_path(&fixture("tiny_llama/tied"))
    );
    assert_eq!(
        inspect_with(&both[1..]),
        inspect_path(&fixture("tiny_llama/untied"))
    );
}

/// A folder `tiny/llama` in the current folder is that folder, not the cached `main`.
#[test]
fn an_existing_path_wins_over_the_cache() {
    let c = two_revision_cache();
    let cwd = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture("tiny_llama/tied"), &cwd.path().join(REPO));
    let env = [("HF_HUB_CACHE", c.root.as_path())];
    let (ok, stdout, stderr) = octet_with(cwd.path(), &env, &["inspect", REPO]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, inspect_path(&fixture("tiny_llama/tied")));
    assert_ne!(stdout, inspect(&c.root, REPO), "main is the untied model");
}

/// An id that is not cached (no repository, or not that revision) fails like any bad input
/// (exit code 1) before anything is written, naming the id, the cache searched and the
/// download command.
#[test]
fn an_id_that_is_not_cached_says_how_to_get_it() {
    let c = two_revision_cache();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let env = [("HF_HUB_CACHE", c.root.as_path())];
    let cases = [
        (
            "nobody/nothing",
            vec![
                "models--nobody--nothing",
                "huggingface-cli download nobody/nothing",
            ],
        ),
        (
            "tiny/llama@v9",
            vec![
                "refs/v9",
                "main -> ",
                "v1 -> ",
                "huggingface-cli download tiny/llama --revision v9",
            ],
        ),
        (
            "tiny/llama@0000000",
            vec!["huggingface-cli download tiny/llama --revision 0000000"],
        ),
    ];
    for (id, needles) in cases {
        for args in [
            vec!["convert", "--model", id, "--out", s(&out)],
            vec!["inspect", id],
            vec!["eval", "--model", id, "--data", "missing.txt"],
        ] {
            let run = octet_output(tmp.path(), &env, &args);
            assert_eq!(run.status.code(), Some(1), "{args:?}");
            let stderr = String::from_utf8_lossy(&run.stderr);
            common::assert_mentions(&stderr, &[id, s(&c.root)]);
            common::assert_mentions(&stderr, &needles);
            assert!(!out.exists(), "{args:?} wrote {}", out.display());
        }
    }
    // The default cache folder when no variable is set: under HOME.
    let (ok, _, stderr) = octet_with(tmp.path(), &[], &["inspect", REPO]);
    assert!(!ok);
    let default = tmp.path().join(".cache/huggingface/hub");
    common::assert_mentions(
        &stderr,
        &[s(&default), "huggingface-cli download tiny/llama"],
    );
}

/// A GGUF repository downloaded one quantization at a time: a snapshot without config.json
/// holding one `.gguf` is that file; with two, the id is refused, naming both.
#[test]
fn a_snapshot_of_one_gguf_file_is_that_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let gguf = fixture("tiny_llama/tied.gguf");
    add_revision(
        &cache,
        "tiny/gguf",
        &commit("one"),
        std::slice::from_ref(&gguf),
        &["main"],
    );
    let two = [gguf.clone(), fixture("tiny_llama/bias.gguf")];
    add_revision(&cache, "tiny/gguf", &commit("two"), &two, &["both"]);
    assert_eq!(inspect(&cache, "tiny/gguf"), inspect_path(&gguf));
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let (ok, _, stderr) = octet_with(tmp.path(), &env, &["inspect", "tiny/gguf@both"]);
    assert!(!ok);
    common::assert_mentions(&stderr, &["2 GGUF files", "tied.gguf", "bias.gguf"]);
}
