//! Packing: several short records per training sequence (`--pack`), so sequences hold tokens
//! instead of padding.
//!
//! Records are placed first-fit in order of decreasing length (ties in file order), each one
//! whole, and every token carries its record's segment id (1, 2, … within a sequence; 0 for
//! the padding that fills what is left). The model turns the ids into positions that restart
//! at each record and a block-diagonal causal mask ([`crate::model::Packing`]), so a record
//! is computed exactly as it would be alone.
//!
//! A record's first label is set to [`IGNORE_INDEX`]: alone, position 0 is never predicted
//! (labels are shifted by the loss), and packed it would be predicted from the previous
//! record's last token.
use super::data::{Sequence, IGNORE_INDEX};

/// What packing did, for logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackStats {
    /// Sequences before packing (one record each).
    pub records: usize,
    /// Sequences after packing.
    pub sequences: usize,
    /// Fraction of positions that are padding before packing.
    pub padding_before: f64,
    /// Fraction of positions that are padding after packing.
    pub padding_after: f64,
}

/// The positions of `s` that belong to its record: everything up to the last token that is
/// not padding (`pad_id` with no label). Dropping unlabelled trailing tokens loses no loss:
/// nothing after them is predicted from them.
fn record_len(s: &Sequence, pad_id: i64) -> usize {
    s.input_ids
        .iter()
        .zip(&s.labels)
        .rposition(|(&id, &label)| id != pad_id || label != IGNORE_INDEX)
        .map_or(0, |i| i + 1)
}

/// Packs one-record sequences (each padded to the same length with `pad_id`) into as few
/// sequences of that length as first-fit-decreasing finds; returns them with their segment
/// ids and the padding fractions. Empty records are dropped.
pub fn pack(records: &[Sequence], pad_id: i64) -> (Vec<Sequence>, Vec<Vec<i64>>, PackStats) {
    let seq_len = records.first().map_or(0, |s| s.input_ids.len());
    let lens: Vec<usize> = records.iter().map(|s| record_len(s, pad_id)).collect();
    let mut order: Vec<usize> = (0..records.len()).filter(|&i| lens[i] > 0).collect();
    // Stable: equal lengths keep their order, so packing is a pure function of the input.
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]));
    // Each bin: the records it holds and the room left.
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
    for i in order {
        match bins.iter_mut().find(|(_, room)| *room >= lens[i]) {
            Some((held, room)) => {
                held.push(i);
                *room -= lens[i];
            }
            None => bins.push((vec![i], seq_len.saturating_sub(lens[i]))),
        }
    }
    let mut sequences = Vec::with_capacity(bins.len());
    let mut segments = Vec::with_capacity(bins.len());
    for (held, _) in &bins {
        let mut ids = Vec::with_capacity(seq_len);
        let mut labels = Vec::with_capacity(seq_len);
        let mut seg = Vec::with_capacity(seq_len);
        for (n, &i) in held.iter().enumerate() {
            let len = lens[i];
            ids.extend_from_slice(&records[i].input_ids[..len]);
            labels.push(IGNORE_INDEX);
            labels.extend_from_slice(&records[i].labels[1..len]);
            seg.extend(std::iter::repeat_n(n as i64 + 1, len));
        }
        ids.resize(seq_len, pad_id);
        labels.resize(seq_len, IGNORE_INDEX);
        seg.resize(seq_len, 0);
        sequences.push(Sequence {
            input_ids: ids,
            labels,
        });
        segments.push(seg);
    }
    let used: usize = lens.iter().sum();
    let fraction = |rows: usize| {
        let total = rows * seq_len;
        if total == 0 {
            0.0
        } else {
            1.0 - used as f64 / total as f64
        }
    };
    let stats = PackStats {
        records: records.len(),
        sequences: sequences.len(),
        padding_before: fraction(records.len()),
        padding_after: fraction(sequences.len()),
    };
    (sequences, segments, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ids: &[i64], labelled_from: usize, seq_len: usize) -> Sequence {
        let mut input_ids = ids.to_vec();
        let mut labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i >= labelled_from { t } else { IGNORE_INDEX })
            .collect();
        input_ids.resize(seq_len, 0);
        labels.resize(seq_len, IGNORE_INDEX);
        Sequence { input_ids, labels }
    }

    #[test]
    fn records_fill_sequences_first_fit_decreasing() {
        let recs = [
            record(&[5, 6, 7], 1, 8),
            record(&[8, 9, 10, 11, 12], 2, 8),
            record(&[13, 14], 0, 8),
            record(&[15, 16, 17, 18, 19, 20], 0, 8),
            // A labelled trailing pad id is part of the record.
            record(&[21, 0], 0, 8),
        ];
        let (seqs, segs, stats) = pack(&recs, 0);
        // Lengths 6, 5, 3, 2, 2: bins [6, 2], [5, 3], [2].
        assert_eq!(seqs.len(), 3);
        assert_eq!(
            seqs[0].input_ids,
            [15, 16, 17, 18, 19, 20, 13, 14],
            "the longest first, then the first record that fits"
        );
        assert_eq!(segs[0], [1, 1, 1, 1, 1, 1, 2, 2]);
        let x = IGNORE_INDEX;
        assert_eq!(seqs[0].labels, [x, 16, 17, 18, 19, 20, x, 14]);
        assert_eq!(seqs[1].input_ids, [8, 9, 10, 11, 12, 5, 6, 7]);
        assert_eq!(seqs[1].labels, [x, x, 10, 11, 12, x, 6, 7]);
        assert_eq!(seqs[2].input_ids, [21, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(seqs[2].labels, [x, 0, x, x, x, x, x, x]);
        assert_eq!(segs[2], [1, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(stats.records, 5);
        assert!((stats.padding_before - (1.0 - 18.0 / 40.0)).abs() < 1e-12);
        assert!((stats.padding_after - (1.0 - 18.0 / 24.0)).abs() < 1e-12);
    }

    #[test]
    fn full_sequences_stay_alone_and_nothing_is_lost() {
        let recs: Vec<Sequence> = (0..4)
            .map(|r| record(&[r + 1, r + 2, r + 3, r + 4], 0, 4))
            .collect();
        let (seqs, segs, stats) = pack(&recs, 0);
        assert_eq!(seqs.len(), 4);
        assert!(segs.iter().all(|s| s == &[1, 1, 1, 1]));
        assert_eq!((stats.padding_before, stats.padding_after), (0.0, 0.0));
        let (none, _, _) = pack(&[], 0);
        assert!(none.is_empty());
    }
}
