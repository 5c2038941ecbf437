//! Reading a PEFT adapter folder: its config and its tensors (safetensors or the older
//! pickled `.bin`), sorted by module into LoRA pairs and replaced parameters. The one reader
//! behind both attaching an adapter and merging it.
use super::config::{
    AdapterConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, PEFT_PREFIX,
};
use crate::error::{OctetError, Result};
use crate::io::{open_file, TensorStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A LoRA pair for one module, as stored (f32).
pub struct LoraPair {
    /// `lora_A`: `[r, in]` (`[r, vocab]` for an embedding).
    pub a: Tensor,
    /// `lora_B`: `[out, r]` (`[dim, r]` for an embedding).
    pub b: Tensor,
    /// The file's name of `a`.
    pub a_name: String,
    /// The file's name of `b`.
    pub b_name: String,
    /// Whether it is an embedding adapter (`lora_embedding_A/B`).
    pub embedding: bool,
}

/// What the adapter changes in one module.
#[derive(Default)]
pub struct ModuleEdit {
    /// Its LoRA pair, if it has one.
    pub lora: Option<LoraPair>,
    /// Parameter name → (adapter tensor name, trained value): trained biases and norms, and
    /// the parameters of `modules_to_save`, which replace the base's.
    pub replace: BTreeMap<String, (String, Tensor)>,
}

impl ModuleEdit {
    /// A name of one of its tensors in the file, for messages.
    pub fn first_name(&self) -> String {
        self.lora
            .as_ref()
            .map(|l| l.a_name.clone())
            .or_else(|| self.replace.values().next().map(|(n, _)| n.clone()))
            .unwrap_or_default()
    }
}

/// A parsed adapter folder.
pub struct Adapter {
    /// Its `adapter_config.json`.
    pub config: AdapterConfig,
    /// The weights file read.
    pub weights: PathBuf,
    /// Module path → what the adapter changes there.
    pub modules: BTreeMap<String, ModuleEdit>,
}

/// The adapter's weight file: safetensors, or the older pickled `adapter_model.bin`.
pub fn adapter_weights(dir: &Path) -> Result<PathBuf> {
    [ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            OctetError::bad_file(
                dir,
                format!(
                    "not a PEFT adapter folder (no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN})"
                ),
            )
        })
}

/// Reads one adapter tensor, refusing what would silently compute garbage: a non-float dtype
/// (integers would be taken as values) or NaN/Inf.
pub fn read_adapter_tensor(store: &dyn TensorStore, name: &str) -> Result<Tensor> {
    let bad = |m: String| OctetError::bad_file(store.path(), m);
    let meta = store.require_float_meta(name, ", not floating point")?;
    let bytes = store.bytes(name)?;
    crate::validate::check_finite(name, meta.dtype, &bytes).map_err(bad)?;
    crate::io::dtype::tensor_from_bytes(meta.dtype, &meta.shape, &bytes)
}

/// The LoRA halves a key can end in: (suffix, index in the pair, embedding form).
const LORA_SUFFIXES: [(&str, usize, bool); 4] = [
    (".lora_A.weight", 0, false),
    (".lora_B.weight", 1, false),
    (".lora_embedding_A", 0, true),
    (".lora_embedding_B", 1, true),
];

/// The halves of each module's LoRA pair, as they are read.
type Halves = BTreeMap<String, (bool, [Option<(String, Tensor)>; 2])>;

impl Adapter {
    /// Reads the adapter folder `dir` and sorts its tensors by module. Half pairs, unknown
    /// LoRA variants and an empty adapter are refused here; whether it fits a model is
    /// [`Adapter::check_fits`]'s question.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.join(ADAPTER_CONFIG).is_file() {
            return Err(OctetError::bad_file(
                dir,
                format!("not a PEFT adapter folder (no {ADAPTER_CONFIG})"),
            ));
        }
        let config = AdapterConfig::read(dir)?;
        let weights = adapter_weights(dir)?;
        let store = open_file(&weights)?;
        let mut halves = Halves::new();
        let mut modules: BTreeMap<String, ModuleEdit> = BTreeMap::new();
        for name in store.names() {
            let key = module_key(&name, &weights)?;
            let t = read_adapter_tensor(store.as_ref(), &name)?.to_kind(Kind::Float);
            sort_tensor(name, &key, t, &mut halves, &mut modules, &weights)?;
        }
        pair_up(halves, &mut modules, &weights)?;
        if modules.is_empty() {
            return Err(OctetError::bad_file(
                &weights,
                "the adapter holds no tensors",
            ));
        }
        Ok(Adapter {
            config,
            weights,
            modules,
        })
    }
}

/// Files tensor `name` (model-side name `key`) as half of a LoRA pair or as a replaced
/// parameter of its module.
fn sort_tensor(
    name: String,
    key: &str,
    t: Tensor,
    halves: &mut Halves,
    modules: &mut BTreeMap<String, ModuleEdit>,
    weights: &Path,
) -> Result<()> {
    let half = LORA_SUFFIXES
        .into_iter()
        .find_map(|(suffix, i, emb)| key.strip_suffix(suffix).map(|p| (p, i, emb)));
    if let Some((path, i, emb)) = half {
        let entry = halves
            .entry(path.to_string())
            .or_insert((emb, [None, None]));
        if entry.0 != emb {
            return Err(OctetError::bad_file(
                weights,
                format!("{path} has both Linear and Embedding LoRA tensors"),
            ));
        }
        entry.1[i] = Some((name, t));
    } else if key.contains("lora_") {
        return Err(OctetError::bad_file(
            weights,
            format!("tensor {name} is no LoRA tensor octet knows (DoRA or another variant?)"),
        ));
    } else {
        let (path, param) = key.rsplit_once('.').ok_or_else(|| {
            OctetError::bad_file(weights, format!("tensor {name} names no module"))
        })?;
        modules
            .entry(path.to_string())
            .or_default()
            .replace
            .insert(param.to_string(), (name, t));
    }
    Ok(())
}

/// The model-side name of adapter tensor `name`: without PEFT's prefix, the adapter name
/// ("default") and the `modules_to_save` wrapper, which peft drops when it saves, but not in
/// every version.
fn module_key(name: &str, weights: &Path) -> Result<String> {
    let key = name
        .replace(".modules_to_save.", ".")
        .replace(".default.", ".")
        .replace(".default", "");
    key.strip_prefix(PEFT_PREFIX)
        .map(String::from)
        .ok_or_else(|| {
            OctetError::bad_file(
                weights,
                format!("tensor {name} lacks the {PEFT_PREFIX} prefix"),
            )
        })
}

/// Joins the read halves into one [`LoraPair`] per module; half a pair is refused.
fn pair_up(
    halves: Halves,
    modules: &mut BTreeMap<String, ModuleEdit>,
    weights: &Path,
) -> Result<()> {
    for (path, (embedding, [a, b])) in halves {
        let (an, bn) = if embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        let ((a_name, a), (b_name, b)) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some((n, _)), None) => {
                return Err(OctetError::bad_file(
                    weights,
                    format!("tensor {n}: {path} has {an} without {bn}"),
                ))
            }
            (None, Some((n, _))) => {
                return Err(OctetError::bad_file(
                    weights,
                    format!("tensor {n}: {path} has {bn} without {an}"),
                ))
            }
            (None, None) => continue,
        };
        modules.entry(path).or_default().lora = Some(LoraPair {
            a,
            b,
            a_name,
            b_name,
            embedding,
        });
    }
    Ok(())
}
