//! Streamed training data (`--stream`): JSON Lines files far larger than memory, tokenized
//! lazily by a background thread while the model trains.
//!
//! Start-up reads the files once to index where each non-blank line starts (12 bytes a record
//! in memory) and parses only the first one, to detect the format. The held-out split and
//! every epoch's order are then drawn over **records** with the same seeded generator as data
//! in memory ([`super::data::split`], one permutation per epoch), and each epoch is cut into
//! units of [`UNIT`] records in that order. The background thread reads a unit's lines, turns
//! them into sequences as the in-memory reader does (JSON Lines text: the unit's documents
//! joined and cut into windows; `--pack`: the unit's records packed), and hands units over a
//! bounded queue, so at most a few units are held at a time.
//!
//! Differences from data in memory, all consequences of never holding the whole file: the
//! split and the order are drawn over records, not sequences; windows of text and packing do
//! not cross unit boundaries; a bad record is found when its unit is read (the run stops with
//! the error naming its file and line; the last checkpoint is kept); the held-out records are
//! read at start-up, so keep `--eval-fraction` small or give `--eval-data`.
//!
//! The position saved in a checkpoint is (epoch, unit, sequences taken from it): a resumed
//! run re-reads that unit and continues exactly where the run stopped. Every rank reads the
//! same units and keeps its slice of each global batch, as with data in memory.
use super::data::{
    batch_of, check_split, conversation_of, encode_conversations, encode_documents, encode_pairs,
    permutation, prompt_completion_of, shard_of, split, string_field, Batch, BatcherState,
    DataFormat, ReadOptions, Sequence,
};
use crate::chat::ChatTemplate;
use crate::error::{OctetError, Result};
use crate::tokenizer::Tokenizer;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Records per unit: tokenized together (in parallel) and, with `--pack`, packed together.
pub const UNIT: usize = 512;

/// Units read ahead of the one training uses.
const AHEAD: usize = 4;

/// Where one record's line starts.
#[derive(Clone, Copy, Debug)]
struct LineRef {
    file: u16,
    line: u32,
    offset: u64,
}

/// Every non-blank line of a set of JSON Lines files.
#[derive(Debug)]
pub struct LineIndex {
    files: Vec<PathBuf>,
    lines: Vec<LineRef>,
    bytes: u64,
}

impl LineIndex {
    /// Indexes `files` in order, reading each once in large blocks.
    pub fn build(files: &[PathBuf]) -> Result<Self> {
        if files.len() > usize::from(u16::MAX) {
            return Err(OctetError::InvalidArgument(format!(
                "--stream reads at most {} files, got {}",
                u16::MAX,
                files.len()
            )));
        }
        let mut lines = Vec::new();
        let mut bytes = 0;
        for (f, path) in files.iter().enumerate() {
            let mut file = std::fs::File::open(path).map_err(|e| OctetError::io(path, e))?;
            let mut buf = vec![0u8; 1 << 22];
            let (mut at, mut line, mut start, mut blank) = (0u64, 1u32, 0u64, true);
            loop {
                let n = file.read(&mut buf).map_err(|e| OctetError::io(path, e))?;
                if n == 0 {
                    break;
                }
                for (i, &b) in buf[..n].iter().enumerate() {
                    if b == b'\n' {
                        if !blank {
                            lines.push(LineRef {
                                file: f as u16,
                                line,
                                offset: start,
                            });
                        }
                        line = line.checked_add(1).ok_or_else(|| {
                            OctetError::bad_file(path, "more than 4 billion lines")
                        })?;
                        start = at + i as u64 + 1;
                        blank = true;
                    } else if blank && !b.is_ascii_whitespace() {
                        blank = false;
                    }
                }
                at += n as u64;
            }
            if !blank {
                lines.push(LineRef {
                    file: f as u16,
                    line,
                    offset: start,
                });
            }
            bytes += at;
        }
        Ok(Self {
            files: files.to_vec(),
            lines,
            bytes,
        })
    }

    /// Non-blank lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line holds a record.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Record `i` parsed, with its file and line; `open` holds the files opened so far.
    fn read(
        &self,
        i: usize,
        open: &mut [Option<std::fs::File>],
    ) -> Result<(PathBuf, usize, serde_json::Value)> {
        let r = self.lines[i];
        let path = &self.files[usize::from(r.file)];
        let file = match &mut open[usize::from(r.file)] {
            Some(f) => f,
            slot => slot.insert(std::fs::File::open(path).map_err(|e| OctetError::io(path, e))?),
        };
        let mut line = Vec::new();
        let mut chunk = vec![0u8; 4096];
        let mut at = r.offset;
        loop {
            let n = file
                .read_at(&mut chunk, at)
                .map_err(|e| OctetError::io(path, e))?;
            if n == 0 {
                break;
            }
            match chunk[..n].iter().position(|&b| b == b'\n') {
                Some(end) => {
                    line.extend_from_slice(&chunk[..end]);
                    break;
                }
                None => line.extend_from_slice(&chunk[..n]),
            }
            at += n as u64;
        }
        let no = r.line as usize;
        let text = std::str::from_utf8(&line).map_err(|e| {
            OctetError::bad_file(
                path,
                format!(
                    "line {no}: not UTF-8 text (invalid byte at column {})",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        let text = if r.offset == 0 {
            text.trim_start_matches('\u{feff}')
        } else {
            text
        };
        let value = serde_json::from_str(text).map_err(|e| {
            OctetError::bad_file(
                path,
                format!(
                    "line {no}: not valid JSON ({e}); expected JSON Lines, one object per line"
                ),
            )
        })?;
        Ok((path.clone(), no, value))
    }
}

/// The segment ids of packed sequences, one row each.
type Segments = Vec<Vec<i64>>;

/// How records become sequences, owned so the reading thread can keep it.
#[derive(Clone)]
pub struct Reader {
    /// The records' format.
    pub format: DataFormat,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template of conversational formats.
    pub template: Option<Arc<ChatTemplate>>,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Loss on every token of a conversation.
    pub train_on_prompt: bool,
    /// Drop records longer than `seq_len`.
    pub drop_long: bool,
    /// Pack each unit's records.
    pub pack: bool,
    /// Rows of the model's embedding: every token id must be below it.
    pub vocab: usize,
}

impl Reader {
    /// The sequences of `records` (indices into `index`), in order, with their segment ids
    /// when packed.
    pub fn sequences(
        &self,
        index: &LineIndex,
        records: &[usize],
    ) -> Result<(Vec<Sequence>, Option<Segments>)> {
        let mut open: Vec<Option<std::fs::File>> = index.files.iter().map(|_| None).collect();
        let parsed: Vec<_> = records
            .iter()
            .map(|&i| index.read(i, &mut open))
            .collect::<Result<_>>()?;
        let eos = self.tokenizer.eos_id().map(i64::from);
        let (seq_len, read) = (self.seq_len, self.read_options());
        let sequences = match &self.format {
            DataFormat::Text => {
                return Err(OctetError::InvalidArgument(
                    "--stream reads JSON Lines; plain text is read whole".into(),
                ))
            }
            DataFormat::JsonlText { field } => {
                let mut docs = Vec::with_capacity(parsed.len());
                for (file, line, v) in &parsed {
                    let d = string_field(file, *line, v, field)?;
                    if !d.trim().is_empty() {
                        docs.push(d);
                    }
                }
                let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
                encode_documents(&self.tokenizer, &docs, seq_len, eos)?.0
            }
            DataFormat::PromptCompletion => {
                let pairs: Vec<_> = parsed
                    .iter()
                    .map(|(file, line, v)| prompt_completion_of(file, *line, v))
                    .collect::<Result<_>>()?;
                encode_pairs(&self.tokenizer, &pairs, seq_len, eos, self.drop_long)?.0
            }
            f => {
                let kind = f
                    .record_kind()
                    .expect("the other formats are conversational");
                let convs: Vec<_> = parsed
                    .into_iter()
                    .map(|(file, line, v)| {
                        let m = conversation_of(kind, &file, line, &v)?;
                        Ok((file, line, m))
                    })
                    .collect::<Result<_>>()?;
                let template = self.template.as_deref().ok_or_else(|| {
                    OctetError::InvalidArgument(format!(
                        "{f} records need a chat template to be rendered with"
                    ))
                })?;
                encode_conversations(template, f, &convs, seq_len, eos, &read)?.0
            }
        };
        let what = index
            .files
            .first()
            .map_or(String::new(), |p| p.display().to_string());
        crate::model::check_token_ids(
            sequences.iter().flat_map(|s| &s.input_ids),
            self.vocab,
            &what,
        )?;
        if !self.pack {
            return Ok((sequences, None));
        }
        let pad = super::data::pad_id(&self.tokenizer);
        let (packed, segments, _) = super::pack::pack(&sequences, pad);
        Ok((packed, Some(segments)))
    }

    fn read_options(&self) -> ReadOptions<'_> {
        ReadOptions {
            format: Some(&self.format),
            template: self.template.as_deref(),
            train_on_prompt: self.train_on_prompt,
            drop_long: self.drop_long,
        }
    }
}

/// Streamed data: the index, the records of training and of the held-out set.
pub struct Stream {
    index: Arc<LineIndex>,
    /// Training records (indices into the index).
    train: Arc<Vec<usize>>,
    /// Held-out records.
    pub eval: Vec<usize>,
    reader: Reader,
}

impl Stream {
    /// Indexes `files` and splits their records with `seed`, holding out `eval_fraction`.
    pub fn open(files: &[PathBuf], reader: Reader, eval_fraction: f64, seed: u64) -> Result<Self> {
        let index = LineIndex::build(files)?;
        if index.is_empty() {
            let p = files.first().map_or(Path::new(""), |p| p.as_path());
            return Err(OctetError::bad_file(p, "no usable text: no records"));
        }
        let (train, eval) = split((0..index.len()).collect(), eval_fraction, seed)?;
        Ok(Self {
            index: Arc::new(index),
            train: Arc::new(train),
            eval,
            reader,
        })
    }

    /// Records in training.
    pub fn train_records(&self) -> usize {
        self.train.len()
    }

    /// Bytes indexed.
    pub fn bytes(&self) -> u64 {
        self.index.bytes
    }

    /// The held-out sequences, read now.
    pub fn eval_sequences(&self) -> Result<Vec<Sequence>> {
        let reader = Reader {
            pack: false,
            ..self.reader.clone()
        };
        let mut out = Vec::new();
        for unit in self.eval.chunks(UNIT) {
            out.extend(reader.sequences(&self.index, unit)?.0);
        }
        Ok(out)
    }

    /// A fingerprint of what is streamed, for resume: the files' names, sizes and record
    /// count, how records are read, and the sequences of the first unit.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for f in &self.index.files {
            h.update(
                f.file_name()
                    .map_or(Vec::new(), |n| n.as_encoded_bytes().to_vec()),
            );
            let size = std::fs::metadata(f)
                .map_err(|e| OctetError::io(f, e))?
                .len();
            h.update(size.to_le_bytes());
        }
        let r = &self.reader;
        h.update(format!(
            "stream {} {} {} {} {}",
            self.index.len(),
            r.format,
            r.train_on_prompt,
            r.drop_long,
            r.pack
        ));
        let first = &self.train[..self.train.len().min(UNIT)];
        for s in r.sequences(&self.index, first)?.0 {
            for v in s.input_ids.iter().chain(&s.labels) {
                h.update(v.to_le_bytes());
            }
        }
        Ok(h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Starts reading at `state` in the background; batches of `batch_size` sequences.
    pub fn batches(&self, state: BatcherState, batch_size: usize) -> Result<StreamBatcher> {
        if batch_size == 0 {
            return Err(OctetError::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        let n = self.train.len();
        let units = n.div_ceil(UNIT);
        if state.cursor >= units.max(1) {
            return Err(OctetError::InvalidArgument(format!(
                "the saved data position (unit {}) is outside the {units} units of the data \
                 (was the data changed since the checkpoint?)",
                state.cursor
            )));
        }
        let (tx, rx) = sync_channel(AHEAD);
        let (index, train, reader) = (self.index.clone(), self.train.clone(), self.reader.clone());
        let seed = state.seed;
        let (mut epoch, mut unit) = (state.epoch, state.cursor);
        std::thread::spawn(move || {
            let mut empty_units = 0usize;
            loop {
                let perm = permutation(n, seed, epoch);
                while unit < units {
                    let records: Vec<usize> = perm[unit * UNIT..((unit + 1) * UNIT).min(n)]
                        .iter()
                        .map(|&i| train[i])
                        .collect();
                    let read = reader.sequences(&index, &records);
                    let done = read.is_err();
                    if let Ok((s, _)) = &read {
                        empty_units = if s.is_empty() { empty_units + 1 } else { 0 };
                    }
                    let read = if empty_units > units {
                        Err(OctetError::InvalidArgument(
                            "no streamed record gives a trained token within --seq-len".into(),
                        ))
                    } else {
                        read
                    };
                    let failed = done || empty_units > units;
                    let msg = read.map(|(sequences, segments)| Unit {
                        epoch,
                        index: unit,
                        sequences,
                        segments,
                    });
                    // The trainer has gone (or the data is unusable): stop reading.
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                    unit += 1;
                }
                unit = 0;
                epoch += 1;
            }
        });
        let mut b = StreamBatcher {
            rx,
            unit: None,
            taken: 0,
            batch_size,
            seed,
        };
        b.fill()?;
        b.taken = state.within;
        Ok(b)
    }
}

/// One unit of records as sequences.
struct Unit {
    epoch: u64,
    index: usize,
    sequences: Vec<Sequence>,
    segments: Option<Vec<Vec<i64>>>,
}

/// Batches of streamed sequences, in the order the reading thread delivers them.
pub struct StreamBatcher {
    rx: Receiver<Result<Unit>>,
    unit: Option<Unit>,
    taken: usize,
    batch_size: usize,
    seed: u64,
}

impl StreamBatcher {
    /// Waits for the next unit.
    fn fill(&mut self) -> Result<()> {
        let unit = self.rx.recv().map_err(|_| {
            OctetError::InvalidArgument("the data reading thread stopped unexpectedly".into())
        })??;
        self.unit = Some(unit);
        self.taken = 0;
        Ok(())
    }

    /// The position to save: the next sequence to take.
    pub fn state(&self) -> BatcherState {
        let (epoch, cursor) = self.unit.as_ref().map_or((0, 0), |u| (u.epoch, u.index));
        BatcherState {
            epoch,
            cursor,
            seed: self.seed,
            within: self.taken,
        }
    }

    /// Completed passes over the data.
    pub fn epoch(&self) -> u64 {
        self.unit.as_ref().map_or(0, |u| u.epoch)
    }

    /// This rank's part of the next global batch (see [`super::data::Batcher::next_shard`]).
    pub fn next_shard(&mut self, rank: usize, world: usize) -> Result<Batch> {
        check_split(self.batch_size, rank, world)?;
        let mut rows = Vec::with_capacity(self.batch_size);
        let mut segs = Vec::with_capacity(self.batch_size);
        let mut packed = false;
        while rows.len() < self.batch_size {
            let unit = self.unit.as_ref().expect("filled at start");
            if self.taken >= unit.sequences.len() {
                self.fill()?;
                continue;
            }
            rows.push(unit.sequences[self.taken].clone());
            if let Some(s) = &unit.segments {
                packed = true;
                segs.push(s[self.taken].clone());
            }
            self.taken += 1;
        }
        let idx: Vec<usize> = (0..rows.len()).collect();
        let b = batch_of(&idx, &rows, packed.then_some(segs.as_slice()))?;
        shard_of(b, rank, world)
    }
}

/// Where training batches come from: data in memory, or streamed.
pub enum DataOrder {
    /// Sequences in memory, in a seeded order per epoch.
    Memory(super::data::Batcher),
    /// Streamed sequences.
    Streamed(StreamBatcher),
}

impl DataOrder {
    /// This rank's part of the next global batch; `data` is the in-memory training set (and
    /// its segment ids when packed), unused when streaming.
    pub fn next_shard(
        &mut self,
        data: &super::data::Dataset,
        rank: usize,
        world: usize,
    ) -> Result<Batch> {
        match self {
            Self::Memory(b) => b.next_shard(&data.train, data.segments.as_deref(), rank, world),
            Self::Streamed(s) => s.next_shard(rank, world),
        }
    }

    /// The position to save in a checkpoint.
    pub fn state(&self) -> BatcherState {
        match self {
            Self::Memory(b) => b.state(),
            Self::Streamed(s) => s.state(),
        }
    }
}
