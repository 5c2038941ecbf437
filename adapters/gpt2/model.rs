//! The GPT-2 forward pass over octet layers (float or 8-bit, with or without adapters).
use super::config::Gpt2Config;
use crate::error::{OctetError, Result};
use crate::model::{CausalLm, LayerCache, ModelInfo};
use crate::nn::float::LayerNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

struct Block {
    ln_1: LayerNorm,
    c_attn: Box<dyn Layer>,
    attn_c_proj: Box<dyn Layer>,
    ln_2: LayerNorm,
    c_fc: Box<dyn Layer>,
    mlp_c_proj: Box<dyn Layer>,
}

/// A GPT-2 model (`GPT2LMHeadModel`).
pub struct Gpt2 {
    cfg: Gpt2Config,
    kind: Kind,
    wte: Box<dyn Layer>,
    wpe: Box<dyn Layer>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

/// Every module of a GPT-2 with its weight shape, as the config implies. `Conv1D` weights
/// are `[in, out]`; there is no `lm_head` (the head is `transformer.wte`).
pub fn weight_shapes(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let (d, inner) = (cfg.n_embd, cfg.inner());
    let mut out = vec![
        ("transformer.wte".to_string(), vec![cfg.vocab_size, d]),
        ("transformer.wpe".to_string(), vec![cfg.n_positions, d]),
    ];
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        out.push((p("ln_1"), vec![d]));
        out.push((p("attn.c_attn"), vec![d, 3 * d]));
        out.push((p("attn.c_proj"), vec![d, d]));
        out.push((p("ln_2"), vec![d]));
        out.push((p("mlp.c_fc"), vec![d, inner]));
        out.push((p("mlp.c_proj"), vec![inner, d]));
    }
    out.push(("transformer.ln_f".to_string(), vec![d]));
    out
}

impl Gpt2 {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(cfg: Gpt2Config, layers: &mut LayerMap, kind: Kind) -> Result<Self> {
        let (d, inner, eps) = (cfg.n_embd, cfg.inner(), cfg.layer_norm_epsilon);
        let wte = layers.take_checked("transformer.wte", &[cfg.vocab_size, d])?;
        crate::nn::tied::check_can_tie("transformer.wte", wte.as_ref())?;
        let wpe = layers.take_checked("transformer.wpe", &[cfg.n_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("transformer.h.{i}.{s}");
            blocks.push(Block {
                ln_1: layers.take_layer_norm(&p("ln_1"), d, eps)?,
                c_attn: layers.take_checked(&p("attn.c_attn"), &[d, 3 * d])?,
                attn_c_proj: layers.take_checked(&p("attn.c_proj"), &[d, d])?,
                ln_2: layers.take_layer_norm(&p("ln_2"), d, eps)?,
                c_fc: layers.take_checked(&p("mlp.c_fc"), &[d, inner])?,
                mlp_c_proj: layers.take_checked(&p("mlp.c_proj"), &[inner, d])?,
            });
        }
        let ln_f = layers.take_layer_norm("transformer.ln_f", d, eps)?;
        let rest = layers.remaining();
        if !rest.is_empty() {
            return Err(OctetError::InvalidArgument(format!(
                "modules unknown to GPT-2: {}",
                rest.join(", ")
            )));
        }
        Ok(Gpt2 {
            cfg,
            kind,
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }

    fn device(&self) -> Device {
        self.ln_f.weight.device()
    }

    fn attention(&self, i: usize, x: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let b = &self.blocks[i];
        let (bs, t) = (x.size()[0], x.size()[1]);
        let (nh, hd) = (self.cfg.n_head as i64, self.cfg.head_dim() as i64);
        let d = nh * hd;
        // c_attn's output is [q | k | v], each n_embd wide and split into heads in order.
        let qkv = b.c_attn.forward(x)?;
        let head = |j: i64| {
            qkv.narrow(2, j * d, d)
                .view([bs, t, nh, hd])
                .permute([0, 2, 1, 3])
        };
        let (q, k, v) = (head(0), head(1), head(2));
        let scale = Some(self.cfg.attn_scale(i));
        let out = crate::model::cached_causal_attention(&q, k, v, cache, scale, false);
        b.attn_c_proj
            .forward(&out.permute([0, 2, 1, 3]).reshape([bs, t, d]))
    }

    fn mlp(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let x = b.c_fc.forward(x)?;
        let x = match self.cfg.activation_function.as_str() {
            "gelu" => x.gelu("none"),
            "relu" => x.relu(),
            // gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh approximation.
            _ => x.gelu("tanh"),
        };
        b.mlp_c_proj.forward(&x)
    }
}

impl CausalLm for Gpt2 {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.n_positions,
            hidden: self.cfg.n_embd,
            blocks: self.cfg.n_layer,
        }
    }
    fn compute_kind(&self) -> Kind {
        self.kind
    }
    fn set_compute_kind(&mut self, kind: Kind) {
        self.kind = kind;
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .wte
            .forward(&ids.f_to_device(self.device())?)?
            .to_kind(self.kind))
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        // The learned positions are added here rather than in `embed`: only block 0's cache
        // knows how many positions came before `h` during cached generation.
        let h = if i == 0 {
            let past = cache.as_ref().map_or(0, |c| c.len());
            let t = h.size()[1];
            let pos = Tensor::arange_start(past, past + t, (Kind::Int64, self.device()));
            h + self.wpe.forward(&pos)?.to_kind(h.kind()).unsqueeze(0)
        } else {
            h.shallow_clone()
        };
        let b = &self.blocks[i];
        let h = &h + self.attention(i, &b.ln_1.forward(&h)?, cache)?;
        let m = self.mlp(b, &b.ln_2.forward(&h)?)?;
        Ok(h + m)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.ln_f.forward(h)?;
        Ok(crate::nn::tied::tied_logits(self.wte.as_ref(), &x)?.to_kind(Kind::Float))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f("transformer.wte", &mut self.wte);
        f("transformer.wpe", &mut self.wpe);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, l) in [
                ("attn.c_attn", &mut b.c_attn),
                ("attn.c_proj", &mut b.attn_c_proj),
                ("mlp.c_fc", &mut b.c_fc),
                ("mlp.c_proj", &mut b.mlp_c_proj),
            ] {
                f(&format!("transformer.h.{i}.{name}"), l);
            }
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            f(&format!("transformer.h.{i}.ln_1"), &mut b.ln_1);
            f(&format!("transformer.h.{i}.ln_2"), &mut b.ln_2);
        }
        f("transformer.ln_f", &mut self.ln_f);
    }
}
