"""Every command in the docs runs.

The ```bash blocks of README.md and docs/*.md are split into commands (`\\`
continuations joined, comments dropped, a heredoc kept with its command) and run
in order, README first (the pages build on its runs/quickstart), then the pages by
name, all in one scratch directory holding links to the repository's configs/,
data/ and tools/: runs/ and exports/ land there, never in the repository.
examples/*/README.md are left to the examples' own tests.

A block that cannot run here carries, on the line right before it,
`<!-- not run by tests: REASON -->`; the reason is required. Any other command is
run, so a new command in the docs is either run or marked. How one runs:

- Speed: a command that trains, evaluates or serves gets overrides appended (SPEED
  by program, EXCEPTIONS by command). The docs show the real run; this test checks
  that the same command, with the same config and arguments, works end to end, in
  a few steps (the quickstart's learning is tests/test_quickstart.py's business).
- `python -m maxllm.serve` starts in the background; its block's later commands are
  its clients. The block's port numbers (`--port N`, `localhost:N`,
  `127.0.0.1:N`, and 8000 for a server given none) are mapped to free ports.
- A command ending in `&` runs in the background until `wait` or the block's end.
- A command already run in an earlier file, outside a server's block, is not run
  again: what it made is there.
- A path the docs leave to the reader (PLACEHOLDERS) is a link to something an
  earlier command made; README's install and test-suite commands are .ci/run's
  (CI_COMMANDS).
- Each command is checked by its exit status (EXPECT_FAILURE lists the commands
  whose point is an error) and by what it made or printed (`_check`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = ("configs", "data", "tools")  # the repository folders the commands read

TRAIN_FAST = ("train.steps=3 checkpoint.every_steps=3 logging.every_steps=1 eval.limit=2 "
              "sample.max_new_tokens=4")
MOE_MAMBA_FAST = f"{TRAIN_FAST} model.num_layers=2 sample.prompts=[]"
SPEED = {  # program: appended to every command that runs it
    "maxllm.train": TRAIN_FAST,  # not a dry run: it compiles one step and stops
    "maxllm.eval": "--limit 4",
    "maxllm.serve": "--slots 1 --max-total-tokens 64",  # fewer prefill shapes to compile at start-up
}
EXCEPTIONS = {  # command: appended instead of SPEED's
    # the page's point is the resume: the run before stopped at step 3
    "python -m maxllm.train --config configs/quickstart.yml train.steps=600":
        TRAIN_FAST.replace("train.steps=3", "train.steps=5"),
    # The MoE and Mamba quickstarts: 2 layers, not 4 or 8 (their layers are unrolled,
    # so compile time grows with depth), and no greedy continuations at the end
    # (tests/test_moe.py and test_mamba.py check these families' decoding).
    "python -m maxllm.train --config configs/quickstart-moe.yml": MOE_MAMBA_FAST,
    "python -m maxllm.train --config configs/quickstart-mamba.yml": MOE_MAMBA_FAST,
}
EXPECT_FAILURE = {  # command: (exit status, text in its output)
    "python -m maxllm.train --config configs/quickstart.yml train.stepz=10":
        (2, "error: unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    "python -m maxllm.train --config configs/quickstart.yml model.attention=flash":
        (2, "error: config key 'model.attention': Input should be 'xla', 'cudnn' or 'splash' (got 'flash')"),
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m maxllm.train "
    "--config configs/quickstart.yml mesh.fsdp=2 mesh.tensor=4 --dry-run":
        (2, "error: parameter layers/attn/wk: dimension 2 (kv_heads=2) does not divide mesh axis tensor=4"),
}
PLACEHOLDERS = {  # a path the docs leave to the reader: what stands for it here
    "path/to/hf_llama": "exports/quickstart",  # README: "bring a Hugging Face Llama in"
}
CI_COMMANDS = {  # unmarked README commands that set up or test the checkout itself
    'pip install -e ".[dev]"': "installs from the package index: .ci/run installs a fresh clone",
    "python -m pytest": "the whole suite, which this test is part of: .ci/run runs it",
}
TIMEOUT = 300  # seconds for one command: longer means it needs speed overrides
SERVER_START = 300  # seconds for a server to answer /health


@dataclasses.dataclass
class Block:
    doc: Path
    line: int
    commands: list[str]
    not_run: str | None  # the marker's reason

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def doc_blocks(doc: Path) -> list[Block]:
    text = doc.read_text()
    out = []
    for fence in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, fence.start()) + 1  # the fence's
        before = text[: fence.start()].rstrip("\n").rpartition("\n")[2].strip()
        not_run = None
        if before.startswith("<!--"):
            marker = re.fullmatch(r"<!--\s*not run by tests:(.*)-->", before)
            assert marker and marker.group(1).strip(), (
                f"{doc.name}:{line - 1}: a marker reads `<!-- not run by tests: REASON -->`, got {before!r}")
            not_run = marker.group(1).strip()
        out.append(Block(doc, line + 1, split_commands(fence.group(1)), not_run))
    return out


def split_commands(body: str) -> list[str]:
    """One string per command: continuations joined, comments dropped, a heredoc's
    lines kept after its command."""
    lines, commands = body.splitlines(), []
    i = 0
    while i < len(lines):
        command = _uncomment(lines[i]).rstrip()
        i += 1
        while command.endswith("\\") and i < len(lines):
            command = command[:-1].rstrip() + " " + _uncomment(lines[i]).strip()
            i += 1
        command = command.strip()
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", command)
        if heredoc:
            end = lines.index(heredoc.group(1), i)
            command, i = "\n".join([command, *lines[i:end], lines[end]]), end + 1
        if command:
            commands.append(command)
    return commands


def _uncomment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def program(command: str) -> str:
    """`maxllm.train` for `python -m maxllm.train ...`, else the first word after
    any VAR=value assignments."""
    words = _words(command)
    if words[:2] == ["python", "-m"] and len(words) > 2:
        return words[2]
    return words[0] if words else ""


def _env_and_words(command: str) -> tuple[dict[str, str], list[str]]:
    """The command's leading VAR=value assignments, and its words after them."""
    words, env = shlex.split(command.split("\n")[0].rstrip("&")), {}
    while words and re.fullmatch(r"\w+=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _words(command: str) -> list[str]:
    return _env_and_words(command)[1]


def _arg(words: list[str], flag: str) -> str | None:
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.partition("=")[2]
    return None


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in doc_blocks(doc)]


# ---------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class Job:
    where: str
    command: str  # as the docs write it
    shell: str  # as run: speed overrides appended, ports mapped
    proc: subprocess.Popen
    log: Path
    started: float


class Workspace:
    """The scratch directory and what has run in it."""

    def __init__(self, root: Path):
        self.root = root
        for name in LINKED:
            (root / name).symlink_to(ROOT / name)
        for placeholder, target in PLACEHOLDERS.items():
            link = root / placeholder
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(root / target, link.parent))
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.ran: dict[str, str] = {}  # command -> the file that ran it
        self.times: list[tuple[float, str, str]] = []
        self._logs = 0

    def run_block(self, block: Block) -> None:
        ports: dict[str, int] = {}
        serves = any(program(c) == "maxllm.serve" for c in block.commands)
        servers, background = [], []
        try:
            for i, command in enumerate(block.commands):
                where = f"{block.where} command {i + 1}"
                if command in CI_COMMANDS:
                    continue
                if not serves and self.ran.get(command, block.doc.name) != block.doc.name:
                    continue  # made by the same command in an earlier file
                self.ran.setdefault(command, block.doc.name)
                shell = _shell(command, ports)
                if program(command) == "maxllm.serve":
                    servers.append(self._start(where, command, shell))
                    self._wait_healthy(servers[-1], _port_of(shell))
                elif command == "wait":
                    self._finish(background)
                elif command.endswith("&"):
                    background.append(self._start(where, command, shell.rstrip("& ")))
                else:
                    self._finish([self._start(where, command, shell)])
            self._finish(background)
        finally:
            for job in [*background, *servers]:
                _stop(job.proc)

    def _start(self, where: str, command: str, shell: str) -> Job:
        self._logs += 1
        log = self.root / f".docs-log-{self._logs}.txt"
        with open(log, "w") as f:
            proc = subprocess.Popen(["bash", "-c", shell],
                                    cwd=self.root, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Job(where, command, shell, proc, log, time.monotonic())

    def _finish(self, jobs: list[Job]) -> None:
        while jobs:
            job = jobs.pop(0)
            try:
                rc = job.proc.wait(timeout=max(1.0, job.started + TIMEOUT - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(job.proc)
                pytest.fail(f"{job.where} took over {TIMEOUT} s (give it speed overrides in "
                            f"test_docs.SPEED or EXCEPTIONS):\n{job.shell}\n{_tail(job.log)}")
            self.times.append((time.monotonic() - job.started, job.where, job.command))
            output = job.log.read_text()
            problem = _check(job.command, rc, output, self.root)
            assert problem is None, f"{job.where}: {problem}\n$ {job.shell}\n{_tail(job.log)}"

    def _wait_healthy(self, job: Job, port: int) -> None:
        deadline = job.started + SERVER_START
        while True:
            assert job.proc.poll() is None, f"{job.where}: the server exited\n$ {job.shell}\n{_tail(job.log)}"
            assert time.monotonic() < deadline, f"{job.where}: no /health in {SERVER_START} s\n{_tail(job.log)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)  # waiting for the port to open; no result depends on it
        self.times.append((time.monotonic() - job.started, job.where, job.command))


def _shell(command: str, ports: dict[str, int]) -> str:
    """The command as run: ports mapped to free ones, speed overrides appended."""
    def free(match: re.Match) -> str:
        if match.group(2) not in ports:
            ports[match.group(2)] = free_port()
        return f"{match.group(1)}{ports[match.group(2)]}"

    shell = re.sub(r"(--port[ =]|localhost:|127\.0\.0\.1:)(\d+)\b", free, command)
    extra = _speed(command)
    if program(command) == "maxllm.serve" and _arg(_words(command), "--port") is None:
        extra += f" --port {ports.setdefault('8000', free_port())}"
    if not extra:
        return shell
    background = shell.endswith("&")
    return f"{shell.rstrip('& ')} {extra.strip()}" + (" &" if background else "")


def _speed(command: str) -> str:
    if command in EXCEPTIONS:
        return EXCEPTIONS[command]
    if program(command) == "maxllm.train" and "--dry-run" in _words(command):
        return ""  # it compiles one step and stops
    return SPEED.get(program(command), "")


def _port_of(shell: str) -> int:
    return int(_arg(_words(shell), "--port"))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text()[-chars:]


def _check(command: str, rc: int, output: str, root: Path) -> str | None:
    """None when the command did what it is for; else what went wrong."""
    status, text = EXPECT_FAILURE.get(command, (0, None))
    if rc != status:
        return f"exit status {rc}, expected {status}"
    if text is not None:
        return None if text in output else f"the output lacks {text!r}"
    words, prog = _words(command), program(command)
    if prog == "maxllm.train" and "--dry-run" in words:
        return None if re.search(r"peak +[\d.]+ GB", output) else "no peak memory in the dry run's report"
    if prog == "maxllm.train":
        env = _env_and_words(command)[0]
        if "JAX_PROCESS_ID" in env:
            banner = f"jax.distributed: process {env['JAX_PROCESS_ID']} of {env['JAX_NUM_PROCESSES']}"
            if banner not in output:
                return f"no {banner!r}"
            if env["JAX_PROCESS_ID"] != "0":
                return None
        return None if re.search(r"step +\d+ \| loss \d", output) else "no training step logged"
    if prog in ("maxllm.export", "maxllm.import_hf"):
        made = root / _arg(words, "--out") / ("config.json" if prog == "maxllm.export" else "checkpoints/0")
        return None if made.exists() else f"{made} was not written"
    if prog == "maxllm.eval":
        out = _arg(words, "--out")
        if out and "results" not in json.loads((root / out).read_text()):
            return f"{out} holds no results"
        return None if re.search(r"^\|.*\|$", output, re.M) else "no results table"
    if prog == "data_pipelines.run":
        out = next(w.partition("=")[2] for w in words if w.startswith("output_dir="))
        return None if (root / out / "tokens" / "manifest.json").is_file() else f"no {out}/tokens"
    if prog == "curl":
        body = json.loads(output)
        return f"the server answered {body}" if "error" in body else None
    return None


# ---------------------------------------------------------------------------------
# Tests


def test_every_command_is_run_or_marked_with_a_reason():
    """Parses every block (a malformed marker fails here), and checks that each
    table entry names a command that is still in the docs and run by this test."""
    blocks = all_blocks()
    run = [c for b in blocks if not b.not_run for c in b.commands]
    marked = [(b.where, b.not_run, c) for b in blocks if b.not_run for c in b.commands]
    for table in (EXCEPTIONS, EXPECT_FAILURE, CI_COMMANDS):
        for command in table:
            assert command in run, f"not a command of an unmarked block any more: {command!r}"
    for placeholder in PLACEHOLDERS:
        assert any(placeholder in c for c in run), placeholder
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "pip install" in ci_script and '-e ".[dev]"' in ci_script and "python -m pytest" in ci_script
    ci = [c for c in run if c in CI_COMMANDS]
    print(f"\n{len(run) + len(marked)} commands in {len(blocks)} blocks: {len(run) - len(ci)} run here, "
          f"{len(ci)} by .ci/run, {len(marked)} marked not run:")
    for command in ci:
        print(f"  README.md: {command}  ({CI_COMMANDS[command]})")
    for where, reason, command in marked:
        print(f"  {where}: {command.splitlines()[0][:70]}  ({reason})")


def test_relative_links_lead_to_files():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.partition("#")[0]
            if path and not re.match(r"\w+:", path):
                assert (doc.parent / path).exists(), f"{doc.relative_to(ROOT)}: link to {target}"


def test_splitting_joins_continuations_drops_comments_and_keeps_heredocs():
    body = ("a --x 1 \\\n    --y '#not' # comment\n# a line of comment\n\n"
            "cat > f.yml <<'EOF'\nk: v  # kept\nEOF\nb &\n")
    assert split_commands(body) == ["a --x 1 --y '#not'", "cat > f.yml <<'EOF'\nk: v  # kept\nEOF", "b &"]
    assert program("A=1 B=2 python -m maxllm.train --config x") == "maxllm.train"
    ports: dict[str, int] = {}
    shell = _shell("python -m maxllm.serve --model runs/quickstart --port 8000", ports)
    assert shell.endswith(SPEED["maxllm.serve"]) and f"--port {ports['8000']} " in shell
    assert _shell("curl -s localhost:8000/health", ports) == f"curl -s localhost:{ports['8000']}/health"


@pytest.mark.slow
def test_the_docs_commands_run(tmp_path):
    workspace = Workspace(tmp_path)
    start, cpu = time.monotonic(), _children_cpu()
    try:
        for block in all_blocks():
            if not block.not_run:
                workspace.run_block(block)
    finally:
        print(f"\ndocs commands: {time.monotonic() - start:.0f} s, {_children_cpu() - cpu:.0f} s of CPU")
        for seconds, where, command in sorted(workspace.times, reverse=True):
            print(f"  {seconds:6.1f} s  {where}  {command.splitlines()[0][:90]}")
