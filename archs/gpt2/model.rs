//! The GPT-2 forward pass over octet layers (float or 8-bit, with or without adapters).
use super::config::Gpt2Config;
use crate::arch::modules::refuse_leftovers;
use crate::arch::{ModuleDecl, Modules};
use crate::error::Result;
use crate::model::{CausalLm, Context, LayerCache, ModelInfo, Packing};
use crate::nn::float::LayerNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

crate::declare_block! {
    /// One GPT-2 block: every module it has, with the shape its config implies (`Conv1D`
    /// weights are `[in, out]`).
    struct Block(c: &Gpt2Config) {
        ln_1: LayerNorm = "ln_1" [c.n_embd],
        c_attn: Box<dyn Layer> = "attn.c_attn" [c.n_embd, 3 * c.n_embd],
        attn_c_proj: Box<dyn Layer> = "attn.c_proj" [c.n_embd, c.n_embd],
        ln_2: LayerNorm = "ln_2" [c.n_embd],
        c_fc: Box<dyn Layer> = "mlp.c_fc" [c.n_embd, c.inner()],
        mlp_c_proj: Box<dyn Layer> = "mlp.c_proj" [c.inner(), c.n_embd],
    }
}

const WTE: &str = "transformer.wte";
const WPE: &str = "transformer.wpe";
const LN_F: &str = "transformer.ln_f";

fn block_prefix(i: usize) -> String {
    format!("transformer.h.{i}")
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

/// Every module of a GPT-2, as the config implies. There is no `lm_head` (the head is
/// `transformer.wte`).
pub fn modules(cfg: &Gpt2Config) -> Modules {
    let d = cfg.n_embd;
    let mut out = Modules::new();
    out.push(ModuleDecl::layer(WTE, vec![cfg.vocab_size, d]));
    out.push(ModuleDecl::layer(WPE, vec![cfg.n_positions, d]));
    for i in 0..cfg.n_layer {
        out.extend(Block::modules(cfg, &block_prefix(i)));
    }
    out.push(ModuleDecl::norm(LN_F, d));
    out
}

impl Gpt2 {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(cfg: Gpt2Config, layers: &mut LayerMap, kind: Kind) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let top = modules(&cfg);
        let wte: Box<dyn Layer> = top.take(layers, WTE, eps)?;
        crate::nn::tied::check_can_tie(WTE, wte.as_ref())?;
        let wpe = top.take(layers, WPE, eps)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::take(layers, &cfg, &block_prefix(i), eps))
            .collect::<Result<_>>()?;
        let ln_f = top.take(layers, LN_F, eps)?;
        refuse_leftovers(layers, "GPT-2")?;
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

    fn attention(&self, i: usize, x: &Tensor, at: Context) -> Result<Tensor> {
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
        let out = at.attend(
            &q,
            k,
            v,
            crate::model::AttentionOptions {
                scale,
                ..Default::default()
            },
        );
        b.attn_c_proj
            .forward(&out.permute([0, 2, 1, 3]).reshape([bs, t, d]))
    }

    fn block_at(&self, i: usize, h: &Tensor, at: Context) -> Result<Tensor> {
        // The learned positions are added here rather than in `embed`: only block 0's cache
        // (or the packing) knows the positions of `h`'s tokens.
        let h = if i == 0 {
            let pos = at.position_ids(h.size()[1], self.device());
            h + self.wpe.forward(&pos)?.to_kind(h.kind())
        } else {
            h.shallow_clone()
        };
        let b = &self.blocks[i];
        let h = &h + self.attention(i, &b.ln_1.forward(&h)?, at)?;
        let m = self.mlp(b, &b.ln_2.forward(&h)?)?;
        Ok(h + m)
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
        crate::model::embed_ids(self.wte.as_ref(), ids, self.device(), self.kind)
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        self.block_at(i, h, Context::Cached(cache))
    }
    fn block_packed(&self, i: usize, h: &Tensor, packing: &Packing) -> Result<Tensor> {
        self.block_at(i, h, Context::Packed(packing))
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.ln_f.forward(h)?;
        Ok(crate::nn::tied::tied_logits(self.wte.as_ref(), &x)?.to_kind(Kind::Float))
    }
    fn head_input(&self, h: &Tensor) -> Result<Option<(Tensor, String)>> {
        Ok(Some((self.ln_f.forward(h)?, WTE.to_string())))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f(WTE, &mut self.wte);
        f(WPE, &mut self.wpe);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_layers(&block_prefix(i), f);
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_norms(&block_prefix(i), f);
        }
        f(LN_F, &mut self.ln_f);
    }
}
