"""DDP through torchrun: two CPU processes on gloo follow the single-process trajectory.

Two ranks with batch_size 2 and 2 accumulation steps read, between them, exactly
the 8 windows that one process with batch_size 8 reads at every step, so the two
runs must agree up to the order of floating-point sums.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from minipt import checkpoint as ckpt
from minipt import train as T
from minipt.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(3):
        lines = [f"Line {i} of part {d}: a horse, a horse, my kingdom for a horse!" for i in range(30)]
        (folder / f"part{d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def losses(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["iter"], r[key]) for r in read_metrics(out) if key in r]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_follow_the_single_process_trajectory(tmp_path, optimizer):
    """Muon orthogonalises the all-reduced gradient of each matrix, the same on every rank. It does so in
    bfloat16 (torch's Newton-Schulz iteration), where the float32 sums' other order can round an element
    the other way (1 part in 256): a single process and two then agree to 1e-4, not 1e-5."""
    common = [
        f"--data={write_corpus(tmp_path / 'corpus')}", f"--cache_dir={tmp_path / 'cache'}", "--tokenizer=char",
        "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--max_iters=6", "--eval_interval=3",
        "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--progress=false", "--sample_tokens=0",
        f"--optimizer={optimizer}",
    ]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert T.main(common + [f"--out_dir={single}", "--batch_size=8", "--eval_iters=1"]) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minipt.train",
           *common, f"--out_dir={ddp}", "--batch_size=2", "--gradient_accumulation_steps=2", "--eval_iters=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("done: run saved") == 1  # only rank 0 speaks

    for key in ("train_loss", "val_loss"):
        a, b = losses(single, key), losses(ddp, key)
        assert [it for it, _ in a] == [it for it, _ in b]  # one row per step: rank 0 alone writes
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel={"adamw": 1e-5, "muon": 1e-4}[optimizer],
                                                  abs=1e-6)
    assert losses(single, "train_loss")[-1][1] < losses(single, "train_loss")[0][1]
    assert {p.name for p in ddp.iterdir()} == {*ckpt.RUN_FILES, ckpt.LOCK}
    assert ckpt.load_state(ddp)["iter"] == 6


@pytest.mark.slow
def test_bad_input_stops_every_rank_with_the_message(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minipt.train",
           f"--data={tmp_path / 'missing.txt'}", f"--out_dir={tmp_path / 'run'}", "--progress=false"]
    # Rank 0 finds the problem; rank 1 must not wait for it at a barrier until the timeout.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("minipt.train: error: data path") == 2
    assert str(REPO / "minipt") not in proc.stderr  # no traceback from minipt; torchrun reports the exit codes


def _wait_for_slow_main(rank: int, port: int, queue) -> None:
    import time
    from datetime import timedelta

    import torch

    from minipt.runtime import MAIN_WAIT_TIMEOUT, Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the default group's timeout is far shorter than rank 0's work, as a long tokenization is
    # against NCCL's 10 minutes
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=1))
    rt = Runtime(torch.device("cpu"), torch.float32, rank, rank, 2)
    rt.main_wait_group = dist.new_group(backend="gloo", timeout=MAIN_WAIT_TIMEOUT)
    try:
        queue.put((rank, rt.on_main(lambda: time.sleep(3) or "prepared")))
    except Exception as exc:  # reported to the test, which names it
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_wait_for_rank_0_past_the_default_timeout():
    """The other ranks wait for rank 0's solo work (tokenizing a corpus) on a group of their own,
    so it may outlast the default group's timeout."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_wait_for_slow_main, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {0: "prepared", 1: None}


@pytest.mark.slow
def test_fine_tuning_on_two_processes_follows_the_single_process_run(tmp_path):
    """Each rank takes half of every batch; DDP's mean of the ranks' gradients is the whole batch's mean."""
    from hf_folders import bert_folder

    rows = [f'{{"text": "Example {i} speaks of {word}.", "label": "{label}"}}'
            for i, (word, label) in enumerate([("cats", "pets"), ("dogs", "pets"), ("kings", "court"),
                                               ("crowns", "court")] * 5)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:19]) + "\n")
    common = [f"--init_from={bert_folder(tmp_path / 'bert')}", f"--data={tmp_path / 'train.jsonl'}",
              f"--val_data={tmp_path / 'train.jsonl'}", "--epochs=2", "--batch_size=6", "--learning_rate=1e-3",
              "--dropout=0", "--log_interval=1", "--progress=false", "--device=cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for out, launcher in ((single, []), (ddp, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        cmd = [sys.executable, *launcher, "-m", "minipt.finetune", *common, f"--out_dir={out}"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("done: run saved") == 1

    # 19 examples, 6 a step: 4 steps an epoch, the last of one example, so rank 1 adds a zero to it
    for key in ("train_loss", "val_loss", "accuracy"):
        a, b = losses(single, key), losses(ddp, key)
        assert [it for it, _ in a] == [it for it, _ in b] and len(a) >= 2
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5, abs=1e-6), key
    assert losses(single, "val_loss")[-1][1] < losses(single, "val_loss")[0][1]


def torchrun(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_rng(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 2  # one state per rank
    for rank_a, rank_b in zip(a, b):
        assert rank_a.keys() == rank_b.keys() and all((rank_a[k] == rank_b[k]).all() for k in rank_a)
    assert not (a[0]["torch"] == a[1]["torch"]).all()  # the ranks draw different dropout masks


@pytest.mark.slow
def test_a_resumed_ddp_run_continues_every_ranks_dropout_exactly(tmp_path):
    """40 + 40 steps equal 80 straight, bit for bit: each rank saves and restores its own generators."""
    common = [
        f"--data={write_corpus(tmp_path / 'corpus')}", f"--cache_dir={tmp_path / 'cache'}", "--tokenizer=char",
        "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--dropout=0.2",
        "--eval_interval=40", "--eval_iters=1", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=80",
        "--progress=false", "--sample_tokens=0",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun("minipt.train", [*common, f"--out_dir={straight}", "--max_iters=80"], tmp_path)
    torchrun("minipt.train", [*common, f"--out_dir={resumed}", "--max_iters=40"], tmp_path)
    torchrun("minipt.train", [f"--out_dir={resumed}", "--resume", "--max_iters=80"], tmp_path)
    a, b = losses(straight, "train_loss"), losses(resumed, "train_loss")
    assert len(a) == 80 and a == b
    assert_same_rng(ckpt.load_state(straight)["rng"], ckpt.load_state(resumed)["rng"])


def _finetune_rank(rank: int, port: int, args: list[str], stop_at: int | None) -> None:
    """One rank of a two-process fine-tune; rank 0 asks to stop (as Ctrl-C does) when it logs step ``stop_at``."""
    import signal

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from minipt import runtime
    from minipt.config import FinetuneConfig, parse_overrides
    from minipt.errors import Interrupted
    from minipt.finetuning import finetune
    from minipt.loop import resumed_config

    overrides = parse_overrides(FinetuneConfig, args, "", "")
    cfg = resumed_config(FinetuneConfig, overrides) if "--resume" in args else FinetuneConfig(**overrides)
    rt = runtime.setup("cpu", "float32")

    def log(message: str) -> None:
        if stop_at is not None and message.startswith(f"step {stop_at}/"):
            os.kill(os.getpid(), signal.SIGINT)

    try:
        finetune(cfg, rt, log=log if rt.is_main else (lambda *a: None))
    except Interrupted:
        pass
    finally:
        runtime.shutdown(rt)


def run_ranks(args: list[str], stop_at: int | None = None) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = 29500 + (os.getpid() + (stop_at or 0) + len(args)) % 1000
    procs = [ctx.Process(target=_finetune_rank, args=(rank, port, args, stop_at)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.slow
def test_a_resumed_ddp_fine_tune_continues_every_ranks_dropout_exactly(tmp_path):
    from hf_folders import bert_folder

    rows = [f'{{"text": "Example {i} speaks of {word}.", "label": "{label}"}}'
            for i, (word, label) in enumerate([("cats", "pets"), ("dogs", "pets"), ("kings", "court"),
                                               ("crowns", "court")] * 10)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    common = [f"--init_from={bert_folder(tmp_path / 'bert')}", f"--data={tmp_path / 'train.jsonl'}",
              f"--val_data={tmp_path / 'train.jsonl'}", "--epochs=8", "--batch_size=4", "--learning_rate=1e-3",
              "--dropout=0.2", "--log_interval=1", "--backend=torch"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks([*common, f"--out_dir={straight}"])  # 10 steps an epoch, 80 in all
    run_ranks([*common, f"--out_dir={resumed}"], stop_at=40)
    assert ckpt.load_state(resumed)["iter"] == 40
    run_ranks([f"--out_dir={resumed}", "--resume"])
    a, b = losses(straight, "train_loss"), losses(resumed, "train_loss")
    assert len(a) == 80 and a == b
    assert_same_rng(ckpt.load_state(straight)["rng"], ckpt.load_state(resumed)["rng"])
