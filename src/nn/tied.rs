//! LM heads tied to the token embedding: logits `x · tableᵀ` from whichever embedding layer
//! the model holds, without a separate head module.
use super::bnb8::Bnb8Embedding;
use super::float::{in_kind, Embedding};
use super::q8::Layout;
use super::{Layer, LoraLayer};
use crate::error::{OctetError, Result};
use tch::Tensor;

/// Whether `layer` can serve as a tied head (a float or 8-bit embedding, possibly with LoRA).
pub fn can_tie(layer: &dyn Layer) -> bool {
    let any = layer.as_any();
    match any.downcast_ref::<LoraLayer>() {
        Some(l) => can_tie(l.base()),
        None => any.is::<Embedding>() || any.is::<Bnb8Embedding>(),
    }
}

/// Refuses, naming module `path`, an embedding whose table cannot serve as the tied head.
pub fn check_can_tie(path: &str, layer: &dyn Layer) -> Result<()> {
    if can_tie(layer) {
        Ok(())
    } else {
        Err(OctetError::InvalidArgument(format!(
            "tied LM head: {path} is a {}, whose table cannot serve as the head",
            layer.kind()
        )))
    }
}

/// Logits `x · tableᵀ` in `x`'s dtype for a head tied to `layer`'s table; an error when
/// [`can_tie`] is false. LoRA on the embedding does not reach the head, as in PEFT (the head
/// shares only the base weight).
///
/// An 8-bit table is never kept in float: it goes through the same multiplication as an 8-bit
/// Linear ([`super::q8::Q8Weight::matmul`]): a few rows that need no gradient (one generation
/// step) straight from its bytes, otherwise de-quantized just in time, into a pooled buffer
/// inside a [`super::scratch`] scope, else into a transient `[vocab, hidden]` tensor freed
/// when the call returns (SmolLM2-135M: 113 MB in f32).
pub fn tied_logits(layer: &dyn Layer, x: &Tensor) -> Result<Tensor> {
    let any = layer.as_any();
    if let Some(l) = any.downcast_ref::<LoraLayer>() {
        return tied_logits(l.base(), x);
    }
    if let Some(e) = any.downcast_ref::<Bnb8Embedding>() {
        return e.weight.matmul(x, None, Layout::OutIn);
    }
    match any.downcast_ref::<Embedding>() {
        Some(e) => Ok(x.f_linear(&in_kind(&e.weight, x.kind())?, None::<Tensor>)?),
        None => Err(OctetError::InvalidArgument(format!(
            "tied LM head: a {} cannot serve as the head",
            layer.kind()
        ))),
    }
}
