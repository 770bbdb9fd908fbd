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


def test_no_stage_sets_the_dtype_but_the_float32_evaluations():
    """The configs' and trainer's dtype=auto decide (bf16 only where the hardware runs it fast); the perplexities
    (float, int8, q8_0) and C-Eval are scored in float32, so that they compare with each other and a reference."""
    flags = re.findall(r"--dtype=\S+", RUN_SH)
    assert set(flags) == {"--dtype=float32"}, flags


def test_the_english_and_chinese_stage_lists_are_numbered_by_count():
    """The "N/M" of each stage line comes from the STAGES arrays (a stage added there is counted)."""
    for pipeline in ("en", "zh"):
        script = RUN_SH[RUN_SH.index("\nif [ \"$PIPELINE\" = zh ]; then\n  STAGE_PREFIX"):RUN_SH.index("\necho\npython results.py")]
        script = script.replace('stage "$n', 'echo "$n')  # the numbering alone
        proc = subprocess.run(["bash", "-c", f"set -euo pipefail\nPIPELINE={pipeline}\nRUN_DIR=r\n{script}"],
                              capture_output=True, text=True)
        lines = proc.stdout.splitlines()[1:]
        names = re.findall(r"STAGES=\(([^)]*)\)", script)[pipeline == "en"].split()
        n = len(names)
        assert [line.split()[:2] for line in lines] == [[f"{i}/{n}", name] for i, name in enumerate(names, 1)], proc
        assert lines[0] == f"1/{n} tokenizer r/tokenizer/tokenizer.model" and names[-1] == "serve", lines
        assert ("ceval" in proc.stdout) == (pipeline == "zh") and ("sample" in proc.stdout) == (pipeline == "en")


def test_run_sh_zh_without_its_data_stops_at_once_naming_what_it_needs(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, ZH_DATA=str(tmp_path / "no_such_data"), RUN_DIR=str(run_dir))
    proc = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "zh"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"not found: {tmp_path}/no_such_data/pretrain_zh/thucnews" in proc.stdout
    for layout in ("ZH_PRETRAIN", "ZH_SFT", "ZH_CEVAL", "ZH_RAG", "alpaca {instruction, input, output}",
                   "val/<subject>_val.csv"):
        assert layout in proc.stdout
    assert not run_dir.exists()  # nothing written, nothing half-way
    bad = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "fr"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "usage: bash run.sh [zh]" in bad.stdout


def write_stage_files(run):
    """The files each stage writes, with figures no other stage shares, as the stages write them."""
    def put(path, obj):
        os.makedirs(os.path.dirname(os.path.join(run, path)), exist_ok=True)
        with open(os.path.join(run, path), "w", encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                f.writelines(json.dumps(r) + "\n" for r in obj)
            elif isinstance(obj, str):
                f.write(obj)
            else:
                json.dump(obj, f, ensure_ascii=False)
    put("tokenizer/tokenizer.json", {"model": {"vocab": {f"p{i}": i for i in range(777)}}})
    put("tokenizer/heldout.json", {"documents": 3, "ours": {"chars_per_token": 1.4321, "vocab_size": 777},
                                   "smollm2": {"chars_per_token": 0.5678, "vocab_size": 49152}})
    put("data/meta.json", {"dtype": "uint16", "train_tokens": 1234, "val_tokens": 56, "counts": {
        "kept": 90, "docs_read": 97, "removed_exact_dup": 4, "removed_near_dup": 2}})
    import numpy as np
    np.array([1, 1, 2, 3], dtype=np.uint16).tofile(os.path.join(run, "data", "train.bin"))  # entropy of 1/2,1/4,1/4
    put("pretrain/metrics.jsonl", [{"step": 0, "val_loss": 9.1, "val_bpb": 4.2}, {"step": 10, "tokens_per_s": 900.0},
                                   {"step": 20, "tokens_per_s": 1100.0}, {"step": 20, "val_loss": 5.55, "val_bpb": 2.61},
                                   {"step": 30, "tokens_per_s": 1000.0}])
    put("eval_pretrain.json", {"results": {"ppl": {"ppl": 200.0, "loss": 5.3, "tokens": 4096}}})
    put("eval_int8.json", {"results": {"ppl": {"ppl": 201.0}}})
    put("eval_q8_0.json", {"results": {"ppl": {"ppl": 199.5}}})
    put("sft/metrics.jsonl", [{"step": 0, "val_loss": 4.75}, {"step": 5, "train_loss": 4.0}, {"step": 9, "val_loss": 3.25}])
    put("dpo/metrics.jsonl", [{"step": 0, "val_rewards/accuracies": 0.0, "val_rewards/margins": 0.0},
                              {"step": 8, "val_rewards/accuracies": 0.8125, "val_rewards/margins": 0.0421}])
    put("dpo_pairs/meta.json", {"train_records": 200, "val_records": 23})
    put("ceval.json", {"results": {"all": {"n": 1346, "acc": 0.2712}}})
    put("rag_eval.json", {"questions": 100, "bm25/recall@5": 0.61, "rerank/recall@5": 0.64, "gap_closed": 0.375})
    put("answer.json", {"results": [{"prompt": "中国的首都是哪里？", "completion": "北京。"}]})
    put("rag_answer.txt", "回答\n\nSources:\n  1. docs.jsonl:7 [0:64]\n")
    put("rl/metrics.jsonl", [{"step": 0, "eval_pass@1": 0.081}, {"step": 5, "reward": 0.125},
                             {"step": 40, "reward": 0.5}, {"step": 40, "eval_pass@1": 0.14}])
    put("serve.json", {"choices": [{"message": {"role": "assistant", "content": "北京是首都。"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 17, "completion_tokens": 5, "total_tokens": 22}})
    for i, stage in enumerate(["tokenizer", "data", "pretrain", "sft"]):
        put(f"logs/{stage}.seconds", f"{i + 10}\n")


def test_the_results_table_reads_every_figure_from_the_stages_files(tmp_path):
    write_stage_files(str(tmp_path))
    stages = ["tokenizer", "data", "pretrain", "perplexity", "quantize", "sft", "answer", "dpo", "ceval", "rag",
              "rag_answer", "rl", "serve"]
    t_done = os.path.getmtime(tmp_path / "logs" / "sft.seconds")
    (tmp_path / "logs" / "data.seconds").write_text("11\n")
    os.utime(tmp_path / "logs" / "tokenizer.seconds", (t_done - 100, t_done - 100))  # an earlier run's
    env = dict(os.environ, RUN_START=str(t_done - 50))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "results.py"), str(tmp_path), "zh", *stages],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert proc.stdout == (tmp_path / "results.md").read_text()
    figs = {r["stage"]: r["figures"] for r in res["stages"]}
    assert figs["tokenizer"] == {"vocab": 777, "chars/token (held out)": 1.432, "SmolLM2's (49152 ids)": 0.568}
    assert figs["data"] == {"train tokens": 1234, "val tokens": 56, "documents kept": "90 of 97", "duplicates": 6}
    assert figs["pretrain"] == {"val loss": 5.55, "val bits/byte": 2.61, "unigram entropy": round(1.5 * 0.6931471805599453, 4),
                                "tokens/s": 1000}
    assert figs["perplexity"] == {"held-out perplexity": 200.0, "tokens": 4096}
    assert figs["quantize"] == {"int8 perplexity change": "+0.50%", "q8_0 perplexity change": "-0.25%"}
    assert figs["sft"] == {"held-out answer loss": "4.750 -> 3.250"}
    assert figs["dpo"] == {"held-out reward accuracy": 0.812, "margin": 0.0421, "held-out pairs": 23}
    assert figs["ceval"] == {"C-Eval accuracy": 0.2712, "chance": 0.25, "questions": 1346}
    assert figs["rag"] == {"recall@5 BM25": 0.61, "re-ranked by the model": 0.64, "answer NLL gap closed": 0.375, "questions": 100}
    assert figs["answer"]["text"] == "中国的首都是哪里？ -> 北京。"
    assert figs["rag_answer"] == {"text": "回答", "source": "1. docs.jsonl:7 [0:64]"}
    assert figs["rl"] == {"held-out exact match": "0.081 -> 0.140", "reward": "0.125 -> 0.500"}
    assert figs["serve"] == {"text": "北京是首都。", "prompt tokens": 17, "completion tokens": 5}
    times = {r["stage"]: (r["seconds"], r["done_before"]) for r in res["stages"]}
    assert times["tokenizer"] == (10, True) and times["data"] == (11, False) and times["perplexity"] == (None, False)
    assert "| tokenizer | 10s (done before) | vocab 777; chars/token (held out) 1.432;" in proc.stdout
    assert "| total | 0m46s | |" in proc.stdout  # 10 + 11 + 12 + 13
    assert res["torch"] and res["machine"] and res["commit"]


def test_the_chinese_preset_at_a_toy_size_and_its_table(tmp_path, shared_data):
    """run.sh zh's first three stages (held-out split, tokenizer, cleaning, config/phi_zh.py's Phi model shrunk by
    PRETRAIN_ARGS) on 300 THUCNews articles; the table's figures are those of the files, recomputed here."""
    import collections
    import math
    import numpy as np
    from tokenizer import Tokenizer
    import gzip
    lines = gzip.open(os.path.join(shared_data, "pretrain_zh", "thucnews", "cnews.val.txt.gz"), "rt",
                      encoding="utf-8").readlines()
    (tmp_path / "news.txt").write_text("".join(lines[:300]), encoding="utf-8")
    run = tmp_path / "run"
    functions = RUN_SH[RUN_SH.index("\nstage() {"):RUN_SH.index("\nrun_tokenizer()")]
    start = RUN_SH[RUN_SH.index("\nstart() {"):RUN_SH.index("\nrun_pretrain()")]
    zh = RUN_SH[RUN_SH.index("\nzh_tokenizer()"):RUN_SH.index("\n# The stages in order")]
    script = (f"set -euo pipefail\nRUN_DIR={run}\nmkdir -p $RUN_DIR/logs\nSTAGE_PREFIX=zh_ ZH_PRETRAIN={tmp_path}/news.txt"
              f" ZH_TEXT_FIELD=text ZH_TXT_SPLIT=line ZH_VOCAB=4000 ZH_CONFIG=config/phi_zh.py LAUNCH=python TRAIN_ARGS=\n"
              f"PRETRAIN_ARGS='--max_iters=4 --eval_interval=2 --eval_iters=1 --batch_size=2 --block_size=64 --dim=32 "
              f"--n_layers=1 --n_heads=2 --log_interval=1'\n{functions}\n{start}\n{zh}\n"
              "stage 1/3 tokenizer; stage 2/3 data; stage 3/3 pretrain\n")
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", TQDM_DISABLE="1")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^1/3   tokenizer  4000 ids \(BPE, byte fallback\): [\d.]+ characters per token on 30 held-out",
                     proc.stdout, re.M), proc.stdout
    proc = subprocess.run([sys.executable, "results.py", str(run), "zh", "tokenizer", "data", "pretrain"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figs = {r["stage"]: r["figures"] for r in json.loads((run / "results.json").read_text())["stages"]}

    held = [json.loads(line)["text"] for line in open(run / "corpus" / "heldout.jsonl", encoding="utf-8")]
    assert held == [line.rstrip("\n") for line in lines[9:300:10]]  # every 10th article, never trained on
    tok = Tokenizer.from_pretrained(str(run / "tokenizer"))
    chars_per_token = sum(map(len, held)) / sum(len(tok.encode(t)) for t in held)
    assert figs["tokenizer"]["vocab"] == 4000 and figs["tokenizer"]["chars/token (held out)"] == round(chars_per_token, 3)
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert figs["data"]["train tokens"] == meta["train_tokens"] == os.path.getsize(run / "data" / "train.bin") // 2
    counts = collections.Counter(np.fromfile(run / "data" / "train.bin", dtype=np.uint16).tolist())
    n = sum(counts.values())
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    val = [r["val_loss"] for r in map(json.loads, open(run / "pretrain" / "metrics.jsonl")) if "val_loss" in r]
    assert figs["pretrain"]["val loss"] == round(min(val), 4) and len(val) == 3  # steps 0, 2, 4
    assert figs["pretrain"]["unigram entropy"] == round(entropy, 4)
    assert json.loads((run / "pretrain" / "hf" / "config.json").read_text())["architectures"] == ["PhiForCausalLM"]
