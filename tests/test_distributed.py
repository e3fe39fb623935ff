"""Scale-out on torch.distributed: identities in one process, and 2 gloo processes (torchrun)
that give the one-process results for discovery, faithfulness, training and experiment grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctsft_lens import distributed

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], cwd: Path, n: int = 2, timeout: int = 240) -> str:
    """``torchrun --standalone --nproc_per_node n ARGS`` with one thread per process, offline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r.stdout


class _one_thread:
    """The one-process reference runs with one thread, like each torchrun child."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.n)


# --------------------------------------------------------------------------------------------
# one process: everything is the identity
# --------------------------------------------------------------------------------------------
def test_single_process_is_identity():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world() == 1
    assert distributed.is_main()
    assert distributed.shard_indices(10, 3) == list(range(10))
    assert distributed.shard(list("abcde"), 2) == (list("abcde"), [0, 1, 2, 3, 4])
    t = torch.arange(4.0)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [0, 1, 2, 3]
    assert distributed.gather_examples(t, range(4), 4) is t
    assert distributed.gather_examples(t, [3, 2, 1, 0], 4).tolist() == [3, 2, 1, 0]
    assert distributed.on_main(lambda: 7) == 7
    with pytest.raises(ValueError):
        distributed.on_main(lambda: int("x"))
    with distributed.alone(), distributed.alone():
        assert distributed.world() == 1
    distributed.barrier()
    distributed.all_ok(None)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.rank_device("cpu") == "cpu"


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("n,batch,world", [(9, 2, 2), (10, 3, 3), (3, 8, 2), (17, 4, 4)])
def test_shards_are_whole_batches_that_cover_every_example_once(monkeypatch, n, batch, world, strided):
    shards = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world", lambda: world)
        shards.append(distributed.shard_indices(n, batch, strided=strided))
    assert sorted(i for s in shards for i in s) == list(range(n))
    single = [list(range(i, min(n, i + batch))) for i in range(0, n, batch)]
    for s in shards:  # each shard is a run of the single process's batches, in order
        parts = [s[i:i + batch] for i in range(0, len(s), batch)]
        assert all(p in single for p in parts) and s == sorted(s)
    if strided:
        assert shards[0][:batch] == single[0] and (len(single) < 2 or shards[1][:batch] == single[1])


# --------------------------------------------------------------------------------------------
# 2 gloo processes against one process
# --------------------------------------------------------------------------------------------
DISCOVER = ["discover", "--model", "tiny", "--n-examples", "9", "--batch-size", "2", "--max-depth", "1",
            "--ratio", "0.1", "--no-progress"]


def _close(a, b, rel=1e-6):
    nan = lambda xs: [nan(x) if isinstance(x, list) else float("nan") if x is None else x for x in xs]  # noqa: E731
    a = torch.tensor(nan(a), dtype=torch.float64)
    b = torch.tensor(nan(b), dtype=torch.float64)
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.nan_to_num(), b.nan_to_num()
    assert torch.allclose(a, b, rtol=rel, atol=rel * float(b.abs().max())), (a - b).abs().max()


def test_discover_over_two_ranks_equals_one_process(tmp_path):
    from ctsft_lens.cli import main

    out = _torchrun(["-m", "ctsft_lens.cli", *DISCOVER, "--out", str(tmp_path / "two")], tmp_path)
    assert out.count("circuit:") == 1  # rank 0 prints and writes
    with _one_thread():
        assert main([*DISCOVER, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "circuit.json").read_text())
    one = json.loads((tmp_path / "one" / "circuit.json").read_text())
    assert two["heads_by_depth"] == one["heads_by_depth"]  # the same circuit
    assert len(one["scores"]) == 2
    for s2, s1 in zip(two["scores"], one["scores"]):
        _close(s2, s1)
    assert two["options"]["n_examples"] == 9


def test_faithfulness_over_two_ranks_equals_one_process(tmp_path):
    from ctsft_lens.cdt import discover
    from ctsft_lens.circuit import save_circuit
    from ctsft_lens.cli import main
    from ctsft_lens.models import tiny_model
    from ctsft_lens.tasks import load_task

    ex = load_task("nusax-senti", "indonesian").sample(6, "train", seed=0)
    save_circuit(discover(tiny_model(), ex, max_depth=1, ratio=0.1, progress=False), tmp_path / "c.json")
    args = ["faithfulness", "--model", "tiny", "--circuit", str(tmp_path / "c.json"), "--n-examples", "9",
            "--batch-size", "2", "--seeds", "2", "--points", "4", "--no-progress"]
    _torchrun(["-m", "ctsft_lens.cli", *args, "--out", str(tmp_path / "two")], tmp_path)
    with _one_thread():
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "faithfulness.json").read_text())
    one = json.loads((tmp_path / "one" / "faithfulness.json").read_text())
    assert two["n_examples"] == one["n_examples"] == 9
    flat = lambda d: [v for k, v in sorted(d["full"].items())] + [v for k, v in sorted(d["empty"].items())] + [  # noqa: E731
        p[k] for c in d["depth_curves"].values() for p in c["points"]
        for k in ("faithfulness", "logit_diff", "accuracy", "necessity")] + d["random"]["values"][0]
    _close(flat(two), flat(one))


def test_training_over_two_ranks(tmp_path):
    """Full and masked fine-tuning: 2 ranks x micro-batch 3 equals one process with 2 accumulated
    micro-batches; every rank holds the same weights; frozen slices stay bit-identical."""
    from distributed_setup import setup  # tests/ is on sys.path under pytest's rootdir insertion

    from ctsft_lens.models import tiny_model
    from ctsft_lens.train import train
    from ctsft_lens.train.masking import trainable_specs

    _torchrun([str(ROOT / "tests" / "distributed_worker.py"), "train", str(tmp_path)], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    initial = dict(tiny_model("qwen2", n_layers=2).named_parameters())
    with _one_thread():
        for variant, (model, train_ex, dev_ex, mask, config) in setup(grad_accum=2).items():
            ref = train(model, train_ex, dev_ex, config, mask=mask, progress=False)
            got = [r[variant] for r in ranks]
            res = got[0]["result"]
            assert res["ranks"] == 2 and res["effective_batch"] == 6 and ref.effective_batch == 6
            assert res["steps"] == ref.steps == 6  # 5 micro-batches -> 3 steps per epoch, 2 epochs
            assert [h["train_loss"] for h in res["history"]] == pytest.approx([h["train_loss"] for h in ref.history], rel=1e-5)
            assert res["best_epoch"] == ref.best_epoch
            for name, p in model.named_parameters():
                assert torch.equal(got[0]["params"][name], got[1]["params"][name]), f"{variant}: ranks differ at {name}"
                assert torch.allclose(got[0]["params"][name], p.detach(), atol=2e-5, rtol=1e-4), f"{variant}: {name}"
            specs, _ = trainable_specs(model, mask)
            trained = {id(s.param): s.mask for s in specs}
            n_changed = 0
            for name, p in model.named_parameters():
                frozen = torch.ones_like(p, dtype=torch.bool) if id(p) not in trained else (
                    torch.zeros_like(p, dtype=torch.bool) if trained[id(p)] is None else ~trained[id(p)])
                for g in got:
                    assert torch.equal(g["params"][name][frozen], initial[name].detach()[frozen]), f"frozen {name} moved"
                n_changed += int((got[0]["params"][name] != initial[name].detach()).sum())
            assert n_changed > 0


def test_experiment_grid_over_two_ranks_same_table(tmp_path):
    from ctsft_lens.cli import main

    (tmp_path / "tiny.toml").write_text("""
[experiment]
name = "dist"
model = "tiny"
device = "cpu"
source = "indonesian"
targets = ["javanese"]
variants = ["full", "circuit", "nearzero"]
seeds = [0, 1]
eval_limit = 6

[competence]
n_examples = 6
n_dev = 0
epochs = 1
batch_size = 6
lr = 1e-3

[discovery]
ratio = 0.1
max_depth = 0
n_examples = 3

[transfer]
n_examples = 3
n_dev = 3
epochs = 1
batch_size = 3
lr = 1e-3
""")
    args = ["experiment", "--config", str(tmp_path / "tiny.toml"), "--no-progress"]
    printed = _torchrun(["-m", "ctsft_lens.cli", *args, "--out", str(tmp_path / "two")], tmp_path, timeout=300)
    assert printed.count("results:") == 1
    with _one_thread():
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert len(one["runs"]) == 6
    assert two["table"] == one["table"] and two["circuit"] == one["circuit"] and two["a0"] == one["a0"]
    assert (tmp_path / "two" / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()
