"""A replica's load from vLLM's Prometheus text: queue, KV-cache use and resident LoRA adapters.

Pure: a small parser of the Prometheus text exposition format (no prometheus_client), and the
reduction of vLLM's series to one `ReplicaLoad`. Malformed lines are skipped, never raised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"  # vLLM V1 engine, newer releases
KV_CACHE_OLD = "vllm:gpu_cache_usage_perc"  # older releases (and V0 engine)
LORA_INFO = "vllm:lora_requests_info"
WANTED = (RUNNING, WAITING, KV_CACHE, KV_CACHE_OLD, LORA_INFO)
LORA_LABELS = frozenset({"running_lora_adapters", "waiting_lora_adapters", "max_lora"})
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass(frozen=True)
class ReplicaLoad:
    """What one vLLM server reports about its load, summed over its engines and models.

    `kv_cache` is the fraction of KV-cache blocks in use (0..1; the mean over engines), None
    when not reported. Adapters are the LoRA names with requests running or waiting;
    `max_loras` is vLLM's `--max-loras` (adapters per batch), None when LoRA is off.
    """

    running: float = 0.0
    waiting: float = 0.0
    kv_cache: float | None = None
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_loras: int | None = None

    @property
    def adapters(self) -> frozenset[str]:
        """Adapters resident on the replica: those with requests running or waiting."""
        return self.running_adapters | self.waiting_adapters


@dataclass(frozen=True)
class Sample:
    """One sample line: metric name, labels and value (a timestamp, if any, is dropped)."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse_load(text: str) -> ReplicaLoad | None:
    """The load a vLLM `/metrics` page reports; None when it has neither queue gauge (then
    it is not a vLLM page, or not one Turnout understands)."""
    lines = (line for line in text.splitlines() if line.startswith(WANTED))
    by_name: dict[str, list[Sample]] = {}
    for sample in parse_samples(lines):
        if not math.isnan(sample.value):
            by_name.setdefault(sample.name, []).append(sample)
    if RUNNING not in by_name and WAITING not in by_name:
        return None
    running, waiting, max_loras = _adapters(by_name.get(LORA_INFO, []))
    return ReplicaLoad(
        running=sum(s.value for s in by_name.get(RUNNING, [])),
        waiting=sum(s.value for s in by_name.get(WAITING, [])),
        kv_cache=_kv_cache(by_name.get(KV_CACHE) or by_name.get(KV_CACHE_OLD) or []),
        running_adapters=running,
        waiting_adapters=waiting,
        max_loras=max_loras,
    )


def parse_samples(lines: Iterable[str]) -> Iterator[Sample]:
    """Samples of Prometheus text lines; comments, blank and malformed lines are skipped."""
    for raw in lines:
        line = raw.strip()
        if line and not line.startswith("#"):
            sample = parse_line(line)
            if sample is not None:
                yield sample


def parse_line(line: str) -> Sample | None:
    """One sample line `name{label="value",...} value [timestamp]`, or None if malformed."""
    brace = line.find("{")
    if brace == -1:
        name, _, rest = line.partition(" ")
        labels: dict[str, str] | None = {}  # the format separates name and value by a space
    else:
        name = line[:brace].rstrip()
        labels, end = _labels(line, brace + 1)
        rest = line[end:] if labels is not None else ""
    fields = rest.split()
    if labels is None or not _is_name(name) or len(fields) not in (1, 2):
        return None
    value = parse_value(fields[0])
    if value is None:
        return None
    return Sample(name, labels, value)


def parse_value(text: str) -> float | None:
    """A sample value as Prometheus writes it (`1.0`, `-2e-05`, `+Inf`, `NaN`), else None."""
    if "_" in text:  # Python's float() accepts digit separators; Prometheus does not
        return None
    try:
        return float(text)
    except ValueError:
        return None


def split_adapters(text: str) -> frozenset[str]:
    """The adapter names of a comma-separated label value (spaces and empties dropped)."""
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def _labels(line: str, index: int) -> tuple[dict[str, str] | None, int]:
    """Labels starting after `{` at `index`: (labels, index after `}`), or (None, 0)."""
    labels: dict[str, str] = {}
    while True:
        while index < len(line) and line[index] in " ,":
            index += 1
        if index < len(line) and line[index] == "}":
            return labels, index + 1
        equals = line.find("=", index)
        if equals == -1 or equals + 1 >= len(line) or line[equals + 1] != '"':
            return None, 0
        key = line[index:equals].strip()
        value, index = _quoted(line, equals + 2)
        if value is None or not _is_name(key):
            return None, 0
        labels[key] = value


def _quoted(line: str, index: int) -> tuple[str | None, int]:
    """A label value starting after its opening quote: (value, index after the closing quote)."""
    chars: list[str] = []
    while index < len(line):
        char = line[index]
        if char == '"':
            return "".join(chars), index + 1
        if char == "\\" and index + 1 < len(line):
            index += 1
            chars.append(_ESCAPES.get(line[index], "\\" + line[index]))
        else:
            chars.append(char)
        index += 1
    return None, 0


def _is_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and name.replace(":", "_").isidentifier()


def _kv_cache(samples: list[Sample]) -> float | None:
    values = [s.value for s in samples if math.isfinite(s.value)]
    if not values:
        return None
    mean = sum(values) / len(values)
    return min(max(mean, 0.0), 1.0)


def _adapters(samples: list[Sample]) -> tuple[frozenset[str], frozenset[str], int | None]:
    """Running and waiting adapters and max LoRAs from `vllm:lora_requests_info`.

    The gauge's value is the wall-clock time of its update and its labels carry the state, so
    an old label set lingers with an older value: keep the latest sample of each series group
    (engine, model), then combine the groups.
    """
    latest: dict[tuple[tuple[str, str], ...], Sample] = {}
    for sample in samples:
        group = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in LORA_LABELS))
        if group not in latest or sample.value > latest[group].value:
            latest[group] = sample
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    max_loras: int | None = None
    for sample in latest.values():
        running |= split_adapters(sample.labels.get("running_lora_adapters", ""))
        waiting |= split_adapters(sample.labels.get("waiting_lora_adapters", ""))
        slots = _int(sample.labels.get("max_lora", ""))
        if slots is not None:
            max_loras = slots if max_loras is None else max(max_loras, slots)
    return running, waiting, max_loras


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return None
