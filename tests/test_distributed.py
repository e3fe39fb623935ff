"""Scale-out on torch.distributed: identities in one process, and 2 gloo processes that give the
one-process results for discovery, faithfulness, training and experiment grids.

Start-up (imports, rendezvous) costs more than these small jobs, so every 2-process job runs in
one pair of ranks, forked from the test process with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``MASTER_*``: the same ``distributed.init`` path as under ``torchrun``) by a
module fixture; each test runs its one-process reference while the ranks work, then waits for
its job. ``tests/distributed_worker.py`` runs the same plan under a real ``torchrun`` too."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from ctsft_lens import distributed

ROOT = Path(__file__).resolve().parents[1]


def _rank_main(rank: int, world: int, port: int, root: Path) -> None:
    """A forked rank: torchrun's environment, one thread, output in ``root/rank<r>.log``."""
    fd = os.open(root / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CTSFT_THREADS="1",
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed_worker import run_plan

    run_plan(root / "plan.json")


class _one_thread:
    """The one-process reference runs with one thread, like each torchrun child."""

    def __enter__(self) -> None:
        self.n, self.env = torch.get_num_threads(), os.environ.get("CTSFT_THREADS")
        os.environ["CTSFT_THREADS"] = "1"  # the CLI sets its threads from it
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.n)
        if self.env is None:
            os.environ.pop("CTSFT_THREADS", None)
        else:
            os.environ["CTSFT_THREADS"] = self.env


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
    assert distributed.all_reduce_max(t) is t and t.tolist() == [0, 1, 2, 3]
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
FAITHFULNESS = ["faithfulness", "--model", "tiny", "--n-examples", "9", "--batch-size", "2", "--seeds", "2",
                "--points", "4", "--no-progress"]
EXPERIMENT_TOML = """
[experiment]
name = "dist"
model = "tiny"
device = "cpu"
source = "indonesian"
targets = ["javanese"]
variants = ["full", "circuit"]
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
"""


class _Launch:
    """The 2-rank jobs (``tests/distributed_worker.py``), all in one pair of processes forked from
    this one with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
    they start with everything imported. The tests run their one-process references meanwhile,
    then :meth:`wait`."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []

    def start(self, plan: list) -> None:
        import multiprocessing
        import socket

        from ctsft_lens.models import tiny_model

        tiny_model()  # transformers' model classes imported before the fork
        (self.root / "plan.json").write_text(json.dumps(plan))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        self.procs = [ctx.Process(target=_rank_main, args=(r, 2, port, self.root)) for r in range(2)]
        for p in self.procs:
            p.start()

    def wait(self, job: str, timeout: float = 300) -> Path:
        """Until the ranks have done ``job`` (a failed rank fails the test at once)."""
        deadline = time.monotonic() + timeout
        while not (self.root / f"{job}.done").exists():
            codes = [p.exitcode for p in self.procs]
            if any(c not in (None, 0) for c in codes) or codes == [0, 0] or time.monotonic() > deadline:
                self.kill()
                logs = "\n".join((self.root / f"rank{r}.log").read_text()[-6000:] for r in range(2))
                raise AssertionError(f"ranks failed before {job!r} was done ({codes}):\n{logs}")
            time.sleep(0.1)
        return self.root

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()

    def printed(self, name: str) -> list[str]:
        """What each rank printed in the CLI job ``name``."""
        return [(self.root / f"{name}.rank{r}.txt").read_text() for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Started first, so that its start-up overlaps the one-process references of the tests."""
    root = tmp_path_factory.mktemp("dist")
    (root / "tiny.toml").write_text(EXPERIMENT_TOML)
    (root / "train").mkdir()
    two = root / "two"
    launch = _Launch(root)
    launch.start([
        ["train", str(root / "train")],
        ["cli", "experiment", ["experiment", "--config", str(root / "tiny.toml"), "--no-progress",
                               "--out", str(two / "experiment")]],
        ["cli", "discover", [*DISCOVER, "--out", str(two / "discover")]],
        ["cli", "faithfulness", [*FAITHFULNESS, "--circuit", str(two / "discover" / "circuit.json"),
                                 "--out", str(two / "faithfulness")]],
    ])
    yield launch
    launch.kill()


def _close(a, b, rel=1e-6):
    nan = lambda xs: [nan(x) if isinstance(x, list) else float("nan") if x is None else x for x in xs]  # noqa: E731
    a = torch.tensor(nan(a), dtype=torch.float64)
    b = torch.tensor(nan(b), dtype=torch.float64)
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.nan_to_num(), b.nan_to_num()
    assert torch.allclose(a, b, rtol=rel, atol=rel * float(b.abs().max())), (a - b).abs().max()


def test_training_over_two_ranks(two_ranks):
    """Full, head-masked, random-sparse and LoRA fine-tuning: 2 ranks x micro-batch 3 equals one
    process with 2 accumulated micro-batches; every rank holds the same weights; frozen slices
    stay bit-identical."""
    from distributed_setup import setup  # tests/ is on sys.path under pytest's rootdir insertion

    from ctsft_lens.masks import LoraSpec
    from ctsft_lens.models import tiny_model
    from ctsft_lens.train import train
    from ctsft_lens.train.lora import lora_targets
    from ctsft_lens.train.masking import trainable_specs

    initial = dict(tiny_model("qwen2", n_layers=2).named_parameters())
    with _one_thread():
        refs = {variant: (model, mask, train(model, train_ex, dev_ex, config, mask=mask, progress=False))
                for variant, (model, train_ex, dev_ex, mask, config) in setup(grad_accum=2).items()}
    two_ranks.wait("train")
    ranks = [torch.load(two_ranks.root / "train" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for variant, (model, mask, ref) in refs.items():
        got = [r[variant] for r in ranks]
        res = got[0]["result"]
        assert res["ranks"] == 2 and res["effective_batch"] == 6 and ref.effective_batch == 6
        assert res["steps"] == ref.steps == 6  # 5 micro-batches -> 3 steps per epoch, 2 epochs
        assert [h["train_loss"] for h in res["history"]] == pytest.approx([h["train_loss"] for h in ref.history], rel=1e-5)
        assert res["best_epoch"] == ref.best_epoch
        assert res["trainable_params"] == ref.trainable_params
        for name, p in model.named_parameters():
            assert torch.equal(got[0]["params"][name], got[1]["params"][name]), f"{variant}: ranks differ at {name}"
            assert torch.allclose(got[0]["params"][name], p.detach(), atol=2e-5, rtol=1e-4), f"{variant}: {name}"
        if isinstance(mask, LoraSpec):  # merged into the targeted projection weights, nothing else
            trained = {id(m.weight): None for _, m in lora_targets(model, mask.targets)}
        else:
            trained = {id(s.param): s.mask for s in trainable_specs(model, mask)[0]}
        n_changed = 0
        for name, p in model.named_parameters():
            frozen = torch.ones_like(p, dtype=torch.bool) if id(p) not in trained else (
                torch.zeros_like(p, dtype=torch.bool) if trained[id(p)] is None else ~trained[id(p)])
            for g in got:
                assert torch.equal(g["params"][name][frozen], initial[name].detach()[frozen]), f"{variant}: frozen {name} moved"
            n_changed += int((got[0]["params"][name] != initial[name].detach()).sum())
        assert n_changed > 0, variant


def test_experiment_grid_over_two_ranks_same_table(two_ranks):
    from ctsft_lens.cli import main

    root = two_ranks.root
    with _one_thread():
        assert main(["experiment", "--config", str(root / "tiny.toml"), "--no-progress",
                     "--out", str(root / "one" / "experiment")]) == 0
    two_ranks.wait("experiment")
    printed = two_ranks.printed("experiment")
    assert printed[0].count("results:") == 1 and printed[1] == ""
    two = json.loads((root / "two" / "experiment" / "results.json").read_text())
    one = json.loads((root / "one" / "experiment" / "results.json").read_text())
    assert len(one["runs"]) == 4  # 2 cells per rank
    assert two["table"] == one["table"] and two["circuit"] == one["circuit"] and two["a0"] == one["a0"]
    assert (root / "two" / "experiment" / "results.md").read_text() == (root / "one" / "experiment" / "results.md").read_text()


def test_discover_over_two_ranks_equals_one_process(two_ranks):
    from ctsft_lens.cli import main

    root = two_ranks.root
    with _one_thread():
        assert main([*DISCOVER, "--out", str(root / "one" / "discover")]) == 0
    two_ranks.wait("discover")
    printed = two_ranks.printed("discover")
    assert printed[0].count("circuit:") == 1 and printed[1] == ""  # rank 0 prints and writes
    two = json.loads((root / "two" / "discover" / "circuit.json").read_text())
    one = json.loads((root / "one" / "discover" / "circuit.json").read_text())
    assert two["heads_by_depth"] == one["heads_by_depth"]  # the same circuit
    assert len(one["scores"]) == 2
    for s2, s1 in zip(two["scores"], one["scores"]):
        _close(s2, s1)
    assert two["options"]["n_examples"] == 9
    assert two["unstable"] == one["unstable"]


def test_faithfulness_over_two_ranks_equals_one_process(two_ranks):
    from ctsft_lens.cli import main

    root = two_ranks.wait("discover")  # both runs read the 2-rank circuit (equal to one process's, see above)
    with _one_thread():
        assert main([*FAITHFULNESS, "--circuit", str(root / "two" / "discover" / "circuit.json"),
                     "--out", str(root / "one" / "faithfulness")]) == 0
    two_ranks.wait("faithfulness")
    assert two_ranks.printed("faithfulness")[1] == ""  # rank 0 prints and writes
    two = json.loads((root / "two" / "faithfulness" / "faithfulness.json").read_text())
    one = json.loads((root / "one" / "faithfulness" / "faithfulness.json").read_text())
    assert two["n_examples"] == one["n_examples"] == 9
    flat = lambda d: [v for k, v in sorted(d["full"].items())] + [v for k, v in sorted(d["empty"].items())] + [  # noqa: E731
        p[k] for c in d["depth_curves"].values() for p in c["points"]
        for k in ("faithfulness", "logit_diff", "accuracy", "necessity")] + d["random"]["values"][0]
    _close(flat(two), flat(one))
