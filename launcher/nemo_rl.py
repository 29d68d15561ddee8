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
``server.*`` key fills that key when the config leaves it unset
(``apply_policy``, while normalising) and must otherwise agree with it: two
sources of truth that disagree are refused rather than silently resolved
(``launcher.spec``, which sees both sections).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from server.checks import Checks

_CHAT_KWARGS = "generation.vllm_cfg.http_server_serving_chat_kwargs"

# policy key (below policy.) -> the server key (attribute of launcher.spec.ServerSpec) it sets
_SERVER_FLAGS = {
    f"{_CHAT_KWARGS}.enable_auto_tool_choice": "enable_auto_tool_choice",
    f"{_CHAT_KWARGS}.tool_call_parser": "tool_call_parser",
    "generation.vllm_cfg.tensor_parallel_size": "tensor_parallel_size",
    "generation.vllm_cfg.pipeline_parallel_size": "pipeline_parallel_size",
    "generation.vllm_cfg.gpu_memory_utilization": "gpu_memory_utilization",
    "generation.vllm_cfg.max_model_len": "max_model_len",
}


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

    def validate(self, checks: Checks) -> None:
        """Refuse what cannot give Gym an endpoint."""
        checks.require(self.expose_http_server is not False, "expose_http_server",
                       "false starts no HTTP server, and Gym can only reach the policy over HTTP; set it to true")
        checks.require(self.async_engine is not False, "async_engine",
                       "false; the OpenAI-compatible HTTP server needs vLLM's async engine: set it to true")


@dataclass
class Generation:
    stop_strings: list[str] | None = None
    stop_token_ids: list[int] | None = None
    vllm_cfg: VllmCfg = field(default_factory=VllmCfg)

    def validate(self, checks: Checks) -> None:
        for name in ("stop_strings", "stop_token_ids"):
            value = getattr(self, name)
            checks.require(value is None, name, f"{value!r}; Gym decides when a turn stops: set it to null")
        self.vllm_cfg.validate(checks.at("vllm_cfg"))


class ServerFlag(NamedTuple):
    """A policy key that is also a server key, as the block sets it."""

    key: str  # below policy., e.g. generation.vllm_cfg.max_model_len
    server_key: str  # below server., e.g. max_model_len
    value: Any


@dataclass
class Policy:
    # Every key defaults to None, "not in the block": the block is the user's, as NeMo RL writes it.
    generation: Generation = field(default_factory=Generation)

    def validate(self, checks: Checks) -> None:
        self.generation.validate(checks.at("generation"))

    def server_flags(self) -> list[ServerFlag]:
        """The keys of the block that set server keys, where the block sets them."""
        flags = [ServerFlag(key, attr, _get(self, key)) for key, attr in _SERVER_FLAGS.items()]
        return [flag for flag in flags if flag.value is not None]


def apply_policy(policy: Policy, server: object) -> None:
    """Normalising: the server keys the config leaves unset (null) take the block's values."""
    for flag in policy.server_flags():
        if getattr(server, flag.server_key) is None:
            setattr(server, flag.server_key, flag.value)


def _get(obj: object, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), obj)
