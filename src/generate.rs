//! Text generation: a per-block KV cache (the prompt is prefilled in one pass, then one token
//! per step), greedy decoding or seeded sampling with Hugging Face's logits processors
//! (repetition penalty, temperature, top-k, top-p), EOS and caller-driven stops, and the
//! incremental text bookkeeping a streaming front end needs ([`TextStream`]).
use crate::error::{OctetError, Result};
use crate::model::{CausalLm, LayerCache};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How to continue a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to add (fewer when the model's positions run out or a stop hits).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax, no sampling, top-k/top-p unused).
    pub temperature: f64,
    /// Keep only the k most likely tokens before sampling; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 disables.
    pub top_p: f64,
    /// Hugging Face's repetition penalty on every token already in the sequence (prompt
    /// included): a logit is divided by it when positive, multiplied when negative; 1 disables.
    pub repetition_penalty: f64,
    /// Seed of the sampler (ignored when greedy).
    pub seed: u64,
    /// Generation ends after any of these ids (the id is returned).
    pub eos: Vec<i64>,
    /// Keep keys and values per block; `false` recomputes the whole sequence every step.
    pub use_cache: bool,
    /// Never produce ids at or above this (a model vocabulary padded beyond the tokenizer's).
    pub vocab_limit: Option<usize>,
}

impl Default for GenerateOptions {
    /// Sampling at temperature 0.7 with no top-k/top-p/penalty, 64 new tokens, cache on.
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos: Vec::new(),
            use_cache: true,
            vocab_limit: None,
        }
    }
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, no EOS, cache on.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Rejects values the processors cannot honour.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(OctetError::InvalidArgument(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "--temperature {} must be ≥ 0 (0 is greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("--top-p {} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "--repetition-penalty {} must be > 0 (1 disables it)",
                self.repetition_penalty
            ));
        }
        if self.vocab_limit == Some(0) {
            return bad("the vocabulary limit must be at least 1".into());
        }
        Ok(())
    }
}

/// SplitMix64: small, seedable and identical on every platform and device, so a seed
/// reproduces a sample regardless of where the model runs.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one row of logits, applying the processors in Hugging Face's
/// order: repetition penalty, then (sampling only) temperature, top-k, top-p.
#[derive(Clone, Debug)]
pub struct Sampler {
    opts: GenerateOptions,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded with `opts.seed`.
    pub fn new(opts: &GenerateOptions) -> Self {
        Sampler {
            opts: opts.clone(),
            rng: Rng(opts.seed),
        }
    }

    /// Applies the vocabulary limit and the repetition penalty over `history`, then, when
    /// sampling, temperature, top-k and top-p; removed tokens become -inf.
    pub fn process(&self, logits: &mut [f32], history: &[i64]) {
        let o = &self.opts;
        if let Some(limit) = o.vocab_limit {
            for l in logits.iter_mut().skip(limit) {
                *l = f32::NEG_INFINITY;
            }
        }
        if o.repetition_penalty != 1.0 {
            let p = o.repetition_penalty as f32;
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = usize::try_from(t).ok().and_then(|t| seen.get_mut(t)) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
        if o.temperature == 0.0 {
            return;
        }
        if o.temperature != 1.0 {
            let t = o.temperature as f32;
            logits.iter_mut().for_each(|l| *l /= t);
        }
        if o.top_k > 0 && o.top_k < logits.len() {
            // Ties with the k-th largest survive, as in transformers' TopKLogitsWarper.
            let mut sorted = logits.to_vec();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let kth = sorted[o.top_k - 1];
            logits
                .iter_mut()
                .filter(|l| **l < kth)
                .for_each(|l| *l = f32::NEG_INFINITY);
        }
        if o.top_p < 1.0 {
            // transformers' TopPLogitsWarper: ascending order, drop tokens while the
            // cumulative probability is ≤ 1 - p, always keep the most likely one.
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
            let probs = softmax(logits);
            let mut cum = 0.0;
            let last = order.len().saturating_sub(1);
            for (rank, &i) in order.iter().enumerate() {
                cum += probs[i];
                if rank == last || cum > 1.0 - o.top_p {
                    break;
                }
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }

    /// The next token: argmax when greedy, otherwise a draw from the processed distribution.
    /// `logits` is overwritten with the processed values.
    pub fn next_token(&mut self, logits: &mut [f32], history: &[i64]) -> i64 {
        self.process(logits, history);
        if self.opts.temperature == 0.0 {
            return argmax(logits) as i64;
        }
        let probs = softmax(logits);
        let total: f64 = probs.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax(logits) as i64;
        }
        let mut u = self.rng.uniform() * total;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                if u < p {
                    return i as i64;
                }
                u -= p;
                last_nonzero = i;
            }
        }
        // Rounding left u just above the total: take the last possible token.
        last_nonzero as i64
    }
}

/// First index of the largest value (torch.argmax's choice among ties).
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || (x[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best
}

/// Softmax in f64; all -inf gives all zeros.
fn softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return vec![0.0; x.len()];
    }
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Feeds a growing sequence to the model and returns the last position's logits, either
/// through a per-block KV cache (only positions not yet seen are computed) or by recomputing
/// the whole sequence.
struct Stepper<'a> {
    model: &'a dyn CausalLm,
    caches: Option<Vec<LayerCache>>,
    fed: i64,
}

impl<'a> Stepper<'a> {
    /// `positions`: the longest sequence that will be fed (the cache is sized for it once).
    fn new(model: &'a dyn CausalLm, use_cache: bool, positions: usize) -> Self {
        let blocks = model.info().blocks;
        Stepper {
            model,
            caches: use_cache.then(|| {
                (0..blocks)
                    .map(|_| LayerCache::with_capacity(positions))
                    .collect()
            }),
            fed: 0,
        }
    }

    /// Forgets every fed position from `keep` on, so the next sequence is fed from there.
    fn rewind(&mut self, keep: i64) {
        if keep >= self.fed {
            return;
        }
        if let Some(caches) = &mut self.caches {
            for c in caches.iter_mut() {
                c.truncate(keep);
            }
        }
        self.fed = keep;
    }

    /// `seq` is `[B, T]` and extends what was fed before; returns f32 logits `[B, vocab]`
    /// for its last position.
    fn last_logits(&mut self, seq: &Tensor) -> Result<Tensor> {
        let t = seq.size()[1];
        let h = match &mut self.caches {
            Some(caches) => {
                if let Some(limit) = self.model.cache_reset_at() {
                    if self.fed > 0 && self.fed <= limit && t > limit {
                        for c in caches.iter_mut() {
                            *c = LayerCache::with_capacity(c.capacity().max(t) as usize);
                        }
                        self.fed = 0;
                    }
                }
                let mut h = self.model.embed(&seq.narrow(1, self.fed, t - self.fed))?;
                for (i, c) in caches.iter_mut().enumerate() {
                    h = self.model.block(i, &h, Some(c))?;
                }
                self.fed = t;
                h
            }
            None => {
                let mut h = self.model.embed(seq)?;
                for i in 0..self.model.info().blocks {
                    h = self.model.block(i, &h, None)?;
                }
                h
            }
        };
        // The head is position-wise: only the last position's logits are needed.
        let n = h.size()[1];
        Ok(self.model.head(&h.narrow(1, n - 1, 1))?.squeeze_dim(1))
    }
}

/// How many tokens can be added to a prompt of `prompt_len` (sequences stop at the model's
/// positions); errors when the prompt alone fills them.
pub fn room(model: &dyn CausalLm, prompt_len: usize, max_new_tokens: usize) -> Result<usize> {
    let max = model.info().max_positions;
    if prompt_len == 0 {
        return Err(OctetError::InvalidArgument(
            "the prompt is empty (no tokens)".into(),
        ));
    }
    if prompt_len >= max {
        return Err(OctetError::InvalidArgument(format!(
            "the prompt has {prompt_len} tokens but the model takes at most {max} positions, \
             leaving no room to generate"
        )));
    }
    Ok(max_new_tokens.min(max - prompt_len))
}

fn check_ids(model: &dyn CausalLm, ids: &[i64]) -> Result<()> {
    crate::model::check_token_ids(ids, model.info().vocab_size, "the prompt")
}

/// Continues `prompt_ids` and returns the new ids. `on_token` sees each new id as soon as it
/// is chosen and returns `false` to stop there (stop strings); an EOS id ends generation after
/// being reported and returned. The sequence never exceeds the model's positions, so fewer
/// than `max_new_tokens` may come back; a prompt that fills them is an error. The caller puts
/// the model in inference mode (no dropout).
pub fn generate(
    model: &dyn CausalLm,
    prompt_ids: &[i64],
    opts: &GenerateOptions,
    on_token: impl FnMut(i64) -> bool,
) -> Result<Vec<i64>> {
    let positions = (prompt_ids.len() + opts.max_new_tokens).min(model.info().max_positions);
    Decoder::new(model, opts.use_cache, positions).generate(prompt_ids, opts, on_token)
}

/// Generation that keeps its KV cache between calls, for a conversation: each call's sequence
/// (the whole conversation so far) is compared with what was fed before, and only the part
/// after their common beginning is computed. A later turn that re-renders the history exactly
/// as it was generated costs only its new tokens; one that differs (a reply whose text
/// re-tokenizes otherwise, a history trimmed at the front) rolls the cache back to where the
/// two agree.
pub struct Decoder<'a> {
    model: &'a dyn CausalLm,
    stepper: Stepper<'a>,
    /// Every id fed to the model or sampled so far; the first `stepper.fed` are cached.
    seq: Vec<i64>,
    /// Leading ids of the last call's sequence whose keys and values were already cached.
    reused: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder whose cache first makes room for `positions` positions (it grows if needed);
    /// `use_cache: false` recomputes the whole sequence every step.
    pub fn new(model: &'a dyn CausalLm, use_cache: bool, positions: usize) -> Self {
        Decoder {
            model,
            stepper: Stepper::new(model, use_cache, positions),
            seq: Vec::new(),
            reused: 0,
        }
    }

    /// How many leading ids of the last call's sequence came from the cache of earlier calls
    /// (0 without a cache).
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// As [`generate`], for `ids` that may begin with what an earlier call fed.
    pub fn generate(
        &mut self,
        ids: &[i64],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(i64) -> bool,
    ) -> Result<Vec<i64>> {
        opts.validate()?;
        check_ids(self.model, ids)?;
        let budget = room(self.model, ids.len(), opts.max_new_tokens)?;
        let device = crate::model::model_device(self.model)?;
        // At least the last id is fed again, for the logits of the next one.
        let fed = (self.stepper.fed as usize).min(self.seq.len());
        let same = self.seq[..fed]
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        self.stepper.rewind(same as i64);
        self.reused = if self.stepper.caches.is_some() {
            same
        } else {
            0
        };
        let mut sampler = Sampler::new(opts);
        self.seq = ids.to_vec();
        let mut new = Vec::with_capacity(budget);
        let (stepper, seq) = (&mut self.stepper, &mut self.seq);
        crate::nn::scratch::inference(|| -> Result<()> {
            for _ in 0..budget {
                let ids = Tensor::from_slice(seq).unsqueeze(0).to_device(device);
                let logits = stepper
                    .last_logits(&ids)?
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu);
                let mut row = Vec::<f32>::try_from(logits.reshape([-1]))?;
                let tok = sampler.next_token(&mut row, seq);
                seq.push(tok);
                new.push(tok);
                if !on_token(tok) || opts.eos.contains(&tok) {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(new)
    }
}

/// Greedy continuation of a batch of equal-length prompts `[B, T]` by exactly
/// `max_new_tokens` tokens (no EOS, no processors): the new ids `[B, max_new_tokens]`, on
/// the model's device. For throughput measurements.
pub fn generate_batch(
    model: &dyn CausalLm,
    prompt_ids: &Tensor,
    max_new_tokens: usize,
    use_cache: bool,
) -> Result<Tensor> {
    let size = prompt_ids.size();
    if size.len() != 2 {
        return Err(OctetError::ShapeMismatch {
            what: "batch of prompts".into(),
            expected: "[B, T]".into(),
            found: format!("{size:?}"),
        });
    }
    let t = size[1] as usize;
    let budget = room(model, t, max_new_tokens)?;
    if budget < max_new_tokens {
        return Err(OctetError::InvalidArgument(format!(
            "{t} prompt tokens + {max_new_tokens} new exceed the model's {} positions",
            model.info().max_positions
        )));
    }
    crate::nn::ids::check_token_tensor(
        prompt_ids,
        model.info().vocab_size as i64,
        "the batch of prompts",
    )?;
    let device = crate::model::model_device(model)?;
    let mut stepper = Stepper::new(model, use_cache, t + budget);
    let mut seq = prompt_ids.to_kind(Kind::Int64).to_device(device);
    crate::nn::scratch::inference(|| -> Result<()> {
        for _ in 0..budget {
            let next = stepper.last_logits(&seq)?.argmax(-1, true);
            seq = Tensor::cat(&[&seq, &next], 1);
        }
        Ok(())
    })?;
    Ok(seq.narrow(1, t as i64, budget as i64))
}

/// End-of-sequence ids of a model folder, as transformers' `generate` takes them:
/// `generation_config.json`'s `eos_token_id` (a number or a list), else `config.json`'s.
pub fn model_eos_ids(dir: &Path) -> Vec<i64> {
    let read = |name: &str| -> Option<Vec<i64>> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => n.as_i64().map(|n| vec![n]),
            serde_json::Value::Array(a) => Some(a.iter().filter_map(|x| x.as_i64()).collect()),
            _ => None,
        }
    };
    read("generation_config.json")
        .or_else(|| read("config.json"))
        .unwrap_or_default()
}

/// Turns successive decodings of a growing continuation into the pieces to print, so that
/// what is printed is always a prefix of the final text: a trailing U+FFFD (a multi-byte
/// character whose bytes have not all arrived) and any tail that could be the start of a
/// stop string are held back; when a stop string appears, the text is cut just before it.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    printed: usize,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            printed: 0,
            stopped: false,
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Given the whole continuation decoded so far, returns the new text safe to print.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            return self.emit(text, cut);
        }
        let complete = text.trim_end_matches('\u{FFFD}');
        let mut end = complete.len();
        // Hold back the longest tail that a stop string starts with (a proper prefix: a
        // whole stop would have been found above).
        for s in &self.stops {
            let from = complete.len().saturating_sub(s.len() - 1);
            for (i, _) in complete
                .char_indices()
                .filter(|&(i, _)| i >= from && i < end)
            {
                if s.starts_with(&complete[i..]) {
                    end = i;
                    break;
                }
            }
        }
        self.emit(text, end)
    }

    /// Given the final continuation, returns whatever is still held back (nothing after a
    /// stop).
    pub fn finish(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.emit(text, text.len())
    }

    fn emit(&mut self, text: &str, end: usize) -> String {
        if end <= self.printed || !text.is_char_boundary(self.printed) {
            return String::new();
        }
        let out = text[self.printed..end].to_string();
        self.printed = end;
        out
    }
}
