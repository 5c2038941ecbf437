//! What every architecture's model offers: embed, blocks, head — split so training can
//! recompute one block at a time and generation can keep a KV cache per block.
use crate::nn::float::LayerNorm;
use crate::nn::Layer;
use crate::Result;
use tch::{Device, Kind, Tensor};

/// Sizes callers need to know.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    /// Vocabulary size (logit width).
    pub vocab_size: usize,
    /// Longest sequence the model takes.
    pub max_positions: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Number of blocks.
    pub blocks: usize,
}

impl ModelInfo {
    /// Estimated bytes of the activations one training micro-batch of `batch` sequences of
    /// `seq_len` tokens takes (f32): logits with their softmax and gradient, the block inputs
    /// kept for the backward pass (all of a block's activations without `checkpointing`), and one
    /// block's working set including attention scores (heads guessed at hidden / 64). An
    /// order-of-magnitude figure meant to refuse the impossible before allocating.
    pub fn training_batch_bytes(&self, batch: usize, seq_len: usize, checkpointing: bool) -> u64 {
        let (b, t) = (batch as u128, seq_len as u128);
        let (d, v, layers) = (
            self.hidden as u128,
            self.vocab_size as u128,
            self.blocks as u128,
        );
        let tokens = b * t;
        let block = tokens * d * 16 + b * t * t * (d / 64).max(1) * 2;
        let kept = if checkpointing {
            layers * tokens * d
        } else {
            layers * block
        };
        let bytes = 4 * (3 * tokens * v + kept + block);
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

pub use crate::nn::ids::check_token_ids;

/// Keys and values of one block for the positions seen so far.
///
/// They live in buffers with room for more positions, so a generation step writes only its
/// new position instead of copying the whole cache into a fresh tensor (what appending with
/// `cat` costs: O(T) per step, O(T²) per sequence). [`LayerCache::with_capacity`] sizes the
/// buffers for a whole generation; a default cache grows by doubling.
#[derive(Default)]
pub struct LayerCache {
    /// `[B, heads, T, head_dim]`, if any positions are cached: a view of the first T
    /// positions of the buffer.
    pub k: Option<Tensor>,
    /// Same shape as `k`.
    pub v: Option<Tensor>,
    /// `[B, heads, capacity, head_dim]` storage behind `k` and `v`.
    buffers: Option<(Tensor, Tensor)>,
    /// Positions the first allocation makes room for.
    reserve: i64,
}

impl LayerCache {
    /// An empty cache whose first append allocates room for `positions` positions (prompt
    /// plus new tokens), so no later step reallocates.
    pub fn with_capacity(positions: usize) -> Self {
        LayerCache {
            reserve: positions as i64,
            ..Default::default()
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.k.as_ref().map_or(0, |k| k.size()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the buffers hold before the next append reallocates (0 before the first).
    pub fn capacity(&self) -> i64 {
        self.buffers.as_ref().map_or(0, |(k, _)| k.size()[2])
    }

    /// Forgets every cached position from `len` on (a conversation that took another turn
    /// than the one cached); the buffers stay for the positions appended next. Views of the
    /// forgotten positions handed out before are overwritten by later appends.
    pub fn truncate(&mut self, len: i64) {
        if len >= self.len() {
            return;
        }
        if len <= 0 {
            self.k = None;
            self.v = None;
            return;
        }
        self.k = self.k.as_ref().map(|k| k.narrow(2, 0, len));
        self.v = self.v.as_ref().map(|v| v.narrow(2, 0, len));
    }

    /// Appends `k`/`v` `[B, heads, t, head_dim]` after the cached positions and returns views
    /// of all of them. Cached positions are never rewritten, so views handed out earlier stay
    /// valid.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let len = self.len();
        let t = k.size()[2];
        let need = len + t;
        let fits = match (&self.buffers, &self.k) {
            // `k` may have been replaced through the public field: only a view of the buffer
            // (same start, same batch/head/width) may be extended in place.
            (Some((kb, _)), Some(kc)) => {
                let (bs, cs) = (kb.size(), kc.size());
                kb.data_ptr() == kc.data_ptr()
                    && bs[2] >= need
                    && (bs[0], bs[1], bs[3]) == (cs[0], cs[1], cs[3])
                    && kb.kind() == k.kind()
            }
            (Some((kb, _)), None) => {
                let (bs, ks) = (kb.size(), k.size());
                bs[2] >= need
                    && (bs[0], bs[1], bs[3]) == (ks[0], ks[1], ks[3])
                    && kb.kind() == k.kind()
            }
            _ => false,
        };
        if !fits {
            let cap = need.max(self.reserve).max(2 * self.capacity());
            let alloc = |x: &Tensor, old: &Option<Tensor>| {
                let mut size = x.size();
                size[2] = cap;
                let buf = Tensor::empty(size.as_slice(), (x.kind(), x.device()));
                if let Some(old) = old {
                    buf.narrow(2, 0, len).copy_(old);
                }
                buf
            };
            self.buffers = Some((alloc(k, &self.k), alloc(v, &self.v)));
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.narrow(2, len, t).copy_(k);
        vb.narrow(2, len, t).copy_(v);
        let (kv, vv) = (kb.narrow(2, 0, need), vb.narrow(2, 0, need));
        self.k = Some(kv.shallow_clone());
        self.v = Some(vv.shallow_clone());
        (kv, vv)
    }
}

/// How a block attends, beyond plain causal attention.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    /// Scores are multiplied by it (default 1/√head_dim).
    pub scale: Option<f64>,
    /// Each key/value head serves several query heads (grouped-query attention).
    pub gqa: bool,
    /// A query sees only the last `window` positions, its own included (sliding window).
    pub window: Option<i64>,
    /// Scores pass through `cap · tanh(score / cap)` before the mask (Gemma 2).
    pub softcap: Option<f64>,
}

/// Causal attention over `[B, heads, T, head_dim]` tensors whose new positions follow any
/// cached ones: extends `cache` with `k`/`v`, then lets query i (absolute position past + i)
/// see keys up to its own position, and within `window` of it if one is set.
pub fn cached_causal_attention(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    cache: Option<&mut LayerCache>,
    opts: AttentionOptions,
) -> Tensor {
    let past = cache.as_ref().map_or(0, |c| c.len());
    let (k, v) = match cache {
        Some(c) => c.append(&k, &v),
        None => (k, v),
    };
    let t = q.size()[2];
    let total = past + t;
    let window_binds = opts.window.is_some_and(|w| total > w);
    if let Some(cap) = opts.softcap {
        let mask = attention_mask(past, t, opts.window, q.device());
        return softcapped_attention(q, &k, &v, &mask, cap, opts);
    }
    if !window_binds && (past == 0 || t == 1) {
        // No past: plain causal. One new query: it sees every cached key, so no mask at all.
        return Tensor::scaled_dot_product_attention(
            q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            past == 0,
            opts.scale,
            opts.gqa,
        );
    }
    let mask = attention_mask(past, t, opts.window, q.device());
    Tensor::scaled_dot_product_attention(q, &k, &v, Some(mask), 0.0, false, opts.scale, opts.gqa)
}

/// Rows that each hold several records (training with packing): every token's segment id
/// gives its position within its record and the block-diagonal causal mask that keeps
/// records from seeing each other, so each record is computed as it would be alone.
pub struct Packing {
    /// `[B, T]` int64: each token's position within its record.
    pub positions: Tensor,
    /// `[B, 1, T, T]`: whether query i may see key j (same segment, j ≤ i).
    pub mask: Tensor,
    /// One past the largest position: the length of the longest record.
    pub longest: i64,
}

impl Packing {
    /// From segment ids `[B, T]` (integers; the records of a row numbered along it, padding
    /// 0). Positions restart wherever the id changes; padding attends only to padding, so
    /// no query row is empty. Built on the segments' device.
    pub fn from_segments(segments: &Tensor) -> Result<Self> {
        let size = segments.size();
        if size.len() != 2 || segments.is_floating_point() {
            return Err(crate::OctetError::ShapeMismatch {
                what: "segment ids".into(),
                expected: "[batch, seq_len] integers".into(),
                found: format!("{size:?} {:?}", segments.kind()),
            });
        }
        let (b, t) = (size[0], size[1]);
        let ids = Vec::<i64>::try_from(segments.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?;
        let mut positions = Vec::with_capacity(ids.len());
        for row in ids.chunks(t.max(1) as usize) {
            let mut pos = 0i64;
            for (j, id) in row.iter().enumerate() {
                pos = if j > 0 && row[j - 1] == *id {
                    pos + 1
                } else {
                    0
                };
                positions.push(pos);
            }
        }
        let longest = positions.iter().max().map_or(0, |p| p + 1);
        let dev = segments.device();
        let seg = segments.f_to_kind(Kind::Int64)?;
        let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
        let causal = attention_mask(0, t, None, dev);
        Ok(Packing {
            positions: Tensor::f_from_slice(&positions)?
                .f_reshape([b, t])?
                .f_to_device(dev)?,
            mask: same.logical_and(&causal).unsqueeze(1),
            longest,
        })
    }
}

/// Where a block's new tokens sit: what their positions are and what they attend to.
pub enum Context<'a> {
    /// After the positions held in the cache (from 0 without one), seeing all before them.
    Cached(Option<&'a mut LayerCache>),
    /// In packed records.
    Packed(&'a Packing),
}

impl Context<'_> {
    /// Positions already cached (0 for packed rows).
    pub fn past(&self) -> i64 {
        match self {
            Context::Cached(c) => c.as_ref().map_or(0, |c| c.len()),
            Context::Packed(_) => 0,
        }
    }

    /// The length a length-dependent rotary table covers for `t` new tokens: cached plus new,
    /// or the longest packed record (transformers takes the largest position id + 1).
    pub fn span(&self, t: i64) -> i64 {
        match self {
            Context::Cached(_) => self.past() + t,
            Context::Packed(p) => p.longest,
        }
    }

    /// Position ids of the `t` new tokens on `device`: `[1, t]`, or `[B, t]` when packed.
    pub fn position_ids(&self, t: i64, device: Device) -> Tensor {
        match self {
            Context::Cached(_) => {
                let past = self.past();
                Tensor::arange_start(past, past + t, (Kind::Int64, device)).unsqueeze(0)
            }
            Context::Packed(p) => p.positions.to_device(device),
        }
    }

    /// The rows of a per-position table `[positions, d]` for the `t` new tokens:
    /// `[1, t, d]`, or `[B, t, d]` when packed, on the table's device.
    pub fn table_rows(&self, table: &Tensor, t: i64) -> Tensor {
        match self {
            Context::Cached(_) => table.narrow(0, self.past(), t).unsqueeze(0),
            Context::Packed(p) => {
                let ids = p.positions.to_device(table.device());
                let b = ids.size()[0];
                table
                    .index_select(0, &ids.flatten(0, -1))
                    .view([b, t, table.size()[1]])
            }
        }
    }

    /// Attention of `q` over `k`/`v` `[B, heads, T, head_dim]` here: causal after the
    /// cache (extending it), or within each packed record.
    pub fn attend(self, q: &Tensor, k: Tensor, v: Tensor, opts: AttentionOptions) -> Tensor {
        match self {
            Context::Cached(cache) => cached_causal_attention(q, k, v, cache, opts),
            Context::Packed(p) => packed_attention(q, &k, &v, p, opts),
        }
    }
}

/// Attention within each packed record: the packing's block-diagonal causal mask, narrowed to
/// the window when one is set.
fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    opts: AttentionOptions,
) -> Tensor {
    let t = q.size()[2];
    let mut mask = packing.mask.to_device(q.device());
    if opts.window.is_some() {
        mask = mask.logical_and(&attention_mask(0, t, opts.window, q.device()));
    }
    if let Some(cap) = opts.softcap {
        return softcapped_attention(q, k, v, &mask, cap, opts);
    }
    Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, opts.scale, opts.gqa)
}

/// `[t, past + t]`: whether query i (position past + i) may see key j.
fn attention_mask(past: i64, t: i64, window: Option<i64>, dev: tch::Device) -> Tensor {
    let kpos = Tensor::arange(past + t, (Kind::Int64, dev)).unsqueeze(0);
    let qpos = (Tensor::arange(t, (Kind::Int64, dev)) + past).unsqueeze(1);
    let causal = kpos.le_tensor(&qpos);
    match window {
        Some(w) => causal.logical_and(&kpos.gt_tensor(&(qpos - w))),
        None => causal,
    }
}

/// Attention with soft-capped scores, written out (the fused kernel has no cap): scores in
/// the activations' dtype, softmax in f32, as transformers' eager path computes it.
fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    cap: f64,
    opts: AttentionOptions,
) -> Tensor {
    let (heads, kv_heads) = (q.size()[1], k.size()[1]);
    let (k, v) = if opts.gqa && kv_heads != heads {
        let n = heads / kv_heads;
        (
            k.repeat_interleave_self_int(n, 1, None),
            v.repeat_interleave_self_int(n, 1, None),
        )
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let scale = opts
        .scale
        .unwrap_or_else(|| (q.size()[3] as f64).powf(-0.5));
    let scores = q.matmul(&k.transpose(2, 3)) * scale;
    let scores = (scores / cap).tanh() * cap;
    let scores = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
    scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
}

/// Token ids looked up in an embedding `table` on `device`, cast to the compute dtype: the
/// first half of every plugin's [`CausalLm::embed`].
pub fn embed_ids(table: &dyn Layer, ids: &Tensor, device: Device, kind: Kind) -> Result<Tensor> {
    Ok(table.forward(&ids.f_to_device(device)?)?.to_kind(kind))
}

/// A causal language model built by an architecture plugin.
pub trait CausalLm: Send {
    /// Its sizes.
    fn info(&self) -> ModelInfo;
    /// The dtype activations are computed in (f32 or bf16).
    fn compute_kind(&self) -> Kind;
    /// Changes the compute dtype.
    fn set_compute_kind(&mut self, kind: Kind);
    /// Token ids `[B, T]` to hidden states `[B, T, hidden]` in the compute dtype; an id
    /// outside the vocabulary is an error naming it.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// Applies block `i`. With a cache, `h` holds only the new positions, which follow the
    /// cached ones, and the cache is extended.
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor>;
    /// Final norm and LM head: hidden states to f32 logits `[B, T, vocab]`.
    fn head(&self, h: &Tensor) -> Result<Tensor>;
    /// What the LM head multiplies (the final norm's output, `[B, T, hidden]`) and the module
    /// whose weight does the multiplying: the LM head's, or the embedding's when tied.
    /// `None` where a plugin does not say; calibrated conversion then rounds that weight to
    /// nearest.
    fn head_input(&self, _h: &Tensor) -> Result<Option<(Tensor, String)>> {
        Ok(None)
    }
    /// Visits every built layer with its module path (to attach adapters, move, inspect).
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>));
    /// Visits every normalisation layer with its module path (to train norms).
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm));

    /// A sequence length past which keys cached for shorter sequences go stale: a cached
    /// generation that grows past it recomputes the whole sequence once. Phi-3's LongRoPE
    /// switches frequency tables there, and transformers drops its cache at that point too.
    fn cache_reset_at(&self) -> Option<i64> {
        None
    }

    /// Stores every frozen float weight in `kind`, the dtype it would be cast to on each call
    /// anyway (see [`Layer::store_frozen_in`]).
    fn store_frozen_in(&mut self, kind: Kind) {
        self.visit_layers(&mut |_, l| l.store_frozen_in(kind));
    }

    /// Full forward pass: logits `[B, T, vocab]` in f32.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for i in 0..self.info().blocks {
            h = self.block(i, &h, None)?;
        }
        self.head(&h)
    }

    /// Applies block `i` to rows of packed records: positions restart at each record and
    /// no record attends to another (see [`Packing`]). Architectures that do not implement
    /// it refuse packed training.
    fn block_packed(&self, _i: usize, _h: &Tensor, _packing: &Packing) -> Result<Tensor> {
        Err(crate::OctetError::InvalidArgument(
            "this architecture does not support packed sequences (train without --pack)".into(),
        ))
    }

    /// Full forward pass over packed rows: logits `[B, T, vocab]` in f32.
    fn forward_packed(&self, ids: &Tensor, packing: &Packing) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for i in 0..self.info().blocks {
            h = self.block_packed(i, &h, packing)?;
        }
        self.head(&h)
    }
}

/// Refuses a `--model` path that is no model at all before anything else reads it, so the
/// message says the model is missing rather than what the first reader missed in it.
pub fn check_model_path(path: &std::path::Path) -> crate::Result<()> {
    let refuse = |why: &str| {
        Err(crate::OctetError::InvalidArgument(format!(
            "--model {}: {why}",
            path.display()
        )))
    };
    if !path.exists() {
        return refuse("no such model folder or file");
    }
    if path.is_dir() && !path.join("config.json").is_file() {
        return refuse("not a model folder (it holds no config.json)");
    }
    Ok(())
}

/// The device the model's embedding output lands on.
pub fn model_device(model: &dyn CausalLm) -> Result<Device> {
    crate::nn::scratch::inference(|| {
        Ok(model
            .embed(&Tensor::zeros([1, 1], (Kind::Int64, Device::Cpu)))?
            .device())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn batch_estimate_grows_with_the_batch_and_refuses_absurd_ones() {
        let info = ModelInfo {
            vocab_size: 1000,
            max_positions: 64,
            hidden: 64,
            blocks: 2,
        };
        let one = info.training_batch_bytes(1, 16, true);
        // The logits alone: 3 copies of 16 x 1000 f32.
        assert!(one >= 3 * 16 * 1000 * 4, "{one}");
        assert_eq!(info.training_batch_bytes(8, 16, true), 8 * one);
        assert!(info.training_batch_bytes(1, 16, false) > one);
        let huge = info.training_batch_bytes(100_000_000, 16, true);
        assert!(crate::memory::ensure_fits("a batch", huge, Device::Cpu, "").is_err());
    }

    fn kv(t: i64, seed: f64) -> (Tensor, Tensor) {
        let k = Tensor::arange(2 * 3 * t * 4, (Kind::Float, Device::Cpu)).view([2, 3, t, 4]) + seed;
        (k.shallow_clone(), -k)
    }

    #[test]
    fn appends_equal_concatenation_and_reserve_avoids_reallocation() {
        for reserve in [0usize, 12] {
            let mut c = LayerCache::with_capacity(reserve);
            let (mut all_k, mut all_v) = kv(5, 0.0);
            let (k, v) = c.append(&all_k, &all_v);
            assert_eq!(k, all_k);
            assert_eq!(v, all_v);
            let first = c.k.as_ref().unwrap().shallow_clone();
            let ptr = c.k.as_ref().unwrap().data_ptr();
            for step in 0..7 {
                let (nk, nv) = kv(1, 100.0 * (step + 1) as f64);
                let (k, v) = c.append(&nk, &nv);
                all_k = Tensor::cat(&[&all_k, &nk], 2);
                all_v = Tensor::cat(&[&all_v, &nv], 2);
                assert_eq!(k, all_k);
                assert_eq!(v, all_v);
                assert_eq!(c.len(), 6 + step);
                assert!(c.capacity() >= c.len());
            }
            if reserve >= 12 {
                assert_eq!(c.capacity(), 12, "sized once");
                assert_eq!(c.k.as_ref().unwrap().data_ptr(), ptr, "never reallocated");
            } else {
                assert!(c.capacity() < 2 * 12 + 1, "grows by doubling, not per step");
            }
            // Views handed out earlier still see the positions they saw.
            assert_eq!(first, all_k.narrow(2, 0, 5));
        }
    }

    #[test]
    fn a_cache_replaced_through_its_fields_is_copied_not_overwritten() {
        let mut c = LayerCache::with_capacity(8);
        let (k0, v0) = kv(3, 0.0);
        let _ = c.append(&k0, &v0);
        // A caller swaps in its own tensors: the next append must extend those.
        let (k1, v1) = kv(2, 50.0);
        c.k = Some(k1.shallow_clone());
        c.v = Some(v1.shallow_clone());
        let (nk, nv) = kv(1, 9.0);
        let (k, v) = c.append(&nk, &nv);
        assert_eq!(k, Tensor::cat(&[&k1, &nk], 2));
        assert_eq!(v, Tensor::cat(&[&v1, &nv], 2));
        assert_eq!(k1, kv(2, 50.0).0, "the caller's tensor is untouched");
    }

    /// Attention over q/k/v fed all at once, then 3 positions, 2 (masked), 1 and 1 (cached).
    fn full_and_stepped(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: AttentionOptions,
    ) -> (Tensor, Tensor) {
        let full = cached_causal_attention(q, k.shallow_clone(), v.shallow_clone(), None, opts);
        let mut c = LayerCache::default();
        let mut rows = Vec::new();
        let mut start = 0;
        for n in [3, 2, 1, 1] {
            rows.push(cached_causal_attention(
                &q.narrow(2, start, n),
                k.narrow(2, start, n),
                v.narrow(2, start, n),
                Some(&mut c),
                opts,
            ));
            start += n;
        }
        (full, Tensor::cat(&rows, 2))
    }

    #[test]
    fn cached_steps_equal_the_full_pass_with_windows_and_soft_caps() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let q = Tensor::randn([1, 4, 7, 8], opts);
        let (k, v) = (
            Tensor::randn([1, 2, 7, 8], opts),
            Tensor::randn([1, 2, 7, 8], opts),
        );
        let gqa = AttentionOptions {
            gqa: true,
            ..Default::default()
        };
        let windowed = AttentionOptions {
            window: Some(3),
            ..gqa
        };
        let mut outs = Vec::new();
        for o in [
            gqa,
            windowed,
            AttentionOptions {
                softcap: Some(1.5),
                ..windowed
            },
            // A cap this large changes nothing: the written-out path equals the fused one.
            AttentionOptions {
                softcap: Some(1e9),
                ..windowed
            },
        ] {
            let (full, stepped) = full_and_stepped(&q, &k, &v, o);
            assert!(stepped.allclose(&full, 1e-5, 1e-6, false), "{o:?}");
            outs.push(full);
        }
        let differs = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) > 1e-3;
        assert!(
            differs(&outs[0], &outs[1]),
            "the window changes late positions"
        );
        assert!(outs[0]
            .narrow(2, 0, 3)
            .allclose(&outs[1].narrow(2, 0, 3), 1e-6, 1e-6, false));
        assert!(differs(&outs[1], &outs[2]), "the cap changes scores");
        assert!(outs[1].allclose(&outs[3], 1e-5, 1e-6, false));
    }
}
