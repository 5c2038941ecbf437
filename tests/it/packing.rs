//! Packed training (`--pack`): several records per sequence with positions restarting at each
//! record and block-diagonal causal attention. The loss and every gradient of a packed batch
//! equal those of the same records run one by one, for each architecture family.
use crate::common;
use octet::load::{load_model, LoadOptions};
use octet::model::Packing;
use octet::nn::LoraConfig;
use octet::peft::{attach_lora, trainable_tensors, Targets};
use octet::train::data::{Sequence, IGNORE_INDEX};
use octet::train::pack::pack;
use octet::train::step::{forward_backward, forward_backward_with};
use tch::{Kind, Tensor};

/// Records of these lengths (labels from `prompt` on), padded to `seq_len` as the data
/// pipeline leaves them.
fn records(lens: &[usize], prompt: usize, seq_len: usize, vocab: i64) -> Vec<Sequence> {
    lens.iter()
        .enumerate()
        .map(|(r, &len)| {
            let ids: Vec<i64> = (0..len as i64)
                .map(|i| (i * 31 + r as i64 * 17 + 3) % (vocab - 1) + 1)
                .collect();
            let mut labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i >= prompt { t } else { IGNORE_INDEX })
                .collect();
            let mut input_ids = ids;
            input_ids.resize(seq_len, 0);
            labels.resize(seq_len, IGNORE_INDEX);
            Sequence { input_ids, labels }
        })
        .collect()
}

fn rows(seqs: &[Sequence], f: impl Fn(&Sequence) -> &Vec<i64>) -> Tensor {
    let t = seqs[0].input_ids.len() as i64;
    let flat: Vec<i64> = seqs.iter().flat_map(|s| f(s).iter().copied()).collect();
    Tensor::from_slice(&flat).reshape([seqs.len() as i64, t])
}

fn labelled(labels: &[i64]) -> usize {
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

fn assert_packed_equals_one_by_one(dir: &str, targets: &str) {
    let _rng = common::global_rng();
    let mut m = load_model(&common::fixture(dir), &LoadOptions::default()).unwrap();
    tch::manual_seed(7);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    attach_lora(m.model.as_mut(), &Targets::parse(targets).unwrap(), cfg).unwrap();
    let params = trainable_tensors(m.model.as_mut());
    // Non-zero B, so gradients reach A and every path through the adapters.
    tch::no_grad(|| {
        for (_, p) in &params {
            let mut p = p.shallow_clone();
            let _ = p.g_add_(&(Tensor::randn_like(&p) * 0.05));
        }
    });
    let model = m.model.as_ref();
    let vocab = model.info().vocab_size as i64;
    // Longer than Gemma 2's window of 5; two rows, the second with padding.
    let seq_len = 12;
    let recs = records(&[7, 5, 4, 3], 1, seq_len, vocab);
    let (packed, segments, stats) = pack(&recs, 0);
    assert_eq!(packed.len(), 2, "{dir}");
    assert!(stats.padding_after < stats.padding_before);
    let total: usize = recs.iter().map(|r| labelled(&r.labels)).sum();
    let grads = || -> Vec<Tensor> { params.iter().map(|(_, p)| p.grad().copy()).collect() };
    let zero = || {
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    };

    // One by one, each record's mean loss weighted by its share of the labelled tokens.
    zero();
    let mut alone_loss = 0.0;
    for r in &recs {
        let len = r.labels.iter().rposition(|&l| l != IGNORE_INDEX).unwrap() + 1;
        let ids = Tensor::from_slice(&r.input_ids[..len]).unsqueeze(0);
        let labels = Tensor::from_slice(&r.labels[..len]).unsqueeze(0);
        let w = labelled(&r.labels) as f64 / total as f64;
        alone_loss += w * forward_backward(model, &ids, &labels, w, false, 1, 0).unwrap();
    }
    let alone = grads();

    let ids = rows(&packed, |s| &s.input_ids);
    let labels = rows(&packed, |s| &s.labels);
    let seg = Tensor::from_slice2(&segments);
    let packing = Packing::from_segments(&seg).unwrap();
    for checkpointing in [false, true] {
        zero();
        let loss = forward_backward_with(
            model,
            &ids,
            &labels,
            Some(&packing),
            1.0,
            checkpointing,
            1,
            0,
        )
        .unwrap();
        assert!(
            (loss - alone_loss).abs() < 1e-5 * alone_loss.abs(),
            "{dir}: packed loss {loss} vs {alone_loss} one by one"
        );
        for ((name, _), (a, b)) in params.iter().zip(alone.iter().zip(&grads())) {
            let scale = a.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{dir} {name}: no gradient");
            let d = (a - b).abs().max().double_value(&[]) / scale;
            assert!(
                d < 1e-5,
                "{dir} {name}: packed gradient differs by {d} (relative)"
            );
        }
    }
    // Without the packing the same rows mix records: the loss differs.
    let mixed = tch::no_grad(|| {
        let logits = model.forward(&ids).unwrap();
        octet::train::step::causal_lm_loss(&logits, &labels).double_value(&[])
    });
    assert!(
        (mixed - alone_loss).abs() > 1e-4,
        "{dir}: the test must tell packed attention from plain causal"
    );
}

#[test]
fn gptj_packed_batch_equals_records_alone() {
    assert_packed_equals_one_by_one("tiny_gptj/hf_safetensors", "q_proj,v_proj,fc_in");
}

#[test]
fn llama_packed_batch_equals_records_alone() {
    assert_packed_equals_one_by_one("tiny_llama/untied", "q_proj,v_proj,down_proj");
}

#[test]
fn gemma2_windows_and_soft_caps_packed_equal_records_alone() {
    assert_packed_equals_one_by_one("tiny_decoders/gemma2", "q_proj,k_proj,o_proj");
}

#[test]
fn gpt2_and_gpt_neox_packed_batches_equal_records_alone() {
    assert_packed_equals_one_by_one("tiny_gpt2/hf_safetensors", "c_attn,c_fc");
    assert_packed_equals_one_by_one(
        "tiny_gpt_neox/hf_safetensors",
        "query_key_value,dense_4h_to_h",
    );
}

#[test]
fn segment_ids_give_restarting_positions_and_a_block_diagonal_mask() {
    let seg = Tensor::from_slice2(&[[1i64, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]]);
    let p = Packing::from_segments(&seg).unwrap();
    let pos = Vec::<i64>::try_from(p.positions.flatten(0, -1)).unwrap();
    assert_eq!(pos, [0, 1, 2, 0, 1, 0, 0, 0, 1, 2, 0, 1]);
    assert_eq!(p.longest, 3);
    assert_eq!(p.mask.size(), [2, 1, 6, 6]);
    let mask = p.mask.to_kind(Kind::Int64);
    let m = |b: i64, q: i64, k: i64| mask.int64_value(&[b, 0, q, k]) == 1;
    assert!(m(0, 2, 0) && !m(0, 3, 2) && m(0, 4, 3) && !m(0, 3, 4));
    assert!(m(0, 5, 5) && !m(0, 5, 4), "padding sees only padding");
    assert!(!m(1, 4, 3) && m(1, 5, 4));
    assert!(Packing::from_segments(&Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu))).is_err());
}
