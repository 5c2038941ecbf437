mod common;
use octet::io::gguf::GgufFile;
use octet::load::{load_model, LoadOptions, QuantizeOptions};
use octet::quant::{BlockSize, CodeKind};
use tch::{Kind, Tensor};
fn ppl(model: &dyn octet::model::CausalLm, ids: &[i64]) -> f64 {
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in ids.chunks(1024).filter(|c| c.len() >= 2) {
        let x = Tensor::from_slice(chunk).unsqueeze(0);
        let logits = tch::no_grad(|| model.forward(&x)).squeeze_dim(0);
        let n = chunk.len() as i64 - 1;
        let logp = logits.narrow(0, 0, n).log_softmax(-1, Kind::Float);
        let target = Tensor::from_slice(&chunk[1..]).unsqueeze(1);
        nll -= logp.gather(1, &target, false).to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        count += n as usize;
    }
    (nll / count as f64).exp()
}
#[test]
fn scan() {
    let g = common::fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let full = std::fs::read_to_string(common::fixture("smollm2/britannica-11th.txt")).unwrap();
    let ids: Vec<i64> = GgufFile::open(&g).unwrap().tokenizer().unwrap().encode(&full[..8192]).unwrap().iter().map(|&i| i as i64).collect();
    let base = 21.703759416938556;
    for code in [CodeKind::Dynamic, CodeKind::Fitted] {
        for b in [64i64, 128, 256, 512, 1024, 2048] {
            let opts = LoadOptions { quantize: Some(QuantizeOptions { block: Some(BlockSize::new(b).unwrap()), code, skip: vec![] }), ..Default::default() };
            let m = load_model(&g, &opts).unwrap();
            let p = ppl(m.model.as_ref(), &ids);
            eprintln!("{code:?} block {b}: {p:.4} ({:+.3}%)", (p / base - 1.0) * 100.0);
        }
    }
}
