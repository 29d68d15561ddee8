"""The fit arithmetic of launcher/slurm_fit.py on captured ``scontrol``/``squeue`` text: what can
never run is refused with the numbers and the key to change; a pending job's reason is judged."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launcher.slurm_fit import (
    Ask, ClusterConfig, ClusterView, QueuedJob, gpu_count, judge, megabytes, minutes, parse_queue, refusals,
    together,
)

# Captured from the project's test cluster (tests/slurm/start.sh), 2026-11-29.
TEST_PARTITIONS = """\
PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=24105M,node=1,billing=8,gres/gpu=4
PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=24105M,node=1,billing=8,gres/gpu=4
"""
TEST_NODES = """\
NodeName=vm Arch=x86_64 CoresPerSocket=8  CPUAlloc=0 CPUEfctv=8 CPUTot=8 CPULoad=0.70 AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:4 NodeAddr=127.0.0.1 NodeHostName=vm Version=22.05.8 OS=Linux 6.18.44-fc-v509 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=24105 AllocMem=0 FreeMem=22150 Sockets=1 Boards=1 State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu,cpu  BootTime=2026-11-29T22:58:22 SlurmdStartTime=2026-11-29T23:13:00 LastBusyTime=2026-11-29T23:33:35 CfgTRES=cpu=8,mem=24105M,billing=8,gres/gpu=4 AllocTRES= CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s
"""
TEST_CONFIG = "AccountingStorageEnforce = none\nDefMemPerCPU            = 3013\nSelectTypeParameters    = CR_CORE\n"

# A site: two 4-GPU nodes in `batch` (4 h limit), one CPU node in `cpu`, typed gres, a node drained.
SITE_PARTITIONS = """\
PartitionName=batch AllowGroups=ALL AllowAccounts=proj_a,proj_b AllowQos=ALL Default=YES MaxNodes=UNLIMITED MaxTime=04:00:00 MinNodes=0 MaxCPUsPerNode=UNLIMITED Nodes=g[01-02] OverSubscribe=NO State=UP SelectTypeParameters=NONE DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED
PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL Default=NO MaxNodes=UNLIMITED MaxTime=1-00:00:00 MinNodes=0 MaxCPUsPerNode=UNLIMITED Nodes=c01 OverSubscribe=NO State=UP SelectTypeParameters=NONE DefMemPerCPU=2000 MaxMemPerNode=64000
"""
SITE_NODES = """\
NodeName=g01 CPUAlloc=0 CPUEfctv=32 CPUTot=32 Gres=gpu:a100:4(S:0-1) OS=Linux 5.14 #1 SMP RealMemory=512000 MemSpecLimit=2000 State=IDLE Partitions=batch Reason=none
NodeName=g02 CPUAlloc=0 CPUEfctv=32 CPUTot=32 Gres=gpu:a100:4(S:0-1) OS=Linux 5.14 #1 SMP RealMemory=512000 MemSpecLimit=2000 State=IDLE+DRAIN Partitions=batch Reason=bad fan [root@2026-11-01]
NodeName=c01 CPUAlloc=0 CPUEfctv=64 CPUTot=64 Gres=(null) RealMemory=256000 State=MIXED Partitions=cpu
"""


def small_view() -> ClusterView:
    return ClusterView.parse(TEST_PARTITIONS, TEST_NODES)


def site_view() -> ClusterView:
    return ClusterView.parse(SITE_PARTITIONS, SITE_NODES)


def servers(count=1, cpus=1, mem_gb=4, gpus=1, partition="gpu", time=60, exclusive=False) -> Ask:
    """As SlurmBackend builds them from the run's server Resources."""
    keys = {"partition": "cluster.partition", "cpus": "cluster.cpus_per_task", "mem": "cluster.mem_gb",
            "gpus": "server.gpus_per_replica", "time": "cluster.timeout_min", "count": "server.replicas"}
    return Ask("policy server replica", count, partition, cpus, int(mem_gb * 1024) if mem_gb else None, gpus,
               time, exclusive, source=dict(keys), lever=dict(keys))


def job(cpus=1, mem_gb=2, partition="cpu", time=60, cpus_from_cluster=False, exclusive=False) -> Ask:
    lever = {"partition": "job.partition", "cpus": "job.cpus_per_task", "mem": "job.mem_gb",
             "gpus": "server.gpus_per_replica", "time": "job.timeout_min"}
    source = {**lever, **({"cpus": "cluster.cpus_per_task"} if cpus_from_cluster else {})}
    return Ask("rollouts job", 1, partition, cpus, int(mem_gb * 1024) if mem_gb else None, 0, time, exclusive,
               source=source, lever=lever)


class ConfigSpy:
    """``scontrol show config``, counting the calls: it is read only when it decides."""

    def __init__(self, text: str = TEST_CONFIG) -> None:
        self.text, self.calls = text, 0

    def __call__(self) -> ClusterConfig:
        self.calls += 1
        return ClusterConfig.parse(self.text)


# ---------------------------------------------------------------- parsing


def test_parses_the_test_clusters_scontrol_lines():
    view = small_view()
    assert view.default == "gpu" and list(view.partitions) == ["gpu", "cpu"]
    (node,) = view.nodes
    assert (node.name, node.cpus, node.mem_mb, node.gpus, node.partitions) == ("vm", 8, 24105, 4, ("gpu", "cpu"))
    assert view.partitions["gpu"].max_time_min is None


def test_parses_a_sites_lines_with_spaces_in_values_typed_gres_and_limits():
    view = site_view()
    g01, g02, c01 = view.nodes
    assert (g01.gpus, g01.mem_mb, g01.real_mb, g01.spec_mb) == (4, 510000, 512000, 2000)
    assert g02.unavailable and not g01.unavailable and not c01.unavailable
    assert c01.gpus == 0
    assert view.partitions["batch"].max_time_min == 240
    assert view.partitions["cpu"].max_mem_per_node_mb == 64000
    assert view.partitions["cpu"].def_mem_per_cpu_mb == 2000
    assert [n.name for n in view.nodes_of("batch")] == ["g01", "g02"]


@pytest.mark.parametrize("text, expected", [
    ("UNLIMITED", None), ("INFINITE", None), ("1-00:00:00", 1440), ("04:00:00", 240), ("30:00", 30), ("45", 45),
    ("2-12:30:00", 3630),
])
def test_minutes(text, expected):
    assert minutes(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("24105", 24105), ("20G", 20480), ("4000M", 4000), ("2T", 2 * 1024 * 1024), ("UNLIMITED", None), ("0", None),
])
def test_megabytes(text, expected):
    assert megabytes(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:v100:2", 4), ("(null)", 0), ("N/A", 0),
    ("gres:gpu:1", 1), ("gres/gpu:2", 2), ("cpu=6,node=1,billing=6,gres/gpu=1", 1), ("gpu", 1), ("gpu:a100", 1),
])
def test_gpu_count(text, expected):
    assert gpu_count(text) == expected


# ---------------------------------------------------------------- one job alone


def test_memory_above_every_node_names_the_key_and_the_bound():
    config = ConfigSpy()
    problems = refusals(small_view(), [servers(mem_gb=64), job()], config)
    assert problems == ["cluster.mem_gb: 64 GB per job, but the only node of partition gpu (vm) has 23.5 GB "
                        "(RealMemory 24105 MB): set cluster.mem_gb <= 23"]
    assert config.calls == 0


def test_memory_against_memspeclimit_and_the_partitions_maxmempernode():
    (problem,) = refusals(site_view(), [servers(mem_gb=505, partition="batch")], ConfigSpy())
    assert problem == ("cluster.mem_gb: 505 GB per job, but the largest node of partition batch (g01) has 498 GB "
                       "(RealMemory 512000 MB, MemSpecLimit 2000 MB kept for the system): set cluster.mem_gb <= 498")
    (problem,) = refusals(site_view(), [servers(partition="batch"), job(mem_gb=100)], ConfigSpy())
    assert problem.startswith("job.mem_gb: 100 GB per job, but partition cpu allows at most 62.5 GB "
                              "(MaxMemPerNode 64000 MB): set job.mem_gb <= 62")


def test_cpus_name_the_key_in_effect_and_the_one_to_set():
    problems = refusals(small_view(), [servers(cpus=16), job(cpus=16, cpus_from_cluster=True)], ConfigSpy())
    assert problems == [
        "cluster.cpus_per_task: 16 CPUs per task, but the only node of partition gpu (vm) has 8: "
        "set cluster.cpus_per_task <= 8",
        "cluster.cpus_per_task, as job.cpus_per_task is unset: 16 CPUs per task, but the only node of partition "
        "cpu (vm) has 8: set job.cpus_per_task <= 8",
    ]


def test_gpus_above_the_nodes_gres_and_a_partition_without_gpus():
    assert refusals(small_view(), [servers(gpus=5)], ConfigSpy()) == [
        "server.gpus_per_replica: 5 GPUs per replica, but the only node of partition gpu (vm) has 4 (gres gpu:4); "
        "a replica runs on one node: set server.gpus_per_replica <= 4"]
    assert refusals(site_view(), [servers(partition="cpu")], ConfigSpy()) == [
        "server.gpus_per_replica: 1 GPU per replica, but no node of partition cpu has a GPU (no gpu gres): "
        "set cluster.partition to a partition with GPUs (batch) or set server.gpus_per_replica=0"]


def test_time_above_the_partitions_maxtime():
    problems = refusals(site_view(), [servers(partition="batch", time=600), job(time=2000)], ConfigSpy())
    assert problems == [
        "cluster.timeout_min: 600 min per job, but partition batch allows at most 240 min (MaxTime 04:00:00): "
        "set cluster.timeout_min <= 240",
        "job.timeout_min: 2000 min per job, but partition cpu allows at most 1440 min (MaxTime 1-00:00:00): "
        "set job.timeout_min <= 1440",
    ]


def test_unknown_partitions_list_the_ones_that_exist():
    problems = refusals(small_view(), [servers(partition="gpus"), job(partition="cpux")], ConfigSpy())
    assert problems == [
        "cluster.partition: partition 'gpus' does not exist; this cluster has gpu (default), cpu: "
        "set cluster.partition to one of them",
        "job.partition: partition 'cpux' does not exist; this cluster has gpu (default), cpu: "
        "set job.partition to one of them",
    ]
    # Unset: the default partition.
    assert refusals(small_view(), [servers(partition=None), job(partition=None)], ConfigSpy()) == []


def test_account_not_allowed_on_the_partition_and_not_among_the_users_associations():
    (problem,) = refusals(site_view(), [servers(partition="batch")], ConfigSpy(), account="proj_c")
    assert problem.startswith("cluster.account: 'proj_c' may not use partition batch (Allow: proj_a,proj_b")
    enforced = ConfigSpy("AccountingStorageEnforce = associations,limits,qos\n")
    assocs = lambda: [("proj_a", "", "normal,long"), ("proj_b", "", "normal")]  # noqa: E731
    problems = refusals(site_view(), [servers(partition="cpu", gpus=0)], enforced, account="proj_x",
                        associations=assocs)
    assert problems == ["cluster.account: 'proj_x' is not one of your accounts on this cluster (sacctmgr lists "
                        "proj_a, proj_b): set cluster.account to one of them"]
    problems = refusals(site_view(), [servers(partition="cpu", gpus=0)], enforced, account="proj_b", qos="long",
                        associations=assocs)
    assert problems == ["cluster.qos: 'long' is not a QOS your association with account proj_b may use (sacctmgr "
                        "lists normal): set cluster.qos to one of them"]
    # Without enforcement Slurm takes any account (the test cluster): not refused.
    assert refusals(site_view(), [servers(partition="cpu", gpus=0)], ConfigSpy(), account="proj_x",
                    associations=assocs) == []


# ---------------------------------------------------------------- the run's jobs side by side


def test_a_collector_that_cannot_fit_beside_its_server_is_refused_with_the_numbers_and_fixes():
    config = ConfigSpy()
    (problem,) = refusals(small_view(), [servers(cpus=8), job(cpus=4)], config)
    assert problem == (
        "the run's own jobs can never run at the same time: the rollouts job starts once 1 policy server replica "
        "is ready and must run beside it, while the servers wait for it.\n"
        "  CPUs: 1 x 8 (cluster.cpus_per_task) + 4 (job.cpus_per_task) = 12, but vm, the only node of partitions "
        "gpu and cpu, has 8 CPUs\n"
        "  change one of: cluster.cpus_per_task <= 4")
    assert config.calls == 0  # explicit memory that fits either way: no third scontrol call
    (problem,) = refusals(small_view(), [servers(count=3, cpus=2), job(cpus=3)], config)
    assert problem.endswith("change one of: cluster.cpus_per_task <= 1; job.cpus_per_task <= 2; server.replicas <= 2")


def test_what_fits_together_is_not_refused():
    assert refusals(small_view(), [servers(count=2, cpus=2, gpus=2), job(cpus=4)], ConfigSpy()) == []
    # Separate nodes: the collector on the CPU node, beside nothing.
    assert refusals(site_view(), [servers(count=2, cpus=32, gpus=4, partition="batch"), job(cpus=64)],
                    ConfigSpy()) == []


def test_replicas_that_cannot_all_run_at_once_are_refused_without_a_job():
    (problem,) = refusals(site_view(), [servers(count=3, gpus=4, partition="batch")], ConfigSpy())
    assert problem.startswith("the run's own jobs can never run at the same time: at most 2 of the 3 policy "
                              "server replicas fit at once")
    assert "GPUs: 3 x 4 (server.gpus_per_replica) = 12, but the 2 nodes of partition batch have 4 GPUs each" in problem
    assert problem.endswith("change one of: server.gpus_per_replica <= 2; server.replicas <= 2")


def test_memory_counts_only_where_slurm_allocates_it_and_config_is_read_only_then():
    run = [servers(mem_gb=20), job(mem_gb=10, partition="gpu")]
    not_consumable = ConfigSpy()  # the test cluster: CR_CORE
    assert refusals(small_view(), run, not_consumable) == []
    assert not_consumable.calls == 1
    consumable = ConfigSpy("SelectTypeParameters = CR_Core_Memory\n")
    (problem,) = refusals(small_view(), run, consumable)
    assert "memory: 1 x 20 GB (cluster.mem_gb) + 10 GB (job.mem_gb) = 30 GB, but vm" in problem
    assert "change one of: cluster.mem_gb <= 13; job.mem_gb <= 3" in problem


def test_an_unset_memory_request_takes_the_whole_node_when_memory_is_allocated_and_no_default_is_set():
    run = [servers(mem_gb=None), job(mem_gb=None, partition="gpu")]
    assert refusals(small_view(), run, ConfigSpy("SelectTypeParameters = CR_Core_Memory\n")) != []
    assert refusals(small_view(), run, ConfigSpy("SelectTypeParameters = CR_Core_Memory\nDefMemPerCPU = 2000\n")) == []


def test_exclusive_nodes_and_the_fixes_that_help():
    view = site_view()
    alone = together(view, servers(count=2, partition="batch", exclusive=True),
                     [job(partition="batch", exclusive=True)], ConfigSpy())
    assert "(cluster.exclusive gives every job a whole node)" in alone
    assert "cluster.exclusive=false" in alone and "server.replicas <= 1" in alone and "job.partition=cpu" in alone


# ---------------------------------------------------------------- pending jobs


QUEUE = """\
48|PENDING||4|2G|N/A|cpu|normal|root|Resources
47|RUNNING|vm|6|4G|gres:gpu:1|gpu|normal|root|None
"""


def own(*ids: str) -> dict:
    return {i: (job(cpus=4) if i == "48" else servers(cpus=6)) for i in ids}


def test_a_job_starved_by_the_runs_own_servers_never_starts_and_says_what_to_change():
    queue = parse_queue(QUEUE)
    verdict = judge(queue["48"], queue, own("47", "48"), small_view(), ConfigSpy(),
                    servers=servers(cpus=6), others=[job(cpus=4)])
    assert verdict.never
    assert verdict.explanation.startswith(
        "rollouts job 48 is PENDING (Resources) and can never start: it needs 4 CPUs on a node of partition cpu, "
        "and this run's own jobs hold them (on vm, job 47 holds 6 of its 8 CPUs).")
    assert "change one of: cluster.cpus_per_task <= 4; job.cpus_per_task <= 2" in verdict.explanation
    assert verdict.short() == "Resources: never starts: this run's own jobs hold what it needs"


def test_a_job_waiting_for_someone_elses_job_will_start():
    queue = parse_queue(QUEUE)
    verdict = judge(queue["48"], queue, own("48"), small_view(), ConfigSpy())  # 47 is not this run's
    assert not verdict.never and verdict.advice == "other jobs hold what it needs; it starts when they end"


def test_squeues_long_form_of_a_node_wait_is_judged_like_resources():
    line = ("48|PENDING||4|2G|N/A|cpu|normal|root|Nodes required for job are DOWN, DRAINED or reserved for jobs "
            "in higher priority partitions")
    queue = parse_queue(line + "\n" + QUEUE.splitlines()[1])
    assert queue["48"].reason.startswith("Nodes required")
    assert judge(queue["48"], queue, own("47", "48"), small_view(), ConfigSpy()).never


def test_down_nodes_are_named_but_the_run_keeps_waiting():
    queue = parse_queue("9|PENDING||4|2G|gres:gpu:4|batch|normal|proj_a|ReqNodeNotAvail, UnavailableNodes:g02\n"
                        "7|RUNNING|g01|4|2G|gres:gpu:4|batch|normal|proj_a|None\n")
    verdict = judge(queue["9"], queue, {"9": servers(gpus=4, partition="batch")}, site_view(), ConfigSpy())
    assert not verdict.never
    assert verdict.short() == ("ReqNodeNotAvail: nodes g02 are down or drained: wait for the admins, or choose "
                               "another partition (cluster.partition)")


def test_permanent_reasons_fail_with_the_key():
    queue = parse_queue("5|PENDING||1|4G|gres:gpu:1|gpu|normal|root|PartitionTimeLimit\n")
    verdict = judge(queue["5"], queue, {"5": servers()}, small_view(), ConfigSpy())
    assert verdict.never and "change cluster.timeout_min" in verdict.advice
    assert verdict.explanation == ("policy server replica 5 is PENDING (PartitionTimeLimit) and never starts: its "
                                   "time limit is above the partition's MaxTime. Change cluster.timeout_min.")


def test_a_per_user_limit_held_only_by_the_runs_own_jobs_never_resolves():
    text = ("3_1|PENDING||1|4G|gres:gpu:1|gpu|gpu1|root|QOSMaxGRESPerUser\n"
            "3_0|RUNNING|vm|1|4G|gres:gpu:1|gpu|gpu1|root|None\n")
    queue = parse_queue(text)
    mine = {"3_0": servers(), "3_1": servers()}
    assert judge(queue["3_1"], queue, mine, small_view(), ConfigSpy()).never
    # Another job of this user holds part of it: it ends some day.
    queue = parse_queue(text + "99|RUNNING|vm|1|4G|gres:gpu:1|gpu|gpu1|root|None\n")
    verdict = judge(queue["3_1"], queue, mine, small_view(), ConfigSpy())
    assert not verdict.never and "in use by jobs 99" in verdict.advice


def test_a_group_limit_asks_who_holds_it():
    text = "3_1|PENDING||1|4G|gres:gpu:1|gpu|gpu1|root|QOSGrpGRES\n3_0|RUNNING|vm|1|4G|gres:gpu:1|gpu|gpu1|root|None\n"
    queue = parse_queue(text)
    mine = {"3_0": servers(), "3_1": servers()}
    asked = []
    only_ours = lambda kind, name: asked.append((kind, name)) or ["3_0"]  # noqa: E731
    assert judge(queue["3_1"], queue, mine, small_view(), ConfigSpy(), group_running=only_ours).never
    assert asked == [("qos", "gpu1")]
    shared = lambda kind, name: ["3_0", "77"]  # noqa: E731
    assert not judge(queue["3_1"], queue, mine, small_view(), ConfigSpy(), group_running=shared).never


def test_queue_lines_parse_array_tasks_and_reasons_with_separators():
    (row,) = parse_queue("12_3|PENDING||2|4000M|gres:gpu:2|gpu|normal|acct|Reason with | bar\n").values()
    assert row == QueuedJob("12_3", "PENDING", "", 2, 4000, 2, "gpu", "normal", "acct", "Reason with | bar")


# ---------------------------------------------------------------- the whole run, as the launcher asks it

# Captured from the test cluster (tests/slurm/start.sh) on 2026-12-08: partitions gpu (default), cpu and
# `shared` (OverSubscribe=FORCE:16), one node of 8 CPUs.
TESTCLUSTER_PARTITIONS = TEST_PARTITIONS + (
    "PartitionName=shared AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 "
    "RootOnly=NO ReqResv=NO OverSubscribe=FORCE:16 OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=8 "
    "TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=8,mem=24105M,node=1,billing=8,gres/gpu=4\n")
TESTCLUSTER_NODES = TEST_NODES.replace("Partitions=gpu,cpu ", "Partitions=gpu,cpu,shared ")


def run_asks(*overrides: str) -> list[Ask]:
    """The run's jobs as ``SlurmBackend.preflight`` gets them from a composed config (Hydra, load_spec,
    launcher.orchestrate.cluster_asks): the keys behind each value are the launcher's, not a test's."""
    from launcher.executors import SlurmBackend
    from launcher.orchestrate import cluster_asks
    from tests.test_spec import spec_for

    spec = spec_for(*overrides)
    backend = SlurmBackend(spec.cluster, "submitit")
    return [backend._ask(r) for r in cluster_asks(spec)]


def proposed_fixes(refusal: str) -> list[str]:
    """``change one of: a <= 2; b=x or y`` -> the overrides that apply each: ``a=2``, ``b=x``, ``b=y``."""
    (line,) = [line for line in refusal.splitlines() if "change one of: " in line]
    overrides = []
    for fix in line.split("change one of: ", 1)[1].split("; "):
        key, sep, bound = fix.partition(" <= ")
        if sep:
            overrides.append(f"{key}={bound}")
        else:
            key, _, values = fix.partition("=")
            overrides += [f"{key}={v}" for v in values.split(" or ")]
    return overrides


def cpus_held_at_once(asks: list[Ask]) -> int:
    """Every job of the run on the one node, the plain sum (what Slurm found: 2 x 2 + 1 + 4 = 9 > 8)."""
    return sum(a.count * a.cpus for a in asks)


TESTCLUSTER = ["cluster=slurm_testcluster"]


@pytest.mark.parametrize("overrides", [
    ["server.replicas=5"],  # observed: refused with "server.replicas <= 2", which could never run
    ["server.replicas=3", "cluster.cpus_per_task=2", "job.cpus_per_task=3"],
    ["server.replicas=2", "cluster.cpus_per_task=3"],
], ids=lambda o: " ".join(o))
def test_every_fix_the_refusal_proposes_passes_the_check(overrides):
    view, config = ClusterView.parse(TESTCLUSTER_PARTITIONS, TESTCLUSTER_NODES), ConfigSpy()
    problems = refusals(view, run_asks(*TESTCLUSTER, *overrides), config)
    fixes = [(fix, refusal) for refusal in problems for fix in proposed_fixes(refusal)]
    assert fixes, problems
    for fix, refusal in fixes:
        asks = run_asks(*TESTCLUSTER, *overrides, fix)
        assert cpus_held_at_once(asks) <= 8, f"{fix} was proposed for {overrides}:\n{refusal}"  # one job a core
        assert refusals(view, asks, config) == [], f"{fix} was proposed for {overrides}:\n{refusal}"


def test_the_gateway_and_the_collector_are_counted_together_beside_the_replicas():
    """Observed: `server.replicas=2` passed, then the collector waited forever behind 2 x 2 + 1 (gateway)."""
    view = ClusterView.parse(TESTCLUSTER_PARTITIONS, TESTCLUSTER_NODES)
    (refusal,) = refusals(view, run_asks(*TESTCLUSTER, "server.replicas=2"), ConfigSpy())
    assert refusal.startswith(
        "the run's own jobs can never run at the same time: the policy gateway and the rollouts job start once "
        "2 policy server replicas are ready and must run beside them, while the servers wait for them.\n"
        "  CPUs: 2 x 2 (cluster.cpus_per_task) + 1 (gateway.cpus_per_task) + 4 (job.cpus_per_task) = 9, but vm, "
        "the only node of partition gpu, has 8 CPUs\n"), refusal
    # A partition whose cores are shared (OverSubscribe=FORCE) shares them with its own jobs only: moving
    # the gateway there frees nothing for the gpu partition's jobs, so it is not proposed.
    assert refusal.endswith("change one of: cluster.cpus_per_task <= 1; job.cpus_per_task <= 3; server.replicas <= 1")
    assert refusals(view, run_asks(*TESTCLUSTER, "server.replicas=1"), ConfigSpy()) == []


def test_a_key_shared_by_several_jobs_is_tried_on_all_of_them():
    """`cluster.mem_gb` sets the servers' memory and the collector's when `job.mem_gb` is unset: the bound
    proposed must hold for both at once."""
    consumable = ConfigSpy("SelectTypeParameters = CR_Core_Memory\n")
    view = ClusterView.parse(TESTCLUSTER_PARTITIONS, TESTCLUSTER_NODES)
    overrides = [*TESTCLUSTER, "server.replicas=2", "cluster.mem_gb=8", "job.mem_gb=null", "job.cpus_per_task=1"]
    (refusal,) = refusals(view, run_asks(*overrides), consumable)
    for fix in proposed_fixes(refusal):
        asks = run_asks(*overrides, fix)
        assert sum(a.count * a.mem_mb for a in asks) <= 24105, fix  # Slurm allocates memory here
        assert refusals(view, asks, consumable) == [], f"{fix}:\n{refusal}"
    assert "memory: 2 x 8 GB (cluster.mem_gb) + 1 GB (gateway.mem_gb) + 8 GB (cluster.mem_gb, as job.mem_gb is " \
           "unset) = 25 GB" in refusal, refusal


def test_a_fix_on_a_site_moves_a_job_to_another_partition_only_where_the_whole_run_fits():
    """Two 4-GPU nodes of 32 CPUs, one replica on each (16 CPUs): the collector (20) and the gateway (8)
    each need a node's other half. Moving the collector to the CPU node fits; moving the gateway does not."""
    gateway = job(cpus=8, partition="batch")
    gateway = replace(gateway, what="policy gateway",
                      lever={**gateway.lever, "partition": "gateway.partition", "cpus": "gateway.cpus_per_task"},
                      source={**gateway.source, "partition": "gateway.partition", "cpus": "gateway.cpus_per_task"})
    asks = [servers(count=2, cpus=16, gpus=4, partition="batch"), gateway, job(cpus=20, partition="batch")]
    (refusal,) = refusals(site_view(), asks, ConfigSpy())
    assert "CPUs: 2 x 16 (cluster.cpus_per_task) + 8 (gateway.cpus_per_task) + 20 (job.cpus_per_task) = 60, but " \
           "the 2 nodes of partition batch have 32 CPUs each" in refusal, refusal
    assert "GPUs: 2 x 4 (server.gpus_per_replica) = 8, but the 2 nodes of partition batch have 4 GPUs each" \
        in refusal, refusal  # 2 GPUs each: both replicas fit on one node, the others on the other
    assert refusal.endswith("change one of: cluster.cpus_per_task <= 12; job.cpus_per_task <= 16; "
                            "server.gpus_per_replica <= 2; server.replicas <= 1; job.partition=cpu"), refusal


def test_replicas_spanning_nodes_count_each_node_in_the_sum():
    view = ClusterView.parse(
        "PartitionName=multi Default=YES MaxTime=UNLIMITED Nodes=n[1-2] OverSubscribe=NO State=UP\n",
        "NodeName=n1 CPUEfctv=4 Gres=gpu:2 RealMemory=8000 State=IDLE Partitions=multi\n"
        "NodeName=n2 CPUEfctv=4 Gres=gpu:2 RealMemory=8000 State=IDLE Partitions=multi\n")
    two_node = replace(servers(count=2, cpus=2, mem_gb=2, gpus=0, partition="multi"), nodes=2)
    gateway = replace(job(cpus=1, partition="multi"), what="policy gateway")
    assert refusals(view, [replace(two_node, count=1), gateway], ConfigSpy()) == []
    (refusal,) = refusals(view, [two_node, gateway], ConfigSpy())
    assert "CPUs: 2 x 2 nodes x 2 (cluster.cpus_per_task) + 1 (job.cpus_per_task) = 9, but the 2 nodes of " \
           "partition multi have 4 CPUs each" in refusal, refusal
    assert refusal.endswith("change one of: cluster.cpus_per_task <= 1; server.replicas <= 1"), refusal


# ---------------------------------------------------------------- reason None


def test_reason_none_is_the_schedulers_first_look_not_other_jobs():
    """Observed: a job Slurm had not evaluated yet (reason None) was explained as held back by other
    jobs, with no other job on the cluster."""
    queue = parse_queue("61|PENDING||1|1G|N/A|gpu|normal|root|None\n")
    verdict = judge(queue["61"], queue, {"61": servers()}, small_view(), ConfigSpy())
    assert not verdict.never
    assert verdict.short() == "None: waiting for the scheduler's first look"
    # Without the cluster's nodes at hand (scontrol failed) it is still explained.
    assert judge(queue["61"], queue, {"61": servers()}, None, ConfigSpy()).short() == verdict.short()
    # Once Slurm looked, its reason decides: held by someone else's job, it starts when that ends.
    queue = parse_queue("61|PENDING||1|1G|N/A|gpu|normal|root|Resources\n")
    assert judge(queue["61"], queue, {"61": servers()}, small_view(), ConfigSpy()).advice == \
        "other jobs hold what it needs; it starts when they end"


# ---------------------------------------------------------------- job names


def test_job_names_say_run_service_and_role_with_the_run_ids_tail_within_slurms_limit():
    from launcher.orchestrate import cluster_asks
    from tests.test_spec import spec_for

    spec = spec_for("cluster=slurm_testcluster")
    assert [r.name for r in cluster_asks(spec, "rollouts-20261208-041157-dc9c")] == [
        "rollouts-policy-dc9c", "rollouts-policy-gateway-dc9c", "rollouts-policy-job-dc9c"]
    long = spec_for("cluster=slurm_testcluster", f"run.name={'r' * 300}")
    names = [r.name for r in cluster_asks(long, f"{'r' * 300}-20261208-041157-dc9c")]
    assert all(len(n) <= 128 and n.endswith("-dc9c") for n in names), names
    assert len(set(names)) == 3


# ---------------------------------------------------------------- rollover successors


def test_a_run_without_room_for_a_rollover_successor_is_told_not_refused():
    """What the fleet keeps at once near a time limit: the run plus a successor per replica (they wait
    when there is no room, launcher/fleet.py): not a refusal, but the user learns what a rollover costs."""
    from launcher.slurm_fit import successor_room

    view = ClusterView.parse(TESTCLUSTER_PARTITIONS, TESTCLUSTER_NODES)
    asks = run_asks(*TESTCLUSTER)  # 2 + 1 + 4 CPUs of 8: the run fits, a successor's 2 do not
    assert refusals(view, asks, ConfigSpy()) == []
    assert successor_room(view, asks, ConfigSpy()) == (
        "no room beside the run for a policy server replica's rollover successor: near the time limit "
        "(cluster.timeout_min) a successor waits for the job it succeeds to end, so the replica is down while "
        "its successor starts; smaller requests leave room for one more replica")
    assert successor_room(view, run_asks(*TESTCLUSTER, "job.cpus_per_task=3"), ConfigSpy()) is None
