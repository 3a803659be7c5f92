"""``make mutate``: mutation testing of the critical modules with cosmic-ray, each module against its own tests.

For each module of ``bench/mutate/modules.toml`` (one or more source files and the pytest arguments of
their tests): ``cosmic-ray init`` lists the mutants, the operator selection below drops the redundant
ones, a baseline run checks that the tests pass unmutated (and sets the timeout), ``cosmic-ray exec``
applies each mutant to the file in place and runs the tests (through ``forkserver.py``: a warm pytest
that reads boxrefine afresh from disk for every mutant; the editable install serves the mutated file),
and the results are classified against the checked-in list of equivalent mutants
(``bench/mutate/equivalent.toml``). Writes, under ``--out`` (``bench/out/mutate``):

- ``report.md`` / ``report.json``: per module mutants, killed, survived, timeout, equivalent, the share
  that survived and the time it took; below the table every survivor (file:line, operator, the line
  before → after) and every equivalent mutant with its reason;
- ``<module>/session.sqlite`` and ``<module>/cosmic-ray.toml``: cosmic-ray's own session
  (``cr-report``, ``cr-html`` read it).

Operator selection (cosmic-ray's full set makes ~6,400 mutants of these 19 files, 10 alternatives per
binary operator): each arithmetic operator is replaced by its inverse (+ ↔ −, × ↔ ÷, // → /, % → //,
** → ×, << ↔ >>, | ↔ &, ^ → |), each comparison by its boundary and its negation (< → ≤ and ≥, ≤ → <
and >, == ↔ !=, is ↔ is not), a number by itself + 1, unary minus and ``not`` and ``~`` removed; all
of cosmic-ray's other operators (``not`` added, ``and`` ↔ ``or``, True ↔ False, break ↔ continue, an
exception type replaced, a decorator removed, a loop made to run zero times) are kept. Mutants inside
type annotations (text only, under ``from __future__ import annotations``) are left out.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from bench.machine import load  # noqa: E402

KEEP_BINARY = {("Add", "Sub"), ("Sub", "Add"), ("Mul", "Div"), ("Div", "Mul"), ("FloorDiv", "Div"),
               ("Mod", "FloorDiv"), ("Pow", "Mul"), ("LShift", "RShift"), ("RShift", "LShift"),
               ("BitOr", "BitAnd"), ("BitAnd", "BitOr"), ("BitXor", "BitOr")}
KEEP_COMPARISON = {("Eq", "NotEq"), ("NotEq", "Eq"), ("Lt", "LtE"), ("Lt", "GtE"), ("LtE", "Lt"), ("LtE", "Gt"),
                   ("Gt", "GtE"), ("Gt", "LtE"), ("GtE", "Gt"), ("GtE", "Lt"), ("Is", "IsNot"), ("IsNot", "Is")}
KEEP_UNARY = {("USub", "UAdd"), ("Delete", "Not"), ("Delete", "USub"), ("Delete", "Invert")}
_REPLACE = re.compile(r"core/Replace(Binary|Comparison|Unary)Operator_(\w+?)_(\w+)$")


def selected(operator: str, occurrence: int) -> bool:
    """Whether a mutant of cosmic-ray's ``operator`` is in the selection (module docstring)."""
    if operator == "core/NumberReplacer":
        return occurrence % 2 == 0  # cosmic-ray gives each number +1 (even occurrences) and -1: keep +1
    m = _REPLACE.match(operator)
    if not m:
        return True
    kind, a, b = m.groups()
    return (a, b) in {"Binary": KEEP_BINARY, "Comparison": KEEP_COMPARISON, "Unary": KEEP_UNARY}[kind]


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) (line, col) of every type annotation of a source file."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        anns = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            anns = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
            anns.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            anns = [node.annotation]
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in anns if n is not None]
    return spans


def in_spans(pos: tuple[int, int], spans: list[tuple[tuple[int, int], tuple[int, int]]]) -> bool:
    return any(start <= tuple(pos) < end for start, end in spans)


@dataclass
class Mutant:
    file: str
    line: int
    operator: str
    before: str
    after: str
    outcome: str  # killed, survived, timeout, equivalent, incompetent
    reason: str = ""


@dataclass
class ModuleResult:
    name: str
    files: list[str]
    tests: list[str]
    baseline_s: float = 0.0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    mutants: list[Mutant] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share_survived(self) -> float:
        scored = self.total - self.counts.get("equivalent", 0)
        return self.counts.get("survived", 0) / scored if scored else 0.0


def load_equivalent(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return tomllib.loads(path.read_text()).get("equivalent", [])


def diff_lines(diff: str) -> tuple[str, str]:
    """The line a mutant changed, before and after (stripped), from cosmic-ray's unified diff."""
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return (minus[0] if minus else ""), (plus[0] if plus else "")


def equivalent_reason(m: Mutant, known: list[dict[str, str]]) -> str | None:
    for e in known:
        if (e["file"] == m.file and e["operator"] == m.operator and e["before"].strip() == m.before
                and e["after"].strip() == m.after):
            return e["reason"]
    return None


def cosmic(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cosmic-ray"), *args], cwd=REPO, check=check, capture_output=True, text=True)


class ForkServer:
    """``forkserver.py serve`` for the length of a run."""

    def __init__(self, socket_path: Path):
        self.socket = socket_path
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, str(HERE / "forkserver.py"), "serve", "--socket", str(socket_path)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            raise SystemExit(f"mutate: the test server did not start ({line!r})")

    def command(self, pytest_args: list[str]) -> str:
        args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "mutate_fast", "--no-header", "-W", "ignore", *pytest_args]
        return " ".join([sys.executable, str(HERE / "forkserver.py"), "client", "--socket", str(self.socket), "--",
                         *args])

    def close(self) -> None:
        subprocess.run([sys.executable, str(HERE / "forkserver.py"), "stop", "--socket", str(self.socket)],
                       check=False, capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_module(spec: dict, server: ForkServer, out: Path, known: list[dict[str, str]]) -> ModuleResult:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    res = ModuleResult(spec["name"], list(spec["files"]), list(spec["tests"]))
    t0 = time.monotonic()
    mdir = out / spec["name"]
    mdir.mkdir(parents=True, exist_ok=True)
    session, cfg = mdir / "session.sqlite", mdir / "cosmic-ray.toml"
    session.unlink(missing_ok=True)
    command = server.command(res.tests)
    # baseline: the tests pass unmutated; the timeout follows from their time
    b0 = time.monotonic()
    base = subprocess.run(command.split(" "), cwd=REPO, capture_output=True, text=True)
    res.baseline_s = time.monotonic() - b0
    if base.returncode != 0:
        raise SystemExit(f"mutate: {spec['name']}: the tests fail without a mutant:\n{base.stdout[-3000:]}")
    timeout = max(float(spec.get("timeout", 0)), 30.0, 8 * res.baseline_s)
    cfg.write_text("[cosmic-ray]\n"
                   f"module-path = {json.dumps(res.files)}\n"
                   f"timeout = {timeout:.1f}\n"
                   "excluded-modules = []\n"
                   f"test-command = {json.dumps(command)}\n\n"
                   "[cosmic-ray.distributor]\nname = \"local\"\n")
    cosmic("init", str(cfg), str(session))
    spans = {f: annotation_spans(REPO / f) for f in res.files}
    with use_db(str(session), WorkDB.Mode.open) as db:
        skip = [item.job_id for item in db.pending_work_items
                if not all(selected(m.operator_name, m.occurrence)
                           and not in_spans(m.start_pos, spans.get(str(m.module_path), [])) for m in item.mutations)]
        if skip:
            db.set_multiple_results(skip, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    print(f"{spec['name']}: baseline {res.baseline_s:.1f} s, timeout {timeout:.0f} s, "
          f"running the mutants ...", flush=True)
    cosmic("exec", str(cfg), str(session))
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            mut = item.mutations[0]
            before, after = diff_lines(result.diff or "")
            if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome == "incompetent":
                outcome = "incompetent"  # the mutant could not be applied or tested (e.g. not valid Python)
            elif result.test_outcome == "survived":
                outcome = "survived"
            elif (result.output or "").strip() == "timeout":
                outcome = "timeout"
            else:
                outcome = "killed"
            m = Mutant(str(mut.module_path), int(mut.start_pos[0]), mut.operator_name, before, after, outcome)
            if outcome == "survived":
                reason = equivalent_reason(m, known)
                if reason is not None:
                    m.outcome, m.reason = "equivalent", reason
            res.mutants.append(m)
    for m in res.mutants:
        res.counts[m.outcome] = res.counts.get(m.outcome, 0) + 1
    res.seconds = time.monotonic() - t0
    return res


COLUMNS = ("killed", "survived", "timeout", "equivalent", "incompetent")


def write_report(results: list[ModuleResult], out: Path, started: float, load: tuple[str, str]) -> None:
    total_s = time.time() - started
    lines = ["# Mutation testing (`make mutate`)", "",
             f"cosmic-ray, operator selection and test selection: `bench/mutate/`. Run time {total_s / 60:.1f} min; "
             f"load average before {load[0]}, after {load[1]} (`/proc/loadavg`).", "",
             "| module | files | mutants | killed | survived | timeout | equivalent | incompetent | survived % "
             "| time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.counts
        lines.append(f"| {r.name} | {', '.join(r.files)} | {r.total} | "
                     + " | ".join(str(c.get(k, 0)) for k in COLUMNS)
                     + f" | {100 * r.share_survived():.1f} % | {r.seconds / 60:.1f} min |")
    lines += ["", "Survived % = survived / (mutants − equivalent); timeouts count as killed.", ""]
    for r in results:
        surv = [m for m in r.mutants if m.outcome == "survived"]
        eq = [m for m in r.mutants if m.outcome == "equivalent"]
        if not surv and not eq:
            continue
        lines += [f"## {r.name}", "", f"Tests: `{' '.join(r.tests)}`", ""]
        for m in sorted(surv, key=lambda m: (m.file, m.line)):
            lines.append(f"- survived `{m.file}:{m.line}` {m.operator}: `{m.before}` → `{m.after}`")
        for m in sorted(eq, key=lambda m: (m.file, m.line)):
            lines.append(f"- equivalent `{m.file}:{m.line}` {m.operator}: `{m.before}` → `{m.after}` — {m.reason}")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(
        {"seconds": total_s, "load_before": load[0], "load_after": load[1],
         "modules": [{**{k: v for k, v in asdict(r).items() if k != "mutants"}, "total": r.total,
                      "survived_share": r.share_survived(), "mutants": [asdict(m) for m in r.mutants]}
                     for r in results]}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=str(HERE / "modules.toml"), help="module table (default: %(default)s)")
    ap.add_argument("--equivalent", default=str(HERE / "equivalent.toml"), help="equivalent mutants")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "mutate"), help="report folder")
    ap.add_argument("--only", nargs="*", default=None, help="module names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the modules and their tests, then exit")
    a = ap.parse_args()
    table = tomllib.loads(Path(a.modules).read_text())["module"]
    if a.list:
        for spec in table:
            print(f"{spec['name']:<12} {' '.join(spec['files'])}\n{'':<12} tests: {' '.join(spec['tests'])}")
        return
    if a.only:
        unknown = set(a.only) - {s["name"] for s in table}
        if unknown:
            raise SystemExit(f"mutate: unknown module(s) {sorted(unknown)}; --list shows them")
        table = [s for s in table if s["name"] in a.only]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    known = load_equivalent(Path(a.equivalent))
    started, load0 = time.time(), load()
    files = [REPO / f for s in table for f in s["files"]]
    originals = {f: f.read_bytes() for f in files}  # put back whatever an interrupted run leaves mutated
    server = ForkServer(out / "forkserver.sock")
    results: list[ModuleResult] = []
    try:
        for spec in table:
            r = run_module(spec, server, out, known)
            results.append(r)
            print(f"{r.name}: {r.total} mutants, " + ", ".join(f"{k} {r.counts.get(k, 0)}" for k in COLUMNS)
                  + f" ({100 * r.share_survived():.1f} % survived, {r.seconds / 60:.1f} min)", flush=True)
            write_report(results, out, started, (load0, load()))
    finally:
        server.close()
        for f, text in originals.items():
            if f.read_bytes() != text:
                f.write_bytes(text)
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
