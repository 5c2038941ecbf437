//! The description of one module: its path, layer kind and tensors (names, dtypes, shapes),
//! known without loading any data.
use crate::io::Dtype;

/// One tensor of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// The last path segment (`weight`, `bias`, `absmax`, `code`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl ParamInfo {
    /// Bytes of the data.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// A module: its path, its layer kind and its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Hugging Face path, e.g. `transformer.h.0.attn.q_proj`.
    pub path: String,
    /// Layer kind, e.g. `Linear` or `Bnb8Linear`.
    pub kind: String,
    /// Its tensors.
    pub params: Vec<ParamInfo>,
}

impl Node {
    /// The tensor named `name`, if present.
    pub fn param(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Full tensor name of parameter `name`.
    pub fn tensor_name(&self, name: &str) -> String {
        format!("{}.{}", self.path, name)
    }

    /// Bytes held by the module.
    pub fn nbytes(&self) -> usize {
        self.params.iter().map(ParamInfo::nbytes).sum()
    }
}
