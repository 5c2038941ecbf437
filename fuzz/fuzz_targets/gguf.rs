#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_dir, p) = common::as_file("m.gguf", data);
    if let Ok(g) = octet::io::gguf::GgufFile::open(&p) {
        let _ = g.config();
        common::read_all(&g);
        let _ = g.hf_tokenizer();
    }
});
