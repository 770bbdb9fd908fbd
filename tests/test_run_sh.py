"""run.sh's console: one line per stage with its figure, the stage's full output in $RUN_DIR/logs/<stage>.log, and
a failing stage's tail and log path; no stage hard-codes a dtype."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = open(os.path.join(ROOT, "run.sh"), encoding="utf-8").read()


def run_stages(run_dir, commands):
    """run.sh's stage() and figure() (without its stages), then `commands`, under run.sh's set -euo pipefail."""
    functions = RUN_SH[RUN_SH.index("\nstage() {"):RUN_SH.index("\nrun_tokenizer()")]
    script = f"set -euo pipefail\nRUN_DIR={run_dir}\nmkdir -p $RUN_DIR/logs\n{functions}\n{commands}"
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_a_stage_prints_one_line_and_keeps_its_output_in_a_log(tmp_path):
    proc = run_stages(tmp_path, """run_perplexity() {
  for i in $(seq 200); do echo "chatter $i"; done
  echo "warning: the data records no tokenizer" >&2
  echo '{"results": {"ppl": {"ppl": 12.5, "loss": 2.526, "tokens": 4096}}}' > $RUN_DIR/eval_pretrain.json
}
stage 5/12 perplexity""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "5/12  perplexity held-out perplexity 12.50 (loss 2.526) over 4,096 tokens  [0s]",
        " " * 17 + "warning: the data records no tokenizer"]  # warnings stay on the console
    log = (tmp_path / "logs" / "perplexity.log").read_text()
    assert "chatter 1\n" in log and "chatter 200\n" in log


def test_a_failing_stage_shows_its_error_and_log_and_stops(tmp_path):
    """Also when the failing command is not the stage's last (bash drops set -e under `|| ...`)."""
    proc = run_stages(tmp_path, """run_data() {
  printf 'progress 1\\rprogress 2\\rprogress 3\\n'
  python -c 'import sys; sys.exit("data.jsonl:3: bad record (--lenient=True skips it)")'
  echo "not reached" > $RUN_DIR/reached
}
stage 2/12 data
echo "the next stage"  """)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert re.fullmatch(rf"2/12  data       FAILED \(exit 1\) after \d+s; the end of {tmp_path}/logs/data.log:", lines[0])
    assert lines[1:] == ["    progress 3", "    data.jsonl:3: bad record (--lenient=True skips it)"]
    assert not (tmp_path / "reached").exists() and "the next stage" not in proc.stdout


def test_a_finished_stage_is_not_redone(tmp_path):
    (tmp_path / "data").mkdir()
    meta = {"train_tokens": 900, "val_tokens": 100, "counts": {"kept": 9, "docs_read": 10, "removed_exact_dup": 1,
                                                               "removed_near_dup": 0}}
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    proc = run_stages(tmp_path, f'run_data() {{ exit 1; }}\nstage 2/12 data "{tmp_path}/data/meta.json"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("2/12  data       900 train + 100 val tokens; 9 of 10 documents kept (1 duplicates)  "
                           "[done before]\n")


def test_no_stage_sets_the_dtype_but_the_float32_perplexities():
    """The configs' and trainer's dtype=auto decide (bf16 only where the hardware runs it fast)."""
    flags = re.findall(r"--dtype=\S+", RUN_SH)
    assert flags == ["--dtype=float32"] * 2, flags
