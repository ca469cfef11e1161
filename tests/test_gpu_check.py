"""benchmarks/gpu_check.sh, the real-scale check for an accelerator machine, run as `--tiny` on the CPU (tiny configs
of all three families) so the script cannot rot while no device is lent: every row of every model at every length,
numbers that parse, the out-of-memory path (the hidden `--oom-at`), rows left out with their reason, `--out`;
and the budget and interleaving rules of its timing loop, with stand-in contenders.
No timing is asserted (numbers measured on a shared CPU are noise): only the structure and the decisions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ("512", "1,024")
# written out here, not read from the script: a script that drops or renames a row fails
ROWS = ("HF sdpa forward, use_cache=False", "hooked_av forward", "attention_rows, last query",
        "attention_rows, last 64 queries", "group_attention_mass", "knockout sweep (run_rows)",
        "HF eager, output_attentions=True", "nnsight HF backend, one cell", "generate, plain",
        "generate under a knockout")
EAGER = "HF eager, output_attentions=True"
MEASURED_EVERYWHERE = ROWS[:6]
LEFT_OUT = {"qwen3_omni": ROWS[6:], "video_salmonn2": ROWS[6:], "qwen2_5_omni": ()}
TITLES = {"qwen2_5_omni": "Qwen2.5-Omni-7B Thinker", "qwen3_omni": "Qwen3-Omni-30B-A3B Thinker",
          "video_salmonn2": "video-SALMONN 2+ 7B (Qwen2.5-VL-7B language model)"}
LAYERS = {"qwen2_5_omni": 4, "qwen3_omni": 3, "video_salmonn2": 2}  # the tiny configs'
HEADER = "| tokens | row | min s | median s | / forward | peak GiB | peak / forward's | note |"
NUMBER = re.compile(r"^\d+\.\d{4}$")
RATIO = re.compile(r"^\d+\.\d\dx$")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """stdout of `bash benchmarks/gpu_check.sh --tiny --oom-at 1024 --out FILE`, and FILE's text."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.md"
    env = dict(os.environ, PY=sys.executable)
    got = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", "--oom-at", "1024", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-4000:]
    return got.stdout, out.read_text()


def sections(text: str) -> dict[str, list[str]]:
    """`### ` heading -> the lines under it."""
    out, key = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            key = line[4:]
            out[key] = []
        elif key is not None:
            out[key].append(line)
    return out


def family_section(text: str, family: str) -> tuple[str, list[str]]:
    found = [(k, v) for k, v in sections(text).items() if k.startswith(TITLES[family] + ":")]
    assert len(found) == 1, f"{family}: {len(found)} sections titled {TITLES[family]!r}"
    return found[0]


def table(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """(tokens, row) -> the cells; the header checked, every body row of 8 cells, no (tokens, row) twice."""
    rows = [line for line in lines if line.startswith("|")]
    assert rows[0] == HEADER and rows[1] == "|---" * 8 + "|"
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 8, line
        assert (cells[0], cells[1]) not in out, f"{cells[:2]} twice"
        out[cells[0], cells[1]] = cells
    return out


@pytest.mark.parametrize("family", list(TITLES))
def test_every_row_of_every_model_at_every_length(tiny_run, family):
    stdout, _ = tiny_run
    title, lines = family_section(stdout, family)
    assert f"{LAYERS[family]} layers" in title
    got = table(lines)
    assert sorted(got) == sorted((n, r) for n in LENGTHS for r in ROWS)
    for n in LENGTHS:
        for row in ROWS:
            cells = got[n, row]
            if row in LEFT_OUT[family]:
                assert cells[2:7] == ["-"] * 5 and cells[7].startswith("left out: "), cells
                continue
            if row == EAGER and n == "1,024":
                continue  # the simulated out-of-memory error (test_out_of_memory_is_recorded)
            assert NUMBER.match(cells[2]) and NUMBER.match(cells[3]), cells
            assert 0 < float(cells[2]) <= float(cells[3]), cells
            assert RATIO.match(cells[4]), cells
            assert cells[5:7] == ["-", "-"], cells  # no device memory on the CPU
        assert got[n, "hooked_av forward"][4] == "1.00x"
        diff = re.fullmatch(r"max abs diff of the last logits vs hooked_av: (\S+) \(largest abs logit (\S+)\)",
                            got[n, ROWS[0]][7])
        assert diff and float(diff.group(1)) < 1e-4 < float(diff.group(2)), got[n, ROWS[0]]  # the same weights, float32
        L = LAYERS[family]
        assert got[n, "knockout sweep (run_rows)"][7].startswith(
            f"{6 * L} cells (6 edges x {L} centres, window 9); / forward: the sweep's cost in forwards, planned ")
        assert got[n, "group_attention_mass"][7].endswith(f"x {L} layers, every head")


def test_out_of_memory_is_recorded(tiny_run):
    stdout, _ = tiny_run
    _, lines = family_section(stdout, "qwen2_5_omni")
    got = table(lines)
    assert got["1,024", EAGER][2:7] == ["OOM", "OOM", "-", "-", "-"]
    assert got["1,024", EAGER][7] == "out of memory in the warm-up: simulated by --oom-at 1024"
    assert got["512", EAGER][7] == "attentions of all 4 layers returned"
    for n in LENGTHS:
        assert got[n, "nnsight HF backend, one cell"][7].startswith("/ forward: forwards per cell; a different cell each call")
    assert f"- {EAGER}: first out of memory at 1,024 tokens." in lines
    for n in LENGTHS:  # the rows after it still ran
        assert NUMBER.match(got[n, "generate under a knockout"][3])
        assert re.search(r"16 new tokens \(greedy, KV cache\): [\d.]+ tokens/s in all; prefill \S+ s, decode [\d.]+ tokens/s",
                         got[n, "generate under a knockout"][7])


def test_harvest_table_and_out_file(tiny_run):
    stdout, written = tiny_run
    assert written == stdout  # --out holds exactly what was printed
    assert stdout.startswith("## GPU check: the CPU (--tiny)")
    harvest = next(v for k, v in sections(stdout).items() if k.startswith("Harvest at one layer"))
    rows = [line for line in harvest if line.startswith("| plain forward") or line.startswith("| harvest blocks.2.")]
    assert len(rows) == 2
    for line in rows:
        assert float(line.split("|")[2].strip().replace(",", "")) > 0
    assert re.search(r"^Took \d+ s of the 440 s budget\.$", stdout, re.M)


# ---- the timing loop's rules, with stand-in contenders ---------------------------------------------------------

@pytest.fixture(scope="module")
def G():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def counting(calls: list, name: str, seconds: float = 0.0, fail_on: int | None = None):
    def fn():
        calls.append(name)
        if fail_on is not None and calls.count(name) == fail_on:
            raise torch.cuda.OutOfMemoryError("stand-in")
        if seconds:
            time.sleep(seconds)
    return fn


def test_rounds_are_interleaved_with_the_order_rotated(G):
    calls = []
    cells = G.measure_group({"a": counting(calls, "a"), "b": counting(calls, "b"), "c": counting(calls, "c")}, 5,
                            G.Budget(60), G.Device("cpu"))
    assert calls == list("abc") + list("abc" "bca" "cab" "abc" "bca")  # warm-ups, then 5 rotated rounds
    assert all(len(c.times) == 5 and not c.status for c in cells.values())


def test_a_spent_budget_skips_every_row_and_says_so(G):
    calls = []
    cells = G.measure_group({"a": counting(calls, "a")}, 5, G.Budget(0), G.Device("cpu"))
    assert calls == [] and cells["a"].status.startswith("skipped: this length's 0 s were spent")


def test_a_row_guessed_too_long_is_skipped_before_its_warm_up(G):
    calls = []
    cells = G.measure_group({G.SWEEP: counting(calls, "s")}, 5, G.Budget(5), G.Device("cpu"), forward_s=1.0)
    assert calls == []  # 2 forwards a call x 1 s x 6 calls > 5 s
    assert cells[G.SWEEP].status.startswith("skipped: 5 rounds and a warm-up would take about 12 s")


def test_rounds_that_would_not_fit_are_skipped_after_the_warm_up(G):
    calls = []
    cells = G.measure_group({"a": counting(calls, "a", seconds=0.05)}, 5, G.Budget(0.1), G.Device("cpu"))
    assert calls == ["a"]  # the warm-up took 0.05 s: 5 rounds need 0.25 s, and at most 0.05 s were left
    assert cells["a"].status.startswith("skipped: 5 rounds would take about") and not cells["a"].times


def test_out_of_memory_in_a_round_drops_that_contender_only(G):
    calls = []
    cells = G.measure_group({"a": counting(calls, "a", fail_on=3), "b": counting(calls, "b")}, 5, G.Budget(60),
                            G.Device("cpu"))
    assert cells["a"].status == "OOM" and cells["a"].note == "out of memory in round 2: stand-in"
    assert len(cells["a"].times) == 1 and len(cells["b"].times) == 5 and not cells["b"].status
    assert calls.count("a") == 3  # not called again after it ran out


def test_budget_parts_share_what_is_left(G):
    now = [100.0]
    total = G.Budget(60, clock=lambda: now[0])
    now[0] += 20  # 40 s left
    part = total.part(1, 3)
    assert part.seconds == pytest.approx(10) and part.left == pytest.approx(10)
    now[0] += 50
    assert total.left < 0 and total.part(1, 0).seconds == 0


def test_make_bench_keeps_the_pasted_gpu_section(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_all import gpu_section

    doc = tmp_path / "benchmarks.md"
    assert gpu_section(doc) == ""
    doc.write_text("# Benchmarks\n\n### a table\n\n| x |\n\n## GPU check: H100, 2027-01-01\n\n### Qwen\n\n| y |\n")
    assert gpu_section(doc) == "\n## GPU check: H100, 2027-01-01\n\n### Qwen\n\n| y |\n"
    doc.write_text("# Benchmarks\n\n## GPU check (not run yet)\n\ntext\n\n## Other\n\nz\n")
    assert gpu_section(doc) == "\n## GPU check (not run yet)\n\ntext\n"


@pytest.mark.parametrize("budget", ["0", "-5", "600"])
def test_a_budget_the_run_cannot_keep_is_refused_before_any_work(G, budget, capsys):
    with pytest.raises(SystemExit):
        G.parse(["--tiny", "--budget", budget])
    assert f"--budget must be in (0, 460] seconds (gpu_check.sh stops the run at 470 s), got {float(budget)}" in capsys.readouterr().err
