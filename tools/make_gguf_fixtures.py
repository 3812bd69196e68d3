#!/usr/bin/env python3
"""Generate the GGUF-import fixtures under tests/fixtures/gguf/ for oxtune's Rust tests.

Run by hand, from the repository root, after fetching the demo model:

    scripts/fetch-demo-model.sh          # models/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 -m venv ~/.cache/oxtune-fixtures
    ~/.cache/oxtune-fixtures/bin/pip install -r tools/requirements-fixtures.txt
    ~/.cache/oxtune-fixtures/bin/python tools/make_gguf_fixtures.py

Deterministic (fixed seeds, one CPU thread, float32). It writes:

  smollm2_reference.json        for the real SmolLM2-135M-Instruct Q4_1 file (not committed,
                                ~98 MB): token ids of test strings, the rendered chat
                                template of a 2-message chat, a greedy 16-token continuation
  smollm2_logits.safetensors    input_ids (the rendered prompt's ids, int64 [n]) and the
                                float32 logits of its LAST 4 positions ([4, 49152])
  tiny_llama_spm.gguf           a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 kv heads)
                                with a SentencePiece vocabulary (BPE, 400 pieces, byte
                                fallback) trained here on a built-in corpus; tensors in F32,
                                F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; q/k rows permuted as
                                llama.cpp's convert_hf_to_gguf.py permutes them
  tiny_llama_spm_reference.json token ids of test strings, config facts, tensor types
  tiny_llama_spm_weights.safetensors
                                every weight as transformers loads it from the GGUF
                                (dequantized, un-permuted, HF names, float32), plus
                                `original.<name>` = the q_proj/k_proj weights before
                                quantization and permutation
  tiny_llama_spm_logits.safetensors
                                input_ids (int64 [n]) and float32 logits ([n, vocab]) from
                                transformers loading the GGUF

Reference token ids follow llama.cpp's tokenizer, which the Rust import reproduces:

  * SmolLM2 (`tokenizer.ggml.pre = smollm`): llama.cpp splits digits one by one before the
    GPT-2 regex, as SmolLM2's own tokenizer.json does. transformers 4.57's GGUF loader drops
    `tokenizer.ggml.pre` (GPT-2 regex only) and adds a BOS although the file says
    `add_bos_token = false`. So `ids` come from transformers' tokenizer with the pre-tokenizer
    set to llama.cpp's `smollm` one, encoded without special tokens; `transformers_gguf_ids`
    keep what transformers gives, for the record (they agree on every string here, since
    SmolLM2's vocabulary has no multi-digit tokens).
  * Tiny SentencePiece model: `ids` are SentencePiece's own encoding of each text fragment
    between added tokens (CONTROL/USER_DEFINED pieces matched whole, a space prefix before
    each fragment), which is llama.cpp's SPM behaviour. transformers' GGUF converter turns
    only CONTROL pieces into added tokens, so its ids differ on strings holding the
    USER_DEFINED `<|im_start|>`/`<|im_end|>`; `transformers_gguf_ids` keep them for the record
    and the script checks they agree everywhere else.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf"
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

GENERATOR = {
    "script": "tools/make_gguf_fixtures.py",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "gguf": getattr(gguf, "__version__", "0.17.1"),
    "sentencepiece": spm.__version__,
    "numpy": np.__version__,
    "python": ".".join(map(str, sys.version_info[:3])),
}

# English, digits, Chinese, emoji, code, leading/trailing spaces, special tokens.
TEST_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "In 2024, pi was still 3.14159 and 1,000,000 > 999.",
    "你好，世界！",
    "emoji 🦀🚀 ok",
    "def add(a, b):\n    return a + b\n",
    "   three leading spaces",
    "trailing spaces   ",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "tabs\tand\r\nnewlines\n\n",
    "Ünïcödé café naïve",
]

CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colors of the rainbow."},
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# (a) SmolLM2-135M-Instruct Q4_1
# ---------------------------------------------------------------------------


def smollm2(gguf_path: Path) -> None:
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    reader = gguf.GGUFReader(str(gguf_path))
    pre = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode()
    assert pre == "smollm", pre

    # llama.cpp's `smollm` pre-tokenizer: each digit alone, then GPT-2's regex.
    faithful = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    faithful.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )

    cases = []
    for text in TEST_STRINGS:
        ids = faithful.encode(text, add_special_tokens=False).ids
        hf_ids = tokenizer.encode(text, add_special_tokens=False)
        if ids != hf_ids:
            print(f"note: transformers' GGUF tokenizer differs from llama.cpp on {text!r}: {hf_ids} vs {ids}")
        cases.append({"text": text, "ids": ids, "transformers_gguf_ids": hf_ids})

    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = faithful.encode(rendered, add_special_tokens=False).ids
    assert prompt_ids == tokenizer.encode(rendered, add_special_tokens=False), "prompt tokenization disagrees"

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()
        generated = model.generate(
            input_ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(input_ids),
            pad_token_id=tokenizer.pad_token_id or 0,
        )
    new_ids = generated[0, len(prompt_ids):].tolist()
    # Greedy decoding must agree with the argmax of the logits just computed.
    assert new_ids[0] == int(logits[-1].argmax()), "generate() disagrees with forward()"

    save_file(
        {"input_ids": input_ids[0].contiguous(), "logits": logits[-4:].contiguous()},
        str(OUT / "smollm2_logits.safetensors"),
        metadata={"generator": json.dumps(GENERATOR, sort_keys=True)},
    )
    write_json(OUT / "smollm2_reference.json", {
        "generator": GENERATOR,
        "gguf": {
            "file": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
            "fetch": "scripts/fetch-demo-model.sh",
            "bytes": gguf_path.stat().st_size,
            "sha256": sha256(gguf_path),
        },
        "pre_tokenizer": pre,
        "add_bos_token": False,
        "tokenization": cases,
        "chat": {
            "messages": CHAT,
            "add_generation_prompt": True,
            "rendered": rendered,
            "input_ids": prompt_ids,
        },
        "greedy": {
            "max_new_tokens": 16,
            "new_ids": new_ids,
            "text": tokenizer.decode(new_ids, skip_special_tokens=False),
        },
        "logits": {
            "file": "smollm2_logits.safetensors",
            "keys": {"input_ids": "int64 [n]: chat.input_ids", "logits": "float32 [4, vocab]: positions n-4 .. n-1"},
            "dtype": "float32 model (transformers dequantizes the GGUF to float32)",
        },
    })
    print(f"smollm2: {len(prompt_ids)} prompt tokens, continuation {tokenizer.decode(new_ids)!r}")


# ---------------------------------------------------------------------------
# (b) A tiny Llama with a SentencePiece vocabulary, written by gguf-py
# ---------------------------------------------------------------------------

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
To be or not to be, that is the question.
All that glitters is not gold; all who wander are not lost.
The rain in Spain stays mainly in the plain.
She sells sea shells by the sea shore, and the shells she sells are sea shells.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
Peter Piper picked a peck of pickled peppers.
In the beginning the universe was created. This has made a lot of people very angry.
It was the best of times, it was the worst of times.
Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.
The numbers 0 1 2 3 4 5 6 7 8 9 appear here, and 42 is the answer.
def greet(name):
    return "Hello, " + name + "!"
for i in range(10):
    print(i * i)
Hello world! Hello there. Hello again, world.
user: what is the weather like today? assistant: it is sunny and warm.
Questions, answers, and conversations between a user and a helpful assistant.
Tabs\tseparate\tcolumns and lines end with newlines.
"""

USER_DEFINED = ["<|im_start|>", "<|im_end|>"]
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=256, theta=10000.0, eps=1e-5)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tensor types: a mix covering every type gguf-py can write and candle can read.
Q = gguf.GGMLQuantizationType
TENSOR_TYPES = {
    "token_embd.weight": Q.F16,
    "output.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.F32,
    "blk.0.attn_k.weight": Q.F16,
    "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.BF16,
    "blk.0.ffn_gate.weight": Q.Q4_0,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q5_0,
    "blk.1.attn_q.weight": Q.Q8_0,
    "blk.1.attn_k.weight": Q.Q8_0,
    "blk.1.attn_v.weight": Q.F16,
    "blk.1.attn_output.weight": Q.Q5_1,
    "blk.1.ffn_gate.weight": Q.Q8_0,
    "blk.1.ffn_up.weight": Q.F16,
    "blk.1.ffn_down.weight": Q.Q4_0,
}  # norms: F32


def train_sentencepiece() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=USER_DEFINED,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def pieces(model_bytes: bytes) -> tuple[list[str], list[float], list[int]]:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    kinds = {
        proto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
        proto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
        proto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
        proto.SentencePiece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
        proto.SentencePiece.UNUSED: gguf.TokenType.UNUSED,
        proto.SentencePiece.BYTE: gguf.TokenType.BYTE,
    }
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(kinds[p.type]) for p in proto.pieces]
    return tokens, scores, types


def llama_cpp_spm_ids(sp: spm.SentencePieceProcessor, tokens: list[str], types: list[int], text: str) -> list[int]:
    """llama.cpp's SPM tokenization: added pieces (CONTROL, USER_DEFINED, UNKNOWN) match
    whole, leftmost-longest; each text fragment is encoded with a space prefix."""
    added = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (2, 3, 4)}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for i, fragment in enumerate(re.split(pattern, text)):
        if i % 2 == 1:
            ids.append(added[fragment])
        elif fragment:
            ids.extend(sp.encode(fragment))
    return ids


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's q/k row permutation: per head, the two rotary halves are
    interleaved (rows [x0..x7, y0..y7] -> [x0, y0, x1, y1, ...])."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(hf: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    layer = re.match(r"model\.layers\.(\d+)\.(.+)$", hf)
    assert layer, hf
    parts = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    return f"blk.{layer.group(1)}.{parts[layer.group(2)]}"


def tiny_llama_spm() -> None:
    model_bytes = train_sentencepiece()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    tokens, scores, types = pieces(model_bytes)
    vocab = len(tokens)

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=TINY["context"], rms_norm_eps=TINY["eps"], rope_theta=TINY["theta"],
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so a swapped norm would show
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    path = OUT / "tiny_llama_spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-spm")
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    tensor_types = {}
    for hf, tensor in state.items():
        name = gguf_name(hf)
        data = tensor
        if name.endswith("attn_q.weight"):
            data = permute(data, TINY["heads"], TINY["heads"])
        elif name.endswith("attn_k.weight"):
            data = permute(data, TINY["heads"], TINY["kv_heads"])
        qtype = TENSOR_TYPES.get(name, Q.F32)
        array = data.numpy().astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, array)
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        tensor_types[name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # transformers reads the GGUF back: its dequantized, un-permuted weights and logits are the
    # reference (an implementation independent of oxtune's).
    loaded = AutoModelForCausalLM.from_pretrained(str(OUT), gguf_file=path.name, torch_dtype=torch.float32)
    loaded.eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(OUT), gguf_file=path.name)

    cases = []
    for text in TEST_STRINGS:
        ids = llama_cpp_spm_ids(sp, tokens, types, text)
        hf_ids = hf_tokenizer.encode(text, add_special_tokens=False)
        if not any(u in text for u in USER_DEFINED):
            assert ids == hf_ids, f"{text!r}: sentencepiece {ids} vs transformers {hf_ids}"
        assert sp.decode(ids) == text or any(u in text for u in USER_DEFINED), text
        cases.append({"text": text, "ids": ids, "with_special_tokens": [1] + ids, "transformers_gguf_ids": hf_ids})

    prompt = "The quick brown fox jumps over the lazy dog."
    input_ids = torch.tensor([[1] + llama_cpp_spm_ids(sp, tokens, types, prompt)], dtype=torch.long)
    with torch.no_grad():
        logits = loaded(input_ids).logits[0].float()
    save_file(
        {"input_ids": input_ids[0].contiguous(), "logits": logits.contiguous()},
        str(OUT / "tiny_llama_spm_logits.safetensors"),
        metadata={"generator": json.dumps(GENERATOR, sort_keys=True)},
    )
    weights = {k: v.detach().float().contiguous() for k, v in loaded.state_dict().items()}
    for hf in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        weights[f"original.{hf}"] = state[hf].contiguous()
    # The original weights must round-trip exactly where the GGUF kept F32.
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.weight"])
    save_file(weights, str(OUT / "tiny_llama_spm_weights.safetensors"), metadata={"generator": json.dumps(GENERATOR, sort_keys=True)})

    write_json(OUT / "tiny_llama_spm_reference.json", {
        "generator": GENERATOR,
        "gguf": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)},
        "config": {
            "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": TINY["hidden"],
            "intermediate_size": TINY["intermediate"], "num_hidden_layers": TINY["layers"],
            "num_attention_heads": TINY["heads"], "num_key_value_heads": TINY["kv_heads"], "head_dim": 16,
            "max_position_embeddings": TINY["context"], "rms_norm_eps": TINY["eps"], "rope_theta": TINY["theta"],
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        },
        "tokenizer": {"bos_token": tokens[1], "eos_token": tokens[2], "unk_token": tokens[0], "add_bos_token": True,
                      "user_defined": USER_DEFINED},
        "tensor_types": tensor_types,
        "tokenization": cases,
        "logits": {"file": "tiny_llama_spm_logits.safetensors", "prompt": prompt,
                   "keys": {"input_ids": "int64 [n], BOS first", "logits": "float32 [n, vocab]"}},
        "weights": {"file": "tiny_llama_spm_weights.safetensors",
                    "keys": "HF names as transformers loads the GGUF (float32); original.<q/k_proj> before quantization and permutation"},
    })
    print(f"tiny_llama_spm: vocab {vocab}, {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--skip-smollm2", action="store_true", help="only regenerate the tiny SentencePiece fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    tiny_llama_spm()
    if not args.skip_smollm2:
        if not args.smollm2.is_file():
            sys.exit(f"error: {args.smollm2} not found\nhint: run scripts/fetch-demo-model.sh first (or pass --skip-smollm2)")
        smollm2(args.smollm2)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{OUT.relative_to(ROOT)}: {total / 1e6:.2f} MB")
    assert total < 2_200_000, "tests/fixtures/gguf should stay around 2 MB"


if __name__ == "__main__":
    main()
