//! Training data: files → fixed-length token sequences → shuffled batches.
//!
//! Input formats:
//! - **Text** (any file not ending in `.jsonl`/`.json`): the whole file is one document.
//! - **JSONL text** (`{"text": "..."}` per line): each line is one document.
//! - **Prompt/completion** (`{"prompt": "...", "completion": "..."}` per line): one sequence per
//!   line, loss only on the completion.
//! - **Chat** (`{"messages": [{"role", "content"}, …]}`), **ShareGPT**
//!   (`{"conversations": [{"from", "value"}, …]}`) and **Alpaca**
//!   (`{"instruction", "input", "output"}`): one sequence per line, rendered and tokenized by
//!   the model's chat template ([`crate::chat::ChatTemplate`]), loss only on the assistant's
//!   tokens (end-of-turn token included) unless [`ReadOptions::train_on_prompt`]. A record
//!   longer than `seq_len` is cut to it, or dropped with [`ReadOptions::drop_long`].
//!
//! BOS follows the tokenizer, as in transformers: when its post-processor adds a BOS
//! ([`Tokenizer::adds_bos`]), each text document and each prompt starts with one; chat records
//! get exactly what their template writes.
//!
//! Documents are tokenized without other special tokens, joined with the tokenizer's EOS token
//! (when it has one), concatenated and cut into `seq_len` windows ("packing", as transformers'
//! `run_clm.py`). A final window shorter than `seq_len` is kept, padded, when it holds at least
//! half of `seq_len` tokens, and dropped otherwise — so small corpora do not lose up to a whole
//! window, while a few stray tokens do not become a mostly-padding sequence. Labels follow the
//! Hugging Face convention: equal to the inputs (the model shifts them) with [`IGNORE_INDEX`]
//! where no loss is wanted.
//!
//! Shuffling uses a SplitMix64 generator written here, so a seed gives the same split and batch
//! order on every platform and crate version.
use super::records::{self, RecordKind};
use crate::chat::ChatTemplate;
use crate::error::{OctetError, Result};
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::Tensor;

/// Label value that excludes a position from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// How a data file is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataFormat {
    /// Plain text: the whole file is one document.
    Text,
    /// JSON Lines with one document per line in the string field `field`.
    JsonlText {
        /// Name of the field holding the text.
        field: String,
    },
    /// JSON Lines with string fields `prompt` and `completion`; loss on the completion only.
    PromptCompletion,
    /// JSON Lines `{"messages": [{"role", "content"}, …]}`.
    Chat,
    /// JSON Lines `{"conversations": [{"from", "value"}, …]}`.
    ShareGpt,
    /// JSON Lines `{"instruction", "input", "output"}`.
    Alpaca,
}

impl DataFormat {
    /// The format of `path`, guessed as [`Dataset::load`] does from the first non-empty line
    /// of a `.jsonl`/`.json` file: `messages` is chat, `conversations` ShareGPT, `instruction`
    /// with `output` Alpaca, `prompt` with `completion` prompt/completion, anything else JSONL
    /// text (field `text`); other files are plain text.
    ///
    /// A folder is read as its JSON Lines shards ([`data_files`]); its format is the first
    /// shard's.
    pub fn detect(path: &Path) -> Result<Self> {
        let files = data_files(path)?;
        let first = &files[0];
        if !has_json_extension(first) {
            return Ok(Self::Text);
        }
        // Only the first record is read: the file may be far larger than memory.
        detect_json_lines(first, &first_record_text(first)?)
    }
}

impl FromStr for DataFormat {
    type Err = OctetError;

    /// Parses `text`, `jsonl` (field `text`), `jsonl:FIELD`, `prompt-completion`, `chat`,
    /// `sharegpt` or `alpaca`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "text" | "txt" => return Ok(Self::Text),
            "jsonl" => {
                return Ok(Self::JsonlText {
                    field: "text".into(),
                })
            }
            "prompt-completion" | "prompt_completion" => return Ok(Self::PromptCompletion),
            "chat" | "messages" => return Ok(Self::Chat),
            "sharegpt" => return Ok(Self::ShareGpt),
            "alpaca" => return Ok(Self::Alpaca),
            _ => {}
        }
        match s.split_once(':') {
            Some((kind, field)) if kind.eq_ignore_ascii_case("jsonl") && !field.is_empty() => {
                Ok(Self::JsonlText {
                    field: field.to_string(),
                })
            }
            _ => Err(OctetError::InvalidArgument(format!(
                "unknown data format {s:?}: expected text, jsonl, jsonl:FIELD, \
                 prompt-completion, chat, sharegpt or alpaca"
            ))),
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text => f.write_str("text"),
            Self::JsonlText { field } => write!(f, "jsonl:{field}"),
            Self::PromptCompletion => f.write_str("prompt-completion"),
            Self::Chat => f.write_str("chat"),
            Self::ShareGpt => f.write_str("sharegpt"),
            Self::Alpaca => f.write_str("alpaca"),
        }
    }
}

impl DataFormat {
    /// The conversational layout of this format, if it is one (rendered by a chat template).
    pub fn record_kind(&self) -> Option<RecordKind> {
        match self {
            Self::Chat => Some(RecordKind::Chat),
            Self::ShareGpt => Some(RecordKind::ShareGpt),
            Self::Alpaca => Some(RecordKind::Alpaca),
            _ => None,
        }
    }
}

/// How a data file is read beyond its sequence length.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions<'a> {
    /// The format; detected from the file when `None`.
    pub format: Option<&'a DataFormat>,
    /// The chat template conversational formats are rendered with (required for them).
    pub template: Option<&'a ChatTemplate>,
    /// Loss on every token of a conversation, not only the assistant's.
    pub train_on_prompt: bool,
    /// Drop conversational and prompt/completion records longer than `seq_len` instead of
    /// truncating them.
    pub drop_long: bool,
}

/// One training example of exactly `seq_len` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids (padding included).
    pub input_ids: Vec<i64>,
    /// Equal to `input_ids`, except [`IGNORE_INDEX`] where no loss is taken (prompt, padding).
    /// Not shifted: the model shifts labels itself.
    pub labels: Vec<i64>,
}

/// What loading a file produced, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadStats {
    /// The format the file was read as.
    pub format: DataFormat,
    /// Non-empty documents (text format: 1) or prompt/completion records read.
    pub documents: usize,
    /// Tokens produced, EOS separators included, padding excluded.
    pub tokens: usize,
    /// Prompt/completion or conversational records cut to `seq_len`.
    pub truncated: usize,
    /// Records longer than `seq_len` dropped ([`ReadOptions::drop_long`]).
    pub dropped_long: usize,
    /// Prompt/completion records dropped because no completion token fit in `seq_len`.
    pub dropped: usize,
}

impl LoadStats {
    /// Nothing cut or dropped yet from `documents` records of `format`.
    pub(super) fn new(format: DataFormat, documents: usize) -> Self {
        Self {
            format,
            documents,
            tokens: 0,
            truncated: 0,
            dropped_long: 0,
            dropped: 0,
        }
    }
}

/// A tokenized data file split into training and held-out sequences.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Training sequences, shuffled.
    pub train: Vec<Sequence>,
    /// Held-out sequences for evaluation.
    pub eval: Vec<Sequence>,
    /// What loading produced.
    pub stats: LoadStats,
    /// The segment ids of each training sequence once packed ([`Dataset::pack_train`]): 1, 2,
    /// … for its records, 0 for padding; `None`: one record (or one window of text) each.
    pub segments: Option<Vec<Vec<i64>>>,
}

impl Dataset {
    /// Reads `path` (format detected from it unless `format` is given), tokenizes it into
    /// sequences of `seq_len`, shuffles them with `seed` and holds out `eval_fraction` of them
    /// (at least one when there are two or more and the fraction is positive; never all).
    pub fn load(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        seq_len: usize,
        eval_fraction: f64,
        seed: u64,
        format: Option<DataFormat>,
    ) -> Result<Self> {
        let read = ReadOptions {
            format: format.as_ref(),
            ..ReadOptions::default()
        };
        Self::load_with(path, tokenizer, seq_len, eval_fraction, seed, &read)
    }

    /// [`Dataset::load`] with every reading option.
    pub fn load_with(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        seq_len: usize,
        eval_fraction: f64,
        seed: u64,
        read: &ReadOptions,
    ) -> Result<Self> {
        check_fraction(eval_fraction)?;
        let (sequences, stats) = load_sequences_with(path.as_ref(), tokenizer, seq_len, read)?;
        let (train, eval) = split(sequences, eval_fraction, seed)?;
        Ok(Self {
            train,
            eval,
            stats,
            segments: None,
        })
    }

    /// Packs the training sequences several records to a sequence
    /// ([`super::pack::pack`]; `pad_id` is what they are padded with, see [`pad_id`]) and
    /// keeps their segment ids. The held-out sequences stay one record each.
    pub fn pack_train(&mut self, pad_id: i64) -> super::pack::PackStats {
        let (train, segments, stats) = super::pack::pack(&self.train, pad_id);
        self.train = train;
        self.segments = Some(segments);
        stats
    }
}

/// The chat template data of `formats` is rendered with: the model's own (or `override_file`),
/// loaded only when one of the formats is conversational.
pub fn template_for(
    formats: &[&DataFormat],
    model: &Path,
    override_file: Option<&Path>,
    tokenizer: &Tokenizer,
) -> Result<Option<ChatTemplate>> {
    formats
        .iter()
        .any(|f| f.record_kind().is_some())
        .then(|| ChatTemplate::load(model, override_file, tokenizer.clone()))
        .transpose()
}

/// The id sequences are padded with: the tokenizer's EOS, or 0 without one.
pub fn pad_id(tokenizer: &Tokenizer) -> i64 {
    tokenizer.eos_id().map_or(0, i64::from)
}

/// Shuffles `sequences` with `seed` and splits off `eval_fraction` of them as (train, eval).
pub fn split<T>(mut sequences: Vec<T>, eval_fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    check_fraction(eval_fraction)?;
    let n = sequences.len();
    shuffle(&mut sequences, &mut SplitMix64::new(seed));
    let n_eval = if eval_fraction > 0.0 && n >= 2 {
        ((n as f64 * eval_fraction).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let train = sequences.split_off(n_eval);
    Ok((train, sequences))
}

pub(super) fn check_fraction(eval_fraction: f64) -> Result<()> {
    if !(0.0..1.0).contains(&eval_fraction) {
        return Err(OctetError::InvalidArgument(format!(
            "eval fraction must be in [0, 1), got {eval_fraction}"
        )));
    }
    Ok(())
}

/// Reads and tokenizes `path` into sequences of `seq_len`, in file order (no shuffling).
pub fn load_sequences(
    path: &Path,
    tokenizer: &Tokenizer,
    seq_len: usize,
    format: Option<DataFormat>,
) -> Result<(Vec<Sequence>, LoadStats)> {
    let read = ReadOptions {
        format: format.as_ref(),
        ..ReadOptions::default()
    };
    load_sequences_with(path, tokenizer, seq_len, &read)
}

/// [`load_sequences`] with every reading option.
pub fn load_sequences_with(
    path: &Path,
    tokenizer: &Tokenizer,
    seq_len: usize,
    read: &ReadOptions,
) -> Result<(Vec<Sequence>, LoadStats)> {
    if seq_len < 2 {
        return Err(OctetError::InvalidArgument(format!(
            "seq_len must be at least 2 (one prediction needs two tokens), got {seq_len}"
        )));
    }
    let files = data_files(path)?;
    let format = match read.format {
        Some(f) => f.clone(),
        None => DataFormat::detect(path)?,
    };
    let eos = tokenizer.eos_id().map(i64::from);
    match &format {
        DataFormat::Text => {
            if path.is_dir() {
                return Err(OctetError::bad_file(
                    path,
                    "a data folder is read as JSON Lines shards, not as plain text (give one \
                     text file, or a --format of JSON Lines)",
                ));
            }
            let text = read_text(path)?;
            if text.trim().is_empty() {
                return Err(no_text(path, "the file holds only whitespace"));
            }
            let docs = [text.as_str()];
            pack(path, tokenizer, &docs, seq_len, eos, format.clone())
        }
        DataFormat::JsonlText { field } => {
            let mut docs = Vec::new();
            for_each_record(&files, |file, line_no, record| {
                let value = string_field(file, line_no, &record, field)?;
                if !value.trim().is_empty() {
                    docs.push(value);
                }
                Ok(())
            })?;
            if docs.is_empty() {
                return Err(no_text(path, &format!("every {field:?} field is empty")));
            }
            let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
            pack(path, tokenizer, &docs, seq_len, eos, format.clone())
        }
        DataFormat::PromptCompletion => {
            prompt_completion(path, &files, tokenizer, seq_len, eos, read.drop_long)
        }
        DataFormat::Chat | DataFormat::ShareGpt | DataFormat::Alpaca => {
            conversations(path, &files, &format, seq_len, eos, read)
        }
    }
}

/// Cuts a token stream into `seq_len` windows under the module's tail rule (a final window is
/// kept, padded with `pad_id`, when it holds at least half of `seq_len` and at least 2 tokens).
pub fn chunk_tokens(tokens: &[i64], seq_len: usize, pad_id: i64) -> Vec<Sequence> {
    let min_tail = min_tail(seq_len);
    tokens
        .chunks(seq_len.max(1))
        .filter(|c| c.len() == seq_len || c.len() >= min_tail)
        .map(|c| padded(c.to_vec(), c.to_vec(), seq_len, pad_id))
        .collect()
}

fn min_tail(seq_len: usize) -> usize {
    seq_len.div_ceil(2).max(2)
}

/// Pads ids with `pad_id` and labels with IGNORE_INDEX up to `seq_len`.
fn padded(mut ids: Vec<i64>, mut labels: Vec<i64>, seq_len: usize, pad_id: i64) -> Sequence {
    ids.resize(seq_len, pad_id);
    labels.resize(seq_len, IGNORE_INDEX);
    Sequence {
        input_ids: ids,
        labels,
    }
}

fn encode_all(tokenizer: &Tokenizer, docs: &[&str]) -> Result<Vec<Vec<u32>>> {
    first_error(
        docs.par_iter()
            .map(|d| tokenizer.encode_with_bos(d))
            .collect(),
    )
}

/// The results in input order, or the error of the earliest record that failed: a parallel
/// `collect::<Result<_>>()` returns whichever error a thread met first, so the line a user
/// is pointed to would change from run to run.
fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

fn pack(
    path: &Path,
    tokenizer: &Tokenizer,
    docs: &[&str],
    seq_len: usize,
    eos: Option<i64>,
    format: DataFormat,
) -> Result<(Vec<Sequence>, LoadStats)> {
    let (sequences, n_tokens) = encode_documents(tokenizer, docs, seq_len, eos)?;
    if sequences.is_empty() {
        return Err(OctetError::bad_file(
            path,
            format!(
                "too few tokens: the file gives {n_tokens} tokens, but one sequence of seq_len \
                 {seq_len} needs at least {}",
                min_tail(seq_len)
            ),
        ));
    }
    let stats = LoadStats {
        tokens: n_tokens,
        ..LoadStats::new(format, docs.len())
    };
    Ok((sequences, stats))
}

/// Documents tokenized, joined with EOS and cut into `seq_len` windows ([`chunk_tokens`]);
/// returns the windows and the tokens they were cut from.
pub(super) fn encode_documents(
    tokenizer: &Tokenizer,
    docs: &[&str],
    seq_len: usize,
    eos: Option<i64>,
) -> Result<(Vec<Sequence>, usize)> {
    let encoded = encode_all(tokenizer, docs)?;
    let mut tokens: Vec<i64> = Vec::with_capacity(encoded.iter().map(Vec::len).sum::<usize>());
    for (i, doc) in encoded.iter().enumerate() {
        // EOS between documents, so the model learns where one ends and the next begins.
        if i > 0 {
            tokens.extend(eos);
        }
        tokens.extend(doc.iter().map(|&t| i64::from(t)));
    }
    Ok((
        chunk_tokens(&tokens, seq_len, eos.unwrap_or(0)),
        tokens.len(),
    ))
}

fn prompt_completion(
    path: &Path,
    files: &[PathBuf],
    tokenizer: &Tokenizer,
    seq_len: usize,
    eos: Option<i64>,
    drop_long: bool,
) -> Result<(Vec<Sequence>, LoadStats)> {
    let mut pairs = Vec::new();
    for_each_record(files, |file, line_no, record| {
        pairs.push(prompt_completion_of(file, line_no, &record)?);
        Ok(())
    })?;
    if pairs.is_empty() {
        return Err(no_text(path, "no prompt/completion records"));
    }
    let (sequences, stats) = encode_pairs(tokenizer, &pairs, seq_len, eos, drop_long)?;
    if sequences.is_empty() {
        return Err(no_text(
            path,
            &format!(
                "none of the {} records has a completion token within seq_len {seq_len} \
                 (prompts too long, or completions empty with no EOS token)",
                stats.documents
            ),
        ));
    }
    Ok((sequences, stats))
}

/// The prompt and completion of a record.
pub(super) fn prompt_completion_of(
    file: &Path,
    line: usize,
    record: &serde_json::Value,
) -> Result<(String, String)> {
    Ok((
        string_field(file, line, record, "prompt")?,
        string_field(file, line, record, "completion")?,
    ))
}

/// Prompt/completion pairs as sequences of `seq_len` (loss on the completion and EOS), in
/// order; those without a trained token are dropped and counted.
pub(super) fn encode_pairs(
    tokenizer: &Tokenizer,
    pairs: &[(String, String)],
    seq_len: usize,
    eos: Option<i64>,
    drop_long: bool,
) -> Result<(Vec<Sequence>, LoadStats)> {
    let encoded: Vec<(Vec<u32>, Vec<u32>)> = first_error(
        pairs
            .par_iter()
            .map(|(p, c)| Ok((tokenizer.encode_with_bos(p)?, tokenizer.encode(c)?)))
            .collect(),
    )?;
    let pad_id = eos.unwrap_or(0);
    let mut stats = LoadStats::new(DataFormat::PromptCompletion, encoded.len());
    let mut sequences = Vec::with_capacity(encoded.len());
    for (prompt, completion) in encoded {
        let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        let mut labels = vec![IGNORE_INDEX; ids.len()];
        for t in completion.iter().map(|&t| i64::from(t)).chain(eos) {
            ids.push(t);
            labels.push(t);
        }
        sequences.extend(fit_record(
            ids, labels, seq_len, pad_id, drop_long, &mut stats,
        ));
    }
    Ok((sequences, stats))
}

/// One record as a sequence of `seq_len`: cut to it (or dropped with `drop_long`) when
/// longer, padded when shorter; `None` when no labelled token is left.
fn fit_record(
    mut ids: Vec<i64>,
    mut labels: Vec<i64>,
    seq_len: usize,
    pad_id: i64,
    drop_long: bool,
    stats: &mut LoadStats,
) -> Option<Sequence> {
    stats.tokens += ids.len();
    if ids.len() > seq_len {
        if drop_long {
            stats.dropped_long += 1;
            return None;
        }
        stats.truncated += 1;
        ids.truncate(seq_len);
        labels.truncate(seq_len);
    }
    // The label at position 0 is never predicted (the model shifts), so a record needs a
    // labelled position after it to contribute any loss.
    if labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
        stats.dropped += 1;
        return None;
    }
    Some(padded(ids, labels, seq_len, pad_id))
}

/// Chat, ShareGPT or Alpaca records, one sequence each, through the chat template; labels on
/// the assistant's tokens (all tokens with `train_on_prompt`).
fn conversations(
    path: &Path,
    files: &[PathBuf],
    format: &DataFormat,
    seq_len: usize,
    eos: Option<i64>,
    read: &ReadOptions,
) -> Result<(Vec<Sequence>, LoadStats)> {
    let kind = format.record_kind().expect("a conversational format");
    let Some(template) = read.template else {
        return Err(OctetError::InvalidArgument(format!(
            "{}: {format} records need a chat template to be rendered with",
            path.display()
        )));
    };
    let mut conversations = Vec::new();
    for_each_record(files, |file, line, record| {
        let messages = conversation_of(kind, file, line, &record)?;
        conversations.push((file.to_path_buf(), line, messages));
        Ok(())
    })?;
    if conversations.is_empty() {
        return Err(no_text(path, "no records"));
    }
    let (sequences, stats) =
        encode_conversations(template, format, &conversations, seq_len, eos, read)?;
    if sequences.is_empty() {
        return Err(no_text(
            path,
            &format!(
                "none of the {} records has an assistant token within seq_len {seq_len}",
                stats.documents
            ),
        ));
    }
    Ok((sequences, stats))
}

fn at_line(file: &Path, line: usize, e: &dyn fmt::Display) -> OctetError {
    OctetError::bad_file(file, format!("line {line}: {e}"))
}

/// The messages of a conversational record.
pub(super) fn conversation_of(
    kind: RecordKind,
    file: &Path,
    line: usize,
    record: &serde_json::Value,
) -> Result<Vec<crate::chat::Message>> {
    records::messages(kind, record).map_err(|e| at_line(file, line, &e))
}

/// Conversations (each with its file and line) rendered and tokenized by `template`, as
/// sequences of `seq_len` in order; those without a trained token are dropped and counted.
pub(super) fn encode_conversations(
    template: &ChatTemplate,
    format: &DataFormat,
    conversations: &[(PathBuf, usize, Vec<crate::chat::Message>)],
    seq_len: usize,
    eos: Option<i64>,
    read: &ReadOptions,
) -> Result<(Vec<Sequence>, LoadStats)> {
    let encoded: Vec<_> = first_error(
        conversations
            .par_iter()
            .map(|(file, line, m)| {
                template
                    .encode_with_assistant_mask(m)
                    .map_err(|e| at_line(file, *line, &e))
            })
            .collect(),
    )?;
    let mut stats = LoadStats::new(format.clone(), encoded.len());
    let pad_id = eos.unwrap_or(0);
    let mut sequences = Vec::with_capacity(encoded.len());
    for chat in encoded {
        let ids: Vec<i64> = chat.ids.iter().map(|&t| i64::from(t)).collect();
        let labels = ids
            .iter()
            .zip(&chat.assistant_mask)
            .map(|(&t, &m)| {
                if m || read.train_on_prompt {
                    t
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        sequences.extend(fit_record(
            ids,
            labels,
            seq_len,
            pad_id,
            read.drop_long,
            &mut stats,
        ));
    }
    Ok((sequences, stats))
}

fn no_text(path: &Path, why: &str) -> OctetError {
    OctetError::bad_file(path, format!("no usable text: {why}"))
}

/// The files of `path`: itself, or, for a folder, the JSON Lines shards directly in it
/// (`*.jsonl`, `*.json`) sorted by name, read as one file in that order. Other files in the
/// folder are not data and are skipped.
pub fn data_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| OctetError::io(path, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let p = entry.map_err(|e| OctetError::io(path, e))?.path();
        if p.is_file() && has_json_extension(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(OctetError::bad_file(
            path,
            "a data folder must hold JSON Lines shards (*.jsonl or *.json); it holds none",
        ));
    }
    // By name, bytewise, so the order is the same on every platform and rank.
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Calls `f` with every record of `files` in order, with its file and 1-based line; stops at
/// the first error.
fn for_each_record(
    files: &[PathBuf],
    mut f: impl FnMut(&Path, usize, serde_json::Value) -> Result<()>,
) -> Result<()> {
    for file in files {
        let text = read_text(file)?;
        for (line, record) in json_lines(file, &text) {
            f(file, line, record?)?;
        }
    }
    Ok(())
}

pub(super) fn has_json_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"))
}

/// The file as UTF-8 (a leading BOM removed); an empty file is an error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| OctetError::io(path, e))?;
    if bytes.is_empty() {
        return Err(OctetError::bad_file(path, "the file is empty"));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        OctetError::bad_file(
            path,
            format!("line {line}: not UTF-8 text (invalid byte at offset {at})"),
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// The text of `path` up to its first non-blank line (a leading BOM removed), so that line
/// keeps its number.
fn first_record_text(path: &Path) -> Result<String> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| OctetError::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut text = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| OctetError::io(path, e))?;
        if n == 0 {
            break;
        }
        let at = 1 + text.matches('\n').count();
        let l = std::str::from_utf8(&line).map_err(|e| {
            OctetError::bad_file(
                path,
                format!(
                    "line {at}: not UTF-8 text (invalid byte at column {})",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        text.push_str(if text.is_empty() {
            l.trim_start_matches('\u{feff}')
        } else {
            l
        });
        if !l.trim().is_empty() {
            break;
        }
    }
    if text.is_empty() {
        return Err(OctetError::bad_file(path, "the file is empty"));
    }
    Ok(text)
}

/// Non-blank lines parsed as JSON, with their 1-based line numbers.
fn json_lines<'a>(
    path: &'a Path,
    text: &'a str,
) -> impl Iterator<Item = (usize, Result<serde_json::Value>)> + 'a {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(move |(i, line)| {
            let parsed = serde_json::from_str(line).map_err(|e| {
                OctetError::bad_file(
                    path,
                    format!(
                        "line {}: not valid JSON ({e}); expected JSON Lines, one object per line",
                        i + 1
                    ),
                )
            });
            (i + 1, parsed)
        })
}

fn detect_json_lines(path: &Path, text: &str) -> Result<DataFormat> {
    let Some((_, first)) = json_lines(path, text).next() else {
        return Err(no_text(path, "the file holds only whitespace"));
    };
    let first = first?;
    let has = |k: &str| first.get(k).is_some();
    Ok(if has("messages") {
        DataFormat::Chat
    } else if has("conversations") {
        DataFormat::ShareGpt
    } else if has("instruction") && has("output") {
        DataFormat::Alpaca
    } else if has("prompt") && has("completion") {
        DataFormat::PromptCompletion
    } else {
        DataFormat::JsonlText {
            field: "text".into(),
        }
    })
}

pub(super) fn string_field(
    path: &Path,
    line_no: usize,
    record: &serde_json::Value,
    field: &str,
) -> Result<String> {
    let Some(obj) = record.as_object() else {
        return Err(OctetError::bad_file(
            path,
            format!(
                "line {line_no}: expected a JSON object, found {}",
                json_kind(record)
            ),
        ));
    };
    match obj.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(OctetError::bad_file(
            path,
            format!(
                "line {line_no}: field {field:?} is {}, not a string",
                json_kind(other)
            ),
        )),
        None => Err(OctetError::bad_file(
            path,
            format!("line {line_no}: no {field:?} field"),
        )),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and fixed forever, unlike `rand`'s
/// generators whose streams may change between versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift; the bias, < n / 2^64, is irrelevant here.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// SplitMix64's output function, also used to derive independent per-epoch seeds.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fisher–Yates.
fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

/// Where a [`Batcher`] stands; saving it and [`Batcher::restore`]-ing it replays the exact
/// batch order of an uninterrupted run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// Completed passes over the data.
    pub epoch: u64,
    /// Position of the next sequence in this epoch's permutation.
    pub cursor: usize,
    /// The seed all permutations derive from.
    pub seed: u64,
    /// Streamed data ([`super::stream`]): sequences already taken from the unit of records
    /// at `cursor`, which then counts units, not sequences. Always 0 for data in memory.
    #[serde(default)]
    pub within: usize,
}

/// One micro-batch, on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// `[batch, seq_len]` int64 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq_len]` int64 labels ([`IGNORE_INDEX`] where no loss is taken).
    pub labels: Tensor,
    /// `[batch, seq_len]` int64 record index of each token within its row, for rows that
    /// hold several records (packing: attention stays within a record); `None` for one
    /// record (or one stream of text) per row.
    pub segment_ids: Option<Tensor>,
}

/// Yields batches of sequence indices in a seeded permutation that is redrawn every epoch.
///
/// Batches always hold `batch_size` sequences: a batch that runs past the end of an epoch is
/// completed from the next epoch's permutation, so every sequence is seen once per epoch and
/// tensor shapes never change.
#[derive(Debug, Clone)]
pub struct Batcher {
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    cursor: usize,
    perm: Vec<usize>,
}

impl Batcher {
    /// A batcher over `n_sequences` sequences, at the start of epoch 0.
    pub fn new(n_sequences: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::restore(
            BatcherState {
                epoch: 0,
                cursor: 0,
                seed,
                within: 0,
            },
            n_sequences,
            batch_size,
        )
    }

    /// A batcher continuing from `state`; `n_sequences` must be the count it was made for.
    pub fn restore(state: BatcherState, n_sequences: usize, batch_size: usize) -> Result<Self> {
        if n_sequences == 0 {
            return Err(OctetError::InvalidArgument(
                "cannot batch an empty set of sequences".into(),
            ));
        }
        if batch_size == 0 {
            return Err(OctetError::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        if state.cursor >= n_sequences {
            return Err(OctetError::InvalidArgument(format!(
                "batcher state cursor {} is outside a data set of {n_sequences} sequences \
                 (was the data changed since the checkpoint?)",
                state.cursor
            )));
        }
        Ok(Self {
            n: n_sequences,
            batch_size,
            seed: state.seed,
            epoch: state.epoch,
            cursor: state.cursor,
            perm: permutation(n_sequences, state.seed, state.epoch),
        })
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> BatcherState {
        BatcherState {
            epoch: self.epoch,
            cursor: self.cursor,
            seed: self.seed,
            within: 0,
        }
    }

    /// Completed passes over the data.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches per pass over the data (the last one may borrow from the next epoch).
    pub fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch_size)
    }

    /// Indices of the next batch.
    pub fn next_indices(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.batch_size);
        while out.len() < self.batch_size {
            out.push(self.perm[self.cursor]);
            self.cursor += 1;
            // Roll over eagerly so `state()` never holds an exhausted cursor.
            if self.cursor == self.n {
                self.epoch += 1;
                self.cursor = 0;
                self.perm = permutation(self.n, self.seed, self.epoch);
            }
        }
        out
    }

    /// The next batch as `(input_ids, labels)`, both `[batch_size, seq_len]` int64 on the CPU.
    /// `data` must be the sequences this batcher was made for.
    pub fn next_batch(&mut self, data: &[Sequence]) -> Result<(Tensor, Tensor)> {
        let b = self.next(data)?;
        Ok((b.input_ids, b.labels))
    }

    /// The next batch (see [`Batcher::next_batch`]).
    pub fn next(&mut self, data: &[Sequence]) -> Result<Batch> {
        self.next_with(data, None)
    }

    /// The next batch, with the segment ids of its rows when the sequences are packed
    /// (`segments`, one row per sequence of `data`).
    pub fn next_with(&mut self, data: &[Sequence], segments: Option<&[Vec<i64>]>) -> Result<Batch> {
        if data.len() != self.n || segments.is_some_and(|s| s.len() != self.n) {
            return Err(OctetError::ShapeMismatch {
                what: "sequences given to the batcher".into(),
                expected: self.n.to_string(),
                found: data.len().to_string(),
            });
        }
        let idx = self.next_indices();
        batch_of(&idx, data, segments)
    }
}

/// The rows `idx` of `data` (with their `segments` when packed) as one batch.
pub(super) fn batch_of(
    idx: &[usize],
    data: &[Sequence],
    segments: Option<&[Vec<i64>]>,
) -> Result<Batch> {
    {
        let seq_len = data[idx[0]].input_ids.len();
        let mut ids = Vec::with_capacity(idx.len() * seq_len);
        let mut labels = Vec::with_capacity(idx.len() * seq_len);
        let mut segs = Vec::with_capacity(if segments.is_some() {
            idx.len() * seq_len
        } else {
            0
        });
        for &i in idx {
            let s = &data[i];
            if s.input_ids.len() != seq_len || s.labels.len() != seq_len {
                return Err(OctetError::ShapeMismatch {
                    what: format!("sequence {i}"),
                    expected: format!("{seq_len} ids and labels"),
                    found: format!("{} ids, {} labels", s.input_ids.len(), s.labels.len()),
                });
            }
            ids.extend_from_slice(&s.input_ids);
            labels.extend_from_slice(&s.labels);
            if let Some(all) = segments {
                if all[i].len() != seq_len {
                    return Err(OctetError::ShapeMismatch {
                        what: format!("segment ids of sequence {i}"),
                        expected: seq_len.to_string(),
                        found: all[i].len().to_string(),
                    });
                }
                segs.extend_from_slice(&all[i]);
            }
        }
        let shape = [idx.len() as i64, seq_len as i64];
        Ok(Batch {
            input_ids: Tensor::f_from_slice(&ids)?.f_reshape(shape)?,
            labels: Tensor::f_from_slice(&labels)?.f_reshape(shape)?,
            segment_ids: segments
                .map(|_| Tensor::f_from_slice(&segs)?.f_reshape(shape))
                .transpose()?,
        })
    }
}

impl Batcher {
    /// This rank's part of the next global batch, for data-parallel training: every rank
    /// draws the same batch of `batch_size` sequences (the global batch) and keeps the
    /// `rank`-th of `world` equal slices, so the data order and the saved position are the
    /// same on every rank.
    /// `segments`: the sequences' segment ids when they are packed.
    pub fn next_shard(
        &mut self,
        data: &[Sequence],
        segments: Option<&[Vec<i64>]>,
        rank: usize,
        world: usize,
    ) -> Result<Batch> {
        check_split(self.batch_size, rank, world)?;
        shard_of(self.next_with(data, segments)?, rank, world)
    }
}

/// Refuses a global batch of `batch_size` that `world` ranks cannot share equally.
pub(super) fn check_split(batch_size: usize, rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world || !batch_size.is_multiple_of(world) {
        return Err(OctetError::InvalidArgument(format!(
            "a global batch of {batch_size} cannot be split into {world} equal parts for rank \
             {rank}"
        )));
    }
    Ok(())
}

/// Rank `rank`'s slice of a global batch (see [`check_split`]).
pub(super) fn shard_of(b: Batch, rank: usize, world: usize) -> Result<Batch> {
    let per = b.input_ids.size()[0] / world as i64;
    let at = rank as i64 * per;
    Ok(Batch {
        input_ids: b.input_ids.f_narrow(0, at, per)?,
        labels: b.labels.f_narrow(0, at, per)?,
        segment_ids: b.segment_ids.map(|s| s.f_narrow(0, at, per)).transpose()?,
    })
}

/// The permutation of epoch `epoch`: a pure function of (n, seed, epoch), so resuming needs no
/// stored permutation.
pub(super) fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(mix64(seed) ^ mix64(epoch ^ 0xD1B5_4A32_D192_ED03));
    shuffle(&mut perm, &mut rng);
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of SplitMix64 seeded with 1234567 (from the reference C code).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn chunk_tail_rule() {
        let toks: Vec<i64> = (0..10).collect();
        let s = chunk_tokens(&toks, 4, 99);
        // 4 + 4 + a tail of 2 = half of 4: kept and padded.
        assert_eq!(s.len(), 3);
        assert_eq!(s[2].input_ids, vec![8, 9, 99, 99]);
        assert_eq!(s[2].labels, vec![8, 9, IGNORE_INDEX, IGNORE_INDEX]);
        // Tail of 1 < half of 6: dropped.
        assert_eq!(chunk_tokens(&(0..7).collect::<Vec<_>>(), 6, 0).len(), 1);
        assert!(chunk_tokens(&[1, 2], 6, 0).is_empty());
    }

    #[test]
    fn split_sizes() {
        let seqs = |n: usize| {
            (0..n)
                .map(|i| Sequence {
                    input_ids: vec![i as i64; 2],
                    labels: vec![i as i64; 2],
                })
                .collect::<Vec<_>>()
        };
        let (t, e) = split(seqs(10), 0.1, 0).unwrap();
        assert_eq!((t.len(), e.len()), (9, 1));
        let (t, e) = split(seqs(2), 0.01, 0).unwrap();
        assert_eq!((t.len(), e.len()), (1, 1));
        let (t, e) = split(seqs(2), 0.99, 0).unwrap();
        assert_eq!((t.len(), e.len()), (1, 1));
        let (t, e) = split(seqs(1), 0.5, 0).unwrap();
        assert_eq!((t.len(), e.len()), (1, 0));
        let (t, e) = split(seqs(5), 0.0, 0).unwrap();
        assert_eq!((t.len(), e.len()), (5, 0));
        assert!(split(seqs(5), 1.0, 0).is_err());
        assert!(split(seqs(5), f64::NAN, 0).is_err());
    }

    #[test]
    fn batcher_covers_each_epoch() {
        let mut b = Batcher::new(7, 3, 42).unwrap();
        let all: Vec<usize> = (0..7).flat_map(|_| b.next_indices()).collect();
        // 21 draws = exactly 3 epochs, each a permutation of 0..7.
        assert_eq!(b.epoch(), 3);
        let mut perms = Vec::new();
        for e in all.chunks(7) {
            let mut s = e.to_vec();
            s.sort_unstable();
            assert_eq!(s, (0..7).collect::<Vec<_>>());
            perms.push(e.to_vec());
        }
        assert!(
            perms[0] != perms[1] || perms[1] != perms[2],
            "epochs reshuffle"
        );
        assert!(Batcher::new(0, 1, 0).is_err());
        assert!(Batcher::new(3, 0, 0).is_err());
    }

    #[test]
    fn shards_of_a_global_batch_are_its_slices() {
        let data: Vec<Sequence> = (0..7i64)
            .map(|i| Sequence {
                input_ids: vec![i, i],
                labels: vec![i, i],
            })
            .collect();
        let mut whole = Batcher::new(7, 4, 5).unwrap();
        let mut r0 = Batcher::new(7, 4, 5).unwrap();
        let mut r1 = Batcher::new(7, 4, 5).unwrap();
        for _ in 0..3 {
            let (ids, _) = whole.next_batch(&data).unwrap();
            let a = r0.next_shard(&data, None, 0, 2).unwrap();
            let b = r1.next_shard(&data, None, 1, 2).unwrap();
            assert_eq!(Tensor::cat(&[a.input_ids, b.input_ids], 0), ids);
        }
        assert_eq!(r0.state(), whole.state());
        assert!(r0.next_shard(&data, None, 0, 3).is_err());
        assert!(r0.next_shard(&data, None, 2, 2).is_err());
        // Packed: each row's segment ids travel with it.
        let segs: Vec<Vec<i64>> = (0..7i64).map(|i| vec![1, 1 + i % 2]).collect();
        let mut r1 = Batcher::new(7, 4, 5).unwrap();
        let b = r1.next_shard(&data, Some(&segs), 1, 2).unwrap();
        let ids = Vec::<i64>::try_from(b.input_ids.flatten(0, -1)).unwrap();
        let got = Vec::<i64>::try_from(b.segment_ids.unwrap().flatten(0, -1)).unwrap();
        let want: Vec<i64> = ids
            .iter()
            .step_by(2)
            .flat_map(|&i| segs[i as usize].clone())
            .collect();
        assert_eq!(got, want);
        assert!(r1.next_shard(&data, Some(&segs[1..]), 0, 2).is_err());
    }
}
