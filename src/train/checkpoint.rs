//! A training run's checkpoint: the adapter, the optimizer state and the run state (step, data
//! position, settings), saved crash-safely into `resume/` and found again on `--resume`, and
//! the check that a resume keeps every setting that gives the saved state its meaning.
use super::data::{BatcherState, Dataset};
use super::optim::Optimizer;
use super::options::{OptimKind, TrainOptions};
use crate::error::{OctetError, Result};
use crate::io::safetensors::save_tensors;
use crate::model::CausalLm;
use crate::peft::{save_adapter, AdapterConfig, Targets, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Resume state kept beside the adapter. Written last into its checkpoint folder, with the
/// SHA-256 of every other file there, so a checkpoint is complete exactly when this file
/// reads back and the files match.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct RunState {
    pub(super) step: usize,
    pub(super) batcher: BatcherState,
    pub(super) seed: u64,
    pub(super) base: String,
    pub(super) base_fingerprint: String,
    pub(super) r: usize,
    pub(super) targets: Vec<String>,
    pub(super) optim: OptimKind,
    pub(super) train_norms: bool,
    pub(super) train_biases: bool,
    /// The settings the run was started with (absent in checkpoints of older versions).
    #[serde(default)]
    pub(super) settings: Option<RunSettings>,
    /// SHA-256 of each other file of the checkpoint folder.
    #[serde(default)]
    pub(super) files: std::collections::BTreeMap<String, String>,
}

/// The settings of a run, named as their flags, compared on resume: the keys of
/// [`MUST_KEEP`] and [`MAY_CHANGE`] taken from the run's options, with `targets` resolved and
/// `data` the SHA-256 of the tokenized data (train and held-out sequences).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub(super) struct RunSettings(serde_json::Map<String, serde_json::Value>);

/// Settings a resumed run must keep, in the order they are checked (shapes first).
const MUST_KEEP: [&str; 12] = [
    "seq-len",
    "batch-size",
    "targets",
    "lora-r",
    "lora-alpha",
    "rslora",
    "train-norms",
    "train-biases",
    "optim",
    "seed",
    "eval-fraction",
    "data",
];

/// Settings a resumed run may change: they steer the rest of the run without making the
/// saved state mean something else.
const MAY_CHANGE: [&str; 10] = [
    "steps",
    "lr",
    "warmup",
    "schedule",
    "grad-accum",
    "lora-dropout",
    "weight-decay",
    "max-grad-norm",
    "eval-every",
    "save-every",
];

/// What a kept setting is, for the refusal.
fn describe(key: &str) -> &'static str {
    match key {
        "seq-len" => "the sequence length",
        "batch-size" => "the batch size the data order was drawn for",
        "targets" => "the modules that carry adapters",
        "lora-r" => "the LoRA rank",
        "lora-alpha" => "the LoRA scale",
        "rslora" => "the LoRA scaling rule",
        "train-norms" | "train-biases" => "the trained tensors",
        "optim" => "the optimizer whose state is saved",
        "seed" => "the seed of the data split and order",
        "eval-fraction" => "the held-out split",
        _ => "a setting of the run",
    }
}

impl RunSettings {
    pub(super) fn of(opts: &TrainOptions, targets: &Targets, data: String) -> Result<Self> {
        let mut all = match serde_json::to_value(opts) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                return Err(OctetError::InvalidArgument(
                    "unserializable settings".into(),
                ))
            }
        };
        all.insert("targets".into(), targets.to_string().into());
        all.insert("data".into(), data.into());
        let wanted = MUST_KEEP.iter().chain(&MAY_CHANGE);
        Ok(RunSettings(
            wanted
                .filter_map(|k| Some((k.to_string(), all.get(*k)?.clone())))
                .collect(),
        ))
    }

    /// Refuses a resume whose settings change what the saved state means, naming the first
    /// such setting; logs the ones that may change on stderr.
    pub(super) fn check_resume(&self, now: &RunSettings, state_file: &Path) -> Result<()> {
        let null = serde_json::Value::Null;
        let mut changed = Vec::new();
        for key in MUST_KEEP.iter().chain(&MAY_CHANGE) {
            let (old, new) = (
                self.0.get(*key).unwrap_or(&null),
                now.0.get(*key).unwrap_or(&null),
            );
            if old == new {
                continue;
            }
            if MAY_CHANGE.contains(key) {
                changed.push(format!("--{key} {old} -> {new}"));
                continue;
            }
            let what = if *key == "data" {
                format!(
                    "--data: the tokenized data differs from the run's (fingerprint {old} now \
                     {new}: the file, the tokenizer, --format, --train-on-prompt, --drop-long \
                     or --pack changed)"
                )
            } else {
                format!(
                    "--{key} {new} differs from the run's {old} ({})",
                    describe(key)
                )
            };
            return Err(OctetError::bad_file(
                state_file,
                format!(
                    "{what}; it changes what the saved state means, so the run cannot resume \
                     with it (use the run's setting, or start a new --out)"
                ),
            ));
        }
        if !changed.is_empty() {
            eprintln!("resuming with changed settings: {}", changed.join(", "));
        }
        Ok(())
    }
}

/// SHA-256 of the tokenized sequences, so a resume onto other data (or another tokenizer)
/// is refused.
pub(super) fn fingerprint_data(dataset: &Dataset) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (part, seqs) in [(b"train", &dataset.train), (b"heldo", &dataset.eval)] {
        h.update(part);
        h.update((seqs.len() as u64).to_le_bytes());
        for s in seqs.iter() {
            for v in s.input_ids.iter().chain(&s.labels) {
                h.update(v.to_le_bytes());
            }
        }
    }
    // Only packed data hashes its segments, so unpacked runs keep their fingerprints.
    for seg in dataset.segments.iter().flatten() {
        for v in seg {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) const STATE_DIR: &str = "resume";
/// The previous checkpoint, kept while the next is swapped in.
pub(super) const OLD_STATE_DIR: &str = ".resume-old";
pub(super) const STATE_FILE: &str = "state.json";
pub(super) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Flushes a file or folder to disk, so a checkpoint is complete after a power loss too.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| OctetError::io(path, e))
}

/// The files of a checkpoint folder besides its state file.
const CHECKPOINT_FILES: [&str; 3] = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE];

/// Reads the checkpoint in `dir` if it is complete: its state file reads back and every
/// file it lists has the recorded hash. Otherwise says what is wrong.
fn read_checkpoint(dir: &Path) -> std::result::Result<RunState, String> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let st: RunState = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    for f in CHECKPOINT_FILES {
        let path = dir.join(f);
        if !path.is_file() {
            return Err(format!("{}: missing", path.display()));
        }
        if let Some(want) = st.files.get(f) {
            let got = crate::manifest::sha256_file(&path).map_err(|e| e.to_string())?;
            if &got != want {
                return Err(format!(
                    "{}: does not match its hash in {STATE_FILE} (incomplete write)",
                    path.display()
                ));
            }
        }
    }
    Ok(st)
}

/// The newest complete checkpoint of run folder `dir`: `resume/`, or the previous one when a
/// crash left `resume/` missing or incomplete. Returns its folder and state.
pub(super) fn find_checkpoint(dir: &Path) -> Result<(PathBuf, RunState)> {
    let mut why = Vec::new();
    for (i, name) in [STATE_DIR, OLD_STATE_DIR].into_iter().enumerate() {
        let d = dir.join(name);
        if !d.is_dir() {
            why.push(format!("{name}/ is missing"));
            continue;
        }
        match read_checkpoint(&d) {
            Ok(st) => {
                if i > 0 {
                    eprintln!(
                        "note: {}/{STATE_DIR} is not a complete checkpoint ({}); resuming from \
                         the previous one, {} (step {})",
                        dir.display(),
                        why.join("; "),
                        d.display(),
                        st.step
                    );
                }
                return Ok((d, st));
            }
            Err(e) => why.push(e),
        }
    }
    Err(OctetError::bad_file(
        dir,
        format!("no complete checkpoint to resume: {}", why.join("; ")),
    ))
}

/// Writes adapter + resume state into `out`. The new checkpoint is filled completely in a
/// sibling folder (its state file last) and swapped in by renames, ordered so that at every
/// instant `resume/` or `.resume-old` holds a complete checkpoint; [`find_checkpoint`] takes
/// whichever is newest and complete.
pub(super) fn save_checkpoint(
    model: &mut dyn CausalLm,
    opt: &dyn Optimizer,
    cfg: &AdapterConfig,
    state: &RunState,
    out: &Path,
) -> Result<()> {
    let tmp = out.join(".save-tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| OctetError::io(&tmp, e))?;
    }
    let tmp_state = tmp.join(STATE_DIR);
    std::fs::create_dir_all(&tmp_state).map_err(|e| OctetError::io(&tmp_state, e))?;
    save_adapter(model, cfg, &tmp)?;
    save_adapter(model, cfg, &tmp_state)?;
    save_tensors(&tmp_state.join(OPTIMIZER_FILE), &opt.state_dict(), &[])?;
    let mut state = state.clone();
    for f in CHECKPOINT_FILES {
        let p = tmp_state.join(f);
        sync(&p)?;
        state
            .files
            .insert(f.to_string(), crate::manifest::sha256_file(&p)?);
    }
    let json = serde_json::to_string_pretty(&state)
        .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
    let state_file = tmp_state.join(STATE_FILE);
    std::fs::write(&state_file, json).map_err(|e| OctetError::io(&state_file, e))?;
    sync(&state_file)?;
    sync(&tmp_state)?;

    let old = out.join(OLD_STATE_DIR);
    let dst = out.join(STATE_DIR);
    let remove = |p: &Path| std::fs::remove_dir_all(p).map_err(|e| OctetError::io(p, e));
    if read_checkpoint(&dst).is_ok() {
        // The current checkpoint becomes the fallback.
        if old.exists() {
            remove(&old)?;
        }
        std::fs::rename(&dst, &old).map_err(|e| OctetError::io(&dst, e))?;
    } else if dst.exists() {
        // Not a checkpoint (the fallback, if any, stays).
        remove(&dst)?;
    }
    std::fs::rename(&tmp_state, &dst).map_err(|e| OctetError::io(&dst, e))?;
    sync(out)?;
    if old.exists() {
        remove(&old)?;
    }
    for f in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        std::fs::rename(tmp.join(f), out.join(f)).map_err(|e| OctetError::io(out.join(f), e))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_either_kept_or_allowed_to_change() {
        let opts = TrainOptions::default();
        let s = RunSettings::of(&opts, &Targets::Names(vec!["q".into()]), "fp".into()).unwrap();
        let serde_json::Value::Object(m) = serde_json::to_value(&s).unwrap() else {
            panic!("settings serialize to an object")
        };
        for key in m.keys() {
            assert!(
                MUST_KEEP.contains(&key.as_str()) ^ MAY_CHANGE.contains(&key.as_str()),
                "{key} is in neither or both lists"
            );
        }
        assert_eq!(m.len(), MUST_KEEP.len() + MAY_CHANGE.len());
    }

    #[test]
    fn a_shape_setting_is_refused_by_name_and_a_schedule_setting_allowed() {
        let opts = TrainOptions::default();
        let t = Targets::Names(vec!["q".into()]);
        let was = RunSettings::of(&opts, &t, "fp".into()).unwrap();
        let longer = TrainOptions {
            seq_len: 256,
            steps: 500,
            ..TrainOptions::default()
        };
        let err = was
            .check_resume(
                &RunSettings::of(&longer, &t, "fp".into()).unwrap(),
                Path::new("s.json"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.json") && err.contains("--seq-len 256"),
            "{err}"
        );
        let more_steps = TrainOptions {
            steps: 500,
            ..TrainOptions::default()
        };
        was.check_resume(
            &RunSettings::of(&more_steps, &t, "fp".into()).unwrap(),
            Path::new("s"),
        )
        .unwrap();
    }
}
