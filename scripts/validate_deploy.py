#!/usr/bin/env python3
"""Checks what the Kubernetes schemas cannot: that docker-compose.yml and
deploy/k8s agree with the code and with each other.

* every service binary (services/*) has a compose service and a Deployment;
* Deployments: image, command naming the binary, the ConfigMap, the AMQP
  URL from its Secret, a readiness probe (HTTP for the gateway, plus
  liveness), resource requests and limits, a non-root security context;
* every ConfigMap/Secret a workload refers to exists (or is `optional`);
* KEDA: each ScaledObject targets a Deployment, each rabbitmq trigger names
  a real work queue (shared/protocol queues.rs) and a TriggerAuthentication
  that exists and reads a Secret that exists; dev-worker and qa-worker are
  scaled;
* kustomization.yaml lists every manifest file (and only existing ones);
* compose: the infrastructure has health checks, services wait for them
  (condition service_healthy), scalable services have no container_name or
  host ports, the scheduler runs with DEVFLEET_SCHEDULER_DIRECT_ROUTING=false;
* every DEVFLEET_* variable set anywhere is one some binary reads (and not
  a deprecated name), and
  every variable a binary reads is documented in docs/OPERATIONS.md.

usage: validate_deploy.py COMPOSE_CONFIG_JSON_OR_YAML   (from `docker-compose config`)
Run from the checkout's root; exits 1 listing every problem.
"""
import glob
import os
import re
import sys

import yaml

ROOT = os.getcwd()
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def binaries():
    names = set()
    for cargo in glob.glob("services/*/Cargo.toml"):
        text = open(cargo).read()
        bins = re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', text)
        if bins:
            names.update(bins)
        else:
            # A package's default binary is named after the folder here.
            names.add(os.path.basename(os.path.dirname(cargo)))
    return names


def known_variables():
    """Every environment variable a binary reads: clap `env = "..."` plus
    the few read directly."""
    found = set()
    for path in glob.glob("src/**/*.rs", recursive=True) + glob.glob("services/*/src/**/*.rs", recursive=True) + glob.glob(
        "shared/*/src/**/*.rs", recursive=True
    ):
        # Unit tests (a trailing `mod tests`) read nothing in production.
        text = open(path).read().split("#[cfg(test)]\nmod tests")[0]
        found.update(re.findall(r'env\s*=\s*"([A-Z][A-Z0-9_]+)"', text))
        found.update(re.findall(r'"((?:DEVFLEET|OTEL)_[A-Z0-9_]*[A-Z0-9])"', text))
    found.update({"RUST_LOG", "OPENAI_API_KEY"})
    return found


def deprecated_variables():
    """The old names of renamed variables (devfleet_runtime::settings::RENAMED):
    still read, with a warning, so deployment files must not use them."""
    text = open("shared/runtime/src/settings.rs").read()
    return set(re.findall(r'(?:same|millis)\(\s*"([A-Z][A-Z0-9_]+)"', text))


DEPRECATED = set()


def check_name(where, name, variables):
    if name.startswith("DEVFLEET_") and name not in variables:
        problem(where, f"sets {name}, which no binary reads")
    elif name in DEPRECATED:
        problem(where, f"sets {name}, a deprecated name (docs/OPERATIONS.md, Deprecated names)")


def work_queues():
    text = open("shared/protocol/src/queues.rs").read()
    names = set(re.findall(r'pub const [A-Z_]+: &str = "([a-z][a-z0-9_.]+)"', text))
    return {n for n in names if not n.startswith("devfleet.")}


def load_k8s():
    docs = []
    for path in sorted(glob.glob("deploy/k8s/*.yaml")):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is None:
                    continue
                if not isinstance(doc, dict):
                    problem(path, "a document is not a mapping")
                    continue
                docs.append((path, doc))
    return docs


def check_required(path, doc):
    for key in ("apiVersion", "kind"):
        if not doc.get(key):
            problem(path, f"document without {key}")
    if doc.get("kind") != "Kustomization" and not (doc.get("metadata") or {}).get("name"):
        problem(path, f"{doc.get('kind')} without metadata.name")


def check_kustomization(docs):
    kust = [d for p, d in docs if d.get("kind") == "Kustomization"]
    if len(kust) != 1:
        problem("deploy/k8s", "expected exactly one kustomization.yaml")
        return set()
    listed = set(kust[0].get("resources") or [])
    files = {os.path.basename(p) for p in glob.glob("deploy/k8s/*.yaml")}
    for r in sorted(listed):
        if r not in files:
            problem("deploy/k8s/kustomization.yaml", f"lists {r}, which does not exist")
    for f in sorted(files - listed - {"kustomization.yaml", "secret-example.yaml"}):
        problem("deploy/k8s/kustomization.yaml", f"does not list {f}")
    generated = {g["name"]: g for g in kust[0].get("secretGenerator") or []}
    if generated and not (kust[0].get("generatorOptions") or {}).get("disableNameSuffixHash"):
        problem("deploy/k8s/kustomization.yaml", "generated Secrets need disableNameSuffixHash (KEDA refers to them by name)")
    return generated


def secret_keys(docs, generated):
    keys = {}
    for _, d in docs:
        if d.get("kind") == "Secret":
            keys[d["metadata"]["name"]] = set((d.get("stringData") or {}).keys()) | set((d.get("data") or {}).keys())
    for name, g in generated.items():
        keys[name] = {lit.split("=", 1)[0] for lit in g.get("literals") or []}
    return keys


def check_workloads(docs, secrets, bins, variables):
    applied = [(p, d) for p, d in docs if not p.endswith("secret-example.yaml")]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for _, d in applied if d.get("kind") == "ConfigMap"}
    deployments = {}
    for path, d in applied:
        kind = d.get("kind")
        if kind not in ("Deployment", "StatefulSet"):
            continue
        name = d["metadata"]["name"]
        spec = d.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problem(path, f"{kind} {name}: selector does not match the pod labels")
        pod = template.get("spec") or {}
        containers = pod.get("containers") or []
        if not containers:
            problem(path, f"{kind} {name}: no containers")
            continue
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates") or []}
        for c in containers:
            where = f"{path}: {kind} {name}, container {c.get('name')}"
            if not c.get("image"):
                problem(where, "no image")
            for ref in c.get("envFrom") or []:
                cm = (ref.get("configMapRef") or {}).get("name")
                if cm and cm not in configmaps:
                    problem(where, f"envFrom ConfigMap {cm} does not exist")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    if ref["key"] not in secrets.get(ref["name"], set()):
                        problem(where, f"{e['name']} reads Secret {ref['name']} key {ref['key']}, which is not defined")
                check_name(where, e["name"], variables)
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in claims:
                    problem(where, f"mounts volume {m['name']}, which is not defined")
            if not c.get("readinessProbe"):
                problem(where, "no readinessProbe")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        problem(where, f"no resources.{part}.{r}")
            if kind == "Deployment":
                deployments[name] = (path, d, c)
    for binary in sorted(bins):
        if binary not in deployments:
            problem("deploy/k8s", f"no Deployment for the service {binary}")
            continue
        path, d, c = deployments[binary]
        where = f"{path}: Deployment {binary}"
        if (c.get("command") or [None])[0] != binary:
            problem(where, f"command must start with the binary name {binary}")
        if c.get("image") != "devfleet":
            problem(where, "image must be `devfleet` (kustomization.yaml `images` sets the real one)")
        if not any((r.get("configMapRef") or {}).get("name") == "devfleet-config" for r in c.get("envFrom") or []):
            problem(where, "does not read the ConfigMap devfleet-config")
        if not any(e["name"] == "DEVFLEET_AMQP_URL" for e in c.get("env") or []):
            problem(where, "no DEVFLEET_AMQP_URL (from the Secret devfleet-rabbitmq)")
        sc = (d["spec"]["template"]["spec"].get("securityContext") or {})
        if not sc.get("runAsNonRoot"):
            problem(where, "must run as non-root")
        check_grace(where, d["spec"]["template"]["spec"], c)
        if binary == "metrics-gateway":
            for probe in ("readinessProbe", "livenessProbe"):
                if ((c.get(probe) or {}).get("httpGet") or {}).get("path") != "/healthz":
                    problem(where, f"{probe} must GET /healthz")
        if binary == "scheduler":
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            if str(env.get("DEVFLEET_SCHEDULER_DIRECT_ROUTING")).lower() != "false":
                problem(where, "must set DEVFLEET_SCHEDULER_DIRECT_ROUTING=false (the router runs)")
    for name, data in configmaps.items():
        for key in data:
            check_name(f"ConfigMap {name}", key, variables)
    services = {d["metadata"]["name"] for _, d in applied if d.get("kind") == "Service"}
    if "metrics-gateway" not in services:
        problem("deploy/k8s", "no Service for metrics-gateway")
    return deployments


def check_grace(where, pod, container):
    """A service's own shutdown grace (a DEVFLEET_*_SHUTDOWN_GRACE_SECONDS in
    its env) must end before Kubernetes kills the pod, or work still running
    is killed with SIGKILL instead of being finished or handed back."""
    if "terminationGracePeriodSeconds" in pod:
        kill_after = float(pod["terminationGracePeriodSeconds"])
    else:
        kill_after = 30.0  # the Kubernetes default
    for e in container.get("env") or []:
        if e["name"].endswith("_SHUTDOWN_GRACE_SECONDS") and "value" in e:
            try:
                grace = float(e["value"])
            except ValueError:
                problem(where, f"{e['name']}={e['value']!r} is not a number of seconds")
                continue
            if kill_after <= grace:
                problem(where, f"terminationGracePeriodSeconds ({kill_after:g}) must exceed {e['name']} ({grace:g})")
    if container.get("command", [None])[0] == "qa-worker" and not any(
        e["name"] == "DEVFLEET_QA_SHUTDOWN_GRACE_SECONDS" for e in container.get("env") or []
    ):
        problem(where, "must set DEVFLEET_QA_SHUTDOWN_GRACE_SECONDS (below terminationGracePeriodSeconds)")


def check_keda(docs, secrets, deployments, queues):
    auths = {}
    for path, d in docs:
        if d.get("kind") == "TriggerAuthentication":
            auths[d["metadata"]["name"]] = d
            for ref in (d.get("spec") or {}).get("secretTargetRef") or []:
                if ref.get("key") not in secrets.get(ref.get("name"), set()):
                    problem(path, f"TriggerAuthentication reads Secret {ref.get('name')} key {ref.get('key')}, not defined")
    scaled = set()
    for path, d in docs:
        if d.get("kind") != "ScaledObject":
            continue
        if d.get("apiVersion") != "keda.sh/v1alpha1":
            problem(path, "ScaledObject apiVersion must be keda.sh/v1alpha1")
        spec = d.get("spec") or {}
        target = (spec.get("scaleTargetRef") or {}).get("name")
        where = f"{path}: ScaledObject {d['metadata']['name']}"
        if target not in deployments:
            problem(where, f"targets {target}, which is not a Deployment here")
        scaled.add(target)
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problem(where, "minReplicaCount/maxReplicaCount must be integers, min <= max")
        triggers = spec.get("triggers") or []
        if not triggers:
            problem(where, "no triggers")
        for t in triggers:
            meta = t.get("metadata") or {}
            if t.get("type") == "rabbitmq":
                if meta.get("queueName") not in queues:
                    problem(where, f"rabbitmq trigger on {meta.get('queueName')}, which is not a devfleet queue")
                if meta.get("mode") != "QueueLength" or not str(meta.get("value", "")).isdigit():
                    problem(where, "rabbitmq trigger needs mode QueueLength and a numeric value")
                auth = (t.get("authenticationRef") or {}).get("name")
                if auth not in auths and not meta.get("host") and not meta.get("hostFromEnv"):
                    problem(where, f"rabbitmq trigger authentication {auth} does not exist")
            elif t.get("type") == "metrics-api":
                for key in ("url", "valueLocation", "targetValue"):
                    if not meta.get(key):
                        problem(where, f"metrics-api trigger without {key}")
            else:
                problem(where, f"unexpected trigger type {t.get('type')}")
    for needed in ("dev-worker", "qa-worker"):
        if needed not in scaled:
            problem("deploy/k8s/keda.yaml", f"no ScaledObject for {needed}")


def check_compose(config_path, bins, variables):
    with open(config_path) as f:
        config = yaml.safe_load(f)
    services = config.get("services") or {}
    for infra in ("rabbitmq", "redis", "nats"):
        if infra not in services:
            problem("docker-compose.yml", f"no {infra} service")
        elif not services[infra].get("healthcheck"):
            problem("docker-compose.yml", f"{infra} has no healthcheck")
    if "--appendonly" not in str((services.get("redis") or {}).get("command")):
        problem("docker-compose.yml", "redis must run with --appendonly yes")
    if "-js" not in str((services.get("nats") or {}).get("command")):
        problem("docker-compose.yml", "nats must run with JetStream (-js)")
    for binary in sorted(bins):
        svc = services.get(binary)
        where = f"docker-compose.yml: {binary}"
        if svc is None:
            problem("docker-compose.yml", f"no service for {binary}")
            continue
        if (svc.get("command") or [None])[0] != binary:
            problem(where, f"command must start with {binary}")
        if not svc.get("restart"):
            problem(where, "no restart policy")
        if not svc.get("healthcheck"):
            problem(where, "no healthcheck")
        deps = svc.get("depends_on") or {}
        for infra in ("rabbitmq", "redis", "nats"):
            if (deps.get(infra) or {}).get("condition") != "service_healthy":
                problem(where, f"must depend on {infra} with condition service_healthy")
        env = svc.get("environment") or {}
        for key in env:
            check_name(where, key, variables)
        for key in ("DEVFLEET_AMQP_URL", "DEVFLEET_REDIS_URL", "DEVFLEET_NATS_URL"):
            if not env.get(key):
                problem(where, f"no {key}")
        if binary != "metrics-gateway":
            if svc.get("container_name"):
                problem(where, "container_name prevents --scale")
            if svc.get("ports"):
                problem(where, "host ports prevent --scale")
        elif not svc.get("ports"):
            problem(where, "the gateway's port must be published")
    if str((services.get("scheduler") or {}).get("environment", {}).get("DEVFLEET_SCHEDULER_DIRECT_ROUTING")).lower() != "false":
        problem("docker-compose.yml: scheduler", "must set DEVFLEET_SCHEDULER_DIRECT_ROUTING=false (the router runs)")


def check_docs(variables):
    path = "docs/OPERATIONS.md"
    if not os.path.exists(path):
        problem(path, "missing")
        return
    text = open(path).read()
    for v in sorted(variables):
        if f"`{v}`" not in text:
            problem(path, f"does not document `{v}`")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("usage: ")[1].splitlines()[0])
    bins = binaries()
    if len(bins) < 7:
        problem("services/", f"found only {sorted(bins)}")
    variables = known_variables()
    DEPRECATED.update(deprecated_variables())
    if not DEPRECATED:
        problem("shared/runtime/src/settings.rs", "found no renamed variables (has RENAMED moved?)")
    docs = load_k8s()
    for path, doc in docs:
        check_required(path, doc)
    generated = check_kustomization(docs)
    secrets = secret_keys(docs, generated)
    deployments = check_workloads(docs, secrets, bins, variables)
    check_keda(docs, secrets, deployments, work_queues())
    check_compose(sys.argv[1], bins, variables)
    check_docs(variables)
    if problems:
        print(f"validate_deploy: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)
    print(f"validate_deploy: compose and {len(docs)} Kubernetes documents agree with {len(bins)} services and {len(variables)} variables")


if __name__ == "__main__":
    main()
