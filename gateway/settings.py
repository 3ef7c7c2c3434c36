"""Typed configuration: the YAML shape of DESIGN.md as msgspec Structs (checks: config_check)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@-]+$")]


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base: unknown keys are errors. Subclasses repeat `frozen=True` for mypy's sake."""


class Server(Strict, frozen=True):
    """Where Turnout listens, and what a client connection may cost it (gateway/serve.py)."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_body_bytes: PositiveInt = 4 * 1024 * 1024  # larger: 413, the rest never read
    # The request line and headers together; larger: 431 and the connection closed.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    # A request's head must arrive within header_timeout_s of its first byte (or of the
    # connection opening); its body within receive_timeout_s of the head: else 408, closed.
    header_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    receive_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # A response the client does not read for this long (the socket's buffers full): the
    # connection is closed and the upstream call cancelled, as if the client had left.
    write_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    keep_alive_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0  # idle between requests
    # API calls (POST /v1/…, streams until their end) one process serves at once; more are
    # refused at once with 503 `overloaded` and Retry-After (gateway/overload.py). None: no cap.
    max_in_flight: PositiveInt | None = None


DEFAULT_MAX_TOKENS = 32_768


class Bounds(Strict, frozen=True):
    """What one request may ask of an upstream: Turnout answers 400 (naming the parameter)
    instead of forwarding a request that would tie up a vLLM server (huge `n`, `max_tokens`,
    logprobs over the vocabulary, a structured-output schema that takes minutes to compile).
    A route enforces the tightest bounds of the upstreams it may send a request to, so every
    arm of an A/B test takes the same requests."""

    max_n: Annotated[int, msgspec.Meta(ge=1, le=128)] = 8  # `n` and `best_of`
    # `max_tokens`, `max_completion_tokens` and vLLM's `min_tokens`. Unset: DEFAULT_MAX_TOKENS,
    # or a vLLM upstream's serve.max_model_len if that is smaller.
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] | None = None
    # `top_logprobs`, an integer `logprobs` (completions) and vLLM's `prompt_logprobs`.
    max_logprobs: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 20
    # Structured-output constraints (`response_format`, vLLM's `guided_*` and
    # `structured_outputs`), each as JSON: its size in bytes and its nesting depth.
    max_schema_bytes: Annotated[int, msgspec.Meta(ge=64, le=16 * 1024 * 1024)] = 64 * 1024
    max_schema_depth: Annotated[int, msgspec.Meta(ge=2, le=256)] = 32


class State(Strict, frozen=True):
    """Shared state: in-process when `redis_url` is null; else Redis keys under `key_prefix`."""

    redis_url: str | None = None
    key_prefix: Annotated[str, msgspec.Meta(max_length=64)] = "turnout:"
    # Gateway processes sharing the limits: while Redis is away each gets limit / replicas.
    replicas: PositiveInt = 1
    # While Redis is away budgets are `closed` (refused, 503) or `local`: each process may
    # spend up to local_budget_usd per budget period on its own.
    budget_when_unavailable: Literal["closed", "local"] = "closed"
    local_budget_usd: NonNegFloat = 0.0
    # Output tokens reserved (rate limits, budgets) for a request that sets no max_tokens.
    max_tokens_ceiling: PositiveInt = 4096
    # How long a request waits on Redis (a limit, a budget hold, a key or assignment lookup)
    # before the failure policy applies; settling spend off the request path may take longer.
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=5)] = 0.5


class Timeouts(Strict, frozen=True):
    """Deadlines per phase of an upstream call, in seconds."""

    connect: PositiveFloat = 5.0
    first_byte: PositiveFloat = 60.0
    idle: PositiveFloat = 60.0
    total: PositiveFloat = 600.0


class Pool(Strict, frozen=True):
    max_connections: PositiveInt = 256
    max_keepalive: PositiveInt = 64


class Gpu(Strict, frozen=True):
    """What one replica's GPUs cost, busy or idle; prefill_factor weighs a prompt token
    against a generated one when a replica's busy time is shared among requests."""

    hourly_usd: NonNegFloat
    count: PositiveInt = 1
    prefill_factor: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.1


class Adapter(Strict, frozen=True):
    """A LoRA adapter: where vLLM finds it, and whether it is loaded when vLLM starts (else
    only through `POST /turnout/adapters`)."""

    path: str
    at_start: bool = True


class Serve(Strict, frozen=True):
    """How vLLM is launched for this upstream: `turnout serving command|launch` and the Helm
    chart render the same `vllm serve` arguments from it (serving/vllm_command.py)."""

    base_model: str
    # The name the base model is served under (--served-model-name); default: base_model.
    served_model_name: str | None = None
    adapters: dict[str, str | Adapter] = {}  # name -> path (or URI), or {path, at_start}
    max_model_len: PositiveInt | None = None
    max_loras: PositiveInt | None = None
    max_lora_rank: PositiveInt | None = None
    dtype: str | None = None
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    tensor_parallel_size: PositiveInt | None = None
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING: adapters may be loaded and unloaded while it runs.
    runtime_lora_updating: bool = True
    host: str = "0.0.0.0"  # where vLLM listens; the port is each replica's URL's
    extra_args: list[str] = []

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.base_model

    def adapter_paths(self) -> dict[str, Adapter]:
        return {
            name: a if isinstance(a, Adapter) else Adapter(path=a)
            for name, a in self.adapters.items()
        }


class VllmUpstream(Strict, tag="vllm", tag_field="kind", frozen=True):
    urls: Annotated[list[str], msgspec.Meta(min_length=1)]
    api_key_env: str | None = None
    gpu: Gpu | None = None
    serve: Serve | None = None
    timeouts: Timeouts = Timeouts()
    pool: Pool = Pool()
    bounds: Bounds = Bounds()
    # Poll each replica's /metrics (queue, KV cache, resident LoRA adapters) for replica choice.
    scrape_metrics: bool = False
    scrape_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] = 1.0


class OpenAIUpstream(Strict, tag="openai", tag_field="kind", frozen=True):
    base_url: str
    api_key_env: str | None = None
    headers: dict[str, str] = {}
    timeouts: Timeouts = Timeouts()
    pool: Pool = Pool()
    bounds: Bounds = Bounds()


class SimulatedUpstream(Strict, tag="simulated", tag_field="kind", frozen=True):
    """An in-process OpenAI-compatible stand-in (see serving/simulated.py)."""

    ttft_ms: NonNegFloat = 50.0
    tokens_per_s: PositiveFloat = 200.0
    failure_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    completion_tokens: PositiveInt = 16
    models: list[str] = []
    gpu: Gpu | None = None
    timeouts: Timeouts = Timeouts()
    pool: Pool = Pool()
    bounds: Bounds = Bounds()
    # A task it knows (for `turnout eval` demos and tests): a JSON-lines file in the eval
    # dataset format, relative to the config file's directory; and per served model the share
    # of its questions answered right, 0..1 (a model not listed: all of them).
    answers: str | None = None
    accuracy: dict[str, float] = {}


Upstream = VllmUpstream | OpenAIUpstream | SimulatedUpstream


class Price(Strict, frozen=True):
    """Dollars per million tokens."""

    input_per_mtok: NonNegFloat = 0.0
    cached_input_per_mtok: NonNegFloat | None = None
    output_per_mtok: NonNegFloat = 0.0


class Example(Strict, frozen=True):
    user: str
    assistant: str


class Prompt(Strict, frozen=True):
    system: str = ""
    examples: list[Example] = []


class Variant(Strict, frozen=True):
    upstream: str
    model: Annotated[str, msgspec.Meta(min_length=1)]
    price: Price | None = None
    prompt: Prompt | None = None
    tuning: Literal["prompted", "fine-tuned"] | None = None
    encoding: str | None = None

    @property
    def is_prompted(self) -> bool:
        if self.tuning is not None:
            return self.tuning == "prompted"
        return self.prompt is not None


class Shadow(Strict, frozen=True):
    variant: str
    fraction: Annotated[float, msgspec.Meta(ge=0, le=1)]


class When(Strict, frozen=True):
    """Conditions of a rule; all given ones must hold."""

    header: dict[str, str] | None = None  # header name -> exact value
    key: list[str] | None = None  # the key's name is one of these
    prompt_tokens_above: Annotated[int, msgspec.Meta(ge=0)] | None = None
    prompt_tokens_below: Annotated[int, msgspec.Meta(ge=0)] | None = None
    tools: bool | None = None  # the request carries `tools`
    stream: bool | None = None


class Rule(Strict, frozen=True):
    """The first rule whose `when` holds picks `variant`, or draws from its own `split`."""

    when: When
    variant: str | None = None
    split: dict[str, float] | None = None


class FeedbackMetric(Strict, frozen=True):
    """A feedback metric clients may post on a route's requests (POST /turnout/feedback)."""

    name: Name
    type: Literal["bool", "float"]
    higher_is_better: bool = True


class Route(Strict, frozen=True):
    split: Annotated[dict[str, float], msgspec.Meta(min_length=1)]
    sticky: str | None = None  # user | key | header:<name>
    fallback: list[str] = []
    shadow: Shadow | None = None
    rules: list[Rule] = []
    budget: Budget | None = None  # for every key together
    feedback: list[FeedbackMetric] = []
    # The report's sample size: requests per arm to detect this relative change in mean cost.
    min_effect: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.10


class Breaker(Strict, frozen=True):
    """Circuit breaker per (variant, replica)."""

    consecutive_failures: PositiveInt = 5
    failure_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    window_s: PositiveFloat = 30.0
    min_requests: PositiveInt = 10
    cooldown_s: PositiveFloat = 10.0
    half_open_probes: PositiveInt = 1


class Routing(Strict, frozen=True):
    """How the gateway keeps answering: retry budget, circuit breakers, shadow limits."""

    retry_budget_ratio: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.2
    retry_budget_min: Annotated[int, msgspec.Meta(ge=0)] = 3
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    breaker: Breaker = Breaker()
    shadow_concurrency: Annotated[int, msgspec.Meta(ge=0)] = 8


class Budget(Strict, frozen=True):
    usd: NonNegFloat
    per: Literal["minute", "hour", "day", "month"] = "day"


class Key(Strict, frozen=True):
    name: Name
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    routes: list[str] | None = None  # None: every route
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    budget: Budget | None = None
    disabled: bool = False


class Records(Strict, frozen=True):
    """Request records: a ring buffer in the state store, optionally JSON lines in a file."""

    capacity: PositiveInt = 100_000
    file: str | None = None
    content: bool = False  # store prompts and answers too (off: never)
    lookup_ttl_s: PositiveInt = 86_400  # with Redis: how long a record can be found by its id


class Settings(Strict, frozen=True):
    upstreams: dict[str, Upstream]
    variants: dict[str, Variant]
    routes: dict[str, Route]
    server: Server = Server()
    state: State = State()
    admin_key_env: str | None = None
    keys: list[Key] = []
    records: Records = Records()
    routing: Routing = Routing()
