//! Llama (and Mistral, which llama.cpp stores as `llama`) in llama.cpp's GGUF files: tensor
//! names, the q/k row permutation its converter applies, and the config.json the `llama.*`
//! metadata implies, including Llama 3's rope scaling, which llama.cpp keeps only as the
//! per-frequency divisors of `rope_freqs.weight`.
use crate::archs::decoder::{gguf as export, DecoderConfig, Family, Scaling};
use crate::error::Result;
use crate::io::gguf::{
    decoder_gguf_name, decoder_hf_name, llama_block_module, llama_qk_heads, rope_scaling,
    settings_values, DecoderSizes, GgufFile, GgufMapping, GgufValue, LLAMA_BLOCK,
};

/// The Llama GGUF mapping (`general.architecture = "llama"`).
pub struct LlamaGguf;

const ARCH: &str = "llama";
const ROPE_FREQS: &str = "rope_freqs.weight";

/// `llama.<key>`.
fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

impl GgufMapping for LlamaGguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, llama_block_module)
    }

    fn permuted_head_count(&self, raw: &str, heads: usize, kv_heads: usize) -> Option<usize> {
        llama_qk_heads(raw, heads, kv_heads)
    }

    fn is_settings_tensor(&self, raw: &str) -> bool {
        raw == ROPE_FREQS
    }

    /// Sizes from the `llama.*` keys, tied embeddings when there is no `output.weight`,
    /// biases when the first block has them, linear rope scaling from
    /// `llama.rope.scaling.type` / `factor`, Llama 3 rope scaling from `rope_freqs.weight`,
    /// and a Mistral config when the file names a sliding window (llama.cpp's converter does
    /// not write Mistral's, so most Mistral files read as Llama).
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        let sizes = DecoderSizes::read(file, ARCH)?;
        let linear = rope_scaling(file, ARCH, sizes.head_dim)?;
        let window = file
            .meta_u64(&key("attention.sliding_window"))
            .filter(|&w| w > 0);
        let (class, model_type) = match window {
            Some(_) => ("MistralForCausalLM", "mistral"),
            None => ("LlamaForCausalLM", "llama"),
        };
        let mut cfg = sizes.config(file, ARCH, class, model_type)?;
        cfg["hidden_act"] = "silu".into();
        cfg["attention_bias"] = file.tensor_info("blk.0.attn_q.bias").is_some().into();
        cfg["mlp_bias"] = file.tensor_info("blk.0.ffn_gate.bias").is_some().into();
        if let Some(w) = window {
            cfg["sliding_window"] = w.into();
        }
        cfg["rope_scaling"] = linear;
        if file.tensor_info(ROPE_FREQS).is_some() {
            if !cfg["rope_scaling"].is_null() {
                return Err(file.bad(format!(
                    "{ROPE_FREQS} and linear rope scaling together: one model has one rope scaling"
                )));
            }
            let theta = sizes.rope_theta.unwrap_or(10000.0);
            let factors = settings_values(file, ROPE_FREQS, (sizes.head_dim / 2) as usize)?;
            cfg["rope_scaling"] = match llama3_from_factors(&factors, theta, sizes.head_dim) {
                Ok(None) => serde_json::Value::Null,
                Ok(Some(r)) => r.to_json(),
                Err(why) => return Err(file.bad(format!("{ROPE_FREQS}: {why}"))),
            };
        }
        Ok(cfg)
    }

    fn exports(&self) -> &'static [&'static str] {
        &["llama", "mistral"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        decoder_gguf_name(hf, |m| LLAMA_BLOCK.part(m))
    }

    /// What llama.cpp's converter writes for a Llama config (rope scaling `linear` as its
    /// type and factor, `llama3` as `rope_freqs.weight`, `dynamic` not at all, as llama.cpp
    /// has no NTK scaling), plus Mistral's sliding window as
    /// `llama.attention.sliding_window`, which the reading direction takes for Mistral.
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let dc = parsed(config)?;
        export::refuse_rope(ARCH, &dc, |s| {
            matches!(
                s,
                Scaling::Linear { .. } | Scaling::Dynamic { .. } | Scaling::Llama3 { .. }
            )
        })?;
        let mut m = export::size_metadata(ARCH, &dc, config);
        m.push((key("vocab_size"), GgufValue::U32(dc.vocab_size as u32)));
        m.push((
            key("rope.dimension_count"),
            GgufValue::U32(dc.head_dim as u32),
        ));
        if let Scaling::Linear { factor } = dc.rope.scaling {
            m.push((key("rope.scaling.type"), GgufValue::Str("linear".into())));
            m.push((key("rope.scaling.factor"), GgufValue::F32(factor as f32)));
        }
        if let Some(w) = dc.windows.iter().flatten().next() {
            m.push((key("attention.sliding_window"), GgufValue::U32(*w as u32)));
        }
        Ok(m)
    }

    fn settings_tensors(&self, config: &serde_json::Value) -> Result<Vec<(String, Vec<f32>)>> {
        let dc = parsed(config)?;
        Ok(match dc.rope.scaling {
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original,
            } => {
                let rule = Llama3Rope {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context: original,
                };
                let divisors = rule.divisors(dc.rope.theta, dc.head_dim as u64);
                vec![(
                    ROPE_FREQS.to_string(),
                    divisors.iter().map(|&d| d as f32).collect(),
                )]
            }
            _ => Vec::new(),
        })
    }
}

/// A Llama or Mistral config.json, parsed over its family's defaults.
fn parsed(config: &serde_json::Value) -> Result<DecoderConfig> {
    match config["model_type"].as_str() {
        Some("mistral") => crate::archs::mistral::Mistral::config(config),
        _ => super::Llama::config(config),
    }
}

/// Llama 3's rope scaling settings (transformers' `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    /// `factor`: the divisor of the low frequencies.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_context: f64,
}

impl Llama3Rope {
    /// The `rope_scaling` object of a config.json (an integral context as an integer).
    fn to_json(self) -> serde_json::Value {
        let ctx = if self.original_context.fract() == 0.0 {
            serde_json::json!(self.original_context as u64)
        } else {
            serde_json::json!(self.original_context)
        };
        serde_json::json!({
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": ctx,
        })
    }

    /// What the rule divides each default rotary frequency by (transformers'
    /// `_compute_llama3_parameters`, llama.cpp's `rope_freqs`): 1 for wavelengths below
    /// `original / high_freq_factor`, `factor` above `original / low_freq_factor`, and a
    /// blend in between.
    pub fn divisors(&self, theta: f64, head_dim: u64) -> Vec<f64> {
        let (low_wl, high_wl) = (
            self.original_context / self.low_freq_factor,
            self.original_context / self.high_freq_factor,
        );
        default_inv_freq(theta, head_dim)
            .map(|inv| {
                let wavelen = 2.0 * std::f64::consts::PI / inv;
                if wavelen < high_wl {
                    1.0
                } else if wavelen > low_wl {
                    self.factor
                } else {
                    let s = (self.original_context / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - s) / self.factor + s)
                }
            })
            .collect()
    }
}

/// The default rotary frequencies `theta^(-2i/d)`.
fn default_inv_freq(theta: f64, head_dim: u64) -> impl Iterator<Item = f64> {
    (0..head_dim / 2).map(move |i| theta.powf(-((2 * i) as f64) / head_dim as f64))
}

/// Relative tolerance for matching stored f32 divisors (a few f32 roundings).
const TOL: f64 = 1e-5;

/// Recovers Llama 3's rope settings from llama.cpp's per-frequency divisors; `Ok(None)` when
/// every divisor is 1 (no scaling).
///
/// The rule depends on the original context and the two band factors only through their
/// ratios, so `low_freq_factor` is taken as 1 (every Llama 3.x uses 1); `factor` is the largest
/// divisor, and the smoothed band, whose blend is linear in the frequency, gives
/// `high_freq_factor` and the original context. Two smoothed frequencies are needed to fix
/// both. The settings are accepted only if the rule reproduces every stored divisor.
pub fn llama3_from_factors(
    factors: &[f32],
    theta: f64,
    head_dim: u64,
) -> std::result::Result<Option<Llama3Rope>, String> {
    let f: Vec<f64> = factors.iter().map(|&x| x as f64).collect();
    let big = f.iter().cloned().fold(1.0, f64::max);
    if f.iter().all(|&x| (x - 1.0).abs() <= TOL) {
        return Ok(None);
    }
    let inv: Vec<f64> = default_inv_freq(theta, head_dim).collect();
    let smoothed: Vec<(f64, f64)> = inv
        .iter()
        .zip(&f)
        .filter(|(_, &x)| (x - 1.0).abs() > TOL && (x - big).abs() > TOL * big)
        .map(|(&i, &x)| (i, (big / x - 1.0) / (big - 1.0)))
        .collect();
    let unsupported = |why: String| {
        format!("{why}; octet reads Llama 3 rope scaling (transformers' rope_type 'llama3') only")
    };
    if smoothed.len() < 2 {
        return Err(unsupported(format!(
            "{} of its {} divisors lie between 1 and {big}; at least two are needed to recover \
             the original context length",
            smoothed.len(),
            f.len()
        )));
    }
    // s = (original · inv / 2π − 1) / (high − 1) = α · inv + β.
    let ((i0, s0), (i1, s1)) = (smoothed[0], smoothed[smoothed.len() - 1]);
    let alpha = (s1 - s0) / (i1 - i0);
    let beta = s0 - alpha * i0;
    if !(alpha > 0.0 && beta < 0.0) {
        return Err(unsupported(
            "the smoothed divisors do not blend linearly in the frequency".into(),
        ));
    }
    let exact = Llama3Rope {
        factor: big,
        low_freq_factor: 1.0,
        high_freq_factor: 1.0 - 1.0 / beta,
        original_context: -2.0 * std::f64::consts::PI * alpha / beta,
    };
    // Prefer the round values the settings were almost surely written with.
    let round = |x: f64, unit: f64| {
        let r = (x / unit).round() * unit;
        if (r - x).abs() <= 1e-3 * x.abs() {
            r
        } else {
            x
        }
    };
    let tidy = Llama3Rope {
        high_freq_factor: round(exact.high_freq_factor, 1e-3),
        original_context: round(exact.original_context, 1.0),
        ..exact
    };
    let reproduces = |r: &Llama3Rope| {
        r.divisors(theta, head_dim)
            .iter()
            .zip(&f)
            .all(|(a, b)| (a - b).abs() <= TOL * b)
    };
    [tidy, exact]
        .into_iter()
        .find(reproduces)
        .map(Some)
        .ok_or_else(|| unsupported("its divisors do not follow Llama 3's rule".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama() {
        let m = LlamaGguf;
        assert_eq!(
            m.tensor_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            m.tensor_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(m.tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(m.tensor_name("rope_freqs.weight"), None);
        assert!(m.is_settings_tensor("rope_freqs.weight"));
        assert!(!m.is_settings_tensor("token_embd.weight"));
    }

    fn f32_divisors(r: &Llama3Rope, theta: f64, head_dim: u64) -> Vec<f32> {
        r.divisors(theta, head_dim)
            .iter()
            .map(|&x| x as f32)
            .collect()
    }

    #[test]
    fn llama_3_1_settings_come_back_from_their_divisors() {
        // Llama 3.1 8B and Llama 3.2 1B as published.
        for (factor, theta, head_dim) in [(8.0, 500000.0, 128), (32.0, 500000.0, 64)] {
            let want = Llama3Rope {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            };
            let got = llama3_from_factors(&f32_divisors(&want, theta, head_dim), theta, head_dim)
                .unwrap()
                .unwrap();
            assert_eq!(got, want);
            assert_eq!(
                got.to_json()["original_max_position_embeddings"],
                serde_json::json!(8192)
            );
        }
    }

    #[test]
    fn scaled_band_factors_are_equivalent_up_to_a_common_scale() {
        // low 2 / high 8 / context 16384 is the same rule as low 1 / high 4 / context 8192.
        let odd = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 2.0,
            high_freq_factor: 8.0,
            original_context: 16384.0,
        };
        let got = llama3_from_factors(&f32_divisors(&odd, 500000.0, 128), 500000.0, 128)
            .unwrap()
            .unwrap();
        assert_eq!((got.high_freq_factor, got.original_context), (4.0, 8192.0));
    }

    #[test]
    fn other_divisors_are_refused_or_mean_no_scaling() {
        assert_eq!(llama3_from_factors(&[1.0; 64], 500000.0, 128), Ok(None));
        // Linear scaling: every frequency divided by 4, no smoothed band.
        let e = llama3_from_factors(&[4.0; 64], 500000.0, 128).unwrap_err();
        assert!(e.contains("llama3") && e.contains("0 of its 64"), "{e}");
        // A smoothed band that is not the Llama 3 blend.
        let mut f = f32_divisors(
            &Llama3Rope {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            },
            500000.0,
            128,
        );
        let mid = f.iter().position(|&x| x > 1.0 && x < 8.0).unwrap();
        f[mid + 1] *= 1.01;
        assert!(llama3_from_factors(&f, 500000.0, 128).is_err());
    }
}
