"""The docs say what the code does, and the project's own files are whole.

Names and numbers come from the code's own tables: alert names from the rule
files, log events (warning and above) from a scan of every logging call in
h5watch/, option defaults from ``h5watch.options``, series counts from a
real daemon's scrape, the modes of the state directory from the systemd unit.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from daemon_support import kill_group, read_json_line, start_worker, wait_for

from h5watch import logs, options

RUNBOOK = REPO / "docs" / "runbook.md"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"
RULE_FILES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
EVENT_NAME = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")


# -- what the code says ----------------------------------------------------------


def alert_names() -> list[str]:
    return [rule["alert"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def _method_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def logged_events() -> dict[str, int]:
    """Every event h5watch/ logs, with the most severe level it is logged at.

    An event is the first argument of ``<logger>.<level>("area.name", ...)``,
    or a constant passed to a function that logs one of its parameters as the
    event (``_incident(lock, "hold", "lock.hold_timeout", limit)``)."""
    found: dict[str, int] = {}

    def note(event: Any, level: int) -> None:
        if isinstance(event, str) and EVENT_NAME.fullmatch(event):
            found[event] = max(found.get(event, 0), level)

    for path in sorted((REPO / "h5watch").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        relays: dict[str, list[tuple[int, int]]] = {}
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            params = [arg.arg for arg in function.args.args]
            for call in ast.walk(function):
                if (isinstance(call, ast.Call) and _method_name(call) in logs.LEVELS and call.args
                        and isinstance(call.args[0], ast.Name) and call.args[0].id in params):
                    relays.setdefault(function.name, []).append((params.index(call.args[0].id), logs.LEVELS[_method_name(call)]))
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            name = _method_name(call)
            if name in logs.LEVELS and call.args and isinstance(call.args[0], ast.Constant):
                note(call.args[0].value, logs.LEVELS[name])
            for index, level in relays.get(name or "", []):
                position = index - 1 if isinstance(call.func, ast.Attribute) and index > 0 else index
                if position < len(call.args) and isinstance(call.args[position], ast.Constant):
                    note(call.args[position].value, level)
    return found


def shown_default(name: str) -> str:
    """An option's default as the README writes it."""
    value = options._DEFAULTS[name]
    if name == "state_dir":
        return f"Default `{options.SHARED_STATE_DIR}` when it exists"
    if name == "service":
        return "default: the program name"
    if value is None:
        return "default off"
    if value == ():
        return "default none"
    if isinstance(value, bool):
        return f"default {str(value).lower()}"
    if isinstance(value, float):
        return f"default {value:g}"
    if isinstance(value, str) and not re.fullmatch(r"[\d.]+", value):
        return f"default `{value}`"
    return f"default {value}"


def readme_option_rows() -> dict[str, str]:
    rows = re.findall(r"^\| `(\w+)` \| `H5WATCH_\w+` \| (.+) \|$", README.read_text(), flags=re.MULTILINE)
    return dict(rows)


# -- the runbook -------------------------------------------------------------------


def test_the_event_scan_sees_the_events_it_must():
    events = logged_events()
    assert {"lock.hold_timeout": 50, "lock.wait_timeout": 50, "lock.orphaned": 50, "worker.killed": 50,
            "h5watch.installed": 20}.items() <= events.items()


def test_the_runbook_has_every_alert_in_its_table_and_a_section():
    text = RUNBOOK.read_text()
    for name in alert_names():
        assert f"| [{name}](#{name.lower()}) |" in text, f"docs/runbook.md's alert table has no row for {name}"
        assert re.search(rf"^## {name}$", text, flags=re.MULTILINE), f"docs/runbook.md has no section for {name}"


def test_the_runbook_explains_every_event_of_level_warning_and_above():
    text = RUNBOOK.read_text()
    missing = sorted(event for event, level in logged_events().items()
                     if level >= logs.LEVELS["warning"] and f"`{event}`" not in text)
    assert not missing, f"events logged at warning or above that docs/runbook.md does not name: {missing}"


def test_the_runbook_gives_the_state_directory_the_modes_the_unit_makes():
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("="))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((REPO / "deploy" / "systemd" / "h5watch-daemon.service").read_text())
    base_mode = unit["Service"]["RuntimeDirectoryMode"]
    # Each user's subdirectory: what the process side makes it.
    modes = set(re.findall(r"\bmode (\d{4})\b", RUNBOOK.read_text()))
    assert base_mode in modes
    assert modes <= {base_mode, "0700"}, modes


def test_the_runbook_defaults_are_the_code_s():
    """Every "`option` (default X)" or "`option` (X)" the runbook writes."""
    text = RUNBOOK.read_text()
    for name in options.OPTION_NAMES:
        value = options._DEFAULTS[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        for said in re.findall(rf"`{name}` \((?:default )?([\d.]+)(?: s)?\)", text):
            assert float(said) == value, f"docs/runbook.md says {name} defaults to {said}, the code {value}"


# -- README -------------------------------------------------------------------------


def test_the_readme_options_table_states_each_default_as_the_code():
    rows = readme_option_rows()
    assert set(rows) == set(options.OPTION_NAMES)
    for name in options.OPTION_NAMES:
        assert shown_default(name) in rows[name], f"README's row for {name} does not say {shown_default(name)!r}"


def test_the_readme_says_what_the_ci_script_needs_and_how_long_it_takes():
    text = README.read_text()
    section = text[text.index("bash .ci/run"):text.index("## Using it in a service")]
    for need in ("root", "Debian's apt", "PyPI", "prometheus-alertmanager", "pyenv"):
        assert need in section, need
    for version in re.findall(r"^run_phase \S+ subset_env \S+ (\d+\.\d+)\.\d+", CI_SCRIPT.read_text(), flags=re.MULTILINE):
        assert version in section, f"README does not say .ci/run needs Python {version}"
    assert re.search(r"about \d+ minutes", section)


# -- the project's own files ----------------------------------------------------------


def project_text_files() -> list[Path]:
    files = [README, CI_SCRIPT, REPO / "pyproject.toml", REPO / "setup.py", REPO / "MANIFEST.in"]
    for folder in ("h5watch", "tests", "benchmarks", "docs", "deploy", "grafana"):
        files += [path for path in (REPO / folder).rglob("*") if path.is_file() and path.suffix in
                  {".py", ".pyi", ".c", ".md", ".yml", ".yaml", ".json", ".service", ".toml", ".txt", ""}
                  and "__pycache__" not in path.parts]
    return files


def test_every_markdown_file_named_in_the_project_is_in_the_project():
    names = {path.name for path in REPO.rglob("*.md")}
    outside = set()
    for path in project_text_files():
        text = path.read_text(errors="replace")
        for mentioned in re.findall(r"[\w./-]*[A-Za-z]\.md\b", text):
            if Path(mentioned).name not in names:
                outside.add((str(path.relative_to(REPO)), mentioned))
    assert not outside, f"references to files outside the project: {sorted(outside)}"


def test_the_license_is_bsd_3_clause_and_in_the_sdist(tmp_path):
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert re.search(r"Copyright \(c\) \d{4}, The h5watch authors", text)
    assert "Neither the name of the copyright holder nor the names of its" in text
    assert 'license = "BSD-3-Clause"' in (REPO / "pyproject.toml").read_text()
    build = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (sdist,) = tmp_path.glob("h5watch-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        packed = tar.extractfile(next(name for name in tar.getnames() if name.endswith("/LICENSE")))
        assert packed is not None and packed.read().decode() == text
    assert "LICENSE" in names


# -- .ci/run ----------------------------------------------------------------------------


def test_the_ci_script_announces_each_phase_and_keeps_its_venvs_in_ci_venvs(tmp_path):
    script = CI_SCRIPT.read_text()
    run_phase = re.search(r"^run_phase\(\) \{\n.*?^\}\n", script, flags=re.MULTILINE | re.DOTALL)
    assert run_phase
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run([bash, "-c", f"set -euo pipefail\nPHASES=()\n{run_phase.group(0)}\n"
                             "run_phase 'a phase' true\nrun_phase other false\nprintf '%s\\n' \"${PHASES[@]}\""],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert "== phase: a phase ==" in result.stdout and "== phase: other ==" in result.stdout, result.stdout
    assert re.search(r"other +\d+s +FAILED", result.stdout), result.stdout
    phases = re.findall(r"^run_phase (\"[^\"]+\"|\S+)", script, flags=re.MULTILINE)
    assert len(phases) >= 10
    assert 'VENVS="$REPO/.ci/venvs"' in script
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(?<![\w/])\.venv\b", code), "the script must not touch the quick start's .venv"


def test_the_ci_script_installs_alertmanager_with_prometheus():
    script = CI_SCRIPT.read_text()
    phase = re.search(r"^phase_prometheus\(\) \{\n.*?^\}\n", script, flags=re.MULTILINE | re.DOTALL)
    assert phase
    assert re.search(r"apt-get install .*\bprometheus prometheus-alertmanager\b", phase.group(0))
    for needed in ("amtool", "prometheus-alertmanager", "promtool"):
        assert needed in phase.group(0)
    main_env = re.search(r"^main_env\(\) \{\n.*?^\}\n", script, flags=re.MULTILINE | re.DOTALL)
    assert main_env and re.search(r"\bCI=1\b", main_env.group(0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("ci", "outcome"), [("1", "failed"), ("", "skipped")])
def test_the_amtool_check_fails_without_amtool_under_ci(tmp_path, ci, outcome):
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "H5WATCH_REQUIRE_PROMTOOL")}
    env["PATH"] = str(Path(sys.executable).parent)  # this venv's tools only: no amtool
    if ci:
        env["CI"] = ci
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--rootdir={REPO}",
         str(REPO / "tests" / "test_deploy.py") + "::test_alertmanager_routes_by_severity"],
        capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path,
    )
    assert f"1 {outcome}" in result.stdout, result.stdout[-3000:]
    if ci:
        assert "amtool is not on PATH but CI is set" in result.stdout


# -- docs/deploy.md's series counts, against a real scrape ------------------------------------


@pytest.mark.timeout(120)
def test_the_series_counts_in_the_deploy_doc_are_a_real_daemon_s(tmp_path, state_dir, daemons):
    text = " ".join(DEPLOY_DOC.read_text().split())
    per_lock = int(re.search(r"exports (\d+) series per workload and lock", text).group(1))
    per_workload = int(re.search(r"plus (\d+) per workload", text).group(1))
    per_operation = int(re.search(r"and (\d+) more per operation that held the lock", text).group(1))
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    worker = start_worker(state_dir, "count", str(tmp_path), "5", service="series")
    try:
        read_json_line(worker)
        wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="series", lock="app.x") >= 5, 20,
                 what="the worker's counts in the daemon's /metrics")
        # Operations are written at the worker's next tick.
        wait_for(lambda: {dict(labels).get("lock") for name, labels in daemon.samples()
                          if name == "h5watch_lock_operation_holds_total" and dict(labels).get("workload") == "series"}
                 >= {"app.x", "h5py.phil"}, 20, what="the worker's operations in the daemon's /metrics")
        samples = daemon.samples()
    finally:
        (tmp_path / "release").touch()
        kill_group(worker)
    of_workload = [(name, dict(labels)) for name, labels in samples if dict(labels).get("workload") == "series"]
    locks = {labels["lock"] for _, labels in of_workload if "lock" in labels}
    assert locks == {"app.x", "h5py.phil"}
    for lock in locks:
        assert sum(labels.get("lock") == lock and "operation" not in labels for _, labels in of_workload) == per_lock, lock
        operations = {labels["operation"] for _, labels in of_workload if labels.get("lock") == lock and "operation" in labels}
        assert operations, lock
        for operation in operations:
            assert sum(labels.get("lock") == lock and labels.get("operation") == operation
                       for _, labels in of_workload) == per_operation, (lock, operation)
    without_lock = [name for name, labels in of_workload if "lock" not in labels and name != "h5watch_processes"]
    assert len(without_lock) == per_workload, sorted(without_lock)
