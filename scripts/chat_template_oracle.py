"""Chat-template oracle: token ids (and assistant masks) from transformers' apply_chat_template.

Usage: chat_template_oracle.py OUT_DIR [SMOLLM2_GGUF]

Writes one tokenizer folder per template family under OUT_DIR (a small byte-level BPE trained
here with the family's special tokens, the family's real template text, BOS added by the
post-processor where the family's tokenizer adds it) and prints JSON:
{"families": [{"name", "model", "cases": [{"messages", "add_generation_prompt",
"ids" | "error", "assistant_mask"?}]}]}. The SmolLM2 family reads the real GGUF's tokenizer
and template.
"""
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# ChatML with its assistant turns in {% generation %} blocks, written with whitespace control
# across lines (trim/lstrip rules around the block tags).
CHATML_GENERATION = """{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CORPUS = [
    "Hello there, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "You are a helpful assistant. Answer the question about the article.",
    "Ça va? Très bien — ありがとう 日本語 🎉 👍",
]

CONVERSATIONS = {
    "multi_turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": " Rome, of course. "},
    ],
    "system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How are you today?"},
    ],
    "empty_assistant": [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
    ],
    "unicode": [
        {"role": "user", "content": "Ça va? 日本語 🎉"},
        {"role": "assistant", "content": "Très bien — ありがとう 👍"},
    ],
    "prompt_only": [
        {"role": "user", "content": "The quick brown fox?"},
    ],
    "out_of_order": [
        {"role": "user", "content": "One"},
        {"role": "user", "content": "Two"},
    ],
    "tool": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
            ],
        },
        {"role": "tool", "content": "{\"temp\": 21.5}"},
        {"role": "assistant", "content": "It is 21.5 degrees."},
    ],
}


def tiny_tokenizer(specials, bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        # The family's tokenizer adds BOS itself: apply_chat_template must not add a second.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def family(out, name, template, specials, bos, eos, add_bos):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(specials, bos if add_bos else None),
        bos_token=bos,
        eos_token=eos,
    )
    fast.chat_template = template
    fast.save_pretrained(d)
    return d, AutoTokenizer.from_pretrained(d)


def cases(tok, with_mask):
    out = []
    for name, msgs in CONVERSATIONS.items():
        for gen in ([True] if name == "prompt_only" else [False, True]):
            case = {"name": name, "messages": msgs, "add_generation_prompt": gen}
            try:
                case["ids"] = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False))
                if with_mask and not gen:
                    r = tok.apply_chat_template(
                        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                    )
                    assert list(r["input_ids"]) == case["ids"]
                    case["assistant_mask"] = list(r["assistant_masks"])
            except Exception as e:  # the template raised
                case.pop("ids", None)
                case["error"] = str(e)
            out.append(case)
    return out


def main():
    out = sys.argv[1]
    fams = []
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    specs = [
        ("llama3", LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True, False),
        ("qwen2", QWEN2, chatml, None, "<|im_end|>", False, False),
        ("gemma2", GEMMA2, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", True, False),
        ("chatml_generation", CHATML_GENERATION, chatml, None, "<|im_end|>", False, True),
    ]
    for name, template, specials, bos, eos, add_bos, with_mask in specs:
        d, tok = family(out, name, template, specials, bos, eos, add_bos)
        fams.append({"name": name, "model": d, "cases": cases(tok, with_mask)})
    if len(sys.argv) > 2:
        gguf = sys.argv[2]
        tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        fams.append({"name": "smollm2", "model": gguf, "cases": cases(tok, False)})
    json.dump({"families": fams}, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
