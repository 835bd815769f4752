"""The server's counters and histograms, rendered in Prometheus' text format."""

from __future__ import annotations

import bisect


class Histogram:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip(self.BUCKETS, self.counts, strict=False):
            total += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self, max_batch_size: int, kv_slots_total: int):
        self.requests: dict[int, int] = {}  # HTTP status -> count
        self.finished: dict[str, int] = {}  # ok / cancelled / error
        self.prompt_tokens = 0
        self.prefix_requests = {"hit": 0, "miss": 0}  # admissions that found a cached prompt prefix, or not
        self.decode_steps = {"batch": 0, "solo": 0}  # all slots at once, or a lone slot in its batch-1 cache
        self.prefix_reused_tokens = 0  # prompt tokens whose KV came from the prefix cache instead of a prefill
        self.generated_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.queue_depth = 0
        self.slots_in_use = 0
        self.kv_slots_in_use = 0
        self.max_batch_size = max_batch_size
        self.kv_slots_total = kv_slots_total

    def render(self) -> str:
        lines = ["# HELP jaxmap_requests_total HTTP requests by status code", "# TYPE jaxmap_requests_total counter"]
        lines += [f'jaxmap_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        lines += ["# HELP jaxmap_generations_total generations by outcome", "# TYPE jaxmap_generations_total counter"]
        lines += [f'jaxmap_generations_total{{outcome="{k}"}} {v}' for k, v in sorted(self.finished.items())]
        lines += ["# HELP jaxmap_prefix_cache_requests_total prefix cache lookups by result",
                  "# TYPE jaxmap_prefix_cache_requests_total counter"]
        lines += [f'jaxmap_prefix_cache_requests_total{{result="{k}"}} {v}' for k, v in self.prefix_requests.items()]
        lines += ["# HELP jaxmap_decode_steps_total decode steps: every slot (batch) or a lone slot at batch 1 (solo)",
                  "# TYPE jaxmap_decode_steps_total counter"]
        lines += [f'jaxmap_decode_steps_total{{rows="{k}"}} {v}' for k, v in self.decode_steps.items()]
        for name, value, kind, text in (
                ("jaxmap_prompt_tokens_total", self.prompt_tokens, "counter", "prompt tokens (prefilled or reused)"),
                ("jaxmap_prefix_cache_reused_tokens_total", self.prefix_reused_tokens, "counter",
                 "prompt tokens whose KV rows came from the prefix cache"),
                ("jaxmap_generation_tokens_total", self.generated_tokens, "counter", "tokens generated"),
                ("jaxmap_queue_depth", self.queue_depth, "gauge", "requests waiting for a slot"),
                ("jaxmap_batch_slots_in_use", self.slots_in_use, "gauge", "batch slots running a request"),
                ("jaxmap_batch_slots_total", self.max_batch_size, "gauge", "batch slots"),
                ("jaxmap_kv_slots_in_use", self.kv_slots_in_use, "gauge", "KV cache slots holding a request's tokens"),
                ("jaxmap_kv_slots_total", self.kv_slots_total, "gauge", "KV cache slots (batch x context)")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += self.ttft.render("jaxmap_time_to_first_token_seconds", "time from request to first token")
        lines += self.itl.render("jaxmap_inter_token_latency_seconds", "time between a request's tokens")
        return "\n".join(lines) + "\n"
