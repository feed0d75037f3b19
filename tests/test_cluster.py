"""cluster/: the `ray up` configs pass Ray's own validator offline (and a broken copy does
not), the KubeRay manifests have what a RayCluster/RayJob needs, and no config opens Ray's
ports to the internet or carries a credential."""

from __future__ import annotations

import copy
import re
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
