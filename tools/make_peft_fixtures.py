#!/usr/bin/env python3
"""Generate the training-parity fixtures under tests/fixtures/peft/ for oxtune's Rust tests.

Reference values for LoRA / rsLoRA / DoRA (Hugging Face peft) and full fine-tuning
(transformers + torch): loss, logits, gradients of every trainable parameter and the
parameters after torch.optim.AdamW steps, plus a gradient-accumulation + clipping case
and merged (merge_and_unload) logits.

Needs the tiny models made by tools/make_fixtures.py (tests/fixtures/tiny-*/). Run by
hand, from the repository root:

    python3 -m venv ~/.cache/oxtune-fixtures
    ~/.cache/oxtune-fixtures/bin/pip install -r tools/requirements-fixtures.txt
    nice ~/.cache/oxtune-fixtures/bin/python tools/make_peft_fixtures.py

The script is deterministic (fixed seeds, one CPU thread, deterministic algorithms,
float32, eager attention): running it twice with the pinned versions gives identical
files. Every reference.safetensors holds the generator versions (torch, transformers,
peft, ...) as JSON in its `generator` metadata entry, and every reference.json has the
same under `generator`. The adapters are written by peft's own `save_pretrained`, so
adapter_config.json / adapter_model.safetensors are exactly peft's format.
The script checks its outputs (reloads every adapter with PeftModel.from_pretrained and
requires bit-identical logits, among other checks) and refuses to finish otherwise.
See tests/fixtures/peft/README.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

# peft turns target_modules="all-linear" into a Python set of module names and saves
# it as a list in set order, which depends on string hashing: fix the hash seed so that
# adapter_config.json is byte-identical between runs.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import accelerate  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import dora as peft_dora  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Paths are kept relative to the repository root so that nothing machine-specific (such
# as an absolute base_model_name_or_path) ends up in adapter_config.json.
os.chdir(ROOT)
FIXTURES = Path("tests/fixtures")
OUT = FIXTURES / "peft"

GENERATOR = {
    "script": "tools/make_peft_fixtures.py",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "accelerate": accelerate.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "python": ".".join(map(str, sys.version_info[:3])),
}

VOCAB_SIZE = 512
SEQ_LEN = 24
ROW1_LEN = 20  # real tokens in row 1; the rest is right padding
PAD_ID = 509  # <|endoftext|>
IGNORE = -100

# (prompt, answer): the prompt tokens get label -100.
BATCH_TEXTS = [
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello! How can I help you today?<|im_end|>\n"),
    ("Q: What is 2 + 2?\nA:", " 2 + 2 = 4, and 3 * 7 = 21."),
]

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}
# (model, variant). tiny-qwen2 (tied embeddings, q/k/v bias) only gets dora, which
# also runs the plain LoRA path (lora_B(lora_A(x))) and peft's "base_result - bias"
# step; rsLoRA is only a different scaling. Keeps the directory near 3 MB.
CASES = [
    ("tiny-llama", "lora"),
    ("tiny-llama", "rslora"),
    ("tiny-llama", "dora"),
    ("tiny-qwen3", "lora"),
    ("tiny-qwen3", "rslora"),
    ("tiny-qwen3", "dora"),
    ("tiny-qwen2", "dora"),
]
# One seed per model, shared by its variants: lora, rslora and dora of one model have
# identical lora_A / lora_B values, so they differ only in adapter_config.json.
MODEL_SEED = {"tiny-llama": 11000, "tiny-qwen2": 12000, "tiny-qwen3": 13000}
LORA_B_STD = 0.1  # lora_B is overwritten with LORA_B_STD * randn (peft inits it to 0)
EXPECTED_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
MAX_GRAD_NORM = 0.5

TOL = {
    "loss_rel": 1e-4,
    "grad_rel": 1e-4,
    "logits_max_abs": 1e-4,
    "adamw_params_max_abs": 1e-6,
    "grad_norm_rel": 1e-4,
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def meta() -> dict:
    return {"generator": json.dumps(GENERATOR, sort_keys=True)}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_base(model_name: str):
    model = AutoModelForCausalLM.from_pretrained(
        str(FIXTURES / model_name), dtype=torch.float32, attn_implementation="eager"
    )
    assert model.dtype == torch.float32
    return model


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' ForCausalLMLoss (the one model(labels=...) uses)."""
    return ForCausalLMLoss(logits, labels, vocab_size=VOCAB_SIZE, num_items_in_batch=num_items_in_batch)


def num_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE).sum())


def forward_loss(model, batch: dict, labels_check: bool = True):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits
    loss = causal_lm_loss(logits, batch["labels"])
    if labels_check:
        with torch.no_grad():
            ref = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        assert torch.equal(ref, loss.detach()), (float(ref), float(loss.detach()))
    return logits, loss


NO_DECAY_PATTERNS = [re.compile(p) for p in ("bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


def no_decay(name: str) -> bool:
    """transformers' Trainer rule (trainer_pt_utils.get_parameter_names with its forbidden
    layer names), which ms-swift and oxtune follow: no weight decay for biases and norm
    weights; everything else, DoRA magnitude vectors and embeddings included, decays."""
    module = name.lower().removesuffix(".weight")
    return any(p.search(module) for p in NO_DECAY_PATTERNS)


def param_groups(named_params):
    """Decay / no-decay groups by `no_decay`. Empty groups are left out."""
    decay = [p for n, p in named_params if not no_decay(n)]
    no_decay_params = [p for n, p in named_params if no_decay(n)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": ADAMW["weight_decay"]})
    if no_decay_params:
        groups.append({"params": no_decay_params, "weight_decay": 0.0})
    return groups


def make_adamw(named_params):
    kw = {k: v for k, v in ADAMW.items() if k != "weight_decay"}
    # foreach=False: the plain single-tensor loop (what torch picks on CPU anyway).
    return torch.optim.AdamW(param_groups(named_params), **kw, foreach=False, fused=False)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of(named, prefix: str) -> dict:
    out = {}
    for n, p in named:
        assert p.grad is not None, f"no gradient for {n}"
        g = p.grad.detach().clone().contiguous()
        assert torch.isfinite(g).all(), n
        assert float(g.abs().max()) > 0.0, f"zero gradient for {n}"
        out[f"{prefix}.{n}"] = g
    return out


def params_of(named, prefix: str) -> dict:
    return {f"{prefix}.{n}": p.detach().clone().contiguous() for n, p in named}


def check_adamw(initial: dict, ref: dict, no_decay_set: set, steps: int) -> float:
    """Re-implement torch.optim.AdamW (the formula in the README) from the recorded
    gradients and compare with the recorded parameters. initial: name -> tensor."""
    lr, (b1, b2), eps, wd = ADAMW["lr"], ADAMW["betas"], ADAMW["eps"], ADAMW["weight_decay"]
    worst = 0.0
    for n, p in initial.items():
        p = p.clone()
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        for t in range(1, steps + 1):
            g = ref[("grad." if t == 1 else "grad_step2.") + n]
            p = p * (1 - lr * (0.0 if n in no_decay_set else wd))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = v.sqrt() / (1 - b2**t) ** 0.5 + eps
            p = p - (lr / (1 - b1**t)) * m / denom
            want = ref[("after_step." if t == 1 else "after_step2.") + n]
            worst = max(worst, float((p - want).abs().max()))
    assert worst < 1e-7, worst
    return worst


def global_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def adapter_name_map(model) -> dict:
    """named_parameters() name -> key in adapter_model.safetensors (what peft writes)."""
    mapping = {}
    for n, _ in trainable(model):
        k = n.replace(".default", "")
        if k.endswith(".lora_magnitude_vector.weight"):
            k = k[: -len(".weight")]
        mapping[n] = k
    return mapping


# ---------------------------------------------------------------------------
# batch
# ---------------------------------------------------------------------------

def make_batch(tokenizer) -> tuple[dict, list]:
    rows, labels, masks, info = [], [], [], []
    for i, (prompt, answer) in enumerate(BATCH_TEXTS):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids
        length = SEQ_LEN if i == 0 else ROW1_LEN
        ids = (p + a)[:length]
        assert len(ids) == length and len(p) < length - 4, (i, len(p), len(a))
        lab = [IGNORE] * len(p) + ids[len(p):]
        pad = SEQ_LEN - length
        rows.append(ids + [PAD_ID] * pad)
        labels.append(lab + [IGNORE] * pad)
        masks.append([1] * length + [0] * pad)
        info.append({"prompt": prompt, "answer": answer, "prompt_tokens": len(p), "real_tokens": length,
                     "padding_tokens": pad})
    batch = {
        "input_ids": torch.tensor(rows, dtype=torch.int64),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "attention_mask": torch.tensor(masks, dtype=torch.int64),
    }
    for r in info:
        r["target_tokens"] = r["real_tokens"] - r["prompt_tokens"]
    assert num_targets(batch["labels"]) == sum(r["target_tokens"] for r in info)
    return batch, info


# ---------------------------------------------------------------------------
# LoRA / rsLoRA / DoRA
# ---------------------------------------------------------------------------

def new_peft_model(model_name: str, variant: str):
    base = load_base(model_name)
    cfg = LoraConfig(**LORA, **VARIANTS[variant], task_type="CAUSAL_LM")
    seed = MODEL_SEED[model_name]
    torch.manual_seed(seed)  # lora_A init (kaiming uniform)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed + 500)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
    return model, seed


def check_structure(model, model_name: str, variant: str) -> None:
    names = [n for n, _ in trainable(model)]
    targets = sorted({n.split(".")[-4] for n in names})
    assert targets == EXPECTED_TARGETS, targets
    assert not any("lm_head" in n or "embed_tokens" in n for n in names), names
    per_module = 3 if variant == "dora" else 2
    n_layers = model.base_model.model.config.num_hidden_layers
    assert len(names) == per_module * len(EXPECTED_TARGETS) * n_layers, len(names)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert n.startswith("base_model.model.model.layers."), n
        assert ".default." in n, n


def dora_sensitivity(model_name, adapter_dir, batch, ref_grads) -> dict:
    """How far the gradients move if the DoRA weight norm were not detached."""
    orig = peft_dora.DoraLinearLayer.forward

    def forward_no_detach(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None):
        x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=x.dtype)
        lora_weight = lora_B(lora_A(x_eye)).T
        weight = peft_dora.dequantize_module_weight(base_layer).to(x.dtype)
        weight_norm = self.get_weight_norm(weight, lora_weight, scaling)  # no detach
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = torch.nn.functional.linear(x, weight)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    peft_dora.DoraLinearLayer.forward = forward_no_detach
    try:
        model = PeftModel.from_pretrained(load_base(model_name), str(adapter_dir), is_trainable=True)
        model.train()
        _, loss = forward_loss(model, batch, labels_check=False)
        loss.backward()
        worst = 0.0
        for n, p in trainable(model):
            if ".lora_magnitude_vector." in n:
                continue
            worst = max(worst, max_rel(p.grad, ref_grads[f"grad.{n}"]))
    finally:
        peft_dora.DoraLinearLayer.forward = orig
    return {"max_rel_lora_grad_change_if_weight_norm_not_detached": worst}


def check_formulas(model_name: str, adapter_dir: Path, batch: dict, ref: dict) -> dict:
    """Recompute loss and gradients without peft, from the saved files and the formulas in
    the README (LoRA: W x + b + s B A x; DoRA: (m / ||W + s B A||_row.detach()) (W x + s B A x) + b)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
    model = load_base(model_name)
    model.train()
    modules = dict(model.named_modules())
    params = {}
    for t in cfg["target_modules"]:
        lin = modules[t]
        A = tensors[f"base_model.model.{t}.lora_A.weight"].clone().requires_grad_(True)
        B = tensors[f"base_model.model.{t}.lora_B.weight"].clone().requires_grad_(True)
        params[f"base_model.model.{t}.lora_A.default.weight"] = A
        params[f"base_model.model.{t}.lora_B.default.weight"] = B
        m = None
        if cfg["use_dora"]:
            m = tensors[f"base_model.model.{t}.lora_magnitude_vector"].clone().requires_grad_(True)
            params[f"base_model.model.{t}.lora_magnitude_vector.default.weight"] = m
            # peft's init: row norms of W (lora_B was zero then)
            assert torch.allclose(m.detach(), torch.linalg.norm(lin.weight, dim=1), rtol=1e-6, atol=0), t

        def fwd(x, lin=lin, A=A, B=B, m=m):
            y = x @ lin.weight.T + s * ((x @ A.T) @ B.T)
            if m is not None:
                y = (m / torch.linalg.norm(lin.weight + s * (B @ A), dim=1).detach()) * y
            return y if lin.bias is None else y + lin.bias

        lin.forward = fwd
    assert len(params) == len(tensors)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    loss_rel = abs(float(loss.detach()) - float(ref["loss"])) / float(ref["loss"])
    grad_rel = max(max_rel(p.grad, ref[f"grad.{n}"]) for n, p in params.items())
    assert loss_rel < 1e-6 and grad_rel < 1e-5, (loss_rel, grad_rel)
    return {"loss_rel": loss_rel, "grad_max_rel": grad_rel}


def make_lora_case(model_name: str, variant: str, batch: dict) -> dict:
    d = OUT / f"{model_name}-{variant}"
    d.mkdir(parents=True)
    model, seed = new_peft_model(model_name, variant)
    check_structure(model, model_name, variant)
    adapter_dir = d / "adapter"
    model.save_pretrained(str(adapter_dir))
    # peft also writes a model-card README.md (a template, not needed to load); drop it.
    (adapter_dir / "README.md").unlink()
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    names = adapter_name_map(model)

    # adapter_model.safetensors holds exactly the trainable parameters, under peft's names.
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(names.values()), (sorted(saved)[:4], sorted(names.values())[:4])
    for n, p in trainable(model):
        assert torch.equal(saved[names[n]], p.detach()), n

    model.train()
    named = trainable(model)
    initial = {n: p.detach().clone() for n, p in named}
    opt = make_adamw(named)

    logits, loss = forward_loss(model, batch)
    loss.backward()
    ref = {"loss": loss.detach().clone().reshape(())}
    if variant != "rslora":
        # rslora has the same lora_A / lora_B as lora (only the scaling differs), so its
        # logits are left out to keep the directory small; reference.json has a checksum.
        ref["logits"] = logits.detach().clone().contiguous()
    full_logits = logits.detach().clone()
    ref.update(grads_of(named, "grad"))
    grad_norm = global_norm([p.grad for _, p in named])
    opt.step()
    opt.zero_grad(set_to_none=True)
    ref.update(params_of(named, "after_step"))

    _, loss2 = forward_loss(model, batch)
    loss2.backward()
    ref["loss_step2"] = loss2.detach().clone().reshape(())
    ref.update(grads_of(named, "grad_step2"))
    grad_norm2 = global_norm([p.grad for _, p in named])
    opt.step()
    opt.zero_grad(set_to_none=True)
    ref.update(params_of(named, "after_step2"))
    assert float(loss2.detach()) < float(loss.detach()), (float(loss.detach()), float(loss2.detach()))
    adamw_check = check_adamw(initial, ref, {n for n, p in named if no_decay(n)}, 2)

    # Reload the saved adapter exactly as a user would and compare.
    reloaded = PeftModel.from_pretrained(load_base(model_name), str(adapter_dir))
    reloaded.eval()
    with torch.no_grad():
        re_logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reload_diff = float((re_logits - full_logits).abs().max())
    assert reload_diff == 0.0, reload_diff
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    merge_diff = float((merged_logits - full_logits).abs().max())
    assert merge_diff < 1e-5, merge_diff
    if (model_name, variant) == ("tiny-llama", "lora"):
        ref["merged_logits"] = merged_logits.detach().clone().contiguous()

    # Sensitivities: the Rust tests must be able to tell these mistakes apart.
    cfg = model.peft_config["default"]
    scaling = {"lora": cfg.lora_alpha / cfg.r, "rslora": cfg.lora_alpha / cfg.r ** 0.5, "dora": cfg.lora_alpha / cfg.r}
    sens = {}
    if variant == "dora":
        sens.update(dora_sensitivity(model_name, adapter_dir, batch, ref))
        # AdamW: the magnitude vectors (1-D) get no weight decay; decaying them would move
        # after_step by lr * wd * |m|.
        sens["max_abs_after_step_change_if_magnitude_decayed"] = max(
            ADAMW["lr"] * ADAMW["weight_decay"] * float(p.abs().max())
            for n, p in initial.items() if ".lora_magnitude_vector." in n
        )

    formulas = check_formulas(model_name, adapter_dir, batch, ref)
    save_file(ref, str(d / "reference.safetensors"), metadata=meta())
    write_json(d / "names.json", names)

    no_decay_names = [n for n, p in named if no_decay(n)]
    info = {
        "generator": GENERATOR,
        "model": model_name,
        "base_model_dir": str(FIXTURES / model_name),
        "variant": variant,
        "lora_config": {**LORA, **VARIANTS[variant]},
        "scaling": scaling[variant],
        "seed": seed,
        "lora_B_init": f"{LORA_B_STD} * randn (torch.Generator seeded {seed + 500}), overwriting peft's zeros",
        "dora_magnitude_init": "peft's own: row-wise L2 norm of the base weight (computed while lora_B was 0)"
        if variant == "dora" else None,
        "num_trainable_tensors": len(named),
        "num_trainable_params": sum(p.numel() for _, p in named),
        "adamw": {**ADAMW, "betas": list(ADAMW["betas"]), "foreach": False,
                  "no_weight_decay": no_decay_names},
        "loss": float(loss.detach()),
        "loss_step2": float(loss2.detach()),
        "grad_norm": grad_norm,
        "grad_norm_step2": grad_norm2,
        "logits_sum": float(full_logits.double().sum()),
        "logits_abs_sum": float(full_logits.double().abs().sum()),
        "adamw_reimplementation_max_abs_diff": adamw_check,
        "reload_max_abs_logit_diff": reload_diff,
        "formulas_without_peft": formulas,
        "merged_vs_unmerged_max_abs_logit_diff": merge_diff,
        "sensitivity": sens,
        "tolerance": TOL,
    }
    write_json(d / "reference.json", info)
    print(f"{d.name}: loss {float(loss.detach()):.6f} -> {float(loss2.detach()):.6f}, grad norm {grad_norm:.6f}, "
          f"merge diff {merge_diff:.2e}, {len(named)} tensors {sens}")
    return info


# ---------------------------------------------------------------------------
# Full fine-tuning (tiny-qwen3)
# ---------------------------------------------------------------------------

def make_full(batch: dict) -> dict:
    model_name = "tiny-qwen3"
    d = OUT / f"{model_name}-full"
    d.mkdir(parents=True)
    model = load_base(model_name)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    named = trainable(model)
    initial = {n: p.detach().clone() for n, p in named}
    assert not model.config.tie_word_embeddings
    on_disk = set()
    for f in (FIXTURES / model_name).glob("model*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            on_disk |= set(fh.keys())
    assert on_disk == {n for n, _ in named}, on_disk ^ {n for n, _ in named}

    opt = make_adamw(named)
    _, loss = forward_loss(model, batch)
    loss.backward()
    ref = {"loss": loss.detach().clone().reshape(())}
    # embed_tokens only gets gradient on the rows of tokens in the batch; the other
    # tensors must all be non-zero.
    for n, p in named:
        g = p.grad.detach().clone().contiguous()
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0, n
        ref[f"grad.{n}"] = g
    grad_norm = global_norm([p.grad for _, p in named])
    opt.step()
    ref.update(params_of(named, "after_step"))
    adamw_check = check_adamw(initial, ref, {n for n, p in named if no_decay(n)}, 1)
    save_file(ref, str(d / "reference.safetensors"), metadata=meta())

    no_decay_names = [n for n, p in named if no_decay(n)]
    assert no_decay_names and all("norm" in n for n in no_decay_names), no_decay_names
    info = {
        "generator": GENERATOR,
        "model": model_name,
        "base_model_dir": str(FIXTURES / model_name),
        "train_type": "full",
        "num_params": sum(p.numel() for _, p in named),
        "adamw": {**ADAMW, "betas": list(ADAMW["betas"]), "foreach": False, "no_weight_decay": no_decay_names},
        "loss": float(loss.detach()),
        "grad_norm": grad_norm,
        "adamw_reimplementation_max_abs_diff": adamw_check,
        "tolerance": TOL,
    }
    write_json(d / "reference.json", info)
    print(f"{d.name}: loss {float(loss.detach()):.6f}, grad norm {grad_norm:.6f}, {info['num_params']} params")
    return info


# ---------------------------------------------------------------------------
# Gradient accumulation + clipping (tiny-llama lora)
# ---------------------------------------------------------------------------

def make_accum(batch: dict, full_grads: dict) -> dict:
    model_name = "tiny-llama"
    src = OUT / f"{model_name}-lora" / "adapter"
    d = OUT / f"{model_name}-lora-accum"
    d.mkdir(parents=True)
    model = PeftModel.from_pretrained(load_base(model_name), str(src), is_trainable=True)
    model.train()
    named = trainable(model)
    initial = {n: p.detach().clone() for n, p in named}
    opt = make_adamw(named)

    total = num_targets(batch["labels"])
    micro_batches = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

    # Sensitivity: gradients if each micro-batch were normalised by its own target count
    # and the micro-batches averaged (the classic mistake). Uses autograd.grad, so the
    # .grad fields used below are untouched.
    per_micro = []
    for mb in micro_batches:
        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
        li = causal_lm_loss(out.logits, mb["labels"], num_items_in_batch=torch.tensor(total))
        per_micro.append(torch.autograd.grad(li, [p for _, p in named]))
    t = [num_targets(mb["labels"]) for mb in micro_batches]
    wrong_rel = 0.0
    for j, (n, _) in enumerate(named):
        right = per_micro[0][j] + per_micro[1][j]
        wrong = (per_micro[0][j] * total / t[0] + per_micro[1][j] * total / t[1]) / 2
        wrong_rel = max(wrong_rel, max_rel(wrong, right))

    micro_losses, micro_targets = [], []
    for mb in micro_batches:
        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
        # sum of per-token losses of this micro-batch / target tokens of the whole step
        loss_i = causal_lm_loss(out.logits, mb["labels"], num_items_in_batch=torch.tensor(total))
        loss_i.backward()
        micro_losses.append(float(loss_i.detach()))
        micro_targets.append(num_targets(mb["labels"]))
    assert sum(micro_targets) == total

    unclipped = {n: p.grad.detach().clone() for n, p in named}
    for n, _ in named:
        r = max_rel(unclipped[n], full_grads[f"grad.{n}"])
        assert r < 1e-5, (n, r)
    gn = torch.nn.utils.clip_grad_norm_([p for _, p in named], MAX_GRAD_NORM, foreach=False)
    gn = float(gn)
    assert gn > MAX_GRAD_NORM, f"grad norm {gn} <= {MAX_GRAD_NORM}: clipping would be a no-op"
    ref = {
        "loss": torch.tensor(sum(micro_losses), dtype=torch.float32),
        "micro_loss": torch.tensor(micro_losses, dtype=torch.float32),
        "micro_target_tokens": torch.tensor(micro_targets, dtype=torch.int64),
        "grad_norm_before_clip": torch.tensor(gn, dtype=torch.float32),
    }
    ref.update(grads_of(named, "grad"))
    clipped_norm = global_norm([p.grad for _, p in named])
    opt.step()
    ref.update(params_of(named, "after_step"))
    adamw_check = check_adamw(initial, ref, set(), 1)
    save_file(ref, str(d / "reference.safetensors"), metadata=meta())
    # the wrong normalisation (mean per micro-batch, then mean over micro-batches)
    wrong = [ml * total / t for ml, t in zip(micro_losses, micro_targets)]
    info = {
        "generator": GENERATOR,
        "model": model_name,
        "adapter_dir": str(src),
        "micro_batches": [[0], [1]],
        "normalisation": "each micro-batch: sum of per-token CE over its targets / total target tokens of the step",
        "total_target_tokens": total,
        "micro_target_tokens": micro_targets,
        "micro_loss": micro_losses,
        "loss": sum(micro_losses),
        "loss_if_mean_of_micro_means": sum(wrong) / len(wrong),
        "sensitivity": {"max_rel_grad_change_if_mean_of_micro_means": wrong_rel},
        "max_grad_norm": MAX_GRAD_NORM,
        "grad_norm_before_clip": gn,
        "grad_norm_after_clip": clipped_norm,
        "clip_coef": MAX_GRAD_NORM / (gn + 1e-6),
        "adamw_reimplementation_max_abs_diff": adamw_check,
        "adamw": {**ADAMW, "betas": list(ADAMW["betas"]), "foreach": False,
                  "no_weight_decay": [n for n, p in named if no_decay(n)]},
        "tolerance": TOL,
    }
    write_json(d / "reference.json", info)
    print(f"{d.name}: loss {sum(micro_losses):.6f} (micro {micro_losses}), grad norm {gn:.6f} -> {clipped_norm:.6f}")
    return info


# ---------------------------------------------------------------------------

def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # Start from an empty directory, but keep the hand-written README.md.
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.iterdir():
        if p.name == "README.md":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(FIXTURES / "tokenizer"))
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.convert_tokens_to_ids("<|endoftext|>") == PAD_ID
    batch, batch_info = make_batch(tokenizer)
    save_file({k: v.contiguous() for k, v in batch.items()}, str(OUT / "batch.safetensors"), metadata=meta())
    write_json(OUT / "batch.json", {"generator": GENERATOR, "rows": batch_info,
                                    "target_tokens": num_targets(batch["labels"])})
    print("batch:", batch_info)

    summary = {"generator": GENERATOR, "cases": {}}
    for model_name, variant in CASES:
        summary["cases"][f"{model_name}-{variant}"] = make_lora_case(model_name, variant, batch)
    full_grads = load_file(str(OUT / "tiny-llama-lora" / "reference.safetensors"))
    summary["cases"]["tiny-llama-lora-accum"] = make_accum(batch, full_grads)
    summary["cases"]["tiny-qwen3-full"] = make_full(batch)

    # lora and rslora differ only in scaling; check the fixtures tell them apart.
    for m in {c[0] for c in CASES}:
        if (m, "rslora") in CASES:
            a = summary["cases"][f"{m}-lora"]["loss"]
            b = summary["cases"][f"{m}-rslora"]["loss"]
            assert abs(a - b) > 1e-3 * abs(a), (m, a, b)

    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            h = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            print(f"{p.stat().st_size:>9}  {h}  {p}")
    print(f"total {total} bytes")
    assert total < 3.6 * 1024 * 1024, total


if __name__ == "__main__":
    main()
