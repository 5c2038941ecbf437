//! The one check that token ids fit a vocabulary. Callers run it where ids enter (a prompt,
//! an evaluation text, training data) to name their source; every embedding lookup runs it
//! too, so an id past a table is an error on any path, never an out-of-bounds read or a
//! device-side assert.
use crate::error::{OctetError, Result};
use tch::Tensor;

/// Refuses token ids outside `[0, vocab)`: an id past the embedding would index out of its
/// rows. `what` says where the ids came from.
pub fn check_token_ids<'a>(
    ids: impl IntoIterator<Item = &'a i64>,
    vocab: usize,
    what: &str,
) -> Result<()> {
    match ids
        .into_iter()
        .find(|&&t| t < 0 || t as u64 >= vocab as u64)
    {
        Some(bad) => Err(OctetError::InvalidArgument(format!(
            "{what}: token id {bad} is outside the model's vocabulary of {vocab} \
             (does the tokenizer belong to this model?)"
        ))),
        None => Ok(()),
    }
}

/// [`check_token_ids`] for a tensor of ids (any shape, any device): its smallest and largest
/// id are checked.
pub fn check_token_tensor(ids: &Tensor, vocab: i64, what: &str) -> Result<()> {
    if ids.numel() == 0 {
        return Ok(());
    }
    let lo = ids.f_min()?.f_int64_value(&[])?;
    let hi = ids.f_max()?.f_int64_value(&[])?;
    let vocab = usize::try_from(vocab).unwrap_or(0);
    check_token_ids(&[lo, hi], vocab, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_id_outside_and_the_source() {
        let err = check_token_ids(&[3, 9, 12, -1], 10, "the prompt").unwrap_err();
        assert!(err.to_string().contains("the prompt: token id 12"), "{err}");
        assert!(check_token_ids(&[0, 9], 10, "x").is_ok());
        let t = Tensor::from_slice(&[1i64, 4, 10]).reshape([1, 3]);
        let err = check_token_tensor(&t, 10, "input").unwrap_err().to_string();
        assert!(
            err.contains("token id 10") && err.contains("vocabulary of 10"),
            "{err}"
        );
        let t = Tensor::from_slice(&[-2i64, 4]);
        assert!(check_token_tensor(&t, 10, "input").is_err());
        assert!(check_token_tensor(&Tensor::from_slice(&[0i64, 9]), 10, "input").is_ok());
    }
}
