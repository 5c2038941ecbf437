//! SentencePiece vocabularies in GGUF metadata (`tokenizer.ggml.model = "llama"`: pieces,
//! scores and token types, no merges), rebuilt as the `tokenizers` pipeline transformers builds
//! from the same file (its `integrations/gguf` tokenizer builders), so ids and text agree:
//!
//! - a BPE with byte fallback (`<0x00>`..`<0xFF>` for characters outside the vocabulary) and
//!   fused unknowns, whose merges are recovered from the vocabulary: every split of a piece
//!   into two pieces, ranked by the merged piece's score;
//! - around it, one of three shapes picked by `general.architecture` (nothing in the
//!   tokenizer metadata tells them apart), see [`Flavour`].
use std::collections::HashMap;
use tokenizers::decoders::{
    byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence, strip::Strip,
};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{prepend::Prepend, replace::Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{DecoderWrapper, SplitDelimiterBehavior};

/// SentencePiece's word-boundary mark, which stands for a space inside pieces.
const SPACE_MARK: char = '\u{2581}';

/// The shape transformers gives a SentencePiece vocabulary, by model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Llama 1/2, Mistral and the rest: a `Metaspace` pre-tokenizer that marks spaces and
    /// prepends one mark to the text's first piece; the decoder strips that leading space.
    Llama,
    /// Phi-3: the same, except that the mark is prepended and spaces replaced by a normalizer,
    /// which differs on text that starts with a space or an added token.
    Phi3,
    /// Gemma 1/2/3: spaces replaced by marks, nothing prepended or stripped; whitespace-only
    /// pieces, which llama.cpp writes with real spaces, respelled with marks; merges ranked by
    /// position in the file rather than by score.
    Gemma,
}

impl Flavour {
    /// The flavour for a GGUF's `general.architecture`.
    pub fn of(architecture: Option<&str>) -> Self {
        match architecture {
            Some("gemma" | "gemma2" | "gemma3") => Flavour::Gemma,
            Some("phi3") => Flavour::Phi3,
            _ => Flavour::Llama,
        }
    }
}

/// The tokenizer for SentencePiece `pieces` and their `scores` (same length), without added
/// tokens or post-processor (the caller adds those for every tokenizer kind). `unk` is the
/// unknown token's text, which only Gemma's model refers to.
pub fn build(
    pieces: &[&str],
    scores: &[f32],
    flavour: Flavour,
    unk: Option<&str>,
) -> Result<tokenizers::Tokenizer, String> {
    let pieces: Vec<String> = pieces
        .iter()
        .map(|p| match flavour {
            Flavour::Gemma => respell_whitespace(p),
            _ => p.to_string(),
        })
        .collect();
    // Later duplicates win, as in a Python dict built in id order.
    let vocab: HashMap<String, u32> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), i as u32))
        .collect();
    let rank: Vec<f64> = match flavour {
        Flavour::Gemma => (0..pieces.len()).map(|i| -(i as f64)).collect(),
        _ => scores.iter().map(|&s| f64::from(s)).collect(),
    };
    let merges = recover_merges(&pieces, &rank, &vocab);
    let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let (Flavour::Gemma, Some(unk)) = (flavour, unk) {
        bpe = bpe.unk_token(unk.to_string());
    }
    let bpe = bpe
        .build()
        .map_err(|e| format!("cannot build the SentencePiece BPE: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mark = SPACE_MARK.to_string();
    let spaces_to_marks =
        || Replace::new(" ", mark.as_str()).map_err(|e| format!("bad normalizer: {e}"));
    match flavour {
        Flavour::Llama => {
            tok.with_pre_tokenizer(Some(Metaspace::new(
                SPACE_MARK,
                PrependScheme::First,
                false,
            )));
        }
        Flavour::Phi3 => {
            tok.with_normalizer(Some(NormSequence::new(vec![
                Prepend::new(mark.clone()).into(),
                spaces_to_marks()?.into(),
            ])));
        }
        Flavour::Gemma => {
            tok.with_normalizer(Some(spaces_to_marks()?));
            // Never splits (the normalizer leaves no space), but it is what transformers has.
            let split = Split::new(
                SplitPattern::String(" ".into()),
                SplitDelimiterBehavior::MergedWithPrevious,
                false,
            )
            .map_err(|e| format!("bad pre-tokenizer: {e}"))?;
            tok.with_pre_tokenizer(Some(split));
        }
    }
    let mut steps: Vec<DecoderWrapper> = vec![
        Replace::new(mark.as_str(), " ")
            .map_err(|e| format!("bad decoder: {e}"))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if flavour != Flavour::Gemma {
        // The space the prepended mark decodes to.
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(steps)));
    Ok(tok)
}

/// A piece of whitespace only (in Python's sense) with a space in it, as llama.cpp writes
/// Gemma's runs of spaces, spelled with one mark per character as the vocabulary is used.
fn respell_whitespace(piece: &str) -> String {
    let python_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    if piece.contains(' ') && piece.chars().all(python_space) {
        SPACE_MARK.to_string().repeat(piece.chars().count())
    } else {
        piece.to_string()
    }
}

/// The merges a vocabulary implies: each piece split at every character boundary into two
/// pieces of the vocabulary, the splits of one piece in id order of their halves, all ranked
/// best first by the merged piece's `rank`, then by the lengths of the halves (longer first).
/// Ties keep vocabulary order, which the stable sort preserves. Pieces appearing twice count
/// once, at their first position with their last rank.
fn recover_merges(
    pieces: &[String],
    rank: &[f64],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut order: Vec<(&str, f64)> = Vec::with_capacity(pieces.len());
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(pieces.len());
    for (p, &r) in pieces.iter().zip(rank) {
        match seen.get(p.as_str()) {
            Some(&at) => order[at].1 = r,
            None => {
                seen.insert(p, order.len());
                order.push((p, r));
            }
        }
    }
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        rank: f64,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Merge> = Vec::new();
    for (piece, r) in order {
        let mut local: Vec<Merge> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
            .map(|(left, right)| Merge {
                left,
                right,
                rank: r,
                left_chars: left.chars().count(),
                right_chars: right.chars().count(),
            })
            .collect();
        local.sort_by_key(|m| (vocab[m.left], vocab[m.right]));
        merges.extend(local);
    }
    merges.sort_by(|a, b| {
        b.rank
            .total_cmp(&a.rank)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_string(), m.right.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merges_of(pieces: &[&str], scores: &[f64]) -> Vec<(String, String)> {
        let pieces: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
        let vocab = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        recover_merges(&pieces, scores, &vocab)
    }

    #[test]
    fn merges_rank_by_score_then_by_longer_halves() {
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        // "abc" splits as a+bc and ab+c; both carry abc's score, so the longer left half
        // goes first. "ab" scores higher than "abc" and so merges first.
        let m = merges_of(
            &["a", "b", "c", "ab", "bc", "abc"],
            &[0., 0., 0., -1., -3., -2.],
        );
        assert_eq!(
            m,
            vec![
                pair("a", "b"),
                pair("ab", "c"),
                pair("a", "bc"),
                pair("b", "c")
            ]
        );
    }

    #[test]
    fn whitespace_runs_are_respelled_with_marks() {
        assert_eq!(respell_whitespace("   "), "▁▁▁");
        assert_eq!(respell_whitespace(" \t"), "▁▁");
        assert_eq!(respell_whitespace("\n\n"), "\n\n");
        assert_eq!(respell_whitespace(" a"), " a");
    }
}
