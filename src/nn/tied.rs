//! LM heads tied to the token embedding: logits `x · tableᵀ` from whichever embedding layer
//! the model holds, without a separate head module.
use super::bnb8::Bnb8Embedding;
use super::float::Embedding;
use super::{Layer, LoraLayer};
use tch::Tensor;

/// Whether `layer` can serve as a tied head (a float or 8-bit embedding, possibly with LoRA).
pub fn can_tie(layer: &dyn Layer) -> bool {
    let any = layer.as_any();
    match any.downcast_ref::<LoraLayer>() {
        Some(l) => can_tie(l.base()),
        None => any.is::<Embedding>() || any.is::<Bnb8Embedding>(),
    }
}

/// Logits `x · tableᵀ` in `x`'s dtype for a head tied to `layer`'s table, or `None` when
/// [`can_tie`] is false. LoRA on the embedding does not reach the head, as in PEFT (the
/// head shares only the base weight).
///
/// An 8-bit table is never kept in float: a few rows that need no gradient (one generation
/// step) are multiplied straight from its bytes; otherwise it is de-quantized just in time,
/// into a pooled buffer inside a [`super::scratch`] scope, else into a transient
/// `[vocab, hidden]` tensor freed when the call returns (SmolLM2-135M: 113 MB in f32).
pub fn tied_logits(layer: &dyn Layer, x: &Tensor) -> Option<Tensor> {
    let any = layer.as_any();
    if let Some(l) = any.downcast_ref::<LoraLayer>() {
        return tied_logits(l.base(), x);
    }
    if let Some(e) = any.downcast_ref::<Bnb8Embedding>() {
        let w = &e.weight;
        if !x.requires_grad() && crate::quant::fused::applies(x, w) {
            return Some(
                crate::quant::fused::linear(x, w, None).expect("shapes checked by applies"),
            );
        }
        let kind = x.kind();
        let table = if super::scratch::active() && crate::quant::uses_cpu_kernels(&w.q) {
            super::scratch::with_buffer(&w.shape(), kind, |buf| {
                w.dequantize_into(buf).expect("validated 8-bit table");
            })
        } else {
            w.dequantize(kind).expect("validated 8-bit table")
        };
        return Some(x.linear(&table, None::<Tensor>));
    }
    any.downcast_ref::<Embedding>().map(|e| {
        if e.weight.kind() == x.kind() {
            x.linear(&e.weight, None::<Tensor>)
        } else {
            x.linear(&e.weight.to_kind(x.kind()), None::<Tensor>)
        }
    })
}
