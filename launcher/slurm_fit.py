"""What a Slurm cluster can ever run, and why a job of the run waits: ``SlurmBackend``'s arithmetic.

Everything here works on text Slurm's clients print (``scontrol show partition -o``,
``scontrol show node -o``, ``scontrol show config``, ``squeue``), so it is tested on captured
output; ``launcher.executors.SlurmBackend`` runs the commands and owns this module.

Two questions:

- before submission (``refusals``): can each job of the run ever start on the nodes of its
  partition (CPUs, memory, GPUs, time limit, partition), and can the run's own jobs hold their
  resources at the same time? The servers run until the job that uses them ends, and that job
  starts only once they are ready: if it cannot fit beside them, the run would wait forever.
- after submission (``judge``): a pending job's reason, what to do about it, and whether it can
  never resolve by itself (e.g. the resources it waits for are held by the run's own jobs).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/]*)=")
_UNLIMITED = {"UNLIMITED", "INFINITE", "NONE", "N/A", "(null)", ""}


# ---------------------------------------------------------------- parsing


def fields(line: str) -> dict[str, str]:
    """``Key=value`` pairs of one ``scontrol ... -o`` line; a value may hold spaces (``OS=Linux 6.1 #1``)."""
    found = list(_KEY.finditer(line))
    out = {}
    for m, following in zip(found, found[1:] + [None]):
        out[m.group(1)] = line[m.end(): following.start() if following else len(line)].strip()
    return out


def minutes(text: str) -> float | None:
    """A Slurm time (``UNLIMITED``, ``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM``) in minutes; None: no limit."""
    text = text.strip()
    if text.upper() in _UNLIMITED:
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = 0, parts[0], 0
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def megabytes(text: str) -> int | None:
    """``24105`` (MB), ``20G``, ``4000M``, ``2T`` -> MB; None for no value or no limit."""
    text = text.strip().upper()
    if text in _UNLIMITED or text == "0":
        return None
    unit = text[-1] if text[-1] in "KMGTP" else "M"
    number = float(text[:-1] if text[-1] in "KMGTP" else text)
    return int(number * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}[unit])


def gpu_count(gres: str) -> int:
    """GPUs in a gres or TRES string: ``gpu:4``, ``gpu:a100:4(S:0-1),gpu:v100:2``, ``gres:gpu:1``,
    ``gres/gpu=2``, ``gres/gpu:1``; 0 for ``(null)``/``N/A``."""
    total = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item.strip())
        item = re.sub(r"^gres[:/]", "", item)
        if not item.startswith("gpu"):
            continue
        parts = re.split(r"[:=]", item)
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int  # what jobs may use (CPUEfctv: without specialised cores)
    mem_mb: int  # RealMemory minus MemSpecLimit
    gpus: int
    partitions: tuple[str, ...]
    state: str
    real_mb: int = 0
    spec_mb: int = 0

    @property
    def unavailable(self) -> bool:
        """Down, drained or failing: no new job starts here until someone acts."""
        return any(s in self.state.upper() for s in ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "MAINT", "REBOOT"))

    @classmethod
    def parse(cls, line: str) -> "Node":
        f = fields(line)
        real = _int(f.get("RealMemory")) or 0
        spec = _int(f.get("MemSpecLimit")) or 0
        cpus = _int(f.get("CPUEfctv")) or _int(f.get("CPUTot")) or 0
        partitions = tuple(p for p in f.get("Partitions", "").split(",") if p)
        return cls(f.get("NodeName", "?"), cpus, real - spec, gpu_count(f.get("Gres", "")), partitions,
                   f.get("State", "?"), real, spec)


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool = False
    state: str = "UP"
    max_time: str = "UNLIMITED"  # as printed
    max_cpus_per_node: int | None = None
    max_mem_per_node_mb: int | None = None
    def_mem_per_node_mb: int | None = None
    def_mem_per_cpu_mb: int | None = None
    min_nodes: int = 0
    oversubscribe: str = "NO"
    select: str = "NONE"  # SelectTypeParameters; NONE: the cluster's
    allow_accounts: str = "ALL"
    deny_accounts: str = ""
    allow_qos: str = "ALL"
    deny_qos: str = ""

    @property
    def max_time_min(self) -> float | None:
        return minutes(self.max_time)

    @property
    def shares_cpus(self) -> bool:
        """OverSubscribe=FORCE: jobs share CPUs, so they never wait for each other's CPUs."""
        return self.oversubscribe.upper().startswith("FORCE")

    @property
    def whole_nodes(self) -> bool:
        return self.oversubscribe.upper().startswith("EXCLUSIVE")

    @classmethod
    def parse(cls, line: str) -> "Partition":
        f = fields(line)
        return cls(
            name=f.get("PartitionName", "?"), default=f.get("Default") == "YES", state=f.get("State", "UP"),
            max_time=f.get("MaxTime", "UNLIMITED"), max_cpus_per_node=_int(f.get("MaxCPUsPerNode")),
            max_mem_per_node_mb=megabytes(f.get("MaxMemPerNode", "")),
            def_mem_per_node_mb=megabytes(f.get("DefMemPerNode", "")),
            def_mem_per_cpu_mb=megabytes(f.get("DefMemPerCPU", "")), min_nodes=_int(f.get("MinNodes")) or 0,
            oversubscribe=f.get("OverSubscribe", "NO"), select=f.get("SelectTypeParameters", "NONE"),
            allow_accounts=f.get("AllowAccounts", "ALL"), deny_accounts=f.get("DenyAccounts", ""),
            allow_qos=f.get("AllowQos", "ALL"), deny_qos=f.get("DenyQos", ""),
        )


@dataclass
class ClusterConfig:
    """The few lines of ``scontrol show config`` that matter here (read only when they decide something)."""

    select: str = ""  # SelectTypeParameters
    def_mem_per_cpu_mb: int | None = None
    def_mem_per_node_mb: int | None = None
    enforce: str = ""  # AccountingStorageEnforce

    @classmethod
    def parse(cls, text: str) -> "ClusterConfig":
        kv = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                kv[key.strip()] = value.strip()
        return cls(select=kv.get("SelectTypeParameters", ""), def_mem_per_cpu_mb=megabytes(kv.get("DefMemPerCPU", "")),
                   def_mem_per_node_mb=megabytes(kv.get("DefMemPerNode", "")),
                   enforce=kv.get("AccountingStorageEnforce", ""))


@dataclass
class ClusterView:
    partitions: dict[str, Partition]
    nodes: list[Node]

    @classmethod
    def parse(cls, partition_text: str, node_text: str) -> "ClusterView":
        parts = [Partition.parse(line) for line in partition_text.splitlines() if "PartitionName=" in line]
        nodes = [Node.parse(line) for line in node_text.splitlines() if "NodeName=" in line]
        return cls({p.name: p for p in parts}, nodes)

    @property
    def default(self) -> str | None:
        return next((p.name for p in self.partitions.values() if p.default), None)

    def nodes_of(self, partition: str) -> list[Node]:
        return [n for n in self.nodes if partition in n.partitions]

    def names(self) -> str:
        """``gpu (default), cpu``"""
        return ", ".join(p.name + (" (default)" if p.default else "") for p in self.partitions.values()) or "none"


# ---------------------------------------------------------------- what the run asks


@dataclass
class Ask:
    """One kind of job the run submits, as sbatch will get it, with the config keys behind each value.

    ``source[field]`` is the key whose value is in effect, ``lever[field]`` the key to change for
    this job alone (they differ for a job-side value left unset that falls back to ``cluster.*``)."""

    what: str  # "policy server replica", "rollouts job"
    count: int
    partition: str | None  # None: the cluster's default partition
    cpus: int
    mem_mb: int | None  # None: Slurm's default
    gpus: int
    time_min: int
    exclusive: bool = False
    nodes: int = 1  # per job, each with cpus, mem and gpus (a replica spanning nodes)
    source: dict[str, str] = field(default_factory=dict)  # partition, cpus, mem, gpus, time, count, nodes
    lever: dict[str, str] = field(default_factory=dict)

    def key(self, what: str) -> str:
        return self.source.get(what, "?")

    def lever_key(self, what: str) -> str:
        return self.lever.get(what) or self.key(what)

    def said(self, what: str) -> str:
        """``job.cpus_per_task`` or ``cluster.cpus_per_task, as job.cpus_per_task is unset``."""
        key, lever = self.key(what), self.lever_key(what)
        return key if key == lever else f"{key}, as {lever} is unset"

    @property
    def per(self) -> str:
        return "per replica" if "count" in self.lever else "per job"

    def plural(self) -> str:
        """``the rollouts job``, ``1 policy server replica``, ``2 policy server replicas``."""
        if "count" not in self.lever:
            return f"the {self.what}"
        return f"{self.count} {self.what}" + ("s" if self.count != 1 else "")


def gb(mb: float) -> str:
    return f"{mb / 1024:.1f}".rstrip("0").rstrip(".") + " GB"


def _gb_floor(mb: float) -> str:
    """The largest round value of a ``*_gb`` key that is <= ``mb``."""
    value = mb / 1024
    return str(int(value)) if value >= 1 else f"{math.floor(value * 10) / 10:g}"


def _n(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


# ---------------------------------------------------------------- before submission


def refusals(view: ClusterView, asks: Sequence[Ask], config: Callable[[], ClusterConfig],
             account: str | None = None, qos: str | None = None,
             associations: Callable[[], list[tuple[str, str, str]]] | None = None) -> list[str]:
    """What can never run, one message per problem, each naming the key to change. ``asks[0]`` are
    the servers; every other ask must run beside them. ``config`` (``scontrol show config``) and
    ``associations`` (sacctmgr: account, partition, qos lists) are called only when they decide.

    What must fit at once is everything the run keeps until it ends: every replica (``count`` jobs
    of ``nodes`` nodes), the gateway and the job that uses them, all together. (Checked beside the
    servers one at a time, a collector that fit beside the replicas, and a gateway that did too,
    passed; the run then waited on a collector with no room beside both.) Not required: rollover
    successors and replacements. The fleet (launcher/fleet.py) submits a successor per replica
    once its time left is below the lead, so an array's replicas get theirs together: up to twice
    the replicas, and two gateways, at once. But a successor with no room only waits, PENDING and
    never judged "never starts", until the job it succeeds ends at its time limit and frees that
    room; the run goes on with that replica down while the successor starts. A replacement
    follows a death, which freed the room. Asking room for them would refuse runs that finish."""
    problems = []
    for ask in asks:
        problems += _alone(view, ask)
    problems += _access(view, asks, account, qos, config, associations)
    if problems:
        return problems
    why = together(view, asks[0], asks[1:], config)
    return [why] if why else []


def successor_room(view: ClusterView, asks: Sequence[Ask], config: Callable[[], ClusterConfig]) -> str | None:
    """None when one more replica job (a rollover successor) fits beside the whole run; else what
    that means for rollovers (not a refusal: see ``refusals``)."""
    servers = asks[0]
    if _fit(view, replace(servers, count=servers.count + 1), asks[1:], functools.cache(config))[0]:
        return None
    down = ("the replica is down while its successor starts" if servers.count == 1 else
            "the replicas, started together, are down together while their successors start")
    fewer = f"fewer {servers.lever_key('count')} or " if servers.count > 1 else ""
    return (f"no room beside the run for a {servers.what}'s rollover successor: near the time limit "
            f"({servers.key('time')}) a successor waits for the job it succeeds to end, so {down}; "
            f"{fewer}smaller requests leave room for one more replica")


def _partition(view: ClusterView, ask: Ask) -> tuple[Partition | None, str | None]:
    name = ask.partition or view.default
    if name is None:
        return None, (f"{ask.said('partition')}: not set, and this cluster has no default partition: "
                      f"set {ask.lever_key('partition')} to one of {view.names()}")
    if name not in view.partitions:
        return None, (f"{ask.said('partition')}: partition {name!r} does not exist; this cluster has "
                      f"{view.names()}: set {ask.lever_key('partition')} to one of them")
    return view.partitions[name], None


def _largest(view: ClusterView, partition: Partition, value: Callable[[Node], float]) -> tuple[Node, str]:
    nodes = view.nodes_of(partition.name)
    best = max(nodes, key=value)
    if len(nodes) == 1:
        return best, f"the only node of partition {partition.name} ({best.name})"
    return best, f"the largest node of partition {partition.name} ({best.name})"


def _alone(view: ClusterView, ask: Ask) -> list[str]:
    """Whether one job of ``ask`` could ever start on an empty node of its partition."""
    p, problem = _partition(view, ask)
    if p is None:
        return [problem]
    nodes = view.nodes_of(p.name)
    if not nodes:
        return [f"{ask.said('partition')}: partition {p.name} has no nodes: set {ask.lever_key('partition')} "
                f"to another of {view.names()}"]
    out = []
    limit = p.max_time_min
    if limit is not None and ask.time_min > limit:
        out.append(f"{ask.said('time')}: {ask.time_min} min per job, but partition {p.name} allows at most "
                   f"{limit:g} min (MaxTime {p.max_time}): set {ask.lever_key('time')} <= {math.floor(limit)}")
    cpu_cap = lambda n: min(n.cpus, p.max_cpus_per_node or n.cpus)  # noqa: E731
    if ask.cpus > max(cpu_cap(n) for n in nodes):
        best, where = _largest(view, p, cpu_cap)
        extra = f" (MaxCPUsPerNode {p.max_cpus_per_node} on the partition)" if cpu_cap(best) < best.cpus else ""
        out.append(f"{ask.said('cpus')}: {ask.cpus} CPUs per task, but {where} has {cpu_cap(best)}{extra}: "
                   f"set {ask.lever_key('cpus')} <= {cpu_cap(best)}")
    if ask.mem_mb:
        best, where = _largest(view, p, lambda n: n.mem_mb)
        cap = best.mem_mb
        detail = f"RealMemory {best.real_mb} MB" + (f", MemSpecLimit {best.spec_mb} MB kept for the system"
                                                     if best.spec_mb else "")
        if p.max_mem_per_node_mb is not None and p.max_mem_per_node_mb < cap:
            cap, where, detail = p.max_mem_per_node_mb, f"partition {p.name}", f"MaxMemPerNode {p.max_mem_per_node_mb} MB"
            where += " allows at most"
        else:
            where += " has"
        if ask.mem_mb > cap:
            out.append(f"{ask.said('mem')}: {gb(ask.mem_mb)} per job, but {where} {gb(cap)} ({detail}): "
                       f"set {ask.lever_key('mem')} <= {_gb_floor(cap)}")
    if ask.gpus:
        most = max(n.gpus for n in nodes)
        if most == 0:
            with_gpus = [q.name for q in view.partitions.values() if any(n.gpus >= ask.gpus for n in view.nodes_of(q.name))]
            where = f"set {ask.lever_key('partition')} to a partition with GPUs ({', '.join(with_gpus)}) or " if with_gpus else ""
            out.append(f"{ask.said('gpus')}: {_n(ask.gpus, 'GPU')} {ask.per}, but no node of partition {p.name} has "
                       f"a GPU (no gpu gres): {where}set {ask.lever_key('gpus')}=0")
        elif ask.gpus > most:
            best, where = _largest(view, p, lambda n: n.gpus)
            per_node = "per node" if ask.nodes > 1 else "a replica runs on one node"
            out.append(f"{ask.said('gpus')}: {_n(ask.gpus, 'GPU')} {ask.per}, but {where} has {most} (gres gpu:{most}); "
                       f"{per_node}: set {ask.lever_key('gpus')} <= {most}")
    if p.min_nodes > ask.nodes:
        out.append(f"{ask.said('partition')}: partition {p.name} takes only jobs of at least {p.min_nodes} nodes "
                   f"(MinNodes), and each job of the run has {ask.nodes}: set {ask.lever_key('partition')} to "
                   f"another of {view.names()}")
    fitting = [n for n in nodes if _fits(_need(ask, n, p, None, count_mem=False), _capacity(n, p))
               and (not ask.mem_mb or ask.mem_mb <= n.mem_mb)]
    if not out and not fitting:
        out.append(f"{ask.what}: no single node of partition {p.name} has {ask.cpus} CPUs, "
                   f"{gb(ask.mem_mb) if ask.mem_mb else 'its memory'} and {_n(ask.gpus, 'GPU')} together "
                   f"({_node_list(nodes)}): lower {ask.lever_key('cpus')}, {ask.lever_key('mem')} or "
                   f"{ask.lever_key('gpus')}, or set {ask.lever_key('partition')}")
    elif not out and len(fitting) < ask.nodes:
        out.append(f"{ask.said('nodes')}: {ask.nodes} nodes per job, but partition {p.name} has "
                   f"{len(fitting)} that fit one task ({_node_list(fitting or nodes)}): set "
                   f"{ask.lever_key('nodes')} <= {len(fitting)}, or set {ask.lever_key('partition')}")
    return out


def _names(text: str) -> set[str]:
    return {x.strip().lower() for x in text.split(",") if x.strip()}


def _access(view: ClusterView, asks: Sequence[Ask], account: str | None, qos: str | None,
            config: Callable[[], ClusterConfig], associations) -> list[str]:
    """Account and QOS against the partitions' Allow/Deny lists and, when Slurm enforces them, the
    user's associations (sacctmgr)."""
    out = []
    for ask in asks:
        p = view.partitions.get(ask.partition or view.default or "")
        if p is None:
            continue
        for key, value, allow, deny in (("cluster.account", account, p.allow_accounts, p.deny_accounts),
                                        ("cluster.qos", qos, p.allow_qos, p.deny_qos)):
            if not value:
                continue
            allowed = _names(allow)
            if ("all" not in allowed and value.lower() not in allowed) or value.lower() in _names(deny):
                out.append(f"{key}: {value!r} may not use partition {p.name} (Allow: {allow or 'ALL'}; "
                           f"Deny: {deny or 'none'}): set {key} to one it allows, or {ask.lever_key('partition')}")
    if out or associations is None or not (account or qos):
        return out
    assocs = associations()
    if not assocs:  # nothing visible (or no accounting): sbatch decides
        return out
    accounts = sorted({a for a, _, _ in assocs})
    unknown_account = bool(account) and account.lower() not in {a.lower() for a in accounts}
    allowed_qos = {q.lower() for a, _, qs in assocs if not account or a.lower() == account.lower()
                   for q in qs.split(",") if q}
    unknown_qos = bool(qos) and bool(allowed_qos) and qos.lower() not in allowed_qos
    if not (unknown_account or unknown_qos):
        return out
    enforce = config().enforce.lower()  # read only now: Slurm may not care (AccountingStorageEnforce=none)
    if unknown_account and "associations" in enforce:
        out.append(f"cluster.account: {account!r} is not one of your accounts on this cluster "
                   f"(sacctmgr lists {', '.join(accounts)}): set cluster.account to one of them")
    if unknown_qos and ("qos" in enforce or "associations" in enforce):
        out.append(f"cluster.qos: {qos!r} is not a QOS your association"
                   f"{' with account ' + account if account else ''} may use (sacctmgr lists "
                   f"{', '.join(sorted(allowed_qos))}): set cluster.qos to one of them")
    return out


# --- the run's jobs side by side

_RESOURCES = ("cpus", "mem", "gpus")
_UNITS = {"cpus": "CPUs", "mem": "memory", "gpus": "GPUs"}


_NO_LIMITS = Partition("")  # a node's whole room, whichever partitions its jobs came through


def _capacity(n: Node, p: Partition) -> dict[str, float]:
    return {"cpus": min(n.cpus, p.max_cpus_per_node or n.cpus), "mem": n.mem_mb, "gpus": n.gpus}


def _mem_consumable(p: Partition, config: ClusterConfig | None) -> bool | None:
    select = p.select if p.select.upper() not in ("NONE", "") else (config.select if config else None)
    return None if select is None else "MEMORY" in select.upper()


def _need(ask: Ask, n: Node, p: Partition, config: ClusterConfig | None, count_mem: bool) -> dict[str, float]:
    """What one job of ``ask`` holds on node ``n`` while it runs. Memory counts only where Slurm
    allocates it (SelectTypeParameters with MEMORY); unknown (``config`` None) counts it, and an
    unset ``--mem`` then as the whole node (what Slurm gives when no default is set)."""
    if ask.exclusive or p.whole_nodes:
        return {"cpus": n.cpus, "mem": n.mem_mb, "gpus": n.gpus, "whole": 1}
    mem = 0.0
    if count_mem and _mem_consumable(p, config) is not False:
        mem = ask.mem_mb or _default_mem(ask, n, p, config)
    return {"cpus": 0 if p.shares_cpus else ask.cpus, "mem": mem, "gpus": ask.gpus}


def _default_mem(ask: Ask, n: Node, p: Partition, config: ClusterConfig | None) -> float:
    for per_cpu, per_node in ((p.def_mem_per_cpu_mb, p.def_mem_per_node_mb),
                              (config.def_mem_per_cpu_mb, config.def_mem_per_node_mb) if config else (None, None)):
        if per_cpu:
            return per_cpu * ask.cpus
        if per_node:
            return per_node
    return n.mem_mb


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(need.get(r, 0) <= free[r] + 1e-9 for r in _RESOURCES)


def _how_many(need: dict[str, float], free: dict[str, float], full: dict[str, float], limit: int) -> int:
    if need.get("whole"):
        return 1 if free == full else 0
    counts = [math.floor(free[r] / need[r] + 1e-9) for r in _RESOURCES if need.get(r)]
    return max(0, min(counts + [limit]))


def _feasible(view: ClusterView, servers: Ask, others: Sequence[Ask], config: ClusterConfig | None,
              count_mem: bool, ignore: Sequence[str] = ()) -> bool:
    """Is there a placement of ``servers.count`` servers and every job of ``others``, all at once
    (the resources in ``ignore`` not counted)?"""
    ps = view.partitions[servers.partition or view.default]
    s_nodes = {n.name: n for n in view.nodes_of(ps.name)}

    def needs(ask, n, p):
        if p.shares_cpus and p.name != ps.name:
            # OverSubscribe=FORCE shares cores among that partition's jobs only: the cores such a
            # job holds are held against the servers' partition (tests/slurm/start.sh's `shared`).
            p = replace(p, oversubscribe="NO")
        return {**_need(ask, n, p, config, count_mem), **{r: 0 for r in ignore}}

    full = {name: _capacity(n, ps) for name, n in s_nodes.items()}
    # A job of ``nodes`` nodes is that many tasks on distinct nodes: count the tasks (an estimate that
    # holds when the replicas' nodes are alike, as GPU partitions' are).
    wanted = servers.count * servers.nodes
    k = {name: _how_many(needs(servers, n, ps), full[name], full[name], wanted) for name, n in s_nodes.items()}
    choices = []
    for other in others:
        po = view.partitions[other.partition or view.default]
        fit = [(n, needs(other, n, po)) for n in view.nodes_of(po.name)]
        fit = [(n, need) for n, need in fit if _fits(need, _capacity(n, po))]
        if not fit:
            return False
        choices.append(_representatives(fit, len(others), k))
    for placement in itertools.product(*choices):
        load: dict[str, dict[str, float]] = {}
        for n, need in placement:
            here = load.setdefault(n.name, {"cpus": 0, "mem": 0, "gpus": 0, "jobs": 0, "whole": 0})
            for r in _RESOURCES:
                here[r] += need.get(r, 0)
            here["jobs"] += 1
            here["whole"] += need.get("whole", 0)
        nodes = {n.name: n for n, _ in placement}
        if any((here["whole"] and here["jobs"] > 1) or not _fits(here, _capacity(nodes[name], _NO_LIMITS))
               for name, here in load.items()):
            continue
        total, hosts = sum(k.values()), sum(1 for v in k.values() if v)
        for name, here in load.items():
            if name not in k:
                continue
            free = {r: full[name][r] - here[r] for r in _RESOURCES}
            room = 0 if here["whole"] else _how_many(needs(servers, s_nodes[name], ps), free, full[name], wanted)
            total += room - k[name]
            hosts += bool(room) - bool(k[name])
        if total >= wanted and hosts >= servers.nodes:
            return True
    return False


def _representatives(fit: list[tuple[Node, dict]], count: int, k: dict[str, int]) -> list[tuple[Node, dict]]:
    """Where one job may go, ``count`` nodes of each kind at most: nodes alike (the same room left
    for the servers, the same need) are interchangeable, and ``count`` jobs can use at most that
    many of them; this keeps the search small on a cluster of thousands of nodes."""
    kept: dict[tuple, list] = {}
    for n, need in fit:
        alike = kept.setdefault((n.cpus, n.mem_mb, n.gpus, k.get(n.name), tuple(sorted(need.items()))), [])
        if len(alike) < count:
            alike.append((n, need))
    return [pair for alike in kept.values() for pair in alike]


def _node_list(nodes: Sequence[Node], limit: int = 4) -> str:
    shown = ", ".join(f"{n.name}: {n.cpus} CPUs, {gb(n.mem_mb)}, {_n(n.gpus, 'GPU')}" for n in nodes[:limit])
    return shown + (f", and {len(nodes) - limit} more" if len(nodes) > limit else "")


def _fit(view: ClusterView, servers: Ask, others: Sequence[Ask],
         config: Callable[[], ClusterConfig]) -> tuple[bool, bool, ClusterConfig | None]:
    """Whether the servers and ``others`` can all hold their resources at once, whether memory
    counted, and the config if it was read: only when memory decides (explicit requests that fit
    even if every job's memory counts, or jobs that do not fit even without memory, need none)."""
    if not _feasible(view, servers, others, None, count_mem=False):
        return False, False, None
    if _feasible(view, servers, others, None, count_mem=True):
        return True, True, None
    conf = config()
    return _feasible(view, servers, others, conf, count_mem=True), True, conf


def together(view: ClusterView, servers: Ask, others: Sequence[Ask],
             config: Callable[[], ClusterConfig]) -> str | None:
    """None if the servers and every job of ``others`` can all hold their resources at once; else
    why not and what to change. Each change proposed makes the whole run fit (it is checked so)."""
    config = functools.cache(config)  # read at most once however many changes are tried
    fits, count_mem, conf = _fit(view, servers, others, config)
    if fits:
        return None
    return _explain(view, servers, list(others), conf, count_mem, config)


def _explain(view: ClusterView, servers: Ask, others: list[Ask], conf: ClusterConfig | None, count_mem: bool,
             config: Callable[[], ClusterConfig]) -> str:
    run = [servers, *others]
    # Only the jobs that share nodes take part in the sums (a job alone on its partition's nodes does not).
    node_sets = [{n.name for n in view.nodes_of(a.partition or view.default)} for a in run]
    shown = [a for i, a in enumerate(run) if i == 0 or any(node_sets[i] & s for j, s in enumerate(node_sets)
                                                           if j != i)]
    partitions = list(dict.fromkeys(a.partition or view.default for a in shown))
    nodes = sorted({n.name: n for p in partitions for n in view.nodes_of(p)}.values(), key=lambda n: n.name)
    kinds = [r for r in _RESOURCES if r != "mem" or count_mem]
    # What decides: a resource without which all would fit; else each that alone does not fit.
    binding = [r for r in kinds if _feasible(view, servers, others, conf, count_mem, ignore=(r,))] or \
        [r for r in kinds if not _feasible(view, servers, others, conf, count_mem,
                                             ignore=[q for q in _RESOURCES if q != r])]
    where = f"partition{'s' if len(partitions) > 1 else ''} {_and(partitions)}"
    if len(nodes) == 1:
        room = f"{nodes[0].name}, the only node of {where}, has"
    else:
        room = f"the {len(nodes)} nodes of {where} have"
    side = ""
    if others:
        one = len(others) == 1
        side = (f"{_and([o.plural() for o in others])} start{'s' if one else ''} once {servers.plural()} "
                f"{'is' if servers.count == 1 else 'are'} ready and must run beside "
                f"{'it' if servers.count == 1 else 'them'}, while the servers wait for {'it' if one else 'them'}")
    if not _feasible(view, servers, [], conf, count_mem):
        fit = _largest_ok(1, servers.count - 1, lambda v: _feasible(view, replace(servers, count=v), [], conf,
                                                                      count_mem)) or 0
        head = (f"at most {fit} of the {servers.count} {servers.what}s fit at once, and each runs until the run "
                f"ends while the run waits for all" + (f"; and {side}" if side else ""))
    else:
        head = side
    lines = [f"the run's own jobs can never run at the same time: {head}."]
    for r in binding:
        per_node = ", ".join(sorted({_have(n, r) for n in nodes}))
        counted = [o for o in shown[1:] if r != "gpus" or o.gpus]
        spans = f"{servers.nodes} nodes x " if servers.nodes > 1 else ""
        asked = " + ".join([f"{servers.count} x {spans}{_amount(servers, r)} ({servers.said(r)})"] +
                           [f"{_amount(o, r)} ({o.said(r)})" for o in counted])
        lines.append(f"  {_UNITS[r]}: {asked} = {_sum(servers, counted, r)}, but {room} {per_node}"
                     + (" each" if len(nodes) > 1 and len({_have(n, r) for n in nodes}) == 1 else ""))
    if not binding:
        lines.append(f"  no placement of them on the nodes of {where} ({_node_list(nodes)}) gives each its "
                     f"CPUs{', memory' if count_mem else ''} and GPUs at once")
    if servers.exclusive:
        lines.append("  (cluster.exclusive gives every job a whole node)")
    fixes = _fixes(view, run, config, binding)
    lines.append("  change one of: " + "; ".join(fixes) if fixes else
                 "  no single change of one key makes them fit: lower several of the requests above")
    return "\n".join(lines)


def _amount(ask: Ask, r: str) -> str:
    if r == "mem":
        return gb(ask.mem_mb) if ask.mem_mb else "the default memory"
    return str(ask.cpus if r == "cpus" else ask.gpus)


def _sum(servers: Ask, others: Sequence[Ask], r: str) -> str:
    if r == "mem":
        if servers.mem_mb and all(o.mem_mb for o in others):
            return gb(servers.count * servers.nodes * servers.mem_mb + sum(o.mem_mb for o in others))
        return "more than a node has"
    return str(servers.count * servers.nodes * _value(servers, r) + sum(_value(o, r) for o in others))


def _value(ask: Ask, r: str) -> int:
    """A request as its ``*_gb``/count key states it (memory in whole GB)."""
    return {"cpus": ask.cpus, "gpus": ask.gpus, "mem": (ask.mem_mb or 0) // 1024}[r]


def _set(ask: Ask, r: str, value: int) -> Ask:
    return replace(ask, **({"mem_mb": value * 1024} if r == "mem" else {r: value}))


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _have_short(value: float, r: str) -> str:
    return gb(value) if r == "mem" else f"{int(value)} {'CPUs' if r == 'cpus' else 'GPUs'}"


def _have(n: Node, r: str) -> str:
    return {"cpus": f"{n.cpus} CPUs", "mem": gb(n.mem_mb), "gpus": _n(n.gpus, "GPU")}[r]


def _fixes(view: ClusterView, run: list[Ask], config: Callable[[], ClusterConfig], binding: list[str]) -> list[str]:
    """Single-key changes that make the whole run fit, each with the bound that works. A key sets
    every job whose value comes from it (``cluster.cpus_per_task`` also sets a job whose own
    ``job.cpus_per_task`` is unset): the change is tried on all of them, as the run would get it."""
    def ok(changed: list[Ask]) -> bool:
        return _fit(view, changed[0], changed[1:], config)[0] and not any(_alone(view, a) for a in changed)

    servers = run[0]
    fixes = []
    for r in binding:
        for key in dict.fromkeys(a.lever_key(r) for a in run):
            # A job that asks no GPU gets none whatever server.gpus_per_replica says.
            moved = [i for i, a in enumerate(run) if key in (a.key(r), a.lever_key(r)) and (r != "gpus" or a.gpus)]
            current = max((_value(run[i], r) for i in moved), default=0)
            if current <= 1:
                continue
            best = _largest_ok(1, current - 1, lambda v: ok([_set(a, r, v) if i in moved else a
                                                             for i, a in enumerate(run)]))
            if best is not None:
                fixes.append(f"{key} <= {best}")
    if servers.count > 1:
        best = _largest_ok(1, servers.count - 1, lambda v: ok([replace(servers, count=v), *run[1:]]))
        if best is not None:
            fixes.append(f"{servers.lever_key('count')} <= {best}")
    if any(a.exclusive for a in run) and ok([replace(a, exclusive=False) for a in run]):
        fixes.append("cluster.exclusive=false")
    for i, other in enumerate(run[1:], start=1):
        elsewhere = [q for q in view.partitions if q != (other.partition or view.default) and view.nodes_of(q)
                     and ok([replace(a, partition=q) if j == i else a for j, a in enumerate(run)])]
        if elsewhere:
            fixes.append(f"{other.lever_key('partition')}=" + " or ".join(elsewhere))
    return fixes


def _largest_ok(low: int, high: int, ok: Callable[[int], bool]) -> int | None:
    """The largest v in [low, high] with ok(v), assuming ok is monotone (smaller requests fit better)."""
    if high < low or not ok(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return low


# ---------------------------------------------------------------- after submission: the queue

QUEUE_FORMAT = "%i|%T|%N|%C|%m|%b|%P|%q|%a|%r"  # the reason last: it is free text


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue -r -o QUEUE_FORMAT``: a job or array task."""

    job_id: str
    state: str
    node: str
    cpus: int
    mem_mb: int
    gpus: int
    partition: str
    qos: str
    account: str
    reason: str

    @property
    def running(self) -> bool:
        return self.state in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")

    @classmethod
    def parse(cls, line: str) -> "QueuedJob | None":
        parts = line.split("|", 9)
        if len(parts) != 10:
            return None
        job_id, state, node, cpus, mem, tres, partition, qos, account, reason = (p.strip() for p in parts)
        return cls(job_id, state, node, _int(cpus) or 0, megabytes(mem) or 0, gpu_count(tres), partition, qos,
                   account, reason)


def parse_queue(text: str) -> dict[str, QueuedJob]:
    jobs = (QueuedJob.parse(line) for line in text.splitlines() if line.strip())
    return {j.job_id: j for j in jobs if j}


@dataclass(frozen=True)
class Verdict:
    """What a pending job waits for, what to do, and whether it can never start as things stand."""

    reason: str  # Slurm's reason code
    advice: str  # short, for the live view
    never: bool = False  # the run fails with ``explanation``
    explanation: str = ""

    def short(self) -> str:
        return f"{self.reason}: {self.advice}" if self.advice else self.reason


# Reason codes that never resolve for this request: (what it means, which keys change it).
_PERMANENT = {
    "PartitionTimeLimit": ("its time limit is above the partition's MaxTime", ("time",)),
    "PartitionNodeLimit": ("its node count is outside the partition's MinNodes/MaxNodes", ("partition",)),
    "PartitionConfig": ("it asks for more than the partition allows (CPUs, memory or GPUs per node, accounts, QOS)",
                        ("cpus", "mem", "gpus", "partition")),
    "InvalidAccount": ("its account is not valid (cluster.account)", ()),
    "InvalidQOS": ("its QOS is not valid for its account or partition (cluster.qos)", ()),
    "BadConstraints": ("no node of its partition matches its constraints (cluster.constraint, "
                       "cluster.additional_parameters)", ()),
    "QOSUsageThreshold": ("its QOS's usage threshold is exceeded", ()),
}
_RESOURCE_WAITS = ("Resources", "Priority", "ReqNodeNotAvail", "Nodes required for job are DOWN",
                   "Nodes_required", "None")
# Reason ``None``: Slurm has not evaluated the job yet (just submitted, or its scheduler has not come
# round to it): nothing holds it back yet, and nothing is known about what will.
_FIRST_LOOK = "waiting for the scheduler's first look"
_RESOURCE_KEYS = ("cpus", "mem", "gpus")


def reason_code(reason: str) -> str:
    """``ReqNodeNotAvail, UnavailableNodes:vm`` -> ``ReqNodeNotAvail``; the long form squeue prints
    for a node-availability wait -> ``ReqNodeNotAvail``."""
    if reason.startswith("Nodes required for job are DOWN"):
        return "ReqNodeNotAvail"
    return reason.split(",")[0].split("(")[0].strip()


def judge(job: QueuedJob, queue: dict[str, QueuedJob], own: dict[str, Ask | None], view: ClusterView | None,
          config: Callable[[], ClusterConfig], servers: Ask | None = None, others: Sequence[Ask] = (),
          group_running: Callable[[str, str], list[str]] | None = None) -> Verdict | None:
    """Why ``job`` (pending, one of ``own``: this run's jobs) waits, and whether it never starts.

    ``queue`` is one ``squeue -u <user>`` snapshot (this user's jobs); ``view`` the cluster's nodes;
    ``servers``/``others`` the run's asks (for the fix to suggest); ``group_running(kind, name)``
    lists the running job ids of a QOS (kind "qos") or account ("account"), asked only for a
    group limit."""
    code = reason_code(job.reason)
    ask = own.get(job.job_id)
    if code in _PERMANENT:
        meaning, levers = _PERMANENT[code]
        keys = ", ".join(dict.fromkeys(ask.lever_key(k) for k in levers)) if ask and levers else ""
        advice = f"never starts: {meaning}" + (f"; change {keys}" if keys else "")
        return Verdict(code, advice, True, f"{_label(job, ask)} is PENDING ({job.reason}) and never starts: "
                                           f"{meaning}" + (f". Change {keys}." if keys else "."))
    if code.startswith(("QOS", "Assoc")) and ("Limit" in code or "Max" in code or "Grp" in code):
        return _limit(job, code, queue, own, ask, group_running)
    if code in ("PartitionDown", "PartitionInactive"):
        return Verdict(code, "the partition is not taking jobs: ask the admins, or choose another partition "
                             f"({ask.lever_key('partition') if ask else 'cluster.partition'})")
    if code in ("JobHeldAdmin", "JobHeldUser"):
        return Verdict(code, "held: scontrol release " + job.job_id.split("_")[0])
    if not any(code.startswith(w) or job.reason.startswith(w) for w in _RESOURCE_WAITS) or view is None:
        return Verdict(code, _FIRST_LOOK) if code == "None" else None
    return _resources(job, code, queue, own, ask, view, config, servers, others)


def _label(job: QueuedJob, ask: Ask | None) -> str:
    return f"{ask.what if ask else 'job'} {job.job_id}"


def _limit(job, code, queue, own, ask, group_running) -> Verdict:
    """A QOS or association limit: never resolves when the jobs that hold it are the run's own."""
    ours = [j for j in queue.values() if j.running and j.job_id in own]
    if "PerJob" in code or code.endswith(("MinCpuNotSatisfied", "MinGRES", "MinMemory", "MinNode")) \
            or "WallDurationPerJob" in code:
        return Verdict(code, "never starts: the QOS/association allows less per job than it asks", True,
                       f"{_label(job, ask)} is PENDING ({job.reason}) and never starts: its QOS or association "
                       "limits a single job to less than it asks. Lower its request, or use another QOS "
                       "(cluster.qos) or account (cluster.account).")
    if "Grp" in code:
        kind, name = ("qos", job.qos) if code.startswith("QOS") else ("account", job.account)
        holders = group_running(kind, name) if group_running else None
    else:  # per user / per association: this user's running jobs hold it
        holders = [j.job_id for j in queue.values() if j.running]
    if holders is not None and holders and all(h in own for h in holders):
        return Verdict(code, "never starts: this run's own jobs hold the limit", True,
                       f"{_label(job, ask)} is PENDING ({job.reason}) and never starts: the limit is held by "
                       f"this run's own running jobs ({', '.join(sorted(holders))}), which run until it ends. "
                       "Ask for less (e.g. fewer server.replicas or server.gpus_per_replica), or use a QOS "
                       "(cluster.qos) or account (cluster.account) with a higher limit.")
    others = [h for h in (holders or []) if h not in own]
    held = f" by jobs {', '.join(sorted(others)[:5])}" if others else ""
    mine = f" (this run holds {len(ours)})" if ours else ""
    return Verdict(code, f"a QOS/association limit is in use{held}{mine}; it starts when they end")


def _resources(job, code, queue, own, ask, view, config, servers, others) -> Verdict | None:
    """A wait for nodes or resources: never resolves if even with only the run's own jobs running
    no node of its partition has room for it."""
    part = view.partitions.get(job.partition)
    nodes = view.nodes_of(job.partition)
    if part is None or not nodes:
        return Verdict(code, _FIRST_LOOK) if code == "None" else None
    conf_cache: list[ClusterConfig] = []

    def conf() -> ClusterConfig:
        if not conf_cache:
            conf_cache.append(config())
        return conf_cache[0]

    ours = [j for j in queue.values() if j.running and j.job_id in own and j.job_id != job.job_id]
    need = {"cpus": job.cpus, "mem": job.mem_mb, "gpus": job.gpus}
    held: dict[str, dict[str, float]] = {}
    for j in ours:
        h = held.setdefault(j.node, {"cpus": 0, "mem": 0, "gpus": 0, "jobs": []})
        h["cpus"] += j.cpus
        h["mem"] += j.mem_mb
        h["gpus"] += j.gpus
        h["jobs"].append(j.job_id)

    def room(n: Node, count_mem: bool) -> bool:
        h = held.get(n.name, {"cpus": 0, "mem": 0, "gpus": 0})
        cap = _capacity(n, part)
        free = {r: cap[r] - h[r] for r in _RESOURCES}
        if not count_mem:
            free["mem"] = math.inf
        return _fits(need, free)

    if any(room(n, count_mem=False) for n in nodes) and (
            any(room(n, count_mem=True) for n in nodes) or not _mem_consumable(part, conf())):
        down = [n.name for n in nodes if n.unavailable]
        if code == "ReqNodeNotAvail" and down:
            return Verdict(code, f"nodes {', '.join(down)} are down or drained: wait for the admins, or choose "
                                 f"another partition ({ask.lever_key('partition') if ask else 'cluster.partition'})")
        if code == "None":  # Slurm has not looked yet: no job is known to hold anything back
            return Verdict(code, _FIRST_LOOK)
        return Verdict(code, "other jobs hold what it needs; it starts when they end")
    if not ours:  # nothing of ours holds it: it does not fit an empty node (the fit check was off)
        return Verdict(code, "never starts: no node of its partition is big enough", True,
                       f"{_label(job, ask)} is PENDING ({job.reason}) and never starts: no node of partition "
                       f"{job.partition} has {job.cpus} CPUs, {gb(job.mem_mb) if job.mem_mb else 'its memory'} and "
                       f"{_n(job.gpus, 'GPU')} ({_node_list(nodes)}).")
    count_mem = bool(job.mem_mb) and _mem_consumable(part, conf()) is True
    holding = []
    for n in nodes:
        h = held.get(n.name)
        if h is None:
            continue
        cap = _capacity(n, part)
        short = [f"{gb(h[r]) if r == 'mem' else int(h[r])} of its {_have_short(cap[r], r)}" for r in _RESOURCES
                 if need[r] and (r != "mem" or count_mem) and need[r] > cap[r] - h[r]]
        jobs = h["jobs"]
        holding.append(f"on {n.name}, job{'s' if len(jobs) > 1 else ''} {', '.join(jobs)} "
                       f"hold{'' if len(jobs) > 1 else 's'} {' and '.join(short)}")
    wants = _and([f"{job.cpus} CPUs"] + ([gb(job.mem_mb)] if count_mem else []) +
                 ([_n(job.gpus, "GPU")] if job.gpus else []))
    text = (f"{_label(job, ask)} is PENDING ({job.reason}) and can never start: it needs {wants} on a node of "
            f"partition {job.partition}, and this run's own jobs hold them ({'; '.join(holding) or 'every node'}). "
            f"They run until it ends, so it would wait forever.")
    fix = ""
    if servers is not None:
        why = together(view, servers, others, conf)
        fix = "\n" + why if why else ""
    if not fix and ask is not None:
        fix = ("\nAsk for less, so that the run's jobs fit its nodes together ("
               + ", ".join(dict.fromkeys(ask.lever_key(k) for k in _RESOURCE_KEYS)) + ").")
    return Verdict(code, "never starts: this run's own jobs hold what it needs", True, text + fix)
