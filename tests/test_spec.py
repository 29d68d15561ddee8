import copy
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from jobs.command import CommandConfig, GymConfig
from jobs.rollouts import CollectorConfig, SamplingParams
from launcher.spec import CommandJob, NoJob, RolloutsJob, SpecError, load_spec, normalise, typed_spec
from server import programs
from server.checks import Checks, ConfigError, check
from server.engines import EngineSpec

CONF = str(Path(__file__).resolve().parent.parent / "conf")
ROOT = Path(__file__).resolve().parent.parent


def config_for(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def spec_for(*overrides):
    return load_spec(config_for(*overrides))


def test_default_composes_to_the_embedded_demo():
    spec = spec_for()
    assert spec.model.embedded == "smollm2_135m" and spec.model.path is None
    assert spec.server.service == "policy" and spec.server.replicas == 1
    assert spec.server.kv_cache_memory_bytes == 268435456 and spec.server.gpus_per_replica == 0
    assert spec.server.tool_call_parser == "hermes"
    assert Path(spec.server.chat_template).is_file()
    assert isinstance(spec.job, RolloutsJob)
    assert Path(spec.job.collector.tasks).name == "demo.jsonl"
    assert spec_for("+experiment=demo") == spec


def test_engine_spec_carries_the_server_flags():
    engine = spec_for("server.max_model_len=1024", "server.extra_args=[--max-num-seqs,8]").server.engine_spec()
    assert engine.max_model_len == 1024 and engine.extra_args == ["--max-num-seqs", "8"]
    assert engine.served_name == "smollm2-135m-instruct"


TASK = '{"id": "%s", "responses_create_params": {"input": "hi"}, "verifier": {"name": "contains", "expected": "x"}}'


def test_job_none_and_task_file(tmp_path):
    assert isinstance(spec_for("job=none").job, NoJob)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(TASK % "a" + "\n\n" + TASK % "b" + "\n")
    job = spec_for(f"job.tasks={tasks}", "job.num_repeats=3").job
    assert job.collector.tasks == str(tasks) and job.num_tasks == 2 and job.num_rollouts == 6


@pytest.mark.parametrize("content,message", [
    ("", "holds no task"),
    ("not json\n", "t.jsonl:1"),
    (TASK % "a" + "\n" + TASK.replace("contains", "llm_judge") % "b" + "\n", "t.jsonl:2"),
    (TASK % "a" + "\n" + TASK % "a" + "\n", "duplicate task id"),
])
def test_a_bad_task_file_is_refused_before_submission(tmp_path, content, message):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(content)
    with pytest.raises(SpecError, match="job.tasks") as info:
        spec_for(f"job.tasks={tasks}")
    assert message in str(info.value)


def test_server_hash_depends_on_server_config_only():
    base = spec_for()
    assert spec_for("job.sampling.temperature=0.1").server_hash() == base.server_hash()
    assert spec_for("server.max_model_len=1024").server_hash() != base.server_hash()


COMMAND = ["job=command", 'job.command="{python} eval.py --base-url {base_url} --out {run_dir}/x.json"']
# Executables named ng_run and ng_collect_rollouts: what the program check looks for.
GYM_BIN = ROOT / "tests" / "data" / "gym_bin"
# NeMo Gym 0.7's own vllm_model configs (tests/data/nemo_gym/README.md).
GYM_07_CONFIGS = ROOT / "tests" / "data" / "nemo_gym" / "0.7.0" / "responses_api_models" / "vllm_model" / "configs"
GYM = [
    "job=gym", "job.config_paths=[resources_servers/x/configs/x.yaml]", "job.agent_name=x_agent",
    f"job.input_jsonl={ROOT / 'jobs' / 'tasks' / 'demo.jsonl'}", f"job.gym_bin={GYM_BIN}",
]

BAD = [
    (["job=command"], "job.command"),
    (["job=command", "job.command=''"], "job.command"),
    (["job=command", 'job.command="eval --key {api_key}"'], "job.command: unknown placeholder {api_key}"),
    (["job=command", 'job.command="eval --url {url}"'], "job.command: unknown placeholder {url}"),
    (["job=command", 'job.command="eval {"'], "job.command"),
    (["job=command", "job.command=\"eval 'unclosed\""], "job.command"),
    ([*COMMAND, "+job.env.POLICY_API_KEY=k"], "job.env.POLICY_API_KEY"),
    ([*COMMAND, "+job.env.GYMLAUNCH_NAMESPACE=n"], "job.env.GYMLAUNCH_NAMESPACE"),
    ([*COMMAND, "job.cwd=/no/such/folder"], "job.cwd"),
    ([*COMMAND, "job.service=judge"], "job.service"),
    ([*COMMAND, "job.timeout_min=0"], "job.timeout_min"),
    ([*COMMAND, "job.stop_grace_s=-1"], "job.stop_grace_s"),
    ([*COMMAND, "+job.run_dir=/tmp/x"], "job.run_dir"),
    ([*COMMAND, "+job.tasks=demo"], "job.tasks"),
    (["job=gym"], "job.config_paths"),
    (["job=gym"], "job.agent_name"),
    (["job=gym"], "job.input_jsonl"),
    ([*GYM, "job.input_jsonl=no/such.jsonl"], "job.input_jsonl"),
    ([*GYM, "job.limit=0"], "job.limit"),
    ([*GYM, "job.num_samples_in_parallel=0"], "job.num_samples_in_parallel"),
    ([*GYM, "job.startup_timeout_s=0"], "job.startup_timeout_s"),
    ([*GYM, "job.gym_bin=/no/such/bin"], "job.gym_bin"),
    ([*GYM, "job.ng_run_args=['+policy_api_key=secret']"], "job.ng_run_args"),
    ([*GYM, "job.collect_args=['++output_jsonl_fpath=x']"], "job.collect_args"),
    ([*GYM, "+job.command=x"], "job.command"),
    ([*GYM, f"job.config_paths=[{GYM_07_CONFIGS}/vllm_model_for_training.yaml,{GYM_07_CONFIGS}/vllm_model_supply_prefix.yaml]",
      "gateway=off"], "job.config_paths: supply_prefix_token_ids"),
    ([*GYM, f"job.config_paths=[{GYM_07_CONFIGS}/vllm_model_for_training.yaml,{GYM_07_CONFIGS}/vllm_model_supply_prefix.yaml]",
      "gateway.on_policy=false"], "job.config_paths: supply_prefix_token_ids"),
    (["server.replicas=0"], "server.replicas"),
    (["server.rollover_lead_s=-1"], "server.rollover_lead_s"),
    (["server.rollover_lead_s=60", "cluster.signal_delay_s=120"], "server.rollover_lead_s"),  # after the warning
    (["server.rollover_lead_s=130", "cluster.signal_delay_s=120", "cluster.timeout_min=2"], "server.rollover_lead_s"),
    (["job.max_requeues=-1"], "job.max_requeues"),
    (["cluster.signal_delay_s=-1"], "cluster.signal_delay_s"),
    (["server.replicas=abc"], "server.replicas"),
    (["server.max_model_len=-5"], "server.max_model_len"),
    (["server.kv_cache_memory_bytes=0"], "server.kv_cache_memory_bytes"),
    (["server.gpu_memory_utilization=1.5"], "server.gpu_memory_utilization"),
    (["server.port=70000"], "server.port"),
    (["server.port=8000", "server.replicas=2"], "server.port"),
    (["server.engine=trt"], "server.engine"),
    (["server.service=a/b"], "server.service"),
    (["server.gpus_per_replica=-1"], "server.gpus_per_replica"),
    (["server.startup_timeout_s=0"], "server.startup_timeout_s"),
    (["server.enforce_eager=maybe"], "server.enforce_eager"),
    (["server.tool_call_parser=null"], "server.enable_auto_tool_choice"),
    (["server.chat_template=nonexistent_template"], "server.chat_template"),
    (["+server.bogus_flag=1"], "server.bogus_flag"),
    (["model.embedded=gpt5"], "model.embedded"),
    (["model.path=/no/such/folder"], "model"),
    (["model.embedded=null", "model.path=/no/such/folder"], "model.path"),
    (["model.served_name="], "model.served_name"),
    (["cluster.kind=kubernetes"], "cluster.kind"),
    (["cluster.timeout_min=0"], "cluster.timeout_min"),
    (["registry.ttl_s=5"], "registry.ttl_s"),
    (["registry.heartbeat_s=0"], "registry.heartbeat_s"),
    (["gateway.policy=consistent_hash"], "gateway.policy"),
    (["gateway.wait_s=-1"], "gateway.wait_s"),
    (["gateway.port=70000"], "gateway.port"),
    (["gateway.timeout_min=0"], "gateway.timeout_min"),
    (["gateway.cpus_per_task=0"], "gateway.cpus_per_task"),
    (["+gateway.listen=0.0.0.0"], "gateway.listen"),
    (["job.tasks=/no/such/tasks.jsonl"], "job.tasks"),
    (["job.num_repeats=0"], "job.num_repeats"),
    (["job.max_concurrency=0"], "job.max_concurrency"),
    (["job.max_turns=0"], "job.max_turns"),
    (["job.top_logprobs=50"], "job.top_logprobs"),
    (["job.sampling.temperature=-1"], "job.sampling.temperature"),
    (["job.sampling.top_p=0"], "job.sampling.top_p"),
    (["job.sampling.max_tokens=4096"], "job.sampling.max_tokens"),
    (["job.sampling.max_tokens=many"], "job.sampling.max_tokens"),
    (["job.service=judge"], "job.service"),
    (["job.timeout_min=0"], "job.timeout_min"),
    (["+job.output_dir=/tmp/x"], "job.output_dir"),
    (["+job.unknown_knob=1"], "job.unknown_knob"),
    (["+server.replica=2"], "server.replica: no such key; did you mean server.replicas"),
    (["+job.sampling.temprature=0.5"], "job.sampling.temprature: no such key; did you mean job.sampling.temperature?"),
    (["+job.tmeout_min=5"], "job.tmeout_min: no such key; did you mean job.timeout_min?"),
    (["+sever=1"], "sever: no such key; did you mean server?"),
    (["job.kind=train"], "job.kind"),
    (["server.tool_call_parser=llama3json"], "server.tool_call_parser"),
    (["server=vllm", "server.tensor_parallel_size=2"], "server.gpus_per_replica"),
    (["server=vllm", "server.gpus_per_replica=4"], "server.gpus_per_replica"),
    (["server=vllm", "server.gpus_per_replica=4", "server.tensor_parallel_size=2"], "server.gpus_per_replica"),
    (["server.pipeline_parallel_size=0"], "server.tensor_parallel_size/pipeline_parallel_size"),
    (["server.drain_grace_s=-1"], "server.drain_grace_s"),
    (["server.api_key=/no/such/key"], "server.api_key"),
    (["server=openai_command"], "server.command"),
    (["server=sglang", "model=qwen3_8b", "server.kv_cache_memory_bytes=100"], "server.kv_cache_memory_bytes"),
    (["server=sglang", "model=llama3_1_8b_instruct"], "server.tool_call_parser"),
    (["model=llama3_1_8b_instruct", "server=vllm", "+policy=nemo_rl_gym"], "tool_call_parser: 'hermes' disagrees"),
] + [
    (["+policy=nemo_rl_gym", f"policy.generation.{key}"], f"policy.generation.{key.split('=')[0]}")
    for key in (
        "vllm_cfg.expose_http_server=false",
        "vllm_cfg.async_engine=false",
        "stop_strings=[eos]",
        "stop_token_ids=[2]",
        "vllm_cfg.http_server_serving_chat_kwargs.tool_call_parser=hermess",
        "vllm_cfg.http_server_serving_chat_kwargs.tool_call_parser=mistral",
        "vllm_cfg.http_server_serving_chat_kwargs.enable_auto_tool_choice=false",
        "vllm_cfg.http_server_serving_chat_kwargs.enable_auto_tool_choice=sometimes",
        "vllm_cfg.async_engine=maybe",
    )
] + [
    (["+policy=nemo_rl_gym", f"+policy.generation.{key}"], f"policy.generation.{key.split('=')[0]}")
    for key in (
        "vllm_cfg.tensor_parallel_size=2",
        "vllm_cfg.max_model_len=4096",
        "vllm_cfg.pipeline_parallel_size=2",
        "temperature=0.5",
        "vllm_cfg.http_server_serving_chat_kwargs.reasoning_parser=qwen3",
    )
]


def test_command_and_gym_jobs_compose(tmp_path):
    job = spec_for(*COMMAND, "+job.env.HF_HOME=/data/hf", f"job.cwd={tmp_path}", "job.partition=cpu").job
    assert isinstance(job, CommandJob) and job.kind == "command" and isinstance(job.process, CommandConfig)
    assert job.process.env == {"HF_HOME": "/data/hf"} and job.process.cwd == str(tmp_path)
    assert (job.partition, job.timeout_min) == ("cpu", 60)
    assert spec_for(*COMMAND).job.process.cwd == str(Path.cwd())  # null: where the launcher started

    gym = spec_for(*GYM, "job.limit=5").job
    assert gym.kind == "gym" and isinstance(gym.process, GymConfig) and gym.process.limit == 5
    assert gym.process.env["UV_PYTHON_DOWNLOADS"] == "never" and gym.process.gym_bin == str(GYM_BIN)


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_refused_naming_the_key(overrides, key):
    with pytest.raises(SpecError) as info:
        spec_for(*overrides)
    assert key in str(info.value)


def test_nemo_rl_block_works_unchanged_and_fills_unset_server_flags():
    spec = spec_for("+policy=nemo_rl_gym")
    assert spec.policy.generation.vllm_cfg.expose_http_server is True
    assert spec.server.tool_call_parser == "hermes" and spec.server.enable_auto_tool_choice
    filled = spec_for("+policy=nemo_rl_gym", "server.tool_call_parser=null", "server=vllm",
                      "+policy.generation.vllm_cfg.gpu_memory_utilization=0.8")
    assert filled.server.tool_call_parser == "hermes" and filled.server.gpu_memory_utilization == 0.8
    gym = spec_for("+experiment=qwen3_8b_gym")
    assert (gym.model.path, gym.server.tool_call_parser, gym.server.replicas) == ("Qwen/Qwen3-8B", "hermes", 4)


def test_policy_parser_typo_names_the_policy_key_and_the_fix():
    with pytest.raises(SpecError) as info:
        spec_for("+policy=nemo_rl_gym", "server.tool_call_parser=null",
                 "policy.generation.vllm_cfg.http_server_serving_chat_kwargs.tool_call_parser=hermess")
    assert "http_server_serving_chat_kwargs.tool_call_parser: 'hermess'" in str(info.value)
    assert "did you mean hermes" in str(info.value)


@pytest.mark.parametrize("family,parser", [
    ("qwen3_8b", "hermes"), ("llama3_1_8b_instruct", "llama3_json"), ("mistral_7b_instruct", "mistral"),
    ("smollm2_135m", "hermes"),
])
def test_model_families_carry_their_parser(family, parser):
    spec = spec_for(f"model={family}", "server=vllm")
    assert spec.server.tool_call_parser == parser and spec.model.served_name


def test_a_world_readable_key_file_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret")
    key.chmod(0o644)
    with pytest.raises(SpecError, match="chmod 600"):
        spec_for(f"server.api_key={key}")
    key.chmod(0o600)
    assert spec_for(f"server.api_key={key}").server.api_key == str(key)


def test_several_errors_are_reported_together():
    with pytest.raises(SpecError) as info:
        spec_for("server.replicas=0", "job.max_turns=0")
    assert "server.replicas" in str(info.value) and "job.max_turns" in str(info.value)


def test_a_missing_key_names_it_and_where_its_value_comes_from(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\npath: org/mine\nserved_name: mine\n")
    with pytest.raises(SpecError) as info:
        spec_for(f"hydra.searchpath=[file://{tmp_path}]", "model=mine")
    assert "model.embedded: missing; every option in conf/model/ sets it" in str(info.value)


# ---------------------------------------------------------------- checks beside their configs


@pytest.mark.parametrize("cfg,prefix,message", [
    (CollectorConfig(num_repeats=0), "", "num_repeats: must be >= 1, got 0"),
    (CollectorConfig(top_logprobs=21), "job", "job.top_logprobs: must be in 0..20, got 21"),
    (CollectorConfig(sampling=SamplingParams(top_p=2)), "job", "job.sampling.top_p: must be in (0, 1], got 2"),
    (SamplingParams(max_tokens=0), "", "max_tokens: must be >= 1, got 0"),
    (EngineSpec(served_name="m", max_model_len=0), "server", "server.max_model_len: must be > 0, got 0"),
    (EngineSpec(served_name="m", tool_call_parser=None), "engine",
     "engine.enable_auto_tool_choice: needs engine.tool_call_parser"),
    (EngineSpec(served_name="m", tensor_parallel_size=0), "",
     "tensor_parallel_size/pipeline_parallel_size: must be >= 1, got 0/1"),
])
def test_each_config_dataclass_checks_itself_under_the_key_it_is_given(cfg, prefix, message):
    with pytest.raises(ConfigError) as info:
        check(cfg, prefix)
    assert message in str(info.value)


def test_the_defaults_kept_in_code_pass_their_own_checks():
    for cfg in (CollectorConfig(), SamplingParams(), EngineSpec(served_name="m", tool_call_parser="hermes")):
        check(cfg)


def test_the_checks_of_a_section_share_one_list_and_name_full_keys():
    checks = Checks()
    checks.at("job").at("sampling").require(False, "top_p", "x")
    checks.at("model").require(False, "", "y")
    assert checks.errors == ["job.sampling.top_p: x", "model: y"]
    assert checks.at("server").key("tool_call_parser") == "server.tool_call_parser"


def test_normalising_is_a_step_of_its_own_and_validation_only_reads(tmp_path):
    cfg = config_for(*COMMAND)
    typed = typed_spec(cfg)
    assert typed.server.chat_template == "chatml_hermes_tools" and typed.job.process.cwd is None
    checks = Checks()
    normalise(typed, checks)
    assert not checks.errors
    assert Path(typed.server.chat_template).is_file() and typed.job.process.cwd == str(Path.cwd())
    before = copy.deepcopy(typed)
    typed.validate(checks)
    assert not checks.errors and typed == before

    rollouts = typed_spec(config_for("+policy=nemo_rl_gym", "server.tool_call_parser=null"))
    assert rollouts.server.tool_call_parser is None and rollouts.job.num_tasks == 0
    normalise(rollouts, Checks())
    assert rollouts.server.tool_call_parser == "hermes"  # the policy block fills what server.* leaves unset
    assert rollouts.job.num_tasks > 0 and Path(rollouts.job.collector.tasks).is_file()


def test_a_value_normalising_cannot_resolve_is_reported_with_the_other_errors():
    with pytest.raises(SpecError) as info:
        spec_for("server.chat_template=nonexistent_template", "job.tasks=/no/such.jsonl", "server.replicas=0")
    for key in ("server.chat_template", "job.tasks", "server.replicas"):
        assert key in str(info.value)


# ---------------------------------------------------------------- schemas and defaults


def test_the_composed_config_shows_every_key_with_the_defaults_kept_in_code():
    cfg = config_for()
    assert cfg.job.num_repeats == CollectorConfig.num_repeats and cfg.job.sampling.top_p == SamplingParams.top_p
    assert cfg.server.dtype == EngineSpec.dtype and cfg.cluster.signal_delay_s == 120
    assert "output_dir" not in cfg.job  # the launcher's, not a setting
    gym = config_for("job=gym").job
    assert gym.kind == "gym" and gym.startup_timeout_s == 900 and "run_dir" not in gym


def test_the_gateway_is_on_by_default_listens_where_the_replicas_do_and_can_be_turned_off():
    spec = spec_for("cluster.bind_host=0.0.0.0")
    assert spec.gateway.enabled and spec.gateway.host == "0.0.0.0" and spec.gateway.policy == "sticky_least_loaded"
    assert not spec_for("gateway=off").gateway.enabled
    # Turned off, its keys are not in the way: a bad value of an unused gateway refuses nothing.
    assert not spec_for("gateway.enabled=false", "gateway.wait_s=-1").gateway.enabled


def test_on_policy_is_on_for_the_gateway_and_the_collector_and_they_must_agree():
    spec = spec_for()
    assert spec.gateway.on_policy and spec.job.collector.on_policy
    with pytest.raises(SpecError, match="job.on_policy: .*gateway.on_policy=false passes their token ids on unchanged"):
        spec_for("gateway.on_policy=false")
    assert not spec_for("gateway.on_policy=false", "job.on_policy=false").job.collector.on_policy
    assert spec_for("gateway=off").job.collector.on_policy  # no gateway: the collector splices itself


def _schemas():
    repo = ConfigStore.instance().repo["schema"]
    nodes = {name.removesuffix(".yaml"): node.node for name, node in repo.items() if name.endswith(".yaml")}
    nodes.update({f"job/{name.removesuffix('.yaml')}": node.node for name, node in repo["job"].items()})
    return nodes


OPTIONS = sorted(p.relative_to(Path(CONF)) for group in ("cluster", "model", "server", "job", "gateway")
                 for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_no_option_restates_a_default_kept_in_code(option):
    """One default per setting: a key whose default is in code is set in conf/ only to change it."""
    data = yaml.safe_load((Path(CONF) / option).read_text()) or {}
    schema = _schemas()[str(option.with_suffix("")) if option.parts[0] == "job" else option.parts[0]]
    for key, value in data.items():
        if key != "defaults" and key in schema and schema[key] != "???":
            assert value != schema[key], f"{option}: {key}: {value!r} is the default in code; drop it"


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_every_option_starts_from_its_schema(option):
    defaults = (yaml.safe_load((Path(CONF) / option).read_text()) or {}).get("defaults", [])
    own = f"/schema/{option.with_suffix('') if option.parts[0] == 'job' else option.parts[0]}@_here_"
    assert own in defaults or any(not str(d).startswith(("/", "_")) for d in defaults)  # or extends an option


# ---------------------------------------------------------------- the programs a run starts


def _refusal(*overrides) -> str:
    with pytest.raises(SpecError) as info:
        spec_for(*overrides)
    return str(info.value)


GYM_ON_PATH = [o for o in GYM if not o.startswith("job.gym_bin=")]


def test_gym_programs_are_looked_for_on_path_when_gym_bin_is_null(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    message = _refusal(*GYM_ON_PATH)
    assert ("job.gym_bin: ng_run and ng_collect_rollouts are not on PATH (job.gym_bin is null, so NeMo Gym's "
            "programs are looked for there); install NeMo Gym in a venv (Python >= 3.12) and set "
            "job.gym_bin=/path/to/venv/bin, the folder holding ng_run") in message
    monkeypatch.setenv("PATH", f"{GYM_BIN}:/usr/bin:/bin")
    assert spec_for(*GYM_ON_PATH).job.process.gym_bin is None


def test_gym_programs_are_looked_for_after_the_setup_lines(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    # As a venv's activate does: the job's bash runs the lines, then starts ng_run.
    activate = tmp_path / "activate"
    activate.write_text(f"export PATH={GYM_BIN}:$PATH\n")
    assert spec_for(*GYM_ON_PATH, f"job.setup=['source {activate}']").job.process.setup
    message = _refusal(*GYM_ON_PATH, "job.setup=['export X=1']")
    assert "ng_run and ng_collect_rollouts are not on PATH after job.setup" in message
    message = _refusal(*GYM_ON_PATH, f"job.setup=['source {tmp_path}/no-such-activate']")
    assert "job.gym_bin: cannot tell whether NeMo Gym is on PATH after job.setup: the setup lines failed here (exit 1" in message
    assert "no-such-activate: No such file or directory" in message


def test_slow_setup_lines_are_bounded(monkeypatch):
    monkeypatch.setattr(programs, "SETUP_TIMEOUT_S", 0.5)
    message = _refusal(*GYM_ON_PATH, "job.setup=['sleep 30']")
    assert "the setup lines did not finish within 0.5s here" in message


def test_gym_bin_must_hold_both_programs(tmp_path):
    (tmp_path / "ng_run").symlink_to(GYM_BIN / "ng_run")
    message = _refusal(*GYM, f"job.gym_bin={tmp_path}")
    assert f"job.gym_bin: no executable ng_collect_rollouts in {tmp_path}" in message and "ng_run in" not in message


def test_a_command_job_needs_its_program(tmp_path, monkeypatch):
    assert "job.command: no-such-eval is not on PATH; give its full path, or add job.setup lines" in _refusal(
        "job=command", 'job.command="no-such-eval --base-url {base_url}"')
    message = _refusal("job=command", 'job.command="./eval.sh {base_url}"', f"job.cwd={tmp_path}")
    assert f"job.command: no file {tmp_path}/eval.sh (relative to job.cwd, {tmp_path})" in message
    (tmp_path / "eval.sh").write_text("#!/bin/sh\n")
    message = _refusal("job=command", 'job.command="./eval.sh {base_url}"', f"job.cwd={tmp_path}")
    assert f"{tmp_path}/eval.sh (relative to job.cwd, {tmp_path}) is not executable" in message
    assert "({python} path/to/script.py)" in message
    (tmp_path / "eval.sh").chmod(0o755)
    spec_for("job=command", 'job.command="./eval.sh {base_url}"', f"job.cwd={tmp_path}")
    spec_for(*COMMAND)  # {python}: the job's interpreter
    spec_for("job=command", 'job.command="{run_dir}/built-by-an-earlier-step"')  # only the run knows
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    (tmp_path / "my-eval").symlink_to(tmp_path / "eval.sh")
    spec_for("job=command", 'job.command="my-eval {base_url}"')


def test_an_openai_command_server_needs_its_program():
    message = _refusal("server=openai_command", 'server.command="no-such-server --port {port}"')
    assert "server.command: no-such-server is not on PATH; give its full path, or put its folder on PATH" in message
    spec_for("server=openai_command", 'server.command="{python} -m server.standin --port {port}"')


def test_on_slurm_the_cluster_setup_runs_first_and_the_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    slurm = ["cluster=slurm", "job.partition=cpu"]
    message = _refusal(*slurm, *GYM_ON_PATH)
    assert "not on PATH after cluster.setup" not in message  # no setup lines: plain PATH
    assert "; if it is there only on the compute nodes, set run.check_programs=false" in message
    spec_for(*slurm, *GYM_ON_PATH, f"cluster.setup=['export PATH={GYM_BIN}:$PATH']")
    message = _refusal(*slurm, *GYM_ON_PATH, "cluster.setup=['export X=1']", "job.setup=['export Y=1']")
    assert "are not on PATH after cluster.setup and job.setup" in message
    assert spec_for(*slurm, *GYM_ON_PATH, "run.check_programs=false").run.check_programs is False
    spec_for(*GYM_ON_PATH, "run.check_programs=false")


def test_a_leading_tilde_is_the_home_folder_in_every_path_key(tmp_path, monkeypatch):
    from launcher.spec import HOME_PATH_KEYS

    monkeypatch.setenv("HOME", str(tmp_path))
    for folder in ("model", "gym"):
        (tmp_path / folder).mkdir()
    for name in ("tasks.jsonl", "gym.jsonl"):
        (tmp_path / name).write_text(TASK % "a" + "\n")
    (tmp_path / "template.jinja").write_text("{{ messages }}")
    (tmp_path / "key").write_text("k")
    (tmp_path / "key").chmod(0o600)
    for program in ("ng_run", "ng_collect_rollouts"):
        (tmp_path / "gym" / program).symlink_to(GYM_BIN / program)
    # As launcher.cli.quote_tilde_values passes them to Hydra.
    values = {
        "model.path": "~/model", "model.cache_dir": "~/cache", "server.chat_template": "~/template.jinja",
        "server.api_key": "~/key", "registry.root": "~/registry", "job.tasks": "~/tasks.jsonl",
    }
    gym = {"job.cwd": "~", "job.gym_bin": "~/gym", "job.input_jsonl": "~/gym.jsonl"}
    assert set(values) | set(gym) == set(HOME_PATH_KEYS)
    spec = spec_for("model.embedded=null", *(f"{k}='{v}'" for k, v in values.items()))
    assert spec.model.path == str(tmp_path / "model")
    assert spec.server.chat_template == str(tmp_path / "template.jinja")
    assert spec.job.collector.tasks == str(tmp_path / "tasks.jsonl") and spec.registry.root == tmp_path / "registry"
    assert Path(spec.server.api_key).expanduser() == tmp_path / "key"  # checked there; read there by the run
    assert Path(spec.model.cache_dir).expanduser() == tmp_path / "cache"  # server.models expands it
    process = spec_for(*GYM, *(f"{k}='{v}'" for k, v in gym.items())).job.process
    assert (process.cwd, process.gym_bin, process.input_jsonl) == (
        str(tmp_path), str(tmp_path / "gym"), str(tmp_path / "gym.jsonl"))


def test_gym_s_training_variant_and_prefix_supply_are_read_from_its_configs():
    """They decide the readiness gate (token ids, token_id:N logprobs, /tokenize) and need the gateway."""
    training = f"{GYM_07_CONFIGS}/vllm_model_for_training.yaml"
    spec = spec_for(*GYM, f"job.config_paths=[{training},{GYM_07_CONFIGS}/vllm_model_supply_prefix.yaml]")
    assert spec.job.records_token_ids and spec.job.supplies_prefix
    plain = spec_for(*GYM, f"job.config_paths=[{GYM_07_CONFIGS}/vllm_model.yaml]", "gateway=off")
    assert not plain.job.records_token_ids and not plain.job.supplies_prefix


def test_on_slurm_servers_and_the_gateway_listen_on_their_advertised_address_unless_told():
    spec = spec_for("cluster=slurm")
    assert spec.cluster.bind_host is None and spec.gateway.host is None  # server/multinode.py listen_address
    told = spec_for("cluster=slurm", "cluster.bind_host=0.0.0.0")
    assert told.cluster.bind_host == told.gateway.host == "0.0.0.0"
    assert spec_for().cluster.bind_host == spec_for().gateway.host == "127.0.0.1"  # local: loopback
