//! Sanity bounds on a model config's sizes, checked before anything is built from them: a
//! config.json with `n_layer` 2^63 must be refused with a message, not make octet allocate
//! (or loop over) what it declares.
use crate::error::{OctetError, Result};
use crate::nn::ModuleGraph;
use std::path::Path;

/// Integer size keys of the supported configs (Hugging Face names).
const SIZE_KEYS: [&str; 18] = [
    "vocab_size",
    "n_embd",
    "hidden_size",
    "d_model",
    "n_layer",
    "num_hidden_layers",
    "n_head",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rotary_dim",
    "n_inner",
    "intermediate_size",
    "n_positions",
    "n_ctx",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
];

/// The largest value any size key may take (far above any real model's, small enough that
/// products of two sizes cannot overflow).
pub const MAX_SIZE: u64 = 1 << 31;

/// Sizes a model cannot be built with at 0 (a 0-position model has no rotary table to index).
const MUST_BE_POSITIVE: [&str; 11] = [
    "vocab_size",
    "n_embd",
    "hidden_size",
    "d_model",
    "n_head",
    "num_attention_heads",
    "num_key_value_heads",
    "n_positions",
    "n_ctx",
    "max_position_embeddings",
    "intermediate_size",
];

/// Keys naming the hidden width and the number of blocks, in order of preference.
const WIDTH_KEYS: [&str; 3] = ["n_embd", "hidden_size", "d_model"];
const LAYER_KEYS: [&str; 2] = ["n_layer", "num_hidden_layers"];
const POSITION_KEYS: [&str; 3] = ["n_positions", "max_position_embeddings", "n_ctx"];

fn first_size(config: &serde_json::Value, keys: &[&str]) -> Option<(&'static str, u64)> {
    SIZE_KEYS
        .iter()
        .filter(|k| keys.contains(k))
        .find_map(|k| config.get(*k).and_then(|v| v.as_u64()).map(|v| (*k, v)))
}

/// Checks every size key present in `config` (from `origin`) is an integer in
/// [0, [`MAX_SIZE`]] (at least 1 for widths, heads, positions and the vocabulary), and that the sizes are consistent with the checkpoint `stored` (read
/// from `weights`): the config's blocks and embedding need at least `layers × width +
/// vocab × width` parameters, which the checkpoint must hold.
pub fn check_config(
    config: &serde_json::Value,
    origin: &Path,
    stored: &ModuleGraph,
    weights: &Path,
) -> Result<()> {
    let bad = |problem: String| OctetError::Config {
        path: origin.to_path_buf(),
        problem,
    };
    if !config.is_object() {
        return Err(bad("the config is not a JSON object".into()));
    }
    for key in SIZE_KEYS {
        let Some(v) = config.get(key) else { continue };
        if v.is_null() {
            continue;
        }
        match v.as_u64() {
            Some(0) if MUST_BE_POSITIVE.contains(&key) => {
                return Err(bad(format!("{key} is 0; it must be at least 1")))
            }
            Some(n) if n <= MAX_SIZE => {}
            _ if key.ends_with("token_id") && (v.is_array() || v.as_i64().is_some()) => {}
            _ => {
                return Err(bad(format!(
                    "{key} is {v}, which is not an integer between 0 and {MAX_SIZE}"
                )))
            }
        }
    }
    let width = first_size(config, &WIDTH_KEYS).map_or(0, |w| w.1);
    let stored_numel: u64 = stored
        .nodes
        .iter()
        .flat_map(|n| &n.params)
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();
    if let Some((lk, layers)) = first_size(config, &LAYER_KEYS) {
        // Every block has at least one width-sized vector (a norm), so this is a lower bound.
        let vocab = config
            .get("vocab_size")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let least = layers
            .saturating_mul(width)
            .saturating_add(vocab.saturating_mul(width));
        if least > stored_numel {
            return Err(bad(format!(
                "{lk} {layers} with hidden width {width} and vocab_size {vocab} implies at least \
                 {least} parameters, but {} holds {stored_numel}",
                weights.display()
            )));
        }
    }
    Ok(())
}

/// An estimate of the host memory a model built from `stored` takes: float parameters in f32,
/// 8-bit ones as stored, plus position tables the config implies (`positions × width` f32,
/// an upper bound of the rotary sin/cos tables).
pub fn model_bytes(config: &serde_json::Value, stored: &ModuleGraph) -> u64 {
    let params: u64 = stored
        .nodes
        .iter()
        .flat_map(|n| &n.params)
        .map(|p| {
            let numel = p.shape.iter().product::<usize>() as u64;
            if p.dtype.is_float() {
                numel.saturating_mul(4)
            } else {
                p.nbytes() as u64
            }
        })
        .fold(0u64, u64::saturating_add);
    let width = first_size(config, &WIDTH_KEYS).map_or(0, |w| w.1);
    let positions = first_size(config, &POSITION_KEYS).map_or(0, |p| p.1);
    params.saturating_add(positions.saturating_mul(width).saturating_mul(4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Dtype;
    use crate::nn::{Node, ParamInfo};

    /// A graph of one float module holding `numel` elements.
    fn graph(numel: usize) -> ModuleGraph {
        ModuleGraph {
            nodes: vec![Node {
                path: "m".into(),
                kind: "Linear".into(),
                params: vec![ParamInfo {
                    name: "weight".into(),
                    dtype: Dtype::F16,
                    shape: vec![numel],
                }],
            }],
        }
    }

    #[test]
    fn sizes_must_be_bounded_integers() {
        let g = graph(1000);
        let origin = Path::new("m/config.json");
        for bad in [
            serde_json::json!({"n_layer": 1e8}),
            serde_json::json!({"n_layer": -1}),
            serde_json::json!({"hidden_size": u64::MAX}),
            serde_json::json!({"vocab_size": "301"}),
            serde_json::json!({"n_positions": 0}),
        ] {
            let e = check_config(&bad, origin, &g, Path::new("w")).unwrap_err();
            assert!(e.to_string().starts_with("m/config.json: "), "{e}");
        }
        let ok = serde_json::json!({"n_layer": 2, "n_embd": 10, "vocab_size": 50, "eos_token_id": [1, 2]});
        check_config(&ok, origin, &g, Path::new("w")).unwrap();
    }

    #[test]
    fn the_checkpoint_must_hold_what_the_config_implies() {
        // 2 blocks × 10 + 50 × 10 = 520 parameters at least.
        let cfg = serde_json::json!({"n_layer": 2, "n_embd": 10, "vocab_size": 50});
        check_config(&cfg, Path::new("c"), &graph(520), Path::new("w")).unwrap();
        let e = check_config(&cfg, Path::new("c"), &graph(519), Path::new("w.bin"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("at least 520") && e.contains("w.bin holds 519"),
            "{e}"
        );
    }

    #[test]
    fn model_bytes_counts_floats_as_f32_and_position_tables() {
        let cfg = serde_json::json!({"n_embd": 10, "n_positions": 100});
        assert_eq!(model_bytes(&cfg, &graph(1000)), 4000 + 100 * 10 * 4);
    }
}
