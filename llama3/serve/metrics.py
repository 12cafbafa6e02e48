"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and latency histograms."""

from __future__ import annotations

import collections
import threading

__all__ = ["HttpCounters", "render_metrics"]


class HttpCounters:
    """Requests answered, by path and status code (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def add(self, path: str, status: int) -> None:
        with self._lock:
            self.counts[(path, status)] += 1


def _histogram(lines: list[str], name: str, help_text: str, hist) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip(hist.BOUNDS, hist.counts):
        cumulative += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {hist.num}')
    lines += [f"{name}_sum {hist.total:.6f}", f"{name}_count {hist.num}"]


def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prefix_cache(lines: list[str], counters: dict, gauges: dict | None) -> None:
    """Prefix-cache counters (prompt tokens looked up and found) and its use; nothing when it is off."""
    if gauges is None:
        return
    queried, hit = counters.get("prefix_cache_query_tokens_total", 0), counters.get("prefix_cache_hit_tokens_total", 0)
    lines += [
        "# HELP llama3_prefix_cache_query_tokens_total Prompt tokens looked up in the prefix cache.",
        "# TYPE llama3_prefix_cache_query_tokens_total counter",
        f"llama3_prefix_cache_query_tokens_total {queried}",
        "# HELP llama3_prefix_cache_hit_tokens_total Prompt tokens whose keys and values came from the prefix cache.",
        "# TYPE llama3_prefix_cache_hit_tokens_total counter",
        f"llama3_prefix_cache_hit_tokens_total {hit}",
        "# HELP llama3_prefix_cache_hit_rate Share of looked-up prompt tokens found in the prefix cache.",
        "# TYPE llama3_prefix_cache_hit_rate gauge",
        f"llama3_prefix_cache_hit_rate {hit / queried if queried else 0.0:.6f}",
        "# HELP llama3_prefix_cache_blocks Blocks held by the prefix cache.",
        "# TYPE llama3_prefix_cache_blocks gauge",
        f"llama3_prefix_cache_blocks {gauges['blocks']}",
        "# HELP llama3_prefix_cache_capacity_blocks Blocks the prefix cache may hold (--kv-cache-gb).",
        "# TYPE llama3_prefix_cache_capacity_blocks gauge",
        f"llama3_prefix_cache_capacity_blocks {gauges['capacity_blocks']}",
        "# HELP llama3_prefix_cache_bytes Bytes of keys and values held by the prefix cache.",
        "# TYPE llama3_prefix_cache_bytes gauge",
        f"llama3_prefix_cache_bytes {gauges['bytes']}",
    ]


def render_metrics(snapshot: dict, http: HttpCounters, model_name: str) -> str:
    """The /metrics body from an engine snapshot and the HTTP counters."""
    counters = snapshot["counters"]
    lines = [
        "# HELP llama3_requests_total Generation requests accepted by the engine (one per choice).",
        "# TYPE llama3_requests_total counter",
        f"llama3_requests_total {counters.get('requests_total', 0)}",
        "# HELP llama3_requests_finished_total Generation requests finished, by reason.",
        "# TYPE llama3_requests_finished_total counter",
    ]
    for reason in ("stop", "length", "cancelled", "error"):
        lines.append(f'llama3_requests_finished_total{{reason="{reason}"}} {counters.get("finished_" + reason, 0)}')
    lines += [
        "# HELP llama3_prompt_tokens_total Prompt tokens prefilled.",
        "# TYPE llama3_prompt_tokens_total counter",
        f"llama3_prompt_tokens_total {counters.get('prompt_tokens_total', 0)}",
        "# HELP llama3_generation_tokens_total Tokens generated.",
        "# TYPE llama3_generation_tokens_total counter",
        f"llama3_generation_tokens_total {counters.get('generation_tokens_total', 0)}",
        "# HELP llama3_queue_depth Requests waiting for a KV-cache slot.",
        "# TYPE llama3_queue_depth gauge",
        f"llama3_queue_depth {snapshot['queue_depth']}",
        "# HELP llama3_queue_capacity Requests that may wait before the server answers 429.",
        "# TYPE llama3_queue_capacity gauge",
        f"llama3_queue_capacity {snapshot['max_queue']}",
        "# HELP llama3_active_slots KV-cache slots holding a running sequence.",
        "# TYPE llama3_active_slots gauge",
        f"llama3_active_slots {snapshot['active_slots']}",
        "# HELP llama3_slots KV-cache slots in the pool.",
        "# TYPE llama3_slots gauge",
        f"llama3_slots {snapshot['num_slots']}",
        "# HELP llama3_kv_cache_bytes Bytes of the KV-cache pool (it grows with the longest sequence).",
        "# TYPE llama3_kv_cache_bytes gauge",
        f"llama3_kv_cache_bytes {snapshot.get('kv_cache_bytes', 0)}",
        "# HELP llama3_model_info The model served.",
        "# TYPE llama3_model_info gauge",
        f'llama3_model_info{{model="{_label(model_name)}"}} 1',
    ]
    _prefix_cache(lines, counters, snapshot.get("prefix_cache"))
    _histogram(lines, "llama3_time_to_first_token_seconds", "From submission to the first generated token.",
               snapshot["ttft"])
    _histogram(lines, "llama3_request_latency_seconds", "From submission to the end of generation.",
               snapshot["latency"])
    lines += ["# HELP llama3_http_requests_total HTTP requests answered, by path and status.",
              "# TYPE llama3_http_requests_total counter"]
    with http._lock:
        items = sorted(http.counts.items())
    for (path, status), count in items:
        lines.append(f'llama3_http_requests_total{{path="{path}",status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
