"""The fixed generation workload the bench and tune time: its prompt text, how prompts are cut from it, and the
figures they report (medians, the process's peak RSS). Below the command line so both commands share it."""

from __future__ import annotations

import re
import resource

from jaxmap.errors import UserError

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
        "salt and cloth. Over the centuries the town grew into a busy port with a cathedral, a university and a "
        "famous market that drew merchants from every corner of the continent. ")


def prompt_ids(tokenizer, n_tokens: int, batch: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``n_tokens`` ids each, cut from a fixed text (row i starts i words later)."""
    words = (TEXT * 40).split()
    rows = []
    for i in range(batch):
        ids = tokenizer(" ".join(words[i:]))[:n_tokens]
        if len(ids) < n_tokens:  # a shorter row would make the table claim a prompt length it did not run
            raise UserError(f"the bench's text gives only {len(ids)} tokens for prompt {i + 1} of {batch}, not "
                            f"{n_tokens}; use a shorter PROMPT or a smaller BATCH in --workload")
        rows.append(ids)
    return rows


def median(values) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_workload(text: str) -> list[tuple[int, int]]:
    """``16x1,128x8`` -> ``[(16, 1), (128, 8)]``: prompt tokens and batch, both positive."""
    rows = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split("x")]
        if len(parts) != 2 or not all(re.fullmatch(r"\d+", p) and int(p) > 0 for p in parts):
            raise UserError(f"--workload item {item.strip()!r} is not PROMPTxBATCH with two positive whole numbers; "
                            f"write e.g. --workload 16x1,128x8")
        rows.append((int(parts[0]), int(parts[1])))
    return rows
