"""cluster/: the `ray up` configs pass Ray's own validator offline (and a broken copy does
not), the KubeRay manifests have what a RayCluster/RayJob needs, and no config opens Ray's
ports to the internet or carries a credential."""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# local.yaml (the fake_multinode rehearsal) is run for real by tests/test_multinode.py
VM_CONFIGS = sorted(p for p in CLUSTER.glob("*.yaml") if p.name != "local.yaml")
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
RAY_PORTS = {"dashboard": 8265, "client": 10001, "gcs": 6379}
OPEN = {"0.0.0.0/0", "::/0"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict) -> dict:
    """Ray's own check, offline: defaults filled in, then the JSON schema and the rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------- the `ray up` configs

def test_there_is_a_config_per_cloud():
    assert {p.name for p in VM_CONFIGS} == {"aws-gpu.yaml", "gcp-gpu.yaml"}
    assert {p.name for p in KUBERAY} >= {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_ray_validates_the_config(path):
    prepared = ray_validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


BREAKAGES = {
    "fractional resources": lambda c: c["available_node_types"]["head"].update(resources={"CPU": 0.5}),
    "unknown top-level key": lambda c: c.update(max_worker=4),
    "head type not defined": lambda c: c.update(head_node_type="no-such-type"),
    "node type without node_config": lambda c: c["available_node_types"]["head"].pop("node_config"),
    "min_workers above max_workers": lambda c: c.update(max_workers=0) or
        c["available_node_types"]["gpu-1x-spot"].update(min_workers=1),
}


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_validator_bites_on_a_broken_copy(path, breakage):
    import jsonschema

    broken = load(path)
    BREAKAGES[breakage](broken)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_validate(broken)


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_config_shape(path):
    """GPU workers from zero (1-GPU and 4-GPU shapes, spot and on demand), a capped cluster,
    an idle timeout, the Ray 2.60 GPU image, the project installed on every node."""
    c = load(path)
    assert c["docker"]["image"] == IMAGE
    assert 1 <= c["max_workers"] <= 16 and 1 <= c["idle_timeout_minutes"] <= 60
    head = c["head_node_type"]
    workers = {k: v for k, v in c["available_node_types"].items() if k != head}
    assert c["available_node_types"][head]["resources"].get("GPU", 0) == 0  # a CPU head
    shapes = set()
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= c["max_workers"], name
        gpus = t["resources"]["GPU"]
        spot = "InstanceMarketOptions" in t["node_config"] or \
            t["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"
        assert spot == name.endswith("-spot"), name
        shapes.add((gpus, spot))
        assert t["priority"] == (1 if spot else 0), f"{name}: spot preferred, on demand as fallback"
    assert {(1, True), (1, False)} <= shapes and any(g > 1 for g, _ in shapes)
    assert {(g, s) for g, s in shapes if g > 1} == {(max(g for g, _ in shapes), True),
                                                    (max(g for g, _ in shapes), False)}
    assert c["file_mounts"]["~/cifar-ray"] == "."
    assert any("pip install" in cmd and "~/cifar-ray" in cmd for cmd in c["setup_commands"])


def _head_start(c: dict) -> str:
    return " ".join(c["head_start_ray_commands"])


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_token_auth_and_credentials_from_roles(path):
    c = load(path)
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]
    assert c["file_mounts"]["~/.ray/auth_token"].startswith("~/")  # a file outside the repo
    for name, t in c["available_node_types"].items():
        nc = t["node_config"]
        if c["provider"]["type"] == "aws":
            assert nc["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
            assert nc["MetadataOptions"]["HttpTokens"] == "required", name
        elif name != c["head_node_type"]:  # gcp: Ray gives the head its own account
            assert nc["serviceAccounts"][0]["email"].endswith(".iam.gserviceaccount.com"), name


# ---------------------------------------------------------------- the lint: nothing open

RULE_SOURCES = ("IpRanges", "Ipv6Ranges", "sourceRanges", "loadBalancerSourceRanges")


def _rule_sources(rule: dict) -> set[str]:
    cidrs = set()
    for key in RULE_SOURCES:
        for item in rule.get(key) or []:
            cidrs.add(item.get("CidrIp") or item.get("CidrIpv6") if isinstance(item, dict) else item)
    return {c for c in cidrs if c}


def _rule_ports(rule: dict) -> set[int] | range:
    everything = range(0, 65536)
    if str(rule.get("IpProtocol", "tcp")) in ("-1", "all"):
        return everything
    if "FromPort" in rule:
        return range(int(rule["FromPort"]), int(rule.get("ToPort", rule["FromPort"])) + 1)
    allowed = rule.get("allowed") or [rule]  # a GCP firewall rule lists protocols and ports
    ports: set[int] = set()
    for a in allowed:
        if str(a.get("IPProtocol", "tcp")) == "all" or not a.get("ports"):
            return everything
        for p in a["ports"]:
            lo, _, hi = str(p).partition("-")
            ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def _open_port_findings(data, where: str) -> list[str]:
    """Firewall / security-group rules anywhere in `data` that admit the whole internet to
    one of Ray's ports."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if _rule_sources(node) & OPEN:
                ports = _rule_ports(node)
                for name, port in RAY_PORTS.items():
                    if port in ports:
                        found.append(f"{where}:{path}: the {name} port {port} is open to the internet")
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
    walk(data, "")
    return found


def lint_vm(c: dict, where: str) -> list[str]:
    found = _open_port_findings(c, where)
    start = _head_start(c)
    host = re.search(r"--dashboard-host[= ](\S+)", start)
    if not host or host.group(1) not in ("127.0.0.1", "localhost"):
        found.append(f"{where}: the dashboard must bind to 127.0.0.1 (--dashboard-host), got "
                     f"{host.group(1) if host else 'nothing'}")
    options = " ".join(c.get("docker", {}).get("run_options", []))
    for port in RAY_PORTS.values():
        if re.search(rf"(-p|--publish)[= ]\S*{port}", options):
            found.append(f"{where}: docker publishes port {port}")
    return found


def lint_kuberay(doc: dict, where: str) -> list[str]:
    found = _open_port_findings(doc, where)
    if doc.get("kind") == "Ingress":
        found.append(f"{where}: an Ingress exposes the cluster")
    if doc.get("kind") == "Service" and doc.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
        found.append(f"{where}: a {doc['spec']['type']} Service")
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)
    if doc.get("kind") in ("RayCluster", "RayJob"):
        service = spec["headGroupSpec"].get("serviceType", "ClusterIP")
        if service != "ClusterIP":
            found.append(f"{where}: head serviceType {service} (use ClusterIP + kubectl port-forward)")
        if spec["headGroupSpec"].get("enableIngress"):
            found.append(f"{where}: enableIngress exposes the dashboard")
        if spec.get("authOptions", {}).get("mode") != "token":
            found.append(f"{where}: token authentication is off (authOptions.mode: token)")
    return found


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_lint_vm_config_opens_nothing(path):
    assert lint_vm(load(path), path.name) == []


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_lint_kuberay_opens_nothing(path):
    for doc in yaml.safe_load_all(path.read_text()):
        assert lint_kuberay(doc, path.name) == []


def test_lint_bites():
    aws = load(CLUSTER / "aws-gpu.yaml")
    opened = copy.deepcopy(aws)
    opened["provider"]["security_group"] = {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    assert any("dashboard port 8265" in f for f in lint_vm(opened, "x"))
    everything = copy.deepcopy(aws)
    everything["provider"]["security_group"] = {"IpPermissions": [
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}
    assert len(lint_vm(everything, "x")) == 3
    ssh_only = copy.deepcopy(aws)
    ssh_only["provider"]["security_group"] = {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    assert lint_vm(ssh_only, "x") == []  # not a Ray port (the README still says: your CIDR)
    public = copy.deepcopy(aws)
    public["head_start_ray_commands"] = [cmd.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                         for cmd in public["head_start_ray_commands"]]
    assert any("127.0.0.1" in f for f in lint_vm(public, "x"))
    gcp_rule = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["10001"]}]}
    assert any("client port 10001" in f for f in _open_port_findings(gcp_rule, "x"))

    cluster = next(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    lb = copy.deepcopy(cluster)
    lb["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert any("LoadBalancer" in f for f in lint_kuberay(lb, "x"))
    no_auth = copy.deepcopy(cluster)
    del no_auth["spec"]["authOptions"]
    assert any("token" in f for f in lint_kuberay(no_auth, "x"))
    assert lint_kuberay({"kind": "Ingress", "spec": {}}, "x")


def test_readme_commands_open_nothing_to_the_internet():
    """The setup commands in cluster/README.md admit SSH from your CIDR, never from anywhere."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:\w+)?\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            assert not any(o in line for o in OPEN), line
    assert "MY_CIDR" in text


CREDENTIALS = {  # pattern -> an example it must catch
    r"AKIA[0-9A-Z]{16}": "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
    r"aws_secret_access_key": "aws_secret_access_key = x",
    r"-----BEGIN [A-Z ]*PRIVATE KEY": "-----BEGIN RSA PRIVATE KEY-----",
    r"\"private_key\"": '{"type": "service_account", "private_key": "x"}',
    r"RAY_AUTH_TOKEN[=:] *[\"']?[A-Za-z0-9_-]{16,}": "RAY_AUTH_TOKEN=3kQ9x_Jd8s7f6g5h4j3k",
}


def test_no_credentials_in_cluster_or_jobs():
    for pattern, example in CREDENTIALS.items():
        assert re.search(pattern, example), pattern
    for path in [*CLUSTER.rglob("*"), *(REPO / "jobs").rglob("*")]:
        if path.is_file() and path.suffix in (".yaml", ".yml", ".md", ".py", ".json", ".sh"):
            text = path.read_text()
            for pattern in CREDENTIALS:
                assert not re.search(pattern, text), f"{path}: matches {pattern}"


# ---------------------------------------------------------------- KubeRay

def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()))


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == IMAGE.split(":")[1].split("-")[0], where
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == IMAGE
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]  # a CPU head
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpus = []
    for g in groups:
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1, g["groupName"]
        assert isinstance(g["rayStartParams"], dict)
        (c,) = g["template"]["spec"]["containers"]
        assert c["image"] == IMAGE
        limits = c["resources"]["limits"]
        assert limits == c["resources"]["requests"], g["groupName"]
        gpus.append(int(limits["nvidia.com/gpu"]))
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert g["template"]["spec"]["serviceAccountName"] == "cifar-ray"
    assert 1 in gpus and max(gpus) > 1


def test_kuberay_raycluster():
    (doc,) = _docs("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "raycluster.yaml")


def test_kuberay_rayjob():
    (doc,) = _docs("rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    (cluster,) = _docs("raycluster.yaml")
    assert spec["rayClusterSpec"] == cluster["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"
    script = spec["entrypoint"].split()[1]
    assert spec["entrypoint"].startswith("python jobs/") and (REPO / script).is_file()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")  # a RayJob cannot upload a local folder
    assert env["env_vars"]["CIFAR_RAY_STORAGE"].startswith(("s3://", "gs://"))
    runtime_env = load(REPO / "jobs" / "runtime_env.yaml")
    assert env["pip"] == runtime_env["pip"]


def test_kuberay_service_account():
    (doc,) = _docs("serviceaccount.yaml")
    assert (doc["kind"], doc["metadata"]["name"]) == ("ServiceAccount", "cifar-ray")
    notes = doc["metadata"]["annotations"]
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(notes)


def test_image_matches_the_ray_we_test_with():
    import ray

    ours = ".".join(ray.__version__.split(".")[:2])
    assert IMAGE.split(":")[1].startswith(ours + "."), (IMAGE, ray.__version__)


# ---------------------------------------------------------------- which nodes a job gets
# Ray 2.60's own scheduling code, offline, as the autoscaler runs it: a Ray Train worker
# group is a placement group of one bundle per worker; the autoscaler turns it into
# resource demands (placement_groups_to_resource_demands) and picks node types for them
# (get_nodes_for with the default scorer, capped by max_workers). Not checked: what the
# cloud then has (quota, spot capacity), which no offline test can see.

def v1_nodes(config: dict, bundles: list[dict], strategy: str = "PACK",
             ) -> tuple[dict[str, int], int]:
    """Node types autoscaler v1 (`ray up`) adds for a placement group on an empty cluster,
    and how many bundles no node can take."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer, get_nodes_for, placement_groups_to_resource_demands)
    from ray.core.generated.common_pb2 import Bundle, PlacementStrategy
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    c = ray_validate(config) if config["provider"]["type"] != "kuberay" else config
    pg = PlacementGroupTableData(strategy=PlacementStrategy.Value(strategy),
                                 bundles=[Bundle(unit_resources=b) for b in bundles])
    demands, _ = placement_groups_to_resource_demands([pg])
    nodes, left = get_nodes_for(
        c["available_node_types"], {}, c["head_node_type"], c["max_workers"], demands,
        partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({})))
    return dict(nodes), len(left)


def v2_nodes(config: dict, bundle: dict, count: int, failed: tuple[str, ...] = ()) -> dict[str, int]:
    """Node types autoscaler v2 launches for `count` x `bundle`, after launches of the
    `failed` types failed just now (its availability scores at 0)."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    ac = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)
    unavailable = {t: 0.0 for t in failed}
    reply = ResourceDemandScheduler(None).schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=ac.get_node_type_configs(),
        max_num_nodes=ac.get_max_num_nodes(),
        resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(bundle), count=count)],
        cloud_resource_availabilities=unavailable, recoverable_resource_availabilities=unavailable))
    out: dict[str, int] = {}
    for launch in reply.to_launch:
        out[launch.instance_type] = out.get(launch.instance_type, 0) + launch.count
    return out


@pytest.mark.parametrize("path", VM_CONFIGS, ids=lambda p: p.name)
def test_spot_first_and_what_happens_when_spot_is_short(path):
    """What the configs' comments and cluster/README.md say: v1 (`ray up`) puts spot first
    only because of the names and ignores priority; v2 reads priority and falls back to
    on demand after a failed spot launch."""
    c = load(path)
    one = {"CPU": 3, "GPU": 1}
    assert v1_nodes(c, [one]) == ({"gpu-1x-spot": 1}, 0)
    swapped = copy.deepcopy(c)  # priorities the other way round: v1 does not care
    for name, t in swapped["available_node_types"].items():
        if name != c["head_node_type"]:
            t["priority"] = 1 - t["priority"]
    assert v1_nodes(swapped, [one]) == ({"gpu-1x-spot": 1}, 0)
    renamed = copy.deepcopy(c)  # ...but names: v1 breaks the tie by the name sorting last
    types = renamed["available_node_types"]
    types["gpu-1x-zz-ondemand"] = types.pop("gpu-1x-ondemand")
    assert v1_nodes(renamed, [one]) == ({"gpu-1x-zz-ondemand": 1}, 0)
    assert "RAY_enable_autoscaler_v2" not in _head_start(c)  # `ray up` runs v1 here
    by_hand = copy.deepcopy(c)  # the README's switch: spot types at max_workers 0
    for name, t in by_hand["available_node_types"].items():
        if name.endswith("-spot"):
            t["max_workers"] = 0
    assert v1_nodes(by_hand, [one]) == ({"gpu-1x-ondemand": 1}, 0)
    assert v1_nodes(by_hand, [{"CPU": 11, "GPU": 1}] * 4) == ({"gpu-4x-ondemand": 1}, 0)

    assert v2_nodes(c, one, 1) == {"gpu-1x-spot": 1}
    assert v2_nodes(swapped, one, 1) == {"gpu-1x-ondemand": 1}  # v2 follows priority
    assert v2_nodes(c, one, 1, failed=("gpu-1x-spot",)) == {"gpu-1x-ondemand": 1}


def _job_cpus(workers: int) -> int:
    """CPUs per worker that jobs/train_ddp.py asks for (see its --cpus-per-worker)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddp", REPO / "jobs" / "train_ddp.py")
    import sys

    sys.path.insert(0, str(REPO / "jobs"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return module.WHOLE_NODE_CPUS if workers >= 4 else 3


PACKING_ROWS = [(1, None, "PACK"), (2, None, "PACK"), (4, None, "PACK"), (8, None, "PACK"),
                (4, 3, "PACK"), (4, 3, "STRICT_PACK"), (8, 3, "STRICT_PACK")]


def _shown(nodes: dict[str, int], left: int, config: dict) -> str:
    types = config["available_node_types"]
    machine = {n: t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
               for n, t in types.items()}
    parts = [f"{k} x {machine[n]} ({n.rsplit('-', 1)[1]})" for n, k in sorted(nodes.items())]
    if left:
        parts.append("**never placed: no node type fits**")
    return ", ".join(parts) or "-"


def packing_table() -> list[str]:
    """The table of cluster/README.md, computed with Ray's scheduling code."""
    aws, gcp = load(CLUSTER / "aws-gpu.yaml"), load(CLUSTER / "gcp-gpu.yaml")
    lines = ["| DDP workers | CPUs per worker | placement | aws-gpu.yaml gets | gcp-gpu.yaml gets |",
             "|---|---|---|---|---|"]
    for workers, cpus, strategy in PACKING_ROWS:
        cpus_text = f"{cpus}" if cpus else f"{_job_cpus(workers)} (the job's default)"
        bundles = [{"CPU": cpus or _job_cpus(workers), "GPU": 1}] * workers
        cells = [_shown(*v1_nodes(c, bundles, strategy), c) for c in (aws, gcp)]
        lines.append(f"| {workers} | {cpus_text} | {strategy} | {cells[0]} | {cells[1]} |")
    return lines


def test_packing_table_in_the_readme_is_what_ray_picks():
    text = (CLUSTER / "README.md").read_text()
    table = packing_table()
    missing = [line for line in table if line not in text]
    assert not missing, "cluster/README.md's packing table differs from Ray's pick:\n" + "\n".join(table)


def test_ddp_jobs_get_whole_4_gpu_nodes():
    """The promise of the configs' comments: 4 workers on one 4-GPU node, 8 on two, with
    the job's defaults; a 1- or 2-worker job on 1-GPU nodes."""
    for path in VM_CONFIGS:
        c = load(path)
        for workers, nodes in ((1, {"gpu-1x-spot": 1}), (2, {"gpu-1x-spot": 2}),
                               (4, {"gpu-4x-spot": 1}), (8, {"gpu-4x-spot": 2})):
            got = v1_nodes(c, [{"CPU": _job_cpus(workers), "GPU": 1}] * workers)
            assert got == (nodes, 0), (path.name, workers, got)


# ---------------------------------------------------------------- the docs run as written

READMES = [REPO / "README.md", CLUSTER / "README.md", REPO / "jobs" / "README.md"]
SHELL_OPERATORS = {">", ">>", "|", "&&", "||", ";", "2>&1", "&"}


def ray_lines(path: Path) -> list[list[str]]:
    """Every `ray ...` command of a markdown file's code blocks (fenced, or indented by 4
    spaces), continuation lines joined, as words up to a comment or a shell operator."""
    commands, pending, fenced = [], None, False
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        text = raw.strip()
        if pending is not None:
            pending += " " + text.rstrip("\\")
            if not text.endswith("\\"):
                commands.append(pending)
                pending = None
        elif (fenced or raw.startswith("    ")) and re.match(r"ray\s", text):
            if text.endswith("\\"):
                pending = text.rstrip("\\")
            else:
                commands.append(text)
    out = []
    for command in commands:
        words = shlex.split(command, comments=True)
        cut = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))
        out.append(words[:cut])
    return out


def ray_cli_parse(words: list[str]) -> tuple[list[str], dict]:
    """Parse `ray ...` with Ray's own click CLI, down to the subcommand, running nothing:
    a bad option or argument raises click's UsageError. Returns the command path and the
    subcommand's parameters."""
    import click
    from ray.scripts.scripts import cli

    assert words[0] == "ray"
    ctx = cli.make_context("ray", list(words[1:]))
    command, path = cli, ["ray"]
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", ctx.protected_args), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        path.append(name)
        ctx = command.make_context(name, rest, parent=ctx)
    return path, ctx.params


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_ray_line_parses(readme, monkeypatch):
    """Every `ray` command in the READMEs is one Ray 2.60's CLI accepts, naming files that
    exist; a job's entrypoint and its options are checked too (--dry-run prints its
    cifar-ray command and stops)."""
    import runpy
    import sys

    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(REPO)  # the READMEs run everything from the repository root
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    monkeypatch.setenv("CIFAR_RAY_STORAGE", "s3://bucket/prefix")
    for words in ray_lines(readme):
        path, params = ray_cli_parse(words)
        where = f"{readme.name}: {shlex.join(words)}"
        for key in ("cluster_config_file", "runtime_env"):
            if params.get(key):
                assert Path(params[key]).is_file(), where
        if params.get("runtime_env"):
            env = yaml.safe_load(Path(params["runtime_env"]).read_text())
            RuntimeEnv(**{k: v for k, v in env.items() if k != "working_dir"})
        entrypoint = params.get("entrypoint") or ()
        if path[1:] == ["job", "submit"]:
            assert entrypoint[0] == "python" and Path(entrypoint[1]).is_file(), where
            monkeypatch.setattr(sys, "argv", [entrypoint[1], *entrypoint[2:], "--dry-run"])
            with pytest.raises(SystemExit) as done:
                runpy.run_path(entrypoint[1], run_name="__main__")
            assert done.value.code == 0, where
    if readme.parent != REPO:
        assert len(ray_lines(readme)) >= 5


def test_the_parser_bites():
    import click

    with pytest.raises(click.UsageError):
        ray_cli_parse(["ray", "job", "submit", "--adress", "http://x", "--", "python", "x.py"])
    with pytest.raises(click.UsageError):
        ray_cli_parse(["ray", "upp", "cluster/aws-gpu.yaml"])
    words = ray_lines(REPO / "jobs" / "README.md")
    assert ["ray", "stop"] in words
    assert ["ray", "get-auth-token", "--generate"] in words  # `> /dev/null` cut off


def test_local_auth_lines_run(tmp_path):
    """jobs/README.md's local block sets RAY_AUTH_MODE=token in the block itself (since Ray
    2.59 `ray start` turns token auth on by itself once ~/.ray/auth_token exists, and a
    client without the variable gets 401), then creates the token: run that part, in a
    fresh HOME, and see the token file appear. (tests/test_jobs_e2e.py runs a head with
    token auth and submits every job to it.)"""
    import subprocess
    import sys

    text = (REPO / "jobs" / "README.md").read_text()
    block = text[text.index("## Trying it on your machine"):]
    assert re.search(r"^    export RAY_AUTH_MODE=token$", block, flags=re.M)
    assert block.index("export RAY_AUTH_MODE=token") < block.index("ray start --head")
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_AUTH_TOKEN", None)
    ray = str(Path(sys.executable).parent / "ray")
    done = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    token = (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32 and token == done.stdout.strip()


def test_kuberay_ddp_jobs_get_whole_4_gpu_pods():
    """The same promise on KubeRay: its worker groups as node types (a pod's CPU and GPU
    limits), asked of Ray's v1 node-picking code (KubeRay runs v2, whose bin packing fits
    these shapes the same way; not checked here)."""
    (doc,) = _docs("raycluster.yaml")
    spec = doc["spec"]
    types = {"head": {"resources": {"CPU": 2}, "max_workers": 0, "min_workers": 0,
                      "node_config": {}}}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        types[g["groupName"]] = {"resources": {"CPU": int(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])},
                                 "min_workers": 0, "max_workers": g["maxReplicas"], "node_config": {}}
    config = {"max_workers": sum(g["maxReplicas"] for g in spec["workerGroupSpecs"]),
              "provider": {"type": "kuberay"}, "available_node_types": types, "head_node_type": "head"}
    for workers, pods in ((1, {"gpu-1x": 1}), (2, {"gpu-1x": 2}), (4, {"gpu-4x": 1}), (8, {"gpu-4x": 2})):
        assert v1_nodes(config, [{"CPU": _job_cpus(workers), "GPU": 1}] * workers) == (pods, 0), workers


def test_every_placeholder_is_marked_edit():
    """Each CHANGE-ME (and the AWS/GCP example ids) in a config sits on a line marked EDIT."""
    placeholders = ("CHANGE-ME", "123456789012", "sg-0123456789abcdef0", "my-project-id")
    files = [*CLUSTER.glob("*.yaml"), *KUBERAY, *(REPO / "jobs").glob("*.yaml")]
    seen = 0
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(p in line for p in placeholders) and not line.lstrip().startswith("#"):
                seen += 1
                assert "# EDIT" in line, f"{path.name}:{number}: {line.strip()}"
    assert seen >= 10
