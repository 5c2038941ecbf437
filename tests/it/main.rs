//! All integration tests, one binary (one link) with a module per area.

mod adam8bit_oracle;
mod common;
mod convert_cli;
mod data_pipeline;
mod decoders;
mod eval_generate;
mod fuzz;
mod fuzz_support;
mod gguf;
mod gguf_decoders;
mod gguf_tokenizer;
mod gguf_types;
mod gguf_write;
mod gpt2;
mod gpt_neox;
mod gptj_golden;
mod gpu;
mod hub_cache;
mod llama_golden;
mod merge;
mod quant_oracle;
mod safety_in;
mod safety_out;
mod smollm2;
mod torch_bin;
mod train;
