#!/usr/bin/env python3
"""Check the Kubernetes manifests in deploy/k8s for the mistakes a schema check misses: cross-references.

Every workload's selector matches its pod template; every Service and PodDisruptionBudget selects some
workload; a StatefulSet's serviceName names a headless Service that selects its pods; probe and Service
ports exist on the container; volume mounts and claims resolve; a Raft group's --peers lists exactly its
replicas under their stable DNS names and the port it listens on; replicas run mutual TLS, each with its own
certificate ({id}) from a mounted /certs. Exits non-zero with one line per problem.
"""
import pathlib
import re
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


docs = []
for path in sorted(HERE.glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        name = f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for field in ("apiVersion", "kind", "metadata"):
            if field not in doc:
                problem(name, f"missing {field}")
        docs.append((name, doc))

by_kind = {}
for name, doc in docs:
    by_kind.setdefault(doc.get("kind"), []).append((name, doc))

workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
services = {d["metadata"]["name"]: (n, d) for n, d in by_kind.get("Service", [])}
claims = {d["metadata"]["name"] for _, d in by_kind.get("PersistentVolumeClaim", [])}
pod_labels = []

for name, doc in workloads:
    spec = doc["spec"]
    template = spec["template"]
    labels = template["metadata"].get("labels", {})
    pod_labels.append(labels)
    if not selects(spec["selector"].get("matchLabels"), labels):
        problem(name, "selector does not match the pod template's labels")
    pod = template["spec"]
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problem(name, "pods must run as non-root")
    volumes = {v["name"] for v in pod.get("volumes", [])}
    volumes |= {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    for volume in pod.get("volumes", []):
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim and claim not in claims:
            problem(name, f"volume {volume['name']} claims unknown PVC {claim}")
    for container in pod["containers"]:
        ports = {p["containerPort"] for p in container.get("ports", [])}
        port_names = {p.get("name") for p in container.get("ports", [])}
        if container.get("image") != "ds824:latest":
            problem(name, f"container {container['name']} does not run ds824:latest")
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                problem(name, f"mount of unknown volume {mount['name']}")
        for probe in ("readinessProbe", "livenessProbe"):
            port = container.get(probe, {}).get("tcpSocket", {}).get("port")
            if port is not None and port not in ports and port not in port_names:
                problem(name, f"{probe} checks port {port}, which the container does not open")
        args = container.get("args", [])
        if doc["kind"] == "StatefulSet" and "--peers" in args:
            replicas = spec["replicas"]
            listen_port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
            if listen_port not in ports:
                problem(name, f"--listen port {listen_port} is not a container port")
            if args[args.index("--id") + 1] != "auto":
                problem(name, "a StatefulSet's pods must take --id auto")
            peers = dict(p.split("=", 1) for p in args[args.index("--peers") + 1].split(","))
            sts, svc = doc["metadata"]["name"], spec["serviceName"]
            if "--peer-listen" in args:
                listen_port = int(args[args.index("--peer-listen") + 1].rsplit(":", 1)[1])
                if listen_port not in ports:
                    problem(name, f"--peer-listen port {listen_port} is not a container port")
            wanted = {str(i + 1): f"{sts}-{i}.{svc}:{listen_port}" for i in range(replicas)}
            if peers != wanted:
                problem(name, f"--peers {peers} should be {wanted}")
            if replicas % 2 == 0:
                problem(name, "a Raft group should have an odd number of replicas")
            # Secure by default: replicas speak mutual TLS, each with its own certificate.
            if "--insecure" in args:
                problem(name, "a Raft group must not run --insecure")
            cert = args[args.index("--tls-cert") + 1] if "--tls-cert" in args else ""
            if "{id}" not in cert:
                problem(name, "--tls-cert must name each replica's own certificate (with {id})")
        uses_certs = "/certs/" in str(container.get("args", [])) + str(container.get("env", [])) + str(
            container.get("readinessProbe", {}))
        if "--insecure" in container.get("args", []) or "--insecure" in str(container.get("readinessProbe", {})):
            problem(name, f"container {container['name']} runs --insecure: every manifest is mutually authenticated")
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if uses_certs and "/certs" not in mounts:
            problem(name, f"container {container['name']} names files in /certs but mounts nothing there")
        # Each workload gets only its own keys out of the Secret: every file it names is projected, and
        # no operator (admin) key sits in a long-running pod.
        projected = {i["path"] for v in pod.get("volumes", []) if v["name"] == "certs"
                     for i in v.get("secret", {}).get("items", [])}
        if uses_certs and not projected:
            problem(name, "mounts the whole certs Secret: project only its own files (items)")
        named = set(re.findall(r"/certs/([\w.{}-]+)", str(container.get("args", [])) + str(container.get("env", []))
                               + str(container.get("readinessProbe", {}))))
        for file in named:
            wanted = [file.replace("{id}", str(i + 1)) for i in range(spec.get("replicas", 1))] if "{id}" in file else [file]
            for w in wanted:
                if projected and w not in projected:
                    problem(name, f"names /certs/{w}, which its certs volume does not project")
        if any(path.startswith("admin-") for path in projected):
            problem(name, "a long-running pod holds an admin key")
    if doc["kind"] == "StatefulSet":
        svc = services.get(spec.get("serviceName"))
        if svc is None:
            problem(name, f"serviceName {spec.get('serviceName')} is not a Service here")
        else:
            if not selects(svc[1]["spec"].get("selector"), labels):
                problem(name, "its governing Service does not select its pods")
            if "--peers" in str(pod) and svc[1]["spec"].get("clusterIP") != "None":
                problem(name, "a Raft group's governing Service must be headless")

for name, doc in by_kind.get("Service", []):
    selector = doc["spec"].get("selector")
    matching = [labels for labels in pod_labels if selects(selector, labels)]
    if not matching:
        problem(name, "selects no workload")
    target_ports = [p.get("targetPort") for p in doc["spec"].get("ports", [])]
    for _, w in workloads:
        if selects(selector, w["spec"]["template"]["metadata"].get("labels", {})):
            opened = {p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            for port in target_ports:
                if port not in opened:
                    problem(name, f"targetPort {port} is not opened by {w['metadata']['name']}")

for name, doc in by_kind.get("PodDisruptionBudget", []):
    if not any(selects(doc["spec"]["selector"].get("matchLabels"), labels) for labels in pod_labels):
        problem(name, "selects no workload")
    if doc["spec"].get("maxUnavailable") != 1:
        problem(name, "at most one member of a group may be down")

for line in problems:
    print(f"k8s: {line}")
print(f"k8s manifests: {len(docs)} objects checked, {len(problems)} problems")
sys.exit(1 if problems else 0)
