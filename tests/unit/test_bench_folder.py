"""bench/ as a product folder: the docs cite results files and scripts that exist, every results file backs a
figure some doc quotes, bench/README.md has a row per script, and the benchmarks' one rank launcher (bench/ranks.py)
starts, watches and stops ranks as it says. No torch: the launcher's ranks are tiny Python processes."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from bench.ranks import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
EXPERIMENTS = RESULTS / "experiments"
PERF_LOG = ROOT / "docs" / "perf-log.md"
DOCS = [ROOT / "README.md", BENCH / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HELPERS = {"ranks.py", "wan_shapes_model.py", "family_shapes.py"}     # used by benchmarks, measure nothing

LINK = re.compile(r"\]\(([^)\s]+)\)")
RESULTS_PATH = re.compile(r"(?<![\w/])(?:\.\./)*bench/results/[^\s`)\]<>,;:]*")
DATED_NAME = re.compile(r"(?<![\w./-])[\w.-]+-\d{4}-\d{2}-\d{2}\.jsonl?\b")
SCRIPT_PATH = re.compile(r"(?<![\w/])bench/[\w/.-]+\.py\b")
TABLE_ROW = re.compile(r"^\| `((?:diagnostics/)?[\w]+\.py)` \|(.*)$", re.MULTILINE)


def _text(doc: pathlib.Path) -> str:
    return doc.read_text(encoding="utf-8")


def _benchmarks() -> set[str]:
    return {p.name for p in BENCH.glob("*.py")} - HELPERS


def _diagnostics() -> set[str]:
    return {f"diagnostics/{p.name}" for p in (BENCH / "diagnostics").glob("*.py")}


def test_perf_log_exists_and_is_dated():
    headings = re.findall(r"^## (\d{4}-\d{2}-\d{2})", _text(PERF_LOG), re.MULTILINE)
    assert headings and headings == sorted(headings)                # oldest first, new entries at the end


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_into_bench_and_docs_resolves(doc):
    broken = []
    for target in LINK.findall(_text(doc)):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if path.is_relative_to(BENCH) or path.is_relative_to(ROOT / "docs"):
            if not path.exists():
                broken.append(target)
    assert not broken, f"{doc.name} links to missing files: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_results_file_a_doc_names_exists(doc):
    text = _text(doc)
    missing = []
    for match in RESULTS_PATH.finditer(text):
        mention = match.group(0).rstrip(".")
        if text[match.end():match.end() + 1] == "<":
            continue                                     # a template: bench/results/previews-<device>-<date>.json
        assert "*" not in mention and "{" not in mention, f"{doc.name} cites files by pattern: {mention}"
        if not (ROOT / mention.lstrip("./")).exists():
            missing.append(mention)
    names = {p.name for p in RESULTS.rglob("*") if p.is_file()}
    missing += [name for name in DATED_NAME.findall(text) if name not in names]
    assert not missing, f"{doc.name} names results files that do not exist: {missing}"
    elided = re.findall(r"`[^`\n]*…[^`\n]*`", text)
    assert not elided, f"{doc.name} cites results by elided names, which no one can check: {elided}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bench_script_a_doc_names_exists(doc):
    missing = [path for path in SCRIPT_PATH.findall(_text(doc)) if not (ROOT / path).is_file()]
    assert not missing, f"{doc.name} names bench scripts that do not exist: {missing}"


def test_every_results_file_backs_a_claim():
    """One file per figure: each file directly in bench/results/ is cited by the README or bench/README.md, and each
    experiment's run by the perf log (evidence for its story, not a claim)."""
    claims = _text(ROOT / "README.md") + _text(BENCH / "README.md")
    uncited = [p.name for p in RESULTS.iterdir() if p.is_file() and p.name not in claims]
    assert not uncited, f"results files no README cites (move them to results/experiments/): {uncited}"
    log = _text(PERF_LOG)
    unlogged = [p.name for p in EXPERIMENTS.iterdir() if p.is_file() and p.name not in log]
    assert not unlogged, f"experiment runs docs/perf-log.md does not cite: {unlogged}"


def test_bench_readme_has_one_row_per_script():
    text = _text(BENCH / "README.md")
    rows = dict(TABLE_ROW.findall(text))
    assert set(rows) == _benchmarks() | _diagnostics()
    for script, cells in rows.items():
        what, claim, command, results = (cell.strip() for cell in cells.rstrip(" |").split(" | "))
        assert what and claim and results, script
        assert f"bench/{script}" in command, f"{script}: its command runs something else: {command}"
        if script.startswith("diagnostics/"):
            assert "perf-log.md" in claim, f"{script}: a diagnostic backs no README figure; say where it is used"
        else:
            assert LINK.search(results), f"{script}: no results file linked"
    for helper in HELPERS:
        assert f"`{helper}`" in text, f"bench/README.md does not say what {helper} is for"


def test_benchmarks_kept_in_bench_are_the_ones_the_readme_quotes():
    """A script in bench/ (not diagnostics/) is there because the README quotes it: by name or by a results file
    its bench/README.md row lists."""
    readme = _text(ROOT / "README.md")
    rows = dict(TABLE_ROW.findall(_text(BENCH / "README.md")))
    for script in _benchmarks():
        results = re.findall(r"\(results/([^)]+)\)", rows[script])
        assert f"bench/{script}" in readme or any(name in readme for name in results), \
            f"the README quotes nothing from bench/{script}: move it to bench/diagnostics/"


# The launcher ---------------------------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return ["-c", code]


def test_ranks_get_the_environment_the_gang_launcher_gives(tmp_path):
    code = ("import json, os, pathlib; pathlib.Path(os.environ['OUT'], os.environ['RANK']).write_text("
            "json.dumps(dict(os.environ)))")
    run = run_ranks(_python(code), 2, {"OUT": str(tmp_path), "MASTER_PORT": "1", "EXTRA": "yes"})
    assert run.ok and run.codes == [0, 0]
    envs = [json.loads((tmp_path / str(rank)).read_text()) for rank in range(2)]
    for rank, env in enumerate(envs):
        assert (env["RANK"], env["LOCAL_RANK"]) == (str(rank), str(rank))
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("2", "2")
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["EXTRA"] == "yes"
        assert env["DIFFMESH_PARENT_PID"] == str(os.getpid())       # the lifeline
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] != "1"    # the caller's env cannot break the rendezvous


def test_capture_keeps_rank_zeros_output_and_not_the_others():
    code = "import os, sys; print('from rank', os.environ['RANK']); print('rank 0 warns', file=sys.stderr)"
    run = run_ranks(_python(code), 2, capture=True)
    assert run.ok
    assert "from rank 0" in run.output and "rank 0 warns" in run.output
    assert "from rank 1" not in run.output


def test_a_failing_rank_stops_the_others_at_once():
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    started = time.monotonic()
    run = run_ranks(_python(code), 2, failure_grace_s=0.2)
    assert time.monotonic() - started < 10                 # rank 0 would have waited a minute
    assert not run.ok and run.codes[1] == 3 and run.codes[0] != 0


def test_a_rank_stuck_after_rank_zero_reported_is_not_a_failure():
    code = "import os, time; os.environ['RANK'] == '0' or time.sleep(60)"
    started = time.monotonic()
    run = run_ranks(_python(code), 2, teardown_s=0.3)
    assert time.monotonic() - started < 10
    assert run.ok and run.codes == [0, 0]


def test_past_the_timeout_every_rank_is_killed():
    started = time.monotonic()
    run = run_ranks(_python("import time; time.sleep(60)"), 2, timeout=0.5)
    assert time.monotonic() - started < 10
    assert run.timed_out and not run.ok and all(code != 0 for code in run.codes)


def test_a_rank_ends_when_its_driver_is_killed(tmp_path):
    """bind_to_driver(): a driver that dies by SIGKILL (no finally runs) leaves no rank holding a device."""
    pid_file = tmp_path / "rank.pid"
    rank = ("from bench.ranks import bind_to_driver; bind_to_driver(); import os, pathlib, time; "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)")
    driver = f"from bench.ranks import run_ranks; run_ranks(['-c', {rank!r}], 1)"
    process = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and process.poll() is None, "the rank never started"
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 5
        while _alive(pid):
            assert time.monotonic() < deadline, "the rank outlived its driver"
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
