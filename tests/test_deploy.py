"""Static checks of deploy/, grafana/ and docs/runbook.md.

promtool checks the Prometheus configurations and rules and runs the rules'
unit tests; every dashboard query is parsed by promtool too (as a recording
rule). Without promtool these tests skip, unless H5WATCH_REQUIRE_PROMTOOL is
set (CI installs Debian's prometheus package and sets it).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "h5watch.rules.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = REPO / "grafana" / "dashboards" / "h5watch.json"
RUNBOOK = REPO / "docs" / "runbook.md"
DATASOURCE_VARIABLE = "${datasource}"
SEVERITIES = {"critical", "warning", "info"}

# What each Grafana variable becomes when a dashboard query is checked outside
# Grafana: "All" for the label filters, and the intervals Grafana would use
# with a 15 s scrape interval.
DEFAULT_VARIABLES = {
    "instance": ".*",
    "workload": ".*",
    "lock": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "3h",
    "__range_s": "10800",
    "__range_ms": "10800000",
}


# -- helpers shared with test_prometheus_e2e ---------------------------------


# Debian's package of each tool the tests run.
TOOL_PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus", "amtool": "prometheus-alertmanager",
                 "alertmanager": "prometheus-alertmanager", "prometheus-alertmanager": "prometheus-alertmanager"}


def tool(name: str) -> str:
    """Path of a Prometheus tool: skip without it, fail if CI requires it
    (CI or H5WATCH_REQUIRE_PROMTOOL set)."""
    path = shutil.which(name)
    if path:
        return path
    install = f"install Debian's {TOOL_PACKAGES.get(name, 'prometheus')} package"
    for variable in ("CI", "H5WATCH_REQUIRE_PROMTOOL"):
        if os.environ.get(variable):
            pytest.fail(f"{name} is not on PATH but {variable} is set ({install})")
    pytest.skip(f"{name} is not on PATH ({install})")


def run_tool(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, timeout=timeout)


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "record" in rule]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation, for the variables our dashboard uses."""

    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def dashboard_queries(values: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any], str]]:
    """(panel title, target, PromQL with variables substituted) for every panel target."""
    values = {**DEFAULT_VARIABLES, **(values or {})}
    queries = []
    for panel in all_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            queries.append((panel["title"], target, substitute(target["expr"], values)))
    return queries


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {slug(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*$", RUNBOOK.read_text(), flags=re.MULTILINE)}


# -- promtool -----------------------------------------------------------------


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_check_config(config):
    result = run_tool(tool("promtool"), "check", "config", PROMETHEUS / config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_check_config_kubernetes():
    result = run_tool(tool("promtool"), "check", "config", DEPLOY / "kubernetes" / "prometheus-scrape.yml")
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = run_tool(tool("promtool"), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_promtool_test_rules():
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests"
    result = run_tool(tool("promtool"), "test", "rules", *RULE_TESTS, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_dashboard_query_parses(tmp_path):
    """promtool 2.42 has no expression check; a rules file of the queries is one."""
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{index}:check", "expr": expr} for index, (_, _, expr) in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_tool(tool("promtool"), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_would_be_kills_are_never_read_as_kills():
    """A --dry-run daemon counts h5watch_worker_would_kill_total: no alert or
    panel about kills may read it, nor match metric names by a pattern."""
    exprs = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in load_rules()]
    exprs += [(title, expr) for title, _, expr in dashboard_queries()]
    for where, expr in exprs:
        assert "__name__" not in expr, where
        if "h5watch_worker_kills_total" in expr:
            assert "would_kill" not in expr, where
    kill_exprs = [expr for where, expr in exprs if "kill" in where.lower()]
    assert kill_exprs and all("h5watch_worker_kills_total" in expr for expr in kill_exprs)


# -- rules: conventions and coverage -------------------------------------------


def test_alerts_follow_the_conventions():
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"H5Watch(?:[A-Z][a-z0-9]*)+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["summary"].endswith(".") and "{{" not in annotations["summary"], name
        assert "$labels." in annotations["description"] or "$value" in annotations["description"], name
        assert annotations["runbook_url"].endswith(f"docs/runbook.md#{name.lower()}"), name


def test_the_issue_s_alerts_are_all_there():
    names = {rule["alert"] for rule in alerts()}
    assert {
        "H5WatchLockWaitHigh",
        "H5WatchLockHeldTooLong",
        "H5WatchOrphanedLock",
        "H5WatchWorkerKilled",
        "H5WatchForkStalled",
        "H5WatchProcessStuck",
        "H5WatchDaemonDown",
        "H5WatchStateDirScanFailing",
    } <= names
    assert {rule["labels"]["severity"] for rule in alerts()} == SEVERITIES


def test_recording_rules_are_named_level_metric_operations():
    for rule in recording_rules():
        level, metric, operations = rule["record"].split(":")
        assert level == "workload_lock", rule["record"]
        assert metric.startswith("h5watch_") and not metric.endswith("_total"), rule["record"]
        assert re.fullmatch(r"[a-z0-9_]+", operations), rule["record"]
        assert operations.endswith("rate5m"), rule["record"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_every_recording_rule_has_a_unit_test():
    tested = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            tested |= {case["expr"] for case in test.get("promql_expr_test", [])}
    assert {rule["record"] for rule in recording_rules()} - tested == set()


def test_every_runbook_url_has_its_section():
    anchors = runbook_anchors()
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in anchors, f"docs/runbook.md has no heading for #{anchor}"


# -- YAML files ------------------------------------------------------------------


def yaml_files() -> list[Path]:
    files = [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *(REPO / "grafana").rglob("*.yml")]
    return sorted(files)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_yaml_file_parses(path):
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert documents, f"{path} is empty"


def test_alertmanager_routes_by_severity():
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {receiver["name"] for receiver in config["receivers"]}
    route = config["route"]
    assert route["receiver"] in receivers
    assert {child["receiver"] for child in route["routes"]} <= receivers
    amtool = tool("amtool")
    path = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = run_tool(amtool, "check-config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    for severity, receiver in [("critical", "pager"), ("warning", "team-chat"), ("info", "low-priority")]:
        result = run_tool(amtool, "config", "routes", "test", f"--config.file={path}", "alertname=H5WatchOrphanedLock", f"severity={severity}")
        assert result.stdout.strip() == receiver, (severity, result.stdout + result.stderr)


# -- systemd, compose, Kubernetes ------------------------------------------------------


def systemd_unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment]
    parser.read_string((DEPLOY / "systemd" / "h5watch-daemon.service").read_text())
    return parser


def test_systemd_unit_is_hardened():
    service = systemd_unit()["Service"]
    assert service["ExecStart"].split()[1:3] == ["daemon", "--listen"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["RuntimeDirectory"] == "h5watch"
    assert service["RuntimeDirectoryPreserve"] == "yes", "a daemon restart must not delete the workers' state files"
    assert "--state-dir /run/h5watch" in service["ExecStart"]
    # The shared base: root-owned (no User=: the daemon is root, to read every
    # user's subdirectory), sticky and world-writable like /tmp.
    assert service["RuntimeDirectoryMode"] == "1777"
    assert "User" not in service and "DynamicUser" not in service
    assert set(service["CapabilityBoundingSet"].split()) == {"CAP_DAC_OVERRIDE", "CAP_KILL"}


def h5watch_command() -> str | None:
    beside_python = Path(sys.executable).parent / "h5watch"
    return str(beside_python) if beside_python.is_file() else shutil.which("h5watch")


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    h5watch = h5watch_command()
    if analyze is None or h5watch is None:
        pytest.skip("systemd-analyze or the h5watch command is not available")
    unit = tmp_path / "h5watch-daemon.service"
    unit.write_text((DEPLOY / "systemd" / "h5watch-daemon.service").read_text().replace("/usr/local/bin/h5watch", h5watch))
    result = run_tool(analyze, "verify", unit)
    assert result.returncode == 0, result.stdout + result.stderr
    # verify only warns about bad values ("Failed to parse ..., ignoring").
    assert unit.name not in result.stderr, result.stderr
    security = run_tool(analyze, "security", "--offline=true", unit)
    if security.returncode == 0 and "Overall exposure level" in security.stdout:
        level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
        assert level <= 2.0, security.stdout


def test_compose_shares_the_state_directory_and_pids():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prometheus", "alertmanager", "grafana", "h5watch-daemon", "example-worker"} <= set(services)
    state_mounts = {name: [v for v in spec.get("volumes", []) if v.startswith("h5watch-state:")] for name, spec in services.items()}
    assert state_mounts["h5watch-daemon"] == state_mounts["example-worker"] == ["h5watch-state:/run/h5watch"]
    assert services["example-worker"]["pid"] == "service:h5watch-daemon"
    assert services["example-worker"]["environment"]["H5WATCH_STATE_DIR"] == "/run/h5watch"
    assert "h5watch-state" in compose["volumes"]
    assert compose["volumes"]["h5watch-state"]["driver_opts"]["o"] == "mode=1777", "the shared base must be sticky"
    assert "mkdir -p -m 1777 /run/h5watch" in (DEPLOY / build_file(services)).read_text()
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    build = services["h5watch-daemon"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    prometheus_config = next(arg for arg in services["prometheus"]["command"] if arg.startswith("--config.file="))
    assert (PROMETHEUS / Path(prometheus_config.split("=", 1)[1]).name).is_file()


def build_file(services: dict[str, Any]) -> Path:
    build = services["h5watch-daemon"]["build"]
    return Path(build["context"]) / build["dockerfile"]


def test_compose_grafana_paths_match_the_provisioning():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((REPO / "grafana" / "provisioning" / "dashboards" / "h5watch.yml").read_text())["providers"][0]
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"


def kubernetes_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return documents


def test_kubernetes_manifests_are_well_formed():
    documents = kubernetes_documents()
    assert documents
    for document in documents:
        assert document.get("apiVersion") and document.get("kind"), document
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"]
    workloads = [doc for doc in documents if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        volumes = {volume["name"] for volume in pod["volumes"]}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (container["name"], mount["name"])
        daemons = [c for c in pod["containers"] if "daemon" in c.get("args", []) + c.get("command", [])]
        assert len(daemons) == 1
        state_dir = daemons[0]["args"][daemons[0]["args"].index("--state-dir") + 1]
        assert all(
            any(m["mountPath"] == state_dir for m in c.get("volumeMounts", [])) for c in pod["containers"]
        ), "every container must mount the state directory"
        # Pids in state files must be the daemon's pids.
        assert pod.get("shareProcessNamespace") or pod.get("hostPID")
        # The emptyDir is root's, mode 0777: an init step makes it sticky
        # (1777), the only shared mode h5watch trusts, before any container runs.
        [init] = [c for c in pod.get("initContainers", []) if state_dir in c.get("command", []) + c.get("args", [])]
        assert init["command"] == ["chmod", "1777", state_dir]
        assert init["securityContext"]["runAsUser"] == 0 and init["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == state_dir for m in init["volumeMounts"])
        # Probes ask /healthz (cheap), never /metrics.
        probes = [c[kind] for c in daemons for kind in ("readinessProbe", "livenessProbe") if kind in c]
        assert probes and all(probe["httpGet"]["path"] == "/healthz" for probe in probes)


def test_kubernetes_kustomization_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not available")
    result = run_tool(kubectl, "kustomize", DEPLOY / "kubernetes")
    assert result.returncode == 0, result.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(result.stdout) if document]
    assert "Deployment" in kinds and "PodMonitor" in kinds


# -- Grafana ---------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_model():
    dashboard = load_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()["panels"]):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_variables():
    variables = {variable["name"]: variable for variable in load_dashboard()["templating"]["list"]}
    assert {"datasource", "workload", "lock"} <= set(variables)
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    provisioned = yaml.safe_load((REPO / "grafana" / "provisioning" / "datasources" / "h5watch-prometheus.yml").read_text())
    assert datasource["current"]["value"] == provisioned["datasources"][0]["uid"]
    for name in ("instance", "workload", "lock"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == DATASOURCE_VARIABLE
        assert variable["includeAll"] and variable["allValue"] == ".*"
        assert f"{name})" in variable["definition"]


def test_every_panel_queries_the_datasource_variable():
    for panel in all_panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_VARIABLE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_VARIABLE}, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_panel_has_a_unit_and_a_description():
    for panel in all_panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel.get("description"), panel["title"]
        if panel["type"] == "heatmap":
            assert panel["options"]["yAxis"]["unit"] == "s", panel["title"]
            assert all(target.get("format") == "heatmap" for target in panel["targets"]), panel["title"]
        else:
            assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_dashboard_queries_filter_by_the_variables():
    for title, target, _ in dashboard_queries():
        expr = target["expr"]
        assert 'instance=~"$instance"' in expr, title
        # Every panel honours the workload picked (a daemon's own series: the
        # daemons that know one of the workloads picked).
        assert 'workload=~"$workload"' in expr, title
        # Series with a lock label (lock-order inversions are a workload's).
        if re.search(r"h5watch_lock_(?!order_inversions)", expr) or "h5watch_orphaned_locks" in expr:
            assert 'lock=~"$lock"' in expr, title


def held_share_queries() -> list[tuple[str, str]]:
    """(title, PromQL) of every query that turns hold time into a share."""
    queries = []
    for panel in all_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            if "h5watch_lock_hold_seconds_sum" in target["expr"]:
                assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit", panel["title"]
                queries.append((panel["title"], substitute(target["expr"], DEFAULT_VARIABLES)))
    return queries


def test_the_held_share_never_exceeds_100_percent(tmp_path):
    """Three processes of a workload that each hold their lock all the time,
    and one 120 s hold that ends at once: evaluated by promtool, the share
    reaches 100 % and never more."""
    queries = held_share_queries()
    assert queries
    rules = {"groups": [{"name": "held-share", "rules": [
        rule for index, (_, expr) in enumerate(queries) for rule in (
            {"alert": f"AboveOne{index}", "expr": f"({expr}) > 1"},
            {"alert": f"Full{index}", "expr": f"({expr}) > 0.99"},
        )]}]}
    (tmp_path / "held.rules.yml").write_text(yaml.safe_dump(rules))
    phil = 'lock="h5py.phil", instance="h1"'
    series = [
        {"series": f'h5watch_lock_hold_seconds_sum{{workload="busy", {phil}}}', "values": "0+45x40"},
        {"series": 'h5watch_processes{workload="busy", instance="h1", state="ok"}', "values": "2x40"},
        {"series": 'h5watch_processes{workload="busy", instance="h1", state="stuck"}', "values": "1x40"},
        {"series": 'h5watch_processes{workload="busy", instance="h1", state="dead"}', "values": "1x40"},
        {"series": f'h5watch_lock_hold_seconds_sum{{workload="long", {phil}}}', "values": "0x10 120x30"},
        {"series": 'h5watch_processes{workload="long", instance="h1", state="ok"}', "values": "1x40"},
        # Counts left by processes that are all gone: no share at all.
        {"series": f'h5watch_lock_hold_seconds_sum{{workload="gone", {phil}}}', "values": "0+30x40"},
    ]
    full = [{"exp_labels": {"workload": "busy", "lock": "h5py.phil"}}, {"exp_labels": {"workload": "long", "lock": "h5py.phil"}}]
    alert_tests = []
    for index in range(len(queries)):
        for at in ("2m", "3m", "5m", "9m"):
            alert_tests.append({"eval_time": at, "alertname": f"AboveOne{index}", "exp_alerts": []})
        alert_tests.append({"eval_time": "3m", "alertname": f"Full{index}", "exp_alerts": full})
        alert_tests.append({"eval_time": "9m", "alertname": f"Full{index}", "exp_alerts": full[:1]})
    tests = {"rule_files": ["held.rules.yml"], "evaluation_interval": "15s",
             "tests": [{"interval": "15s", "input_series": series, "alert_rule_test": alert_tests}]}
    (tmp_path / "held.test.yml").write_text(yaml.safe_dump(tests))
    result = run_tool(tool("promtool"), "test", "rules", tmp_path / "held.test.yml", timeout=120)
    assert result.returncode == 0, "\n".join(title for title, _ in queries) + "\n" + result.stdout + result.stderr


def test_dashboard_shows_what_the_issue_asks_for():
    exprs = " ".join(target["expr"] for _, target, _ in dashboard_queries())
    for metric in (
        "h5watch_lock_hold_seconds_sum",
        "h5watch_lock_waiters",
        "h5watch_lock_wait_seconds_bucket",
        "h5watch_lock_hold_seconds_bucket",
        "h5watch_lock_contentions_total",
        "h5watch_lock_timeouts_total",
        "h5watch_orphaned_locks_total",
        "h5watch_forks_total",
        "h5watch_fork_wait_seconds_bucket",
        "h5watch_processes",
        "h5watch_worker_kills_total",
    ):
        assert metric in exprs, metric
    types = {panel["type"] for panel in all_panels(load_dashboard()["panels"])}
    assert "heatmap" in types


def test_substitute_replaces_grafana_variables():
    assert substitute('rate(x{a=~"$workload"}[$__rate_interval])', {"workload": "api|batch", "__rate_interval": "1m"}) == (
        'rate(x{a=~"api|batch"}[1m])'
    )
    assert substitute("${lock:regex} [[lock]]", {"lock": "h5py\\.phil"}) == "h5py\\.phil h5py\\.phil"
    with pytest.raises(KeyError):
        substitute("$nope", {})
