"""peft loads the adapters oxtune writes.

Loads `tests/fixtures/peft/oxtune-saved/adapter/` (written by oxtune's peft writer, see
crates/oxtune-tuners/tests/peft_reads_ours.rs) with `peft.PeftModel.from_pretrained` on the
tiny Llama fixture, and writes the logits on the shared training batch to
`tests/fixtures/peft/oxtune-saved/peft_logits.safetensors`; the Rust test compares oxtune's
logits with them.

Run by hand, with the pinned environment of tools/requirements-fixtures.txt:

    python tools/check_oxtune_adapter.py
"""

import json
import pathlib

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "peft" / "oxtune-saved"


def main() -> None:
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / "tiny-llama", torch_dtype=torch.float32, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, OUT / "adapter")
    model.eval()
    config = json.loads((OUT / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"], "the fixture is a DoRA adapter"
    batch = load_file(FIXTURES / "peft" / "batch.safetensors")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The adapter must change the output: compare with the base model.
    with model.disable_adapter(), torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (logits - plain).abs().max() > 1e-3, "the adapter had no effect"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    save_file({"logits": logits.contiguous()}, OUT / "peft_logits.safetensors", metadata={"generator": json.dumps(versions)})
    print("wrote", OUT / "peft_logits.safetensors", versions, "max |adapted - base|", float((logits - plain).abs().max()))


if __name__ == "__main__":
    main()
