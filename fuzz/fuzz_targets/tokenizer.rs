#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (dir, _p) = common::as_file("tokenizer.json", data);
    if let Ok(t) = octet::tokenizer::Tokenizer::from_dir(dir.path()) {
        if let Ok(ids) = t.encode("Hello, world!") {
            let _ = t.decode(&ids);
        }
    }
});
