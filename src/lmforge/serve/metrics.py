"""Server metrics in the Prometheus text format (version 0.0.4), kept by hand: a few counters, gauges and
histograms do not need a client library.

    lmforge_http_requests_total{path,status}          requests answered
    lmforge_http_request_seconds{path}                 time to the last byte (histogram)
    lmforge_prompt_tokens_total{model}                 tokens read
    lmforge_generation_tokens_total{model}             tokens generated
    lmforge_time_to_first_token_seconds{model}         histogram
    lmforge_requests_rejected_total{model}             answered 429 (queue full)
    lmforge_running_sequences{model}                   the batch now (gauge)
    lmforge_waiting_requests{model}                    the queue now (gauge)
    lmforge_decode_steps_total{model}                  engine decode steps ...
    lmforge_decode_rows_total{model}                   ... and the rows they ran (mean batch = rows / steps)
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum, self.n = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts)]
        out += [
            f'{name}_bucket{{{labels},le="+Inf"}} {self.n}',
            f"{name}_sum{{{labels}}} {self.sum:.6f}",
            f"{name}_count{{{labels}}} {self.n}",
        ]
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.first_token: dict[str, Histogram] = defaultdict(Histogram)
        self.rejections: dict[str, int] = defaultdict(int)

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        with self._lock:
            self.requests[(path, status)] += 1
            self.latency[path].observe(seconds)

    def count_tokens(self, model: str, prompt: int, generated: int) -> None:
        with self._lock:
            self.tokens[model][0] += prompt
            self.tokens[model][1] += generated

    def ttft(self, model: str, seconds: float) -> None:
        with self._lock:
            self.first_token[model].observe(seconds)

    def rejected(self, model: str) -> None:
        with self._lock:
            self.rejections[model] += 1

    def render(self, models) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])

        with self._lock:
            family("lmforge_http_requests_total", "counter", "HTTP requests answered, by path and status.")
            for (path, status), n in sorted(self.requests.items()):
                out.append(f'lmforge_http_requests_total{{path="{path}",status="{status}"}} {n}')
            family("lmforge_http_request_seconds", "histogram", "Time from request to the last byte sent.")
            for path, h in sorted(self.latency.items()):
                out.extend(h.lines("lmforge_http_request_seconds", f'path="{path}"'))
            family("lmforge_prompt_tokens_total", "counter", "Prompt tokens read.")
            out += [f'lmforge_prompt_tokens_total{{model="{m}"}} {t[0]}' for m, t in sorted(self.tokens.items())]
            family("lmforge_generation_tokens_total", "counter", "Tokens generated.")
            out += [f'lmforge_generation_tokens_total{{model="{m}"}} {t[1]}' for m, t in sorted(self.tokens.items())]
            family("lmforge_time_to_first_token_seconds", "histogram", "Time from arrival to the first new token.")
            for m, h in sorted(self.first_token.items()):
                out.extend(h.lines("lmforge_time_to_first_token_seconds", f'model="{m}"'))
            family("lmforge_requests_rejected_total", "counter", "Requests answered 429 because the queue was full.")
            out += [f'lmforge_requests_rejected_total{{model="{m}"}} {n}' for m, n in sorted(self.rejections.items())]
        engines = [(m.name, m.engine) for m in models if m.engine is not None]
        for name, kind, help, value in (
            ("lmforge_running_sequences", "gauge", "Sequences in the running batch.", lambda e: e.running),
            (
                "lmforge_waiting_requests",
                "gauge",
                "Requests waiting for a batch slot (queue depth).",
                lambda e: e.queued,
            ),
            ("lmforge_decode_steps_total", "counter", "Engine decode steps.", lambda e: e.stats.steps),
            (
                "lmforge_decode_rows_total",
                "counter",
                "Sequences advanced by decode steps (mean batch size = rows / steps).",
                lambda e: e.stats.batch_rows,
            ),
            (
                "lmforge_prefill_chunks_total",
                "counter",
                "Decode steps that also ran a chunk of a long prompt (--prefill-chunk).",
                lambda e: e.stats.chunks,
            ),
            (
                "lmforge_prefix_cache_hits_total",
                "counter",
                "Prompts that reused a cached prefix (--cache-mb).",
                lambda e: e.prefix.hits if e.prefix else 0,
            ),
            (
                "lmforge_prefix_cache_misses_total",
                "counter",
                "Prompts that found no cached prefix.",
                lambda e: e.prefix.misses if e.prefix else 0,
            ),
            (
                "lmforge_prefix_cache_reused_tokens_total",
                "counter",
                "Prompt tokens taken from the prefix cache instead of being computed.",
                lambda e: e.prefix.reused_tokens if e.prefix else 0,
            ),
            (
                "lmforge_prefix_cache_bytes",
                "gauge",
                "Memory the prefix cache holds.",
                lambda e: e.prefix.bytes if e.prefix else 0,
            ),
            (
                "lmforge_speculative_passes_total",
                "counter",
                "Speculative passes (--speculative; also decode steps).",
                lambda e: e.stats.spec_passes,
            ),
            (
                "lmforge_speculative_drafted_tokens_total",
                "counter",
                "Tokens drafted for speculative passes.",
                lambda e: e.stats.drafted,
            ),
            (
                "lmforge_speculative_accepted_tokens_total",
                "counter",
                "Drafted tokens the model kept.",
                lambda e: e.stats.accepted,
            ),
        ):
            family(name, kind, help)
            out += [f'{name}{{model="{n}"}} {value(e)}' for n, e in engines]
        return "\n".join(out) + "\n"
