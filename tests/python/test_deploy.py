"""The shipped deployment files agree with the launcher: the Kubernetes manifests' launcher
flags parse for every pod index, the pod count matches --nnodes, the scheduler address is
pod 0 under the headless Service and the ports agree. (No Kubernetes cluster runs here.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from meshpost.launch import _parse

ROOT = Path(__file__).resolve().parents[2]
yaml = pytest.importorskip("yaml", reason="python3-yaml is not installed")


def _launcher_args(script: str, env: dict) -> list:
    text = script.replace("\\\n", " ")
    line = next(l for l in text.splitlines() if "meshpost.launch" in l)
    argv = shlex.split(line.split("meshpost.launch", 1)[1])
    out = []
    for a in argv:
        out.append(re.sub(r"\$\{(\w+)##\*-\}|\$\{?(\w+)\}?",
                          lambda m: (env[m.group(1)].rsplit("-", 1)[1] if m.group(1)
                                     else env[m.group(2)]), a))
    return out


@pytest.mark.parametrize("manifest", ["indexed-job.yaml", "statefulset.yaml"])
def test_kubernetes_manifest_matches_launcher(manifest):
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / manifest).read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    work = next(d for d in docs if d["kind"] in ("Job", "StatefulSet"))
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    spec = work["spec"]
    pods = spec["completions"] if work["kind"] == "Job" else spec["replicas"]
    if work["kind"] == "Job":
        assert spec["completionMode"] == "Indexed" and spec["parallelism"] == pods
        assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    else:
        assert spec["serviceName"] == service["metadata"]["name"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["NNODES"]) == pods
    assert env["MASTER_ADDR"] == f"{work['metadata']['name']}-0.{service['metadata']['name']}"
    script = container["args"][0]
    layouts = []
    for index in range(pods):
        env.update(JOB_COMPLETION_INDEX=str(index), POD_NAME=f"{work['metadata']['name']}-{index}")
        ns = _parse(_launcher_args(script, env), environ={})
        assert ns.layout.node_rank == index and ns.layout.nnodes == pods
        assert ns.master_port == service["spec"]["ports"][0]["port"] == \
            container["ports"][0]["containerPort"]
        layouts.append(ns.layout)
    names = [c.name for l in layouts for c in l.children()]
    assert len(names) == len(set(names)) == layouts[0].num_workers + layouts[0].num_servers


def test_sbatch_script_runs_one_launcher_per_node():
    text = (ROOT / "deploy" / "slurm" / "meshpost.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert re.search(r"srun --ntasks-per-node=1 .*\n.*-m meshpost\.launch --slurm \"\$@\"", text)
