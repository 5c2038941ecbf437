//! The GPT-J forward pass over octet layers (float or 8-bit, with or without adapters).
use super::config::GptjConfig;
use crate::arch::modules::refuse_leftovers;
use crate::arch::{Bias, ModuleDecl, Modules};
use crate::error::Result;
use crate::model::{CausalLm, Context, LayerCache, ModelInfo, Packing};
use crate::nn::float::LayerNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

crate::declare_block! {
    /// One GPT-J block: every module it has, with the shape its config implies.
    struct Block(c: &GptjConfig) {
        ln_1: LayerNorm = "ln_1" [c.n_embd],
        q_proj: Box<dyn Layer> = "attn.q_proj" [c.n_embd, c.n_embd] bias Bias::Never,
        k_proj: Box<dyn Layer> = "attn.k_proj" [c.n_embd, c.n_embd] bias Bias::Never,
        v_proj: Box<dyn Layer> = "attn.v_proj" [c.n_embd, c.n_embd] bias Bias::Never,
        out_proj: Box<dyn Layer> = "attn.out_proj" [c.n_embd, c.n_embd] bias Bias::Never,
        fc_in: Box<dyn Layer> = "mlp.fc_in" [c.inner(), c.n_embd] bias Bias::Always,
        fc_out: Box<dyn Layer> = "mlp.fc_out" [c.n_embd, c.inner()] bias Bias::Always,
    }
}

const WTE: &str = "transformer.wte";
const LN_F: &str = "transformer.ln_f";
const LM_HEAD: &str = "lm_head";

fn block_prefix(i: usize) -> String {
    format!("transformer.h.{i}")
}

/// A GPT-J model.
pub struct Gptj {
    cfg: GptjConfig,
    kind: Kind,
    wte: Box<dyn Layer>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Box<dyn Layer>,
    /// `[n_positions, rotary_dim / 2]` f32 tables.
    sin: Tensor,
    cos: Tensor,
}

/// Every module of a GPT-J, as the config implies.
pub fn modules(cfg: &GptjConfig) -> Modules {
    let (d, v) = (cfg.n_embd, cfg.vocab_size);
    let mut out = Modules::new();
    out.push(ModuleDecl::layer(WTE, vec![v, d]));
    for i in 0..cfg.n_layer {
        out.extend(Block::modules(cfg, &block_prefix(i)));
    }
    out.push(ModuleDecl::norm(LN_F, d));
    out.push(ModuleDecl::layer(LM_HEAD, vec![v, d]).with_bias(Bias::Always));
    out
}

impl Gptj {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(cfg: GptjConfig, layers: &mut LayerMap, kind: Kind) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let top = modules(&cfg);
        let wte = top.take(layers, WTE, eps)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::take(layers, &cfg, &block_prefix(i), eps))
            .collect::<Result<_>>()?;
        let ln_f = top.take(layers, LN_F, eps)?;
        let lm_head = top.take(layers, LM_HEAD, eps)?;
        refuse_leftovers(layers, "GPT-J")?;
        let (sin, cos) = rotary_tables(cfg.n_positions, cfg.rotary_dim());
        Ok(Gptj {
            cfg,
            kind,
            wte,
            blocks,
            ln_f,
            lm_head,
            sin,
            cos,
        })
    }

    fn device(&self) -> Device {
        self.ln_f.weight.device()
    }

    /// Rotates the leading `rotary_dim` of each head of `x` `[B, T, heads, head_dim]` at the
    /// positions `at` gives (GPT-J's interleaved pairs).
    fn apply_rotary(&self, x: &Tensor, at: &Context) -> Tensor {
        let rd = self.cfg.rotary_dim() as i64;
        if rd == 0 {
            return x.shallow_clone();
        }
        let t = x.size()[1];
        let dev = x.device();
        // [1 or B, T, 1, rd]
        let rows = |tab: &Tensor| {
            at.table_rows(tab, t)
                .to_device(dev)
                .repeat_interleave_self_int(2, -1, None::<i64>)
                .unsqueeze(2)
        };
        let (sin, cos) = (rows(&self.sin), rows(&self.cos));
        let head_dim = x.size()[3];
        let rot = x.narrow(3, 0, rd);
        let x1 = rot.slice(3, 0, rd, 2);
        let x2 = rot.slice(3, 1, rd, 2);
        let rotated = Tensor::stack(&[-x2, x1], -1).flatten(-2, -1);
        let out =
            (rot.to_kind(Kind::Float) * cos + rotated.to_kind(Kind::Float) * sin).to_kind(x.kind());
        if rd == head_dim {
            out
        } else {
            Tensor::cat(&[out, x.narrow(3, rd, head_dim - rd)], 3)
        }
    }

    fn attention(&self, b: &Block, h: &Tensor, at: Context) -> Result<Tensor> {
        let (bs, t) = (h.size()[0], h.size()[1]);
        let (nh, hd) = (self.cfg.n_head as i64, self.cfg.head_dim() as i64);
        let split = |x: Tensor| x.view([bs, t, nh, hd]);
        let q = self
            .apply_rotary(&split(b.q_proj.forward(h)?), &at)
            .permute([0, 2, 1, 3]);
        let k = self
            .apply_rotary(&split(b.k_proj.forward(h)?), &at)
            .permute([0, 2, 1, 3]);
        let v = split(b.v_proj.forward(h)?).permute([0, 2, 1, 3]);
        let out = at.attend(&q, k, v, Default::default());
        b.out_proj
            .forward(&out.permute([0, 2, 1, 3]).reshape([bs, t, nh * hd]))
    }

    fn block_at(&self, i: usize, h: &Tensor, at: Context) -> Result<Tensor> {
        let b = &self.blocks[i];
        let x = b.ln_1.forward(h)?;
        let attn = self.attention(b, &x, at)?;
        let ff = self.mlp(b, &x)?;
        Ok(attn + ff + h)
    }

    fn mlp(&self, b: &Block, h: &Tensor) -> Result<Tensor> {
        let x = b.fc_in.forward(h)?;
        let x = match self.cfg.activation_function.as_str() {
            "gelu_new" => x.gelu("tanh"),
            "gelu" => x.gelu("none"),
            _ => x.relu(),
        };
        b.fc_out.forward(&x)
    }
}

/// HF's `create_sinusoidal_positions`: angle(p, j) = p / 10000^(2j / rd).
fn rotary_tables(positions: usize, rd: usize) -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let exponent = Tensor::arange_start_step(0, rd as i64, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / rd as f64;
    let inv_freq = Tensor::pow_scalar(10000.0, &exponent).reciprocal();
    let angles = Tensor::arange(positions as i64, opts).unsqueeze(1) * inv_freq.unsqueeze(0);
    (angles.sin(), angles.cos())
}

impl CausalLm for Gptj {
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
        crate::model::embed_ids(self.wte.as_ref(), ids, self.device(), self.kind)
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        self.block_at(i, h, Context::Cached(cache))
    }
    fn block_packed(&self, i: usize, h: &Tensor, packing: &Packing) -> Result<Tensor> {
        self.block_at(i, h, Context::Packed(packing))
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self
            .lm_head
            .forward(&self.ln_f.forward(h)?)?
            .to_kind(Kind::Float))
    }
    fn head_input(&self, h: &Tensor) -> Result<Option<(Tensor, String)>> {
        Ok(Some((self.ln_f.forward(h)?, LM_HEAD.to_string())))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f(WTE, &mut self.wte);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_layers(&block_prefix(i), f);
        }
        f(LM_HEAD, &mut self.lm_head);
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_norms(&block_prefix(i), f);
        }
        f(LN_F, &mut self.ln_f);
    }
}
