//! Whether an adapter fits a model: checked against the model's module graph before anything
//! is attached or written, with the same rules whether the adapter is attached (eval,
//! generate, resumed training) or merged.
use super::read::{Adapter, LoraPair, ModuleEdit};
use crate::error::{OctetError, Result};
use crate::nn::kinds::quantized_param;
use crate::nn::{ModuleGraph, Node};
use tch::Tensor;

fn is_embedding_kind(kind: &str) -> bool {
    kind.ends_with("Embedding")
}

/// Refuses `t` unless its shape is `want`; `what` and `expected` describe it in the error.
fn expect_shape(t: &Tensor, want: &[i64], what: String, expected: String) -> Result<()> {
    if t.size() == want {
        return Ok(());
    }
    Err(OctetError::ShapeMismatch {
        what,
        expected,
        found: format!("{:?}", t.size()),
    })
}

impl Adapter {
    /// Checks that every adapter tensor lands on a module of `graph` with a fitting shape.
    /// `model` names the model in messages ("this gptj model").
    pub fn check_fits(&self, graph: &ModuleGraph, model: &str) -> Result<()> {
        if self.modules.keys().all(|p| graph.node(p).is_none()) {
            return Err(self.fits_nothing(model));
        }
        for (path, edit) in &self.modules {
            let node = graph.node(path).ok_or_else(|| {
                self.bad(format!(
                    "tensor {}: {model} has no module {path}",
                    edit.first_name()
                ))
            })?;
            if let Some(l) = &edit.lora {
                self.check_lora(l, node)?;
            }
            self.check_replaced(edit, node)?;
        }
        Ok(())
    }

    fn bad(&self, problem: String) -> OctetError {
        OctetError::bad_file(&self.weights, problem)
    }

    /// None of the adapter's modules exists: most likely another architecture's adapter.
    fn fits_nothing(&self, model: &str) -> OctetError {
        let first = self.modules.keys().next().cloned().unwrap_or_default();
        let trained_on = self
            .config
            .base_model_name_or_path
            .as_deref()
            .map(|b| format!(" (it was trained on {b})"))
            .unwrap_or_default();
        self.bad(format!(
            "the adapter does not fit {model}: it matches no module here (none of its {} \
             modules, e.g. {first}, exists); was it trained for another architecture{trained_on}?",
            self.modules.len()
        ))
    }

    /// A LoRA pair fits its module: the right form (Linear or Embedding) and shapes.
    fn check_lora(&self, l: &LoraPair, node: &Node) -> Result<()> {
        let path = &node.path;
        let w = node
            .param(quantized_param(&node.kind).unwrap_or("weight"))
            .map(|p| crate::nn::q4::logical_weight_shape(&node.kind, &p.shape))
            .filter(|s| s.len() == 2)
            .ok_or_else(|| {
                self.bad(format!(
                    "tensor {}: {path} ({}) has no 2-d weight to merge into",
                    l.a_name, node.kind
                ))
            })?;
        if l.embedding != is_embedding_kind(&node.kind) {
            let form = if l.embedding { "Embedding" } else { "Linear" };
            return Err(self.bad(format!(
                "tensor {}: a {form} adapter, but {path} is a {}",
                l.a_name, node.kind
            )));
        }
        let (w0, w1) = (w[0] as i64, w[1] as i64);
        // [r, in] / [out, r] for Linear (weight [out, in], or [in, out] with
        // fan_in_fan_out); [r, vocab] / [dim, r] for Embedding (weight [vocab, dim]).
        let (fan_in, fan_out) = if l.embedding || self.config.fan_in_fan_out {
            (w0, w1)
        } else {
            (w1, w0)
        };
        let r = self.config.r as i64;
        let shape = format!("{w:?}");
        for (name, t, want) in [
            (&l.a_name, &l.a, [r, fan_in]),
            (&l.b_name, &l.b, [fan_out, r]),
        ] {
            expect_shape(
                t,
                &want,
                format!("adapter tensor {name} ({path}.weight is {shape}, r = {r})"),
                format!("{want:?}"),
            )?;
        }
        Ok(())
    }

    /// Replaced parameters exist in the module, are float (or its 8-bit weight) and keep
    /// their shape.
    fn check_replaced(&self, edit: &ModuleEdit, node: &Node) -> Result<()> {
        let path = &node.path;
        for (param, (name, t)) in &edit.replace {
            let p = node.param(param).ok_or_else(|| {
                self.bad(format!(
                    "tensor {name}: {path} ({}) has no {param}",
                    node.kind
                ))
            })?;
            if !(p.dtype.is_float() || quantized_param(&node.kind) == Some(param.as_str())) {
                return Err(self.bad(format!(
                    "tensor {name}: {path}.{param} is not a trainable float tensor"
                )));
            }
            let want: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            expect_shape(
                t,
                &want,
                format!("adapter tensor {name}"),
                format!("{want:?} (as {path}.{param})"),
            )?;
        }
        Ok(())
    }
}
