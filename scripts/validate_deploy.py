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
  every variable a binary reads is documented in docs/OPERATIONS.md;
* durability (what README's delivery guarantees need of the servers, see
  docs/OPERATIONS.md "Durability"), in compose and Kubernetes alike: Redis
  with `--appendonly yes --appendfsync always`; NATS 2.10 or later with
  JetStream `sync_interval: always` and `max_payload` of at least 16 MiB in
  the configuration it loads; RabbitMQ work queues declared as quorum
  queues and published to with publisher confirms (in the bus code).
  `--self-test` breaks each of these settings in a copy and checks that
  every break is reported.

usage: validate_deploy.py [--self-test] COMPOSE_CONFIG_JSON_OR_YAML   (from `docker-compose config`)
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


def runtime_grace():
    """The consume loops' default shutdown grace (SHUTDOWN_GRACE), seconds."""
    text = open("shared/runtime/src/consume.rs").read()
    m = re.search(r"pub const SHUTDOWN_GRACE: Duration = Duration::from_secs\((\d+)\);", text)
    if not m:
        problem("shared/runtime/src/consume.rs", "no `pub const SHUTDOWN_GRACE` (has it moved?)")
        return 0
    return int(m.group(1))


# Seconds a pod needs beyond its service's shutdown grace to close its
# connections and exit.
GRACE_MARGIN = 10


def check_grace_periods(deployments, configmaps):
    """terminationGracePeriodSeconds covers each service's shutdown grace: a
    DEVFLEET_*_SHUTDOWN_GRACE_SECONDS setting of the service (the
    container's env, else the ConfigMap, else its default), else the
    runtime's SHUTDOWN_GRACE."""
    default = runtime_grace()
    for binary, (path, d, c) in sorted(deployments.items()):
        settings = f"services/{binary}/src/settings.rs"
        text = open(settings).read() if os.path.exists(settings) else ""
        m = re.search(r'env = "(DEVFLEET_[A-Z_]+_SHUTDOWN_GRACE_SECONDS)", default_value = "(\d+)"', text)
        grace, source = default, "the runtime's SHUTDOWN_GRACE"
        if m:
            name, grace, source = m.group(1), int(m.group(2)), m.group(1)
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            configured = env.get(name)
            if configured is None:
                for data in configmaps.values():
                    configured = data.get(name, configured)
            if configured is not None:
                grace = int(float(configured))
        period = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if period < grace + GRACE_MARGIN:
            problem(
                f"{path}: Deployment {binary}",
                f"terminationGracePeriodSeconds {period} must be at least {grace + GRACE_MARGIN} "
                f"({source} = {grace} s plus {GRACE_MARGIN} s to exit)",
            )


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
    check_compose_durability(services)
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


# ---- durability ----

MIN_PAYLOAD = 16 * 1024 * 1024


def tokens(command):
    """A command or args list (or string) as a list of words."""
    if command is None:
        return []
    if isinstance(command, str):
        return command.split()
    return [str(w) for w in command]


def check_redis_command(where, command):
    words = tokens(command)
    pairs = {(a, b) for a, b in zip(words, words[1:])}
    if ("--appendonly", "yes") not in pairs:
        problem(where, "redis must run with --appendonly yes (the task store is the source of truth)")
    if ("--appendfsync", "always") not in pairs:
        problem(where, "redis must run with --appendfsync always: an acknowledged store write must survive a host crash")


def image_version(image):
    """(major, minor) of an image tag like nats:2.10-alpine, or None."""
    tag = (image or "").rsplit("/", 1)[-1].partition(":")[2]
    m = re.match(r"v?(\d+)\.(\d+)", tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_nats_image(where, image):
    version = image_version(image)
    if version is None or version < (2, 10):
        problem(where, f"nats image {image!r} must be a pinned 2.10 or later (JetStream sync_interval needs 2.10)")


def strip_conf_comments(text):
    return "\n".join(re.split(r"#|//", line, maxsplit=1)[0] for line in text.splitlines())


def check_nats_conf(where, text):
    """A nats-server configuration: JetStream fsyncs every write and
    payloads of a bus envelope fit."""
    text = strip_conf_comments(text or "")
    block = re.search(r"\bjetstream\s*[:=]?\s*\{([^}]*)\}", text)
    synced = block and re.search(r"\b(?:sync_interval|sync)\s*[:=]\s*[\"']?always[\"']?", block.group(1))
    if not synced:
        problem(where, "NATS must set jetstream { sync_interval: always }: a confirmed publish must survive a host crash")
    m = re.search(r"\bmax_payload\s*[:=]\s*[\"']?(\d+)\s*([KMG]i?B?)?", text, re.IGNORECASE)
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(m.group(1)) * units[(m.group(2) or "")[:1].upper()] if m else 1 << 20
    if size < MIN_PAYLOAD:
        problem(where, f"NATS max_payload must be at least 16MB (the bus's largest envelope, e.g. a 20,000-task plan); it is {size} bytes")


def compose_nats_conf(nats):
    """The text of the configuration file the compose nats service loads
    (its `-c` argument, found among its bind mounts), or None."""
    words = tokens(nats.get("command"))
    if "-c" not in words or words.index("-c") + 1 >= len(words):
        return None
    target = words[words.index("-c") + 1]
    for volume in nats.get("volumes") or []:
        if isinstance(volume, dict):
            source, dest = volume.get("source"), volume.get("target")
        else:
            parts = str(volume).split(":")
            source, dest = parts[0], parts[1] if len(parts) > 1 else None
        if dest == target and source:
            path = source if os.path.isabs(source) else os.path.join(ROOT, source)
            if os.path.exists(path):
                return open(path).read()
    return None


def check_compose_durability(services):
    check_redis_command("docker-compose.yml: redis", (services.get("redis") or {}).get("command"))
    nats = services.get("nats") or {}
    check_nats_image("docker-compose.yml: nats", nats.get("image"))
    if "-js" not in tokens(nats.get("command")):
        problem("docker-compose.yml: nats", "nats must run with JetStream (-js)")
    check_nats_conf("docker-compose.yml: nats (the file its -c names)", compose_nats_conf(nats))


def check_k8s_durability(docs):
    applied = [(p, d) for p, d in docs if not p.endswith("secret-example.yaml")]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for _, d in applied if d.get("kind") == "ConfigMap"}
    found = set()
    for path, d in applied:
        if d.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        pod = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for c in pod.get("containers") or []:
            image = c.get("image") or ""
            where = f"{path}: {d['kind']} {d['metadata']['name']}"
            command = tokens(c.get("command")) + tokens(c.get("args"))
            if image.startswith("redis"):
                found.add("redis")
                check_redis_command(where, command)
            elif image.startswith("nats"):
                found.add("nats")
                check_nats_image(where, image)
                if "-js" not in command:
                    problem(where, "nats must run with JetStream (-js)")
                conf = None
                if "-c" in command and command.index("-c") + 1 < len(command):
                    target = command[command.index("-c") + 1]
                    for m in c.get("volumeMounts") or []:
                        if target.startswith(m.get("mountPath", "").rstrip("/") + "/"):
                            cm = ((volumes.get(m.get("name")) or {}).get("configMap") or {}).get("name")
                            conf = (configmaps.get(cm) or {}).get(os.path.basename(target))
                check_nats_conf(where + " (the file its -c names)", conf)
    for needed in ("redis", "nats"):
        if needed not in found:
            problem("deploy/k8s", f"no {needed} workload to check for durability")


def check_rabbitmq_code():
    topology = open("shared/bus/src/amqp/topology.rs").read()
    if not re.search(r'"x-queue-type".*"quorum"', topology):
        problem("shared/bus/src/amqp/topology.rs", "work queues must be declared as quorum queues (durable, fsynced before confirm)")
    link = open("shared/bus/src/amqp/link.rs").read()
    if "confirm_select" not in link:
        problem("shared/bus/src/amqp/link.rs", "publishing must use publisher confirms (confirm_select)")


def self_test(config_path):
    """Each durability setting, broken in a copy, must be reported."""
    import copy

    with open(config_path) as f:
        config = yaml.safe_load(f)
    services = config.get("services") or {}
    docs = load_k8s()
    nats_conf = compose_nats_conf(services.get("nats") or {})
    failures = []

    def expect(what, run, needle):
        problems.clear()
        run()
        if not any(needle in p for p in problems):
            failures.append(f"{what}: not reported (got {problems})")

    def compose_with(service, key, value):
        broken = copy.deepcopy(services)
        broken[service][key] = value
        return lambda: check_compose_durability(broken)

    redis_cmd = tokens(services["redis"]["command"])
    everysec = [("everysec" if w == "always" else w) for w in redis_cmd]
    expect("compose redis appendfsync everysec", compose_with("redis", "command", everysec), "--appendfsync always")
    no_aof = [w for w in redis_cmd if w not in ("--appendonly", "yes")]
    expect("compose redis without AOF", compose_with("redis", "command", no_aof), "--appendonly yes")
    expect("compose nats 2.9", compose_with("nats", "image", "nats:2.9-alpine"), "2.10 or later")
    expect("nats.conf without sync_interval", lambda: check_nats_conf("nats.conf", re.sub(r"sync_interval[^\n]*", "", nats_conf or "")), "sync_interval: always")
    expect("nats.conf sync_interval 2m", lambda: check_nats_conf("nats.conf", (nats_conf or "").replace("always", "2m")), "sync_interval: always")
    expect("nats.conf default max_payload", lambda: check_nats_conf("nats.conf", re.sub(r"max_payload[^\n]*", "", nats_conf or "")), "max_payload")

    def k8s_with(edit):
        broken = copy.deepcopy(docs)
        for _, d in broken:
            edit(d)
        return lambda: check_k8s_durability(broken)

    def redis_everysec(d):
        for c in (((d.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []:
            if (c.get("image") or "").startswith("redis"):
                c["args"] = [("everysec" if w == "always" else w) for w in tokens(c.get("args"))]

    def nats_conf_default(d):
        if d.get("kind") == "ConfigMap" and "nats.conf" in (d.get("data") or {}):
            d["data"]["nats.conf"] = "max_payload: 16MB\n"

    expect("k8s redis appendfsync everysec", k8s_with(redis_everysec), "--appendfsync always")
    expect("k8s nats without sync_interval", k8s_with(nats_conf_default), "sync_interval: always")
    problems.clear()
    check_compose_durability(services)
    check_k8s_durability(docs)
    if problems:
        failures.append(f"the shipped files themselves: {problems}")
    problems.clear()
    if failures:
        print("validate_deploy --self-test: the durability checks missed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print("validate_deploy --self-test: every broken durability setting is reported")

def check_redis_memory(compose_path, docs):
    """Redis memory is bounded without eviction (an LRU policy could evict
    plan state): --maxmemory and --maxmemory-policy noeviction in both."""
    with open(compose_path) as f:
        compose = yaml.safe_load(f)
    commands = [("docker-compose.yml", ((compose.get("services") or {}).get("redis") or {}).get("command"))]
    for path, doc in docs:
        if doc.get("kind") == "StatefulSet" and doc["metadata"].get("name") == "redis":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                commands.append((path, c.get("args")))
    for where, args in commands:
        args = list(args or [])
        policy = args[args.index("--maxmemory-policy") + 1] if "--maxmemory-policy" in args[:-1] else None
        if "--maxmemory" not in args[:-1] or policy != "noeviction":
            problem(where, "redis must run with --maxmemory and --maxmemory-policy noeviction")
    if len(commands) < 2:
        problem("deploy/k8s", "no redis StatefulSet")


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
    args = sys.argv[1:]
    if args[:1] == ["--self-test"] and len(args) == 2:
        self_test(args[1])
        return
    if len(args) != 1:
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
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for _, d in docs if d.get("kind") == "ConfigMap"}
    check_grace_periods(deployments, configmaps)
    check_keda(docs, secrets, deployments, work_queues())
    check_k8s_durability(docs)
    check_rabbitmq_code()
    check_compose(args[0], bins, variables)
    check_redis_memory(args[0], docs)
    check_docs(variables)
    if problems:
        print(f"validate_deploy: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)
    print(f"validate_deploy: compose and {len(docs)} Kubernetes documents agree with {len(bins)} services and {len(variables)} variables")


if __name__ == "__main__":
    main()
