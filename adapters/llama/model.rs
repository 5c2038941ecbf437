//! The Llama forward pass over octet layers (float or 8-bit, with or without adapters).
use super::config::LlamaConfig;
use crate::error::{OctetError, Result};
use crate::model::{CausalLm, LayerCache, ModelInfo};
use crate::nn::float::LayerNorm;
use crate::nn::rmsnorm::RmsNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

struct Block {
    input_layernorm: RmsNorm,
    q_proj: Box<dyn Layer>,
    k_proj: Box<dyn Layer>,
    v_proj: Box<dyn Layer>,
    o_proj: Box<dyn Layer>,
    post_attention_layernorm: RmsNorm,
    gate_proj: Box<dyn Layer>,
    up_proj: Box<dyn Layer>,
    down_proj: Box<dyn Layer>,
}

/// A Llama model.
pub struct Llama {
    cfg: LlamaConfig,
    kind: Kind,
    embed_tokens: Box<dyn Layer>,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens`.
    lm_head: Option<Box<dyn Layer>>,
    /// `[head_dim / 2]` f32 rotary inverse frequencies.
    inv_freq: Tensor,
}

fn take_norm(layers: &mut LayerMap, path: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
    let mut n: RmsNorm = layers.take_as(path)?;
    crate::nn::layer::expect_weight_shape(path, &n, &[dim])?;
    n.params.eps = eps;
    Ok(n)
}

/// Paths of the linear modules of block `i`, with their `[out, in]` shapes and whether the
/// config gives them a bias.
fn block_linears(cfg: &LlamaConfig, i: usize) -> Vec<(String, Vec<usize>, bool)> {
    let (d, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
    let p = |s: &str| format!("model.layers.{i}.{s}");
    let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
    vec![
        (p("self_attn.q_proj"), vec![q, d], ab),
        (p("self_attn.k_proj"), vec![kv, d], ab),
        (p("self_attn.v_proj"), vec![kv, d], ab),
        (p("self_attn.o_proj"), vec![d, q], ab),
        (p("mlp.gate_proj"), vec![inter, d], mb),
        (p("mlp.up_proj"), vec![inter, d], mb),
        (p("mlp.down_proj"), vec![d, inter], mb),
    ]
}

/// Every module of a Llama with its weight shape, as the config implies; `lm_head` is left
/// out when `with_head` is false (tied embeddings and no separate head stored).
pub fn weight_shapes(cfg: &LlamaConfig, with_head: bool) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens".to_string(), vec![v, d])];
    for i in 0..cfg.num_hidden_layers {
        out.push((format!("model.layers.{i}.input_layernorm"), vec![d]));
        out.push((
            format!("model.layers.{i}.post_attention_layernorm"),
            vec![d],
        ));
        out.extend(block_linears(cfg, i).into_iter().map(|(p, s, _)| (p, s)));
    }
    out.push(("model.norm".to_string(), vec![d]));
    if with_head {
        out.push(("lm_head".to_string(), vec![v, d]));
    }
    out
}

/// Checks a checkpoint's graph against the config: every module with its shape, and biases
/// present exactly where `attention_bias` / `mlp_bias` say.
pub fn check_graph(cfg: &LlamaConfig, graph: &crate::nn::ModuleGraph) -> Result<()> {
    // A tied checkpoint may still carry a copy of the head (some exporters write both).
    let with_head = !cfg.tie_word_embeddings || graph.node("lm_head").is_some();
    crate::nn::graph::check_weight_shapes(graph, &weight_shapes(cfg, with_head))?;
    for i in 0..cfg.num_hidden_layers {
        for (path, _, bias) in block_linears(cfg, i) {
            let has = graph.node(&path).is_some_and(|n| n.param("bias").is_some());
            if has != bias {
                let flag = if path.contains("self_attn") {
                    "attention_bias"
                } else {
                    "mlp_bias"
                };
                return Err(OctetError::InvalidArgument(format!(
                    "{path}: the checkpoint {} a bias but config.json has {flag} = {bias}",
                    if has { "has" } else { "lacks" }
                )));
            }
        }
    }
    Ok(())
}

impl Llama {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(cfg: LlamaConfig, layers: &mut LayerMap, kind: Kind) -> Result<Self> {
        let (d, v, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps);
        let embed_tokens = layers.take_checked("model.embed_tokens", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut lin = Vec::with_capacity(7);
            for (path, shape, _) in block_linears(&cfg, i) {
                lin.push(layers.take_checked(&path, &shape)?);
            }
            let mut lin = lin.into_iter();
            let mut next = || lin.next().expect("block_linears lists seven modules");
            blocks.push(Block {
                input_layernorm: take_norm(layers, &p("input_layernorm"), d, eps)?,
                q_proj: next(),
                k_proj: next(),
                v_proj: next(),
                o_proj: next(),
                post_attention_layernorm: take_norm(
                    layers,
                    &p("post_attention_layernorm"),
                    d,
                    eps,
                )?,
                gate_proj: next(),
                up_proj: next(),
                down_proj: next(),
            });
        }
        let norm = take_norm(layers, "model.norm", d, eps)?;
        let lm_head = if cfg.tie_word_embeddings && !layers.remaining().contains(&"lm_head") {
            check_tied_embedding(embed_tokens.as_ref())?;
            None
        } else {
            Some(layers.take_checked("lm_head", &[v, d])?)
        };
        let rest = layers.remaining();
        if !rest.is_empty() {
            return Err(OctetError::InvalidArgument(format!(
                "modules unknown to Llama: {}",
                rest.join(", ")
            )));
        }
        let inv_freq = inv_freq(cfg.head_dim(), cfg.rope_theta());
        Ok(Llama {
            cfg,
            kind,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    fn device(&self) -> Device {
        self.norm.params.weight.device()
    }

    /// Rotates `x` `[B, heads, T, head_dim]` whose first position is `start` (HF's
    /// `rotate_half` convention: the two halves of each head form the pairs).
    fn apply_rotary(&self, x: &Tensor, start: i64) -> Tensor {
        let (t, hd) = (x.size()[2], x.size()[3]);
        let dev = x.device();
        let pos = Tensor::arange_start(start, start + t, (Kind::Float, dev));
        let freqs = pos.unsqueeze(1) * self.inv_freq.to_device(dev).unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).reshape([1, 1, t, hd]);
        let (cos, sin) = (emb.cos(), emb.sin());
        let xf = x.to_kind(Kind::Float);
        let half = hd / 2;
        let rotated = Tensor::cat(&[-xf.narrow(3, half, half), xf.narrow(3, 0, half)], 3);
        (xf * cos + rotated * sin).to_kind(x.kind())
    }

    fn attention(&self, b: &Block, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (bs, t) = (h.size()[0], h.size()[1]);
        let hd = self.cfg.head_dim() as i64;
        let (nh, nkv) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.kv_heads() as i64,
        );
        let past = cache.as_ref().map_or(0, |c| c.len());
        let heads = |x: Tensor, n: i64| x.view([bs, t, n, hd]).transpose(1, 2);
        let q = self.apply_rotary(&heads(b.q_proj.forward(h)?, nh), past);
        let k = self.apply_rotary(&heads(b.k_proj.forward(h)?, nkv), past);
        let v = heads(b.v_proj.forward(h)?, nkv);
        // The cache keeps only the kv heads; attention shares each among nh / nkv queries.
        let out = crate::model::cached_causal_attention(&q, k, v, cache, None, nkv != nh);
        b.o_proj
            .forward(&out.transpose(1, 2).reshape([bs, t, nh * hd]))
    }

    fn mlp(&self, b: &Block, h: &Tensor) -> Result<Tensor> {
        let gate = b.gate_proj.forward(h)?.silu();
        b.down_proj.forward(&(gate * b.up_proj.forward(h)?))
    }
}

/// HF's default rope: `1 / theta^(2j / head_dim)` in f32.
fn inv_freq(head_dim: usize, theta: f64) -> Tensor {
    let exponent = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / head_dim as f64;
    Tensor::pow_scalar(theta, &exponent).reciprocal()
}

/// Refuses an embedding kind whose table the tied head cannot read.
fn check_tied_embedding(layer: &dyn Layer) -> Result<()> {
    if crate::nn::tied::can_tie(layer) {
        Ok(())
    } else {
        Err(OctetError::InvalidArgument(format!(
            "tied LM head: model.embed_tokens is a {}, whose table cannot serve as the head",
            layer.kind()
        )))
    }
}

impl CausalLm for Llama {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.max_position_embeddings,
            hidden: self.cfg.hidden_size,
            blocks: self.cfg.num_hidden_layers,
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
            .embed_tokens
            .forward(&ids.f_to_device(self.device())?)?
            .to_kind(self.kind))
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let b = &self.blocks[i];
        let h = h + self.attention(b, &b.input_layernorm.forward(h)?, cache)?;
        let m = self.mlp(b, &b.post_attention_layernorm.forward(&h)?)?;
        Ok(h + m)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(h)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => crate::nn::tied::tied_logits(self.embed_tokens.as_ref(), &x)?,
        };
        Ok(logits.to_kind(Kind::Float))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f("model.embed_tokens", &mut self.embed_tokens);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, l) in [
                ("self_attn.q_proj", &mut b.q_proj),
                ("self_attn.k_proj", &mut b.k_proj),
                ("self_attn.v_proj", &mut b.v_proj),
                ("self_attn.o_proj", &mut b.o_proj),
                ("mlp.gate_proj", &mut b.gate_proj),
                ("mlp.up_proj", &mut b.up_proj),
                ("mlp.down_proj", &mut b.down_proj),
            ] {
                f(&format!("model.layers.{i}.{name}"), l);
            }
        }
        if let Some(head) = &mut self.lm_head {
            f("lm_head", head);
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            f(
                &format!("model.layers.{i}.input_layernorm"),
                &mut b.input_layernorm.params,
            );
            f(
                &format!("model.layers.{i}.post_attention_layernorm"),
                &mut b.post_attention_layernorm.params,
            );
        }
        f("model.norm", &mut self.norm.params);
    }
}
