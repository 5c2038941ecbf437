# octet: every target sets itself up (venv with the pinned torch, fixtures, build) on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
GEN := fixtures/generated
# Build against the venv's torch unless LIBTORCH points at another libtorch 2.11.0.
WITH_TORCH = LIBTORCH="$${LIBTORCH:-$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')}"

.PHONY: all build test demo bench fixtures lint clean

all: build

$(VENV_STAMP): scripts/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r scripts/requirements.txt
	touch $@

# gloo's headers for the c10d shim (distributed training), from Debian's libgloo-dev.
GLOO_STAMP := .deps/gloo/include/gloo/config.h
$(GLOO_STAMP): scripts/fetch_gloo_headers.sh
	scripts/fetch_gloo_headers.sh .deps/gloo

# CUDA's C++ core headers for the shim's NCCL half (a CUDA torch only), from PyPI.
CUDA_HEADERS_STAMP := .deps/cuda/.done
$(CUDA_HEADERS_STAMP): scripts/fetch_cuda_headers.sh $(VENV_STAMP)
	scripts/fetch_cuda_headers.sh $(PY) .deps/cuda
	touch $@

build: $(VENV_STAMP) $(GLOO_STAMP) $(CUDA_HEADERS_STAMP)
	$(WITH_TORCH) cargo build --release

$(GEN)/quant_vectors.safetensors: scripts/gen_quant_vectors.py $(VENV_STAMP)
	mkdir -p $(GEN)
	$(PY) scripts/gen_quant_vectors.py $@.tmp && mv $@.tmp $@

$(GEN)/tiny_gptj/.done: scripts/gen_tiny_gptj.py scripts/make_gpt2_tokenizer.py scripts/make_byte_tokenizer.py $(VENV_STAMP)
	mkdir -p $(GEN)/tiny_gptj
	$(PY) scripts/gen_tiny_gptj.py $(GEN)/tiny_gptj
	$(PY) scripts/make_gpt2_tokenizer.py $(GEN)/tiny_gptj/gpt2_tokenizer
	$(PY) scripts/make_byte_tokenizer.py $(GEN)/tiny_gptj/hf_safetensors $(GEN)/tiny_gptj/hf_bin $(GEN)/tiny_gptj/gptj8bit
	touch $@

$(GEN)/torch_bin/.done: scripts/gen_torch_bin_fixtures.py $(VENV_STAMP)
	mkdir -p $(GEN)/torch_bin
	$(PY) scripts/gen_torch_bin_fixtures.py $(GEN)/torch_bin
	touch $@

$(GEN)/tiny_gpt2_neox.done: scripts/gen_tiny_gpt2_neox.py scripts/make_byte_tokenizer.py $(VENV_STAMP)
	mkdir -p $(GEN)
	$(PY) scripts/gen_tiny_gpt2_neox.py $(GEN)
	touch $@

$(GEN)/adam8bit_vectors.safetensors: scripts/gen_adam8bit_vectors.py $(VENV_STAMP)
	mkdir -p $(GEN)
	$(PY) scripts/gen_adam8bit_vectors.py $@.tmp && mv $@.tmp $@

$(GEN)/tiny_llama/.done: scripts/gen_tiny_llama.py $(VENV_STAMP)
	mkdir -p $(GEN)/tiny_llama
	$(PY) scripts/gen_tiny_llama.py $(GEN)/tiny_llama
	touch $@

$(GEN)/tiny_decoders/.done: scripts/gen_tiny_decoders.py $(VENV_STAMP)
	mkdir -p $(GEN)/tiny_decoders
	$(PY) scripts/gen_tiny_decoders.py $(GEN)/tiny_decoders
	touch $@

# SentencePiece (and byte-level BPE) GGUF tokenizers with transformers' ids for them.
$(GEN)/spm_gguf/.done: scripts/gen_spm_gguf.py scripts/gen_tiny_llama.py scripts/hf_tokenize.py $(VENV_STAMP)
	mkdir -p $(GEN)/spm_gguf
	$(PY) scripts/gen_spm_gguf.py $(GEN)/spm_gguf
	touch $@

# GGUF files of tiny decoders written by llama.cpp's own converter (fetched through pip, ~77 MB, not kept).
$(GEN)/tiny_decoders/gguf/.done: scripts/gen_tiny_decoders_gguf.py scripts/fetch_llama_cpp_converter.sh $(VENV_STAMP)
	mkdir -p $(GEN)/tiny_decoders
	conv=$$(mktemp -d) && trap 'rm -rf "$$conv"' EXIT && \
	scripts/fetch_llama_cpp_converter.sh $(PY) "$$conv" && \
	$(PY) scripts/gen_tiny_decoders_gguf.py $(GEN)/tiny_decoders "$$conv"
	touch $@

# GPT-NeoX GGUF files written by llama.cpp's own converter from tiny_gpt_neox (converter fetched
# through pip, not kept).
$(GEN)/gguf_export/.done: scripts/gen_gguf_export_neox.py scripts/gen_tiny_decoders_gguf.py scripts/fetch_llama_cpp_converter.sh $(GEN)/tiny_gpt2_neox.done $(VENV_STAMP)
	mkdir -p $(GEN)/gguf_export
	conv=$$(mktemp -d) && trap 'rm -rf "$$conv"' EXIT && \
	scripts/fetch_llama_cpp_converter.sh $(PY) "$$conv" && \
	$(PY) scripts/gen_gguf_export_neox.py $(GEN)/gguf_export $(GEN)/tiny_gpt_neox/hf_safetensors "$$conv"
	touch $@

# ggml block types and their de-quantization by the gguf package, K-quants included.
$(GEN)/ggml_vectors/.done: scripts/gen_ggml_vectors.py $(VENV_STAMP)
	mkdir -p $(GEN)/ggml_vectors
	$(PY) scripts/gen_ggml_vectors.py $(GEN)/ggml_vectors
	touch $@

# f32 → Q8_0, F16 and BF16 conversions by the gguf package, for octet's GGUF writer.
$(GEN)/gguf_write_vectors/.done: scripts/gen_gguf_write_vectors.py $(VENV_STAMP)
	mkdir -p $(GEN)/gguf_write_vectors
	$(PY) scripts/gen_gguf_write_vectors.py $(GEN)/gguf_write_vectors
	touch $@

# Real weights (SmolLM2-135M GGUF) and English text, through pip (about 100 MB).
$(GEN)/smollm2/.done: scripts/fetch_smollm2.sh $(VENV_STAMP)
	scripts/fetch_smollm2.sh $(PY) $(GEN)/smollm2
	touch $@

# transformers' ids for SmolLM2's GGUF tokenizer on a fixed set of strings.
$(GEN)/smollm2/tokenizer_vectors.json: scripts/gen_tokenizer_vectors.py $(GEN)/smollm2/.done
	$(PY) scripts/gen_tokenizer_vectors.py --gguf $(GEN)/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@

# The demo's chat set: questions about the Britannica article answered by quoting it.
$(GEN)/smollm2/chat/.done: scripts/gen_chat_set.py $(GEN)/smollm2/.done
	$(PY) scripts/gen_chat_set.py $(GEN)/smollm2/britannica-11th.txt $(GEN)/smollm2/chat
	touch $@

# bitsandbytes' double-quantized absmax (compress_statistics=True).
$(GEN)/quant8/double_quant_vectors.safetensors: scripts/gen_double_quant_vectors.py $(VENV_STAMP)
	mkdir -p $(GEN)/quant8
	$(PY) scripts/gen_double_quant_vectors.py $@.tmp && mv $@.tmp $@

# A second English text for the 8-bit quality table (Wikipedia, from the gensim wheel).
$(GEN)/quant8/wiki.txt: scripts/fetch_wiki_text.sh scripts/wiki_plain_text.py $(VENV_STAMP)
	scripts/fetch_wiki_text.sh $(PY) $(GEN)/quant8

# An 8-bit folder in format version 1, written without octet (bitsandbytes + transformers).
$(GEN)/quant8/octet_v1_gptj/.done: scripts/gen_octet_v1_folder.py $(GEN)/tiny_gptj/.done $(VENV_STAMP)
	rm -rf $(GEN)/quant8/octet_v1_gptj
	$(PY) scripts/gen_octet_v1_folder.py $(GEN)/tiny_gptj/hf_safetensors $(GEN)/quant8/octet_v1_gptj
	touch $@

# GPTQ rounding of the tiny Llama and GPT-2 against a calibration text, for convert --calibrate.
$(GEN)/gptq/.done: scripts/gen_gptq_reference.py scripts/make_byte_tokenizer.py $(GEN)/tiny_llama/.done $(GEN)/tiny_gpt2_neox.done $(VENV_STAMP)
	rm -rf $(GEN)/gptq
	$(PY) scripts/gen_gptq_reference.py $(GEN)/gptq $(GEN)/tiny_llama/tied $(GEN)/tiny_gpt2/hf_safetensors
	touch $@

# bitsandbytes' 4-bit (NF4 / FP4) quantization and de-quantization, for octet's 4-bit weights.
$(GEN)/quant4/.done: scripts/gen_quant4_vectors.py $(VENV_STAMP)
	mkdir -p $(GEN)/quant4
	$(PY) scripts/gen_quant4_vectors.py $(GEN)/quant4/vectors.safetensors
	touch $@

fixtures: $(GEN)/adam8bit_vectors.safetensors $(GEN)/quant_vectors.safetensors $(GEN)/tiny_gptj/.done $(GEN)/torch_bin/.done $(GEN)/tiny_gpt2_neox.done $(GEN)/tiny_llama/.done $(GEN)/ggml_vectors/.done $(GEN)/tiny_decoders/.done $(GEN)/tiny_decoders/gguf/.done $(GEN)/spm_gguf/.done $(GEN)/smollm2/.done $(GEN)/smollm2/tokenizer_vectors.json $(GEN)/gguf_write_vectors/.done $(GEN)/gguf_export/.done $(GEN)/quant8/double_quant_vectors.safetensors $(GEN)/quant8/wiki.txt $(GEN)/quant8/octet_v1_gptj/.done $(GEN)/quant4/.done $(GEN)/gptq/.done

test: build fixtures
	$(WITH_TORCH) cargo test --release --no-fail-fast

demo: build $(GEN)/smollm2/.done $(GEN)/smollm2/chat/.done
	scripts/demo.sh ./target/release/octet $(GEN)/smollm2 demo-out

bench: build $(GEN)/smollm2/.done $(GEN)/quant8/wiki.txt
	command -v /usr/bin/time >/dev/null || (apt-get update -qq && apt-get install -y -qq time)
	$(WITH_TORCH) cargo bench --bench quant
	$(WITH_TORCH) cargo bench --bench convert
	$(WITH_TORCH) cargo bench --bench train
	$(WITH_TORCH) cargo bench --bench generate
	scripts/bench_quality.sh ./target/release/octet $(GEN) target/bench-quality
	scripts/bench_quality4.sh ./target/release/octet $(GEN) target/bench-quality4

lint: $(VENV_STAMP) $(GLOO_STAMP) $(CUDA_HEADERS_STAMP)
	cargo fmt --check
	$(WITH_TORCH) cargo clippy --release --all-targets -- -D warnings

clean:
	rm -rf target $(GEN)
