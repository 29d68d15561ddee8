"""NeMo RL's generation keys, accepted as written and translated to server flags.

Users bring a block like this from their NeMo RL configs::

    policy:
      generation:
        stop_strings: null
        stop_token_ids: null
        vllm_cfg:
          async_engine: true
          expose_http_server: true
          http_server_serving_chat_kwargs:
            enable_auto_tool_choice: true
            tool_call_parser: hermes

Only the keys that shape the HTTP endpoint are read. A key that is also a
``server.*`` key must agree with it: two sources of truth that disagree are
refused rather than silently resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

_VLLM_CFG = "policy.generation.vllm_cfg"
_CHAT_KWARGS = f"{_VLLM_CFG}.http_server_serving_chat_kwargs"


@dataclass
class ServingChatKwargs:
    enable_auto_tool_choice: bool | None = None
    tool_call_parser: str | None = None


@dataclass
class VllmCfg:
    async_engine: bool | None = None
    expose_http_server: bool | None = None
    http_server_serving_chat_kwargs: ServingChatKwargs = field(default_factory=ServingChatKwargs)
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None


@dataclass
class Generation:
    stop_strings: list[str] | None = None
    stop_token_ids: list[int] | None = None
    vllm_cfg: VllmCfg = field(default_factory=VllmCfg)


@dataclass
class Policy:
    generation: Generation = field(default_factory=Generation)


# policy key -> the server key it sets (server attribute name)
_SHARED_KEYS = {
    f"{_CHAT_KWARGS}.enable_auto_tool_choice": "enable_auto_tool_choice",
    f"{_CHAT_KWARGS}.tool_call_parser": "tool_call_parser",
    f"{_VLLM_CFG}.tensor_parallel_size": "tensor_parallel_size",
    f"{_VLLM_CFG}.pipeline_parallel_size": "pipeline_parallel_size",
    f"{_VLLM_CFG}.gpu_memory_utilization": "gpu_memory_utilization",
    f"{_VLLM_CFG}.max_model_len": "max_model_len",
}


def policy_values(policy: Policy) -> dict[str, object]:
    """The block's values by full key, for the keys gymlaunch reads."""
    vllm = policy.generation.vllm_cfg
    chat = vllm.http_server_serving_chat_kwargs
    return {
        f"{_CHAT_KWARGS}.enable_auto_tool_choice": chat.enable_auto_tool_choice,
        f"{_CHAT_KWARGS}.tool_call_parser": chat.tool_call_parser,
        f"{_VLLM_CFG}.tensor_parallel_size": vllm.tensor_parallel_size,
        f"{_VLLM_CFG}.pipeline_parallel_size": vllm.pipeline_parallel_size,
        f"{_VLLM_CFG}.gpu_memory_utilization": vllm.gpu_memory_utilization,
        f"{_VLLM_CFG}.max_model_len": vllm.max_model_len,
    }


def apply_policy(policy: Policy, server: object, need: Callable[[bool, str], None]) -> None:
    """Refuse what cannot give Gym an endpoint; fill unset server flags; refuse disagreements."""
    gen, vllm = policy.generation, policy.generation.vllm_cfg
    need(
        vllm.expose_http_server is not False,
        f"{_VLLM_CFG}.expose_http_server: false starts no HTTP server, and Gym can only reach the policy "
        "over HTTP; set it to true",
    )
    need(
        vllm.async_engine is not False,
        f"{_VLLM_CFG}.async_engine: false; the OpenAI-compatible HTTP server needs vLLM's async engine: "
        "set it to true",
    )
    need(
        gen.stop_strings is None,
        f"policy.generation.stop_strings: {gen.stop_strings!r}; Gym decides when a turn stops: set it to null",
    )
    need(
        gen.stop_token_ids is None,
        f"policy.generation.stop_token_ids: {gen.stop_token_ids!r}; Gym decides when a turn stops: set it to null",
    )
    for key, value in policy_values(policy).items():
        if value is None:
            continue
        attr = _SHARED_KEYS[key]
        current = getattr(server, attr)
        if current is None:
            setattr(server, attr, value)
        else:
            need(
                current == value,
                f"{key}: {value!r} disagrees with server.{attr}={current!r}; keep one source of truth "
                f"(drop the key from the policy block, or set server.{attr}={value})",
            )
