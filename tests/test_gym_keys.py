"""job=gym's overrides against the keys each NeMo Gym release really reads.

Gym ignores a model key it does not know (pydantic's default), so an override a release lacks
fails nowhere: it just does nothing. The facts come from Gym's own source, copied into
tests/data/nemo_gym/ (keys.json says from which tag or wheel, and how; the YAML files are
Gym's verbatim), so these tests need neither Gym nor the network. A fake install here is only a
folder layout: ``<prefix>/bin/ng_run`` beside ``<prefix>/lib/python3.X/site-packages`` holding
``nemo_gym-<version>.dist-info`` and Gym's bundled configs, as pip lays them out."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import pytest

from jobs.command import (
    GYM_KEY_SINCE, GYM_VLLM_MODEL_KEY, CommandFailed, Endpoints, GymConfig, GymInstall, gym_install, run,
)
from server.registry import Registry

DATA = Path(__file__).resolve().parent / "data" / "nemo_gym"
KEYS = {v: facts for v, facts in json.loads((DATA / "keys.json").read_text()).items() if not v.startswith("_")}
CONFIGS = "responses_api_models/vllm_model/configs"
TRAINING = f"{CONFIGS}/vllm_model_for_training.yaml"
SUPPLY_PREFIX = f"{CONFIGS}/vllm_model_supply_prefix.yaml"
# The arguments that are Gym's own CLI contract in every release, not keys that came later.
ALWAYS = ("config_paths", "policy_base_url", "policy_model_name", "policy_api_key")


def release(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in version.split("."))


def fake_install(tmp_path: Path, version: str) -> Path:
    """A Gym ``version`` laid out as pip installs it, with that line's vllm_model configs (0.5 and
    0.6 get 0.7's: the training config's policy keys are the same). Returns ng_run's path."""
    prefix = tmp_path / f"gym-{version}"
    site = prefix / "lib" / "python3.13" / "site-packages"
    (site / f"nemo_gym-{version}.dist-info").mkdir(parents=True)
    shutil.copytree(DATA / ("0.4.0" if version == "0.4.0" else "0.7.0") / "responses_api_models",
                    site / "responses_api_models")
    (prefix / "bin").mkdir()
    ng_run = prefix / "bin" / "ng_run"
    ng_run.write_text("#!/bin/sh\n")
    ng_run.chmod(0o755)
    return ng_run


def gym(tmp_path: Path, config_paths: list[str], ng_run_args: list[str] = (), gym_bin: Path | None = None) -> GymConfig:
    return GymConfig(
        service="policy", env={}, cwd=str(tmp_path), setup=[], stop_grace_s=1, config_paths=config_paths,
        agent_name="a", input_jsonl="t.jsonl", limit=None, num_samples_in_parallel=None,
        gym_bin=str(gym_bin) if gym_bin else None, startup_timeout_s=60, ng_run_args=list(ng_run_args),
        collect_args=[],
    )


def endpoints(tmp_path: Path, gateway_url: str | None = "http://gw:9000/v1") -> Endpoints:
    endpoint_file = None
    if gateway_url:
        endpoint_file = tmp_path / "policy.url"
        endpoint_file.write_text(gateway_url + "\n")
    return Endpoints(service="policy", namespace="ns", registry=Registry(tmp_path / "registry"),
                     base_urls=[gateway_url or "http://replica:8000/v1"], model="m",
                     endpoint_file=str(endpoint_file) if endpoint_file else None)


def written_keys(argv: list[str]) -> dict[str, str]:
    """Each override's key -> where Gym reads it: "vllm_model" (a field of the policy's
    VLLMModelConfig) or "global"; ALWAYS left out."""
    keys = {}
    for arg in argv[1:]:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key in ALWAYS:
            continue
        instance, _, field = key.partition(GYM_VLLM_MODEL_KEY)
        keys[field or instance] = "vllm_model" if field else "global"
    return keys


def test_the_key_table_is_gym_s_own():
    """GYM_KEY_SINCE says when each key came; every release's source agrees, before and after."""
    assert sorted(KEYS) == ["0.4.0", "0.5.0", "0.6.0", "0.7.0"]
    for key, since in GYM_KEY_SINCE.items():
        where = "global" if key == "model_endpoint_readiness_timeout_seconds" else "vllm_model"
        for version, facts in KEYS.items():
            assert (key in facts[where]) == (release(version)[:2] >= since), (key, version)
    # What the job reads from Gym's configs is a vllm_model field in every release.
    for version, facts in KEYS.items():
        assert {"base_url", "return_token_id_information"} <= set(facts["vllm_model"]), version


@pytest.mark.parametrize("version", sorted(KEYS))
@pytest.mark.parametrize("gateway", [True, False])
def test_every_override_names_a_key_the_release_reads(tmp_path, version, gateway):
    ng_run = fake_install(tmp_path, version)
    install = gym_install(str(ng_run))
    assert install == GymInstall(release(version), ng_run.parent.parent / "lib" / "python3.13" / "site-packages")
    cfg = gym(tmp_path, [TRAINING], gym_bin=ng_run.parent)
    keys = written_keys(cfg.ng_run_argv(endpoints(tmp_path, "http://gw:9000/v1" if gateway else None), install))
    for key, where in keys.items():
        assert key in KEYS[version][where], f"NeMo Gym {version} has no {where} key {key}"
    # ... and every key the release has that the job should write is written.
    expected = {k for k, since in GYM_KEY_SINCE.items() if release(version)[:2] >= since
                and k != "supply_prefix_token_ids"  # the user's choice: Gym's own config file
                and (gateway or k == "model_endpoint_readiness_timeout_seconds")}
    assert set(keys) == expected


def test_the_overrides_for_gym_0_7_through_the_gateway(tmp_path):
    cfg = gym(tmp_path, [TRAINING], gym_bin=fake_install(tmp_path, "0.7.0").parent)
    argv = cfg.ng_run_argv(endpoints(tmp_path), cfg.install())
    model = "++policy_model.responses_api_models.vllm_model"
    assert argv[1:] == [
        f"+config_paths=[{TRAINING}]", "+policy_base_url=http://gw:9000/v1", "+policy_model_name=m",
        "+policy_api_key=EMPTY", "++model_endpoint_readiness_timeout_seconds=20",
        f"{model}.endpoint_file={tmp_path / 'policy.url'}", f"{model}.endpoint_connection_retries=40",
        f"{model}.forward_session_id_as_conversation_id=true",
    ]


def test_an_unknown_release_gets_only_what_every_release_reads(tmp_path):
    bin_dir = tmp_path / "bin"  # ng_run with no dist-info beside it: no release to tell
    bin_dir.mkdir()
    cfg = gym(tmp_path, [TRAINING], gym_bin=bin_dir)
    assert cfg.install() is None
    assert written_keys(cfg.ng_run_argv(endpoints(tmp_path), None)) == {}


def test_two_gym_installs_in_one_environment_are_no_release(tmp_path):
    ng_run = fake_install(tmp_path, "0.7.0")
    (ng_run.parent.parent / "lib" / "python3.13" / "site-packages" / "nemo_gym-0.4.0.dist-info").mkdir()
    assert gym_install(str(ng_run)) is None


def test_the_job_starts_gym_at_the_gateway_the_endpoint_file_names_now(tmp_path):
    """A job requeued after a gateway rollover: the launcher rewrote the file, the argv follows it."""
    e = endpoints(tmp_path, "http://old-gw:9000/v1")
    Path(e.endpoint_file).write_text("http://new-gw:9100/v1\n")
    argv = gym(tmp_path, [TRAINING]).ng_run_argv(e)
    assert "+policy_base_url=http://new-gw:9100/v1" in argv
    assert e.environ()["POLICY_BASE_URLS"] == "http://new-gw:9100/v1"
    Path(e.endpoint_file).unlink()  # between two gateways: the last one the launcher saw ready
    assert e.current_base_urls() == ["http://old-gw:9000/v1"]


def test_the_training_variant_and_prefix_supply_are_read_from_gym_s_configs(tmp_path):
    ng_run = fake_install(tmp_path, "0.7.0")
    install = gym_install(str(ng_run))
    plain = gym(tmp_path, [f"{CONFIGS}/vllm_model.yaml"])
    # Not in cwd (tmp_path): found in the install, as Gym 0.7 finds its bundled configs.
    assert plain.policy_models(install)["policy_model"]["return_token_id_information"] is False
    assert not plain.records_token_ids(install) and not plain.supplies_prefix(install)
    assert plain.policy_models() == {}  # nowhere to be found without the install
    assert gym(tmp_path, [TRAINING]).records_token_ids(install)
    switched = gym(tmp_path, [f"{CONFIGS}/vllm_model.yaml"],
                   ["++policy_model.responses_api_models.vllm_model.return_token_id_information=true"])
    assert switched.records_token_ids(install)
    both = gym(tmp_path, [TRAINING, SUPPLY_PREFIX])
    assert both.records_token_ids(install) and both.supplies_prefix(install)
    # Gym's supply-prefix file alone names no base_url: it only means something on top of a policy config.
    assert not gym(tmp_path, [SUPPLY_PREFIX]).supplies_prefix(install)


def test_a_judge_s_vllm_model_is_not_pointed_at_the_service(tmp_path):
    judge = tmp_path / "judge.yaml"
    judge.write_text(
        "judge_model:\n  responses_api_models:\n    vllm_model:\n      entrypoint: app.py\n"
        "      base_url: http://judge:8000/v1\n      return_token_id_information: true\n"
    )
    cfg = gym(tmp_path, [TRAINING, str(judge)], gym_bin=fake_install(tmp_path, "0.7.0").parent)
    argv = cfg.ng_run_argv(endpoints(tmp_path), cfg.install())
    assert not any(a.startswith("++judge_model.") for a in argv)
    assert sum(a.startswith("++policy_model.") for a in argv) == 3


@pytest.fixture
def own_signals():
    """run() takes SIGTERM/SIGINT/SIGUSR2 for the job; given back to pytest afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_prefix_supply_on_a_gym_without_it_fails_before_anything_starts(tmp_path, own_signals):
    """Gym 0.4 would ignore supply_prefix_token_ids: the run would look verified and not be."""
    cfg = gym(tmp_path, [TRAINING], ["++policy_model.responses_api_models.vllm_model.supply_prefix_token_ids=true"],
              gym_bin=fake_install(tmp_path, "0.4.0").parent)
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"), endpoints=endpoints(tmp_path))
    with pytest.raises(CommandFailed, match=r"supply_prefix_token_ids is set, but NeMo Gym 0\.4\.0 has no such "
                                            r"key \(it came with 0\.6\)"):
        run(cfg)
    assert not (tmp_path / "run" / "logs" / "ng_run.log").exists()  # nothing was started
