"""On-policy multi-turn token ids for stock vLLM: a conversation's next prompt begins with exactly
the tokens the engine used and generated on its previous call.

Why: a client rebuilds the next turn's messages from text, and the chat template re-tokenizes the
previous answer, often differently (after a tool call ``"}}`` + ``</tool_call>`` come back as
other tokens). A trainer that scores the recorded ids would then score tokens the policy never
sampled. NeMo RL fixes this inside its own vLLM server (``required_prefix_token_ids``,
nemo_rl/models/generation/vllm/vllm_worker_async.py and openai_server_utils.replace_prefix_tokens);
stock vLLM does not. vLLM 0.32 has the parts to do it from outside the engine (``vllm serve
--enable-scale-out``): ``/v1/chat/completions/render`` (chat -> token ids and sampling
parameters), ``/inference/v1/generate`` (token ids in, token ids out) and
``/v1/chat/completions/derender`` (token ids -> a chat completion, tool calls parsed by the
server's parser). ``chat`` chains them; the gateway (``gateway.on_policy``) and the built-in
collector (``job.on_policy``, when it talks to replicas directly) both call it.

The prefix, as NeMo RL defines it: the request's ``required_prefix_token_ids``, else the
``prompt_token_ids + generation_token_ids`` of its last message that carries them (NeMo Gym puts
``prompt_token_ids``, ``generation_token_ids``, ``generation_log_probs`` on the assistant
messages of its training model config). The splice point, as NeMo RL's: the messages up to the
last assistant message are rendered too (no generation prompt); with N end-of-sequence tokens in
that rendering, the prompt is the prefix (without its own trailing EOS) followed by the full
rendering from its N-th EOS on (the end of the last assistant turn, then tool results, the next
user turn, the generation prompt).

Where NeMo RL asserts, this module says so instead: when the prefix does not hold the same
number of turn ends as the messages up to the last assistant message (the ids belong to another
history, or the client edited it), the request is generated from the re-rendered prompt, the
answer says ``on_policy: {"spliced": false, "reason": ...}`` and the caller counts it. Never a
silent fallback: every answer ``chat`` returns names its outcome.

``prefix_contiguity`` is the figure runs report: of consecutive model calls of one rollout, how
many have the next prompt begin with the previous prompt + generation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence

# The NeMo RL extension field, and the fields NeMo Gym puts on assistant messages it sends back.
PREFIX_FIELD = "required_prefix_token_ids"
MESSAGE_ID_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
# Either one in a request body (as bytes: the gateway looks before it parses anything).
PREFIX_MARKERS = (b'"required_prefix_token_ids"', b'"generation_token_ids"')
# Each answer's outcome, in its body (``on_policy``) and in this header.
HEADER = "x-gymlaunch-on-policy"
RESPONSE_FIELD = "on_policy"
OUTCOMES = ("spliced", "mismatch", "unsupported")

RENDER = "/v1/chat/completions/render"
GENERATE = "/inference/v1/generate"
DERENDER = "/v1/chat/completions/derender"

# A route the server does not have.
MISSING = (404, 405)
# (method, path from the server's root, JSON body or None) -> (status, parsed JSON body)
Call = Callable[[str, str, Any], Awaitable[tuple[int, Any]]]


class Unsupported(Exception):
    """The server lacks the routes (not vLLM, or vLLM without ``--enable-scale-out`` and
    ``--enable-tokenizer-info-endpoint``): the caller sends the request as it came, and says so."""


class Mismatch(ValueError):
    """The prefix and the re-rendered messages disagree on where the turns end."""


class BadIds(ValueError):
    """Token ids in the request that cannot be a prompt's (``param`` names the field): the
    client's error (400), never a mismatch."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelInfo:
    eos_token_id: int
    eos_token: str
    max_model_len: int
    vocab_size: int | None = None  # one more than the largest id the engine takes; None: not known


def has_prefix(body: bytes) -> bool:
    """Whether ``body`` may carry prior ids (a look before parsing; ``required_prefix`` decides)."""
    return any(marker in body for marker in PREFIX_MARKERS)


def required_prefix(request: dict, vocab_size: int | None = None) -> list[int] | None:
    """The ids the prompt must begin with, or None (nothing to splice: a first turn). ``BadIds``
    when they are not lists of non-negative ints below ``vocab_size`` (when known): ids no engine
    would take are the client's error, never a mismatch."""
    ids = request.get(PREFIX_FIELD)
    if ids:
        return _ids(ids, PREFIX_FIELD, vocab_size)
    messages = request.get("messages") or []
    for i in reversed(range(len(messages) if isinstance(messages, list) else 0)):
        message = messages[i]
        if isinstance(message, dict) and message.get("prompt_token_ids") is not None:
            return (_ids(message["prompt_token_ids"], f"messages[{i}].prompt_token_ids", vocab_size)
                    + _ids(message.get("generation_token_ids") or [], f"messages[{i}].generation_token_ids", vocab_size))
    return None


def _ids(value: Any, param: str, vocab_size: int | None) -> list[int]:
    # bool is an int, and no token id.
    if not isinstance(value, list) or any(type(token) is not int or token < 0 for token in value):
        raise BadIds(f"{param} must be a list of non-negative integer token ids", param)
    if vocab_size is not None and value and max(value) >= vocab_size:
        raise BadIds(f"{param} holds token id {max(value)}, beyond the model's vocabulary ({vocab_size} ids)", param)
    return value


def plain_request(request: dict) -> dict:
    """``request`` without the token-id fields: what vLLM's own chat request model knows."""
    out = {k: v for k, v in request.items() if k != PREFIX_FIELD}
    out["messages"] = [
        {k: v for k, v in m.items() if k not in MESSAGE_ID_FIELDS} if isinstance(m, dict) else m
        for m in request.get("messages") or []
    ]
    return out


def splice(eos: int, model_prefix: Sequence[int], template_prefix: Sequence[int], template: Sequence[int]) -> list[int]:
    """NeMo RL's ``replace_prefix_tokens``: the exact prior ids, then the template from the end of
    the last assistant turn on. ``Mismatch`` where NeMo RL would assert."""
    if not model_prefix:
        return list(template)
    cut = len(model_prefix) - 1 if model_prefix[-1] == eos else len(model_prefix)
    # Counting EOS, not positions: a template that drops earlier reasoning (Qwen3's <think>) from
    # the history shifts positions but not turn ends.
    needed = template_prefix.count(eos)
    held = list(model_prefix[:cut]).count(eos) + 1  # its own end: generated, or added by the template
    if needed == 0:
        raise Mismatch("the messages up to the last assistant message hold no end-of-sequence token "
                       f"(id {eos}): the chat template does not end turns with it")
    if held != needed:
        raise Mismatch(f"the prior token ids hold {held} turn ends, the messages up to the last assistant "
                       f"message {needed}: the ids belong to another history")
    seen = 0
    for pos, token in enumerate(template):
        if token == eos:
            seen += 1
            if seen == needed:
                return list(model_prefix[:cut]) + list(template[pos:])
    raise Mismatch(f"the rendered prompt holds {seen} end-of-sequence tokens, fewer than the {needed} of "
                   "the messages up to the last assistant message")


async def model_info(call: Call) -> ModelInfo:
    """The EOS id and context length of the served model (one fetch per gateway or collector)."""
    (s1, models), (s2, tokenizer) = await asyncio.gather(call("GET", "/v1/models", None),
                                                         call("GET", "/tokenizer_info", None))
    if s2 in MISSING:
        raise Unsupported("the server has no /tokenizer_info (vLLM: --enable-tokenizer-info-endpoint)")
    _raise_for(s1, models, "/v1/models")
    _raise_for(s2, tokenizer, "/tokenizer_info")
    eos = tokenizer.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    status, tokens = await call("POST", "/tokenize", {"prompt": eos, "add_special_tokens": False})
    _raise_for(status, tokens, "/tokenize")
    if not isinstance(eos, str) or len(tokens.get("tokens") or []) != 1:
        raise Unsupported(f"the tokenizer's eos_token {eos!r} is not one token")
    return ModelInfo(eos_token_id=tokens["tokens"][0], eos_token=eos,
                     max_model_len=int(models["data"][0]["max_model_len"]),
                     vocab_size=await _vocab_size(call, models["data"][0]["id"]))


async def _vocab_size(call: Call, model: str) -> int | None:
    """One more than the largest token id the engine takes, by bisection on vLLM's own check: a
    chat render whose ``kv_transfer_params`` carry ``prompt_token_ids`` (ids handed on by a
    prefill stage) has them validated against the larger of the tokenizer's and the model's
    vocabulary, with no templating (vLLM 0.32 renderers/online_renderer.py); no route tells the
    size itself (``/tokenizer_info`` holds the tokenizer's settings, not its vocabulary). About 32
    renders, once per gateway or collector. None when the server does not answer so (it takes any
    id, or refuses even id 0): then only the engine's own check, at generation, bounds them."""

    async def takes(token_id: int) -> bool:
        status, _ = await call("POST", RENDER, {"model": model, "messages": [{"role": "user", "content": "x"}],
                                                "kv_transfer_params": {"prompt_token_ids": [token_id]}})
        if status in MISSING:
            raise Unsupported(f"the server has no {RENDER} (vLLM: --enable-scale-out)")
        return status < 400

    low, high = 0, 1 << 31  # low: taken (any vocabulary has id 0); high: beyond any vocabulary
    if not await takes(low) or await takes(high):
        return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if await takes(mid) else (low, mid)
    return high


def _raise_for(status: int, body: Any, route: str) -> None:
    if status >= 400:
        raise RuntimeError(f"{route} answered {status}: {str(body)[:300]}")


async def _render(call: Call, plain: dict, prefix: list[int], info: ModelInfo) -> tuple[int, dict, list[int], dict]:
    """Render ``plain`` and splice ``prefix`` in: (status, the rendered request or vLLM's error,
    the prompt ids, the outcome for ``on_policy``)."""
    messages = plain["messages"]
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
               default=len(messages) - 1)
    # Rendered without the output cap, set once the spliced prompt's length is known: vLLM refuses a
    # cap that does not fit beside the re-rendered prompt (NeMo RL sets it to 1 meanwhile).
    uncapped = {k: v for k, v in plain.items() if k not in ("max_tokens", "max_completion_tokens")}
    prefix_request = {**uncapped, "messages": messages[: last + 1], "add_generation_prompt": False}
    (status, rendered), (prefix_status, rendered_prefix) = await asyncio.gather(
        call("POST", RENDER, uncapped), call("POST", RENDER, prefix_request))
    if status in MISSING or prefix_status in MISSING:
        raise Unsupported(f"the server has no {RENDER} (vLLM: --enable-scale-out)")
    if status >= 400 or prefix_status >= 400:
        return (status, rendered, [], {}) if status >= 400 else (prefix_status, rendered_prefix, [], {})
    template = rendered["token_ids"]
    try:
        ids = splice(info.eos_token_id, prefix, rendered_prefix["token_ids"], template)
        return status, rendered, ids, {"spliced": True, "prefix_tokens": len(prefix)}
    except Mismatch as e:
        return status, rendered, template, {"spliced": False, "reason": str(e)}


async def chat(call: Call, request: dict, info: ModelInfo) -> tuple[int, dict]:
    """A chat completion whose prompt begins with the request's prefix: (status, body). Statuses
    and bodies of vLLM's own errors come back unchanged; ``Unsupported`` when the server lacks
    the routes. The answer is what vLLM's chat route returns (tool calls parsed, ``logprobs``,
    ``prompt_token_ids`` and ``choices[i].token_ids`` with ``return_token_ids``, ``token_id:N``
    tokens with ``return_tokens_as_token_ids``) plus the message's ``prompt_token_ids``,
    ``generation_token_ids`` and ``generation_log_probs`` (NeMo Gym and NeMo RL read them there)
    and ``on_policy``."""
    plain = plain_request(request)
    if plain.get("stream"):
        return 400, error("on-policy splicing answers whole responses: send stream=false, or turn "
                          "gateway.on_policy off", "stream")
    status, rendered, ids, outcome = await _render(call, plain, required_prefix(request, info.vocab_size) or [], info)
    if status >= 400:
        return status, rendered
    room = info.max_model_len - len(ids)
    if room <= 0:
        return 400, error(f"the prompt ({len(ids)} tokens after splicing) fills the model's context of "
                          f"{info.max_model_len} tokens", "messages")
    asked = plain.get("max_completion_tokens") or plain.get("max_tokens")
    rendered["sampling_params"]["max_tokens"] = min(asked, room) if asked else room  # prompt + output fit
    rendered["token_ids"] = ids
    status, generated = await call("POST", GENERATE, rendered)
    if status >= 400:
        return status, generated
    status, completion = await call("POST", DERENDER, {
        "generate_response": generated, "chat_request": plain, "prompt_token_ids": ids, "prompt_tokens": len(ids),
        "model": plain.get("model"),
    })
    if status >= 400:
        return status, completion
    _as_vllm_chat(plain, info, ids, generated, completion)
    completion[RESPONSE_FIELD] = outcome
    return 200, completion


async def tokenize(call: Call, request: dict, info: ModelInfo) -> tuple[int, dict]:
    """``/tokenize`` of a chat whose earlier turns carry their ids: the prompt ids ``chat`` would
    generate from (the same render, the same splice), in vLLM's answer shape. NeMo Gym reads a
    turn's prompt ids here when an answer's message does not carry them."""
    status, rendered, ids, outcome = await _render(call, plain_request(request),
                                                   required_prefix(request, info.vocab_size) or [], info)
    if status >= 400:
        return status, rendered
    return 200, {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": None,
                 RESPONSE_FIELD: outcome}


def _as_vllm_chat(request: dict, info: ModelInfo, prompt_ids: list[int], generated: dict, completion: dict) -> None:
    """What vLLM's chat route would have done and derender does not (vLLM 0.32,
    renderers/online_derenderer.py): the EOS that ended a generation is not text; token ids,
    ``token_id:N`` logprob tokens; and the id bundle on each message, so that a client needs no
    ``/tokenize`` call (which would re-render)."""
    as_ids = bool(request.get("return_tokens_as_token_ids"))
    for choice, produced in zip(completion["choices"], generated["choices"]):
        token_ids = produced.get("token_ids") or []
        message = choice["message"]
        # Derender decodes every id, the EOS too (a tool parser needs special tokens kept).
        ended = produced.get("finish_reason") == "stop" and token_ids and token_ids[-1] == info.eos_token_id
        if ended and isinstance(message.get("content"), str) and message["content"].endswith(info.eos_token):
            message["content"] = message["content"][: -len(info.eos_token)]
        if request.get("return_token_ids"):
            choice["token_ids"] = token_ids
        content = (choice.get("logprobs") or {}).get("content")
        if content and as_ids:
            raw = (produced.get("logprobs") or {}).get("content") or []
            for entry, token_id, produced_entry in zip(content, token_ids, raw):
                entry["token"] = f"token_id:{token_id}"
                for alt, produced_alt in zip(entry.get("top_logprobs") or [], produced_entry.get("top_logprobs") or []):
                    alt["token"] = f"token_id:{produced_alt['token_id']}"
        if request.get("logprobs"):  # the bundle is whole or absent: NeMo Gym checks ids and logprobs pair up
            message.update(
                prompt_token_ids=prompt_ids, generation_token_ids=token_ids,
                generation_log_probs=[e["logprob"] for e in (produced.get("logprobs") or {}).get("content") or []],
            )
    if request.get("return_token_ids"):
        completion["prompt_token_ids"] = prompt_ids


def error(message: str, param: str) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def prefix_contiguity(rollouts: Iterable[Sequence[tuple[Sequence[int] | None, Sequence[int] | None]]]) -> tuple[int, int]:
    """(contiguous, checked) over consecutive model calls of each rollout, each call as
    (prompt_token_ids, generation_token_ids): contiguous when the next prompt begins with the
    previous prompt + generation. A call without ids is not checked."""
    contiguous = checked = 0
    for calls in rollouts:
        for (prompt, generation), (next_prompt, _) in zip(calls, calls[1:]):
            if prompt is None or generation is None or next_prompt is None:
                continue
            checked += 1
            before = list(prompt) + list(generation)
            contiguous += list(next_prompt[: len(before)]) == before
    return contiguous, checked
