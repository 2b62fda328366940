"""`python -m fastmeta train|eval`: runs, atomic checkpoints, resume, errors."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from fastmeta import train as training
from fastmeta.algorithms import LEARNERS
from fastmeta.cli import main
from fastmeta.data import DATASETS
from fastmeta.models import from_config
from fastmeta.train import RunConfig, evaluation, loop

OMNIGLOT = Path(os.environ.get("FASTMETA_OMNIGLOT", Path(__file__).resolve().parents[2] / "shared/data/omniglot"))
QUICK = ["--iterations", "30", "--val-every", "10", "--val-episodes", "2"]
# The learners of each kind of task, and those with the zeroing trick: every declared learner is tested.
REGRESSION = [n for n, x in LEARNERS.items() if "regression" in x.tasks]
CLASSIFICATION = [n for n, x in LEARNERS.items() if "classification" in x.tasks]
ZERO_HEAD = [n for n, x in LEARNERS.items() if x.option("zero_head") is not None]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("algo", REGRESSION)
def test_sinusoid_runs_checkpoints_and_evaluates(tmp_path, capsys, algo):
    out = tmp_path / "run"
    code, stdout, err = run(["train", "--algo", algo, "--out", str(out), "--json"] + QUICK, capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["iteration"] == 30
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 30 and len(state["history"]) == 3 and (out / "best.pt").is_file()
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    if algo == "metasgd":
        assert state["aux"] is not None
    code, stdout, err = run(["eval", str(out / "checkpoint.pt"), "--episodes", "100"], capsys)
    assert code == 0, err
    assert f"{algo} sinusoid 10-shot, test split, 100 tasks, 1 inner step: mse" in stdout and "(95% CI)" in stdout
    code, stdout, err = run(["eval", str(out / "best.pt"), "--episodes", "10", "--k-shot", "20"], capsys)
    assert code == 0 and f"{algo} sinusoid 20-shot, test split, 10 tasks" in stdout, err
    code, stdout, err = run(["eval", str(out / "best.pt"), "--episodes", "7", "--tasks-per-batch", "3"], capsys)
    assert code == 0 and f"{algo} sinusoid 10-shot, test split, 7 tasks" in stdout, err  # not 9
    code, _, err = run(["eval", str(out / "best.pt"), "--episodes", "0"], capsys)
    assert code == 2 and "episodes and tasks_per_batch must be >= 1" in err
    code, _, err = run(["eval", str(out / "best.pt"), "--k-shot", "0"], capsys)
    assert code == 2 and "k_shot must be >= 1, got 0" in err
    code, _, err = run(["eval", str(out / "best.pt"), "--n-way", "5"], capsys)
    assert code == 2 and "n_way: sinusoid tasks have no classes" in err


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_learns_sinusoids(tmp_path, algo):
    """A few hundred meta-steps take the post-adaptation MSE well below the untrained model's: MAML after one
    step, Reptile (its default outer and inner steps) after ten, as Nichol et al. test it with many steps."""
    if algo == "maml":
        config = RunConfig.make("sinusoid", iterations=300, val_every=300, val_episodes=8, meta_lr=1e-2)
    else:
        config = RunConfig.make("sinusoid", algo="reptile", iterations=600, val_every=600, val_episodes=8)
    steps = 1 if algo == "maml" else 10
    model, aux = training.build_model(config)
    before = training.evaluate_model(model, aux, config, training.datasets(config, "val"), 8, steps)["mean"]
    training.train(config, tmp_path / "run")
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"])
    after = training.evaluate_model(model, aux, config, training.datasets(config, "val"), 8, steps)["mean"]
    assert after < 0.4 * before


def test_resume_continues_the_same_run(tmp_path, capsys):
    settings = ["--iterations", "40", "--val-every", "20", "--val-episodes", "2"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["train", "--out", str(full)] + settings) == 0
    assert main(["train", "--out", str(half), "--time-limit", "0"] + settings) == 0  # stops after one step
    assert torch.load(half / "checkpoint.pt", weights_only=False)["iteration"] == 1
    code, _, err = run(["train", "--out", str(half)] + settings, capsys)
    assert code == 2 and "exists: pass --resume" in err
    code, _, err = run(["train", "--out", str(half), "--resume", "--iterations", "40", "--val-every", "10"], capsys)
    assert code == 2 and "other settings" in err and "val_every" in err
    assert main(["train", "--out", str(half), "--resume"] + settings) == 0
    a = torch.load(half / "checkpoint.pt", weights_only=False)
    b = torch.load(full / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 40
    for k in b["model"]:  # interrupted and resumed = uninterrupted
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    # the wall-clock goes on from the checkpoint's: a resumed run's history is one run's
    seconds = [h["seconds"] for h in a["history"]]
    assert [h["iteration"] for h in a["history"]] == [1, 20, 40]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    assert all(0 <= h["episode_wait"] <= h["seconds"] for h in a["history"])


class _Episodes:
    """Episode i is a function of i (as a run's are); episode 5 fails; records what was built."""

    def __init__(self) -> None:
        self.built = []

    def __getitem__(self, i: int) -> torch.Tensor:
        self.built.append(i)
        if i == 5:
            raise ValueError("episode 5 is bad")
        return torch.full((3,), float(i))


def test_prefetcher_gives_the_episodes_indexing_gives_one_ahead():
    episodes = _Episodes()
    with loop.Prefetcher(episodes, 2, 5) as p:
        assert torch.equal(p.get(2), torch.full((3,), 2.0))
        assert p.next is not None and p.next[0] == 3  # built while the caller works on 2
        assert torch.equal(p.get(3), torch.full((3,), 3.0))
        assert torch.equal(p.get(4), torch.full((3,), 4.0))
        assert p.next is None  # nothing past stop is built
    assert episodes.built == [2, 3, 4] and p.waited >= 0
    with loop.Prefetcher(episodes, 0, 10) as p:
        assert torch.equal(p.get(3), torch.full((3,), 3.0))  # a skip builds the asked one
        assert torch.equal(p.get(4), torch.full((3,), 4.0))  # episode 5 fails on the thread meanwhile
        with pytest.raises(ValueError, match="episode 5 is bad"):
            p.get(5)  # an episode's error is raised where it is asked for
    with loop.Prefetcher(episodes, 7, 7) as p:  # an empty range builds nothing
        assert p.next is None


def test_prefetched_run_episodes_equal_the_episode_set():
    config = RunConfig.make("sinusoid", meta_batch=3)
    train_set = training.datasets(config, "train")
    with loop.Prefetcher(training.datasets(config, "train"), 4, 8) as p:
        for i in range(4, 8):
            a, b = p.get(i), train_set[i]
            for name in ("support_x", "support_y", "query_x", "query_y"):
                assert torch.equal(getattr(a, name), getattr(b, name))


def test_plot_draws_runs_against_wall_clock(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tiny = ["--iterations", "4", "--val-every", "2", "--val-episodes", "1", "--test-episodes", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a)] + tiny) == 0
    assert main(["train", "--out", str(b), "--algo", "reptile"] + tiny) == 0
    capsys.readouterr()
    png = tmp_path / "curves.png"
    code, stdout, err = run(["plot", str(a), str(b), "--out", str(png)], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = stdout.splitlines()
    assert lines[1].startswith("a: maml 10-shot") and lines[2].startswith("b: reptile 10-shot")
    assert "it 4" in lines[1] and lines[-1] == f"plot: {png}"
    rows = training.plot_runs([a], tmp_path / "i.png", x="iteration")
    history = [json.loads(line) for line in (a / "history.jsonl").read_text().splitlines()]
    assert rows[0]["best_val"] == min(h["val"] for h in history) and rows[0]["metric"] == "mse"  # lower is better
    code, _, err = run(["plot", str(a), str(tmp_path / "nothere")], capsys)
    assert code == 2 and "nothere is not a run folder of fastmeta train: no" in err
    with pytest.raises(ValueError, match="x: 'seconds' or 'iteration'"):
        training.plot_runs([a], png, x="minutes")


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_makes_a_run_of_every_learner_for_it(dataset):
    """Each registered dataset's defaults make a valid run of every learner for its kind of task, and the model
    of that run is built for the dataset's images (channels, size) or its functions."""
    spec = DATASETS[dataset]
    learners = [n for n, x in LEARNERS.items() if spec.kind in x.tasks]
    assert learners
    for algo in learners:
        config = RunConfig.make(dataset, algo=algo)
        assert config.spec is spec and config.metric == ("mse" if spec.kind == "regression" else "accuracy")
        for name, value in spec.settings.items():
            assert getattr(config, name) == LEARNERS[algo].defaults.get(spec.domain, {}).get(name, value)
        model_config = config.model_config()
        if spec.channels is not None:
            assert (model_config["in_channels"], model_config["image_size"]) == (spec.channels, spec.image_size)
        if algo == learners[0]:  # one model a dataset: its input shape goes through it
            model = from_config(model_config).eval()
            shape = (2, 1) if spec.channels is None else (2, spec.channels, spec.image_size, spec.image_size)
            assert model(torch.zeros(shape)).shape[0] == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    training.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(training.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--iterations", "2", "--val-every", "2", "--val-episodes", "1"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["config"]["dataset"] = "omniglot"  # a sinusoid MLP's weights under an Omniglot Conv4's config
    state["config"]["data"] = str(OMNIGLOT)
    training.save_checkpoint(tmp_path / "odd.pt", state)
    code, _, err = run(["eval", str(tmp_path / "odd.pt")], capsys)
    assert code == 2 and "holds a different model" in err
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    code, _, err = run(["eval", str(tmp_path / "foreign.pt")], capsys)
    assert code == 2 and "is not a fastmeta checkpoint" in err
    code, _, err = run(["eval", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "no checkpoint at" in err


def test_train_errors(tmp_path, capsys):
    code, _, err = run(["train", "--dataset", "omniglot", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "omniglot needs --data PATH" in err
    code, _, err = run(
        ["train", "--dataset", "omniglot", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")], capsys
    )
    assert code == 2 and "Omniglot not found under" in err
    code, _, err = run(["train", "--algo", "pretrain", "--dataset", "omniglot", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "algo 'pretrain' is for regression tasks: use --dataset sinusoid, not omniglot" in err
    code, _, err = run(["train", "--algo", "protonet", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "algo 'protonet' is for classification tasks: use --dataset omniglot" in err
    code, _, err = run(["train", "--algo", "snail", "--out", str(tmp_path / "d2")], capsys)
    assert code == 2 and "algo 'snail' is for classification tasks: use --dataset omniglot" in err
    code, _, err = run(["train", "--dataset", "omniglot", "--train-way", "20", "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "--train-way is not an option of maml (it is for protonet, matching, siamese, metabase" in err
    code, _, err = run(["train", "--fce", "3", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "--fce is not an option of maml (it is for matching); maml reads --inner-lr," in err
    code, _, err = run(["train", "--margin", "3", "--out", str(tmp_path / "h")], capsys)
    assert code == 2 and "--margin is not an option of maml (it is for siamese)" in err
    code, _, err = run(
        ["train", "--dataset", "omniglot", "--algo", "protonet", "--scale", "3", "--out", str(tmp_path / "h2")], capsys
    )
    assert (
        code == 2
        and "--scale is not an option of protonet" in err
        and "protonet reads --train-way, --train-shot" in err
    )
    code, _, err = run(["train", "--algo", "protonet", "--inner-lr", "0.1", "--out", str(tmp_path / "h3")], capsys)
    assert code == 2 and "--inner-lr is not an option of protonet" in err  # once silently ignored
    code, _, err = run(["train", "--dataset", "omniglot", "--backbone", "koch", "--out", str(tmp_path / "i")], capsys)
    assert code == 2 and "koch backbone is an embedding network" in err
    code, _, err = run(["train", "--dataset", "omniglot", "--algo", "snail", "--train-shot", "5"], capsys)
    assert code == 2 and "--train-shot is not an option of snail" in err and "snail reads no options of its own" in err
    code, _, err = run(["train", "--dataset", "omniglot", "--algo", "snail", "--zero-head"], capsys)
    assert (
        code == 2
        and "--zero-head is not an option of snail (it is for maml, fomaml, metasgd, anil, imaml, reptile, metalstm)"
        in err
    )
    code, _, err = run(["train", "--dataset", "omniglot", "--layers", "3", "--out", str(tmp_path / "k")], capsys)
    assert code == 2 and "layers is a setting of sinusoid runs, not of omniglot ones" in err
    code, _, err = run(["train", "--algo", "metalstm", "--init-lr", "1.5", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "init_lr must be in (0, 1) (the Meta-LSTM's first rate is its input gate), got 1.5" in err
    for algo in ("metasgd", "metalstm"):  # --inner-lr was their initial rate: a step size is another thing
        code, _, err = run(["train", "--algo", algo, "--inner-lr", "0.1", "--out", str(tmp_path / "o2")], capsys)
        assert code == 2 and f"--inner-lr is not an option of {algo}: use --init-lr, " in err
    code, _, err = run(["train", "--layers", "0", "--out", str(tmp_path / "l")], capsys)
    assert code == 2 and "layers must be >= 1, got 0" in err
    code, _, err = run(["train", "--algo", "pretrain", "--inner-steps", "3", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and err.startswith("error: --inner-steps is not an option of pretrain") and err.count("\n") == 1
    assert not (tmp_path / "p").exists()
    for flag, value, text in (("--scale", "0", "scale must be > 0"), ("--fce", "0", "fce must be >= 1")):
        args = ["train", "--dataset", "omniglot", "--algo", "matching", flag, value, "--out", str(tmp_path / "m")]
        code, _, err = run(args, capsys)
        assert code == 2 and f"{text}, got 0" in err
    args = ["train", "--dataset", "omniglot", "--algo", "siamese", "--margin", "-1", "--out", str(tmp_path / "n")]
    code, _, err = run(args, capsys)
    assert code == 2 and "margin must be > 0, got -1.0" in err
    code, _, err = run(["train", "--train-shot", "0", "--out", str(tmp_path / "j")], capsys)
    assert code == 2 and "train_shot must be >= 1, got 0" in err
    if OMNIGLOT.is_dir():
        code, _, err = run(
            [
                "train",
                "--dataset",
                "omniglot",
                "--data",
                str(OMNIGLOT),
                "--n-way",
                "5000",
                "--out",
                str(tmp_path / "d"),
            ],
            capsys,
        )
        assert code == 2 and "n_way=5000 is more than the 4400 classes" in err
        code, _, err = run(
            ["train", "--dataset", "omniglot", "--data", str(OMNIGLOT), "--k-shot", "15", "--n-query", "10"]
            + ["--out", str(tmp_path / "e")],
            capsys,
        )
        assert code == 2 and "k_shot + n_query = 25 examples per class" in err


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"the Omniglot zips are not at {OMNIGLOT}")
@pytest.mark.parametrize("algo", CLASSIFICATION)
def test_omniglot_run(tmp_path, capsys, algo):
    out = tmp_path / "run"
    args = ["train", "--algo", algo, "--dataset", "omniglot", "--data", str(OMNIGLOT), "--out", str(out)]
    args += [
        "--meta-batch",
        "2",
        "--iterations",
        "3",
        "--val-every",
        "3",
        "--val-episodes",
        "1",
        "--test-episodes",
        "4",
        "--hidden",
        "16",  # a narrower Conv4: the command line's path is the same, in a quarter of the time
    ]
    if algo == "protonet":
        args += ["--train-way", "12"]  # Snell et al. train with more classes than they test
    if algo == "matching":
        args += ["--fce", "2", "--scale", "5"]
    if algo == "siamese":
        args += ["--margin", "2", "--pairs", "pairs"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    if algo == "matching":
        options = torch.load(out / "best.pt", weights_only=False)["config"]["options"]
        assert options == {"train_way": None, "train_shot": None, "fce": 2, "scale": 5.0}
    code, stdout, err = run(["eval", str(out / "best.pt"), "--episodes", "6", "--tasks-per-batch", "3"], capsys)
    assert code == 0, err
    learner = LEARNERS[algo]  # metric learners and SNAIL: no inner steps
    steps = f", {RunConfig.make('omniglot', algo=algo).eval_inner_steps} inner steps" if learner.adapts else ""
    assert f"{algo} omniglot 5-way 1-shot, test split, 6 tasks{steps}: accuracy" in stdout
    # other test episodes: any number of classes for the metric learners, more shots for all but SNAIL
    wider = ["eval", str(out / "best.pt"), "--episodes", "4", "--tasks-per-batch", "2", "--n-way", "20"]
    code, stdout, err = run(wider + ["--k-shot", "2"], capsys)
    if not learner.head and "n_way" not in learner.built_for:
        assert code == 0, err
        assert f"{algo} omniglot 20-way 2-shot, test split, 4 tasks{steps}: accuracy" in stdout
    else:
        assert code == 2 and f"n_way: a {algo} model is built for 5-way episodes" in err
        code, stdout, err = run(wider[:-2] + ["--k-shot", "2"], capsys)
        if "k_shot" in learner.built_for:
            assert code == 2 and f"k_shot: a {algo} model is built for 1-shot episodes" in err
        else:
            assert code == 0 and f"{algo} omniglot 5-way 2-shot, test split, 4 tasks{steps}" in stdout, err


def test_plot_writes_a_learning_curve_or_says_what_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--out", str(out), "--plot"] + QUICK, capsys)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "--plot needs matplotlib: pip install matplotlib" in err
    else:
        assert code == 0, err
        assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_run_folders_are_numbered(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--iterations", "2", "--val-every", "2", "--val-episodes", "1"]
    assert main(["train"] + tiny) == 0 and main(["train"] + tiny) == 0
    assert (tmp_path / "runs/maml-sinusoid/checkpoint.pt").is_file()
    assert (tmp_path / "runs/maml-sinusoid-2/checkpoint.pt").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", "--iterations", "4", "--val-every", "2", "--val-episodes", "1"]) == 2
    assert "runs/maml-sinusoid-2/checkpoint.pt was written by a run with other settings" in capsys.readouterr().err


def test_meta_lr_schedules(tmp_path):
    constant = RunConfig.make("sinusoid", iterations=100, meta_lr=1.0)
    assert constant.lr_at(0) == constant.lr_at(99) == 1.0
    reptile = RunConfig.make("sinusoid", algo="reptile", iterations=100, meta_lr=1.0)
    assert reptile.lr_at(25) == 0.75  # Nichol et al.'s linear annealing by default
    cosine = RunConfig.make("sinusoid", iterations=100, meta_lr=1.0, schedule="cosine")
    assert cosine.lr_at(0) == 1.0 and cosine.lr_at(50) == pytest.approx(0.5) and cosine.lr_at(100) == pytest.approx(0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        RunConfig.make("sinusoid", schedule="step")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--iterations", "8", "--val-every", "8", "--schedule", "cosine"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["config"]["schedule"] == "cosine"
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_train_and_eval_on_a_device(tmp_path, capsys, device):
    out = tmp_path / "run"
    code, _, err = run(["train", "--out", str(out), "--device", device, "--algo", "metasgd"] + QUICK, capsys)
    assert code == 0, err
    code, stdout, err = run(["eval", str(out / "best.pt"), "--episodes", "50", "--device", device], capsys)
    assert code == 0 and "mse" in stdout, err
    code, _, err = run(["train", "--out", str(tmp_path / "x"), "--device", "tpu:7"] + QUICK, capsys)
    assert code == 2 and "--device" in err


def test_step_numbers_and_batches_cross_between_host_and_device(device):
    """What the loop sends without waiting arrives intact: a step's numbers to the host (read after the
    step's event on a GPU), an episode batch to the device (through pinned memory on a GPU)."""
    numbers = training.StepNumbers(torch.tensor([0.25, math.nan], dtype=torch.float64, device=device) * 2, True)
    assert numbers.stop and numbers.read() == {"loss": 0.5, "accuracy": None}
    batch = training.datasets(RunConfig.make("sinusoid", meta_batch=3), "train")[0]
    moved = training.to_device(batch, device)
    assert moved.device.type == device
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(moved, name).cpu(), getattr(batch, name))


def test_train_shot_widens_only_the_training_episodes(tmp_path):
    """Nichol et al. train Reptile on 10-shot episodes and test it on 1-shot ones: --train-shot sets the training
    episodes' support size; validation and test keep --k-shot."""
    config = RunConfig.make("sinusoid", k_shot=5, train_shot=20, meta_batch=3)
    train_batch = training.datasets(config, "train")[0]
    val_batch = training.datasets(config, "val")[0]
    assert train_batch.support_x.shape == (3, 20, 1) and val_batch.support_x.shape == (3, 5, 1)
    assert training.datasets(config, "test")[0].support_x.shape == (3, 5, 1)
    plain = RunConfig.make("sinusoid", k_shot=5, meta_batch=3)
    assert training.datasets(plain, "train")[0].support_x.shape == (3, 5, 1)
    if OMNIGLOT.is_dir():
        config = RunConfig.make("omniglot", data=str(OMNIGLOT), k_shot=1, train_shot=3, n_query=2, meta_batch=2)
        assert training.datasets(config, "train")[0].support_x.shape[:2] == (2, 15)  # 5 classes x 3
        assert training.datasets(config, "val")[0].support_x.shape[:2] == (2, 5)
        wide = RunConfig.make("omniglot", data=str(OMNIGLOT), train_shot=19, n_query=2)
        with pytest.raises(ValueError, match="k_shot \\+ n_query = 21 examples per class"):
            training.datasets(wide, "train")


def test_eval_tests_the_asked_episodes_on_every_part(tmp_path, monkeypatch):
    """eval on the training part tests --k-shot episodes too, not the run's wider --train-shot ones."""
    config = RunConfig.make(
        "sinusoid", algo="reptile", k_shot=5, train_shot=20, meta_batch=2, iterations=2, val_every=2, val_episodes=1
    )
    training.train(config, tmp_path / "run")
    shots, real = [], evaluation.datasets

    def recording(config, part="train", shard=(0, 1), episodes=False):
        episodes = real(config, part, shard, episodes)
        shots.append((part, episodes[0].support_x.shape[1]))
        return episodes

    monkeypatch.setattr(evaluation, "datasets", recording)
    for part in ("train", "trainval", "test"):
        result = training.evaluate(tmp_path / "run" / "checkpoint.pt", episodes=2, part=part)
        assert result["config"]["k_shot"] == 5 and result["inner_steps"] == 1
    assert shots == [("train", 5), ("trainval", 5), ("test", 5)]
    assert training.evaluate(tmp_path / "run" / "checkpoint.pt", episodes=2, k_shot=7)["config"]["k_shot"] == 7
    assert shots[-1] == ("test", 7)


@pytest.mark.parametrize("algo", ZERO_HEAD)
def test_zero_head_keeps_the_head_at_zero_and_trains_the_body(tmp_path, algo):
    """--zero-head (Kao et al.'s zeroing trick): every task adapts from a zero head, so the head is 0 after
    every meta-update, while the layers below it learn; without it the head learns too. The Meta-LSTM's head is
    its learner's (the head's part of the initial cell state)."""
    pre = "learner." if algo == "metalstm" else ""
    runs = {}
    for zero in (True, False):
        config = RunConfig.make(
            "sinusoid", algo=algo, iterations=4, val_every=4, val_episodes=1, zero_head=zero or None
        )
        torch.manual_seed(0)
        initial = training.build_model(config)[0].state_dict()
        training.train(config, tmp_path / f"{algo}{zero}")
        runs[zero] = initial, torch.load(tmp_path / f"{algo}{zero}" / "checkpoint.pt", weights_only=False)
    initial, trained = runs[True][0], runs[True][1]["model"]
    assert torch.all(initial[pre + "head.weight"] == 0) and torch.all(initial[pre + "head.bias"] == 0)
    assert torch.all(trained[pre + "head.weight"] == 0) and torch.all(trained[pre + "head.bias"] == 0)
    assert not torch.equal(trained[pre + "features.0.weight"], initial[pre + "features.0.weight"])
    initial, trained = runs[False][0], runs[False][1]["model"]
    assert not torch.equal(trained[pre + "head.weight"], initial[pre + "head.weight"])
    # evaluation adapts from the zero head: before any step the model is the zero function (MSE = mean y^2)
    config = RunConfig.make("sinusoid", algo=algo, zero_head=True)
    model, aux = training.build_model(config)
    model.load_state_dict(runs[True][1]["model"])
    if aux is not None:
        aux.load_state_dict(runs[True][1]["aux"])
    episodes = training.datasets(config, "val")
    squares = torch.cat([episodes[i].query_y.flatten() for i in range(2)]).square().mean().item()
    unadapted = training.evaluate_model(model, aux, config, episodes, 2, 0)["mean"]
    assert unadapted == pytest.approx(squares, rel=1e-5)
    assert training.evaluate_model(model, aux, config, episodes, 2, 5)["mean"] < unadapted


def test_zero_head_needs_a_linear_head():
    with pytest.raises(ValueError, match="zero_head: the model needs a linear `head`"):
        training.zero_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_per_algorithm_defaults():
    assert RunConfig.make("omniglot", algo="metalstm").meta_batch == 8  # T * P LSTM rows: fewer tasks
    assert RunConfig.make("omniglot", algo="metalstm", meta_batch=3).meta_batch == 3  # what the user says wins
    for dataset in ("omniglot", "sinusoid"):  # the Meta-LSTM's first rate: the paper's, unless told
        config = RunConfig.make(dataset, algo="metalstm")
        assert config.init_lr == 0.011
        assert -5 <= training.build_model(config)[0].input_gate.bias.item() <= -4
    torch.manual_seed(0)
    config = RunConfig.make("omniglot", algo="metalstm", init_lr=0.2)
    assert torch.sigmoid(training.build_model(config)[0].input_gate.bias).item() == pytest.approx(0.2, abs=0.1)
    assert RunConfig.make("omniglot", algo="maml").meta_batch == 32
    assert RunConfig.make("sinusoid", algo="metalstm").meta_batch == 25
    reptile = RunConfig.make("omniglot", algo="reptile")  # Nichol et al.'s: 5 tasks, 5 steps, 10-shot training
    assert (reptile.meta_batch, reptile.inner_steps, reptile.train_shot, reptile.meta_lr) == (5, 5, 10, 1.0)
    assert (reptile.k_shot, RunConfig.make("omniglot", algo="maml").train_shot) == (1, None)
    assert RunConfig.make("sinusoid", algo="reptile").meta_lr == 1.0  # epsilon, not Adam's 1e-3


def test_layers_sets_the_sinusoid_mlp_depth(tmp_path, capsys):
    """--layers N --hidden H trains an MLP (1, H x N, 1), which eval rebuilds from the checkpoint."""
    code, _, _ = run(["train", "--layers", "3", "--hidden", "8", *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    state = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert [v.shape for k, v in state["model"].items() if k.endswith("weight")] == [(8, 1), (8, 8), (8, 8), (1, 8)]
    code, out, _ = run(["eval", str(tmp_path / "r" / "best.pt"), "--episodes", "20"], capsys)
    assert code == 0 and "mse" in out.lower()


def test_eval_says_which_file_is_not_a_readable_checkpoint(tmp_path, capsys):
    """A truncated checkpoint, a text file and an empty one: one line naming the file, not a traceback."""
    good = (Path(__file__).parent / "fixtures" / "checkpoints" / "maml-sinusoid.pt").read_bytes()
    for name, content in (("truncated.pt", good[:5000]), ("notes.pt", b"hello\n"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        code, _, err = run(["eval", str(tmp_path / name)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{tmp_path / name} is not a readable fastmeta checkpoint" in err
    code, _, err = run(["train", "--out", str(tmp_path / "r"), "--resume", "--iterations", "2"], capsys)
    assert code == 2 and "no checkpoint at" in err  # --resume of nothing
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(good[:5000])
    code, _, err = run(["train", "--out", str(tmp_path / "r"), "--resume", "--iterations", "2"], capsys)
    assert code == 2 and "checkpoint.pt is not a readable fastmeta checkpoint" in err


def test_corrupt_omniglot_zip_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "omniglot"
    data.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        (data / name).write_bytes(b"PK\x03\x04 half a download")
    out = tmp_path / "run"
    code, _, err = run(["train", "--dataset", "omniglot", "--data", str(data), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{data / 'images_background.zip'} is not a readable zip file" in err and "download it again" in err
    assert not out.exists()  # a run that fails before its first step leaves no folder


def test_corrupt_png_in_a_valid_omniglot_zip_is_named(tmp_path, capsys, monkeypatch):
    """A zip that reads, one PNG of which does not decode: one line naming the member and the zip, exit status 2,
    no run folder and no cache file."""
    import io
    import zipfile

    from PIL import Image

    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    buf = io.BytesIO()
    Image.new("1", (105, 105), 1).save(buf, format="PNG")
    data = tmp_path / "omniglot"
    data.mkdir()
    for s in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(data / f"{s}.zip", "w") as z:
            z.writestr(f"{s}/Alpha/character01/0001_01.png", buf.getvalue())
            if s == "images_background":
                z.writestr(f"{s}/Alpha/character01/0001_02.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 8)
    out = tmp_path / "run"
    code, _, err = run(["train", "--dataset", "omniglot", "--data", str(data), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    where = f"images_background/Alpha/character01/0001_02.png in {data / 'images_background.zip'}"
    assert err.startswith(f"error: cannot decode image {where} (") and "download images_background.zip again" in err
    assert not out.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize(
    "flag, value, text",
    [
        ("--inner-lr", "nan", "inner_lr must be a finite number, got nan"),
        ("--inner-lr", "inf", "inner_lr must be a finite number, got inf"),
        ("--inner-lr", "-0.1", "inner_lr must be >= 0, got -0.1"),
        ("--meta-lr", "-1e-3", "meta_lr must be > 0, got -0.001"),
        ("--meta-lr", "nan", "meta_lr must be a finite number, got nan"),
    ],
)
def test_non_finite_or_negative_rates_are_refused(tmp_path, capsys, flag, value, text):
    code, _, err = run(["train", f"{flag}={value}", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and text in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_keeps_its_checkpoints(tmp_path, capsys, monkeypatch):
    """When the training loss becomes NaN the run stops at that step, says so and what to try, and leaves the
    last checkpoint and best.pt as they were."""
    real, calls = loop.train_step, []

    def diverging(config, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 15:  # the 15th step starts from NaN weights
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)
        return real(config, model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", diverging)
    out = tmp_path / "run"
    code, _, err = run(
        ["train", "--out", str(out), "--iterations", "20", "--val-every", "10", "--val-episodes", "1"], capsys
    )
    assert code == 2 and err.splitlines()[-1].startswith("error: the training loss became nan at iteration 15 of 20")
    assert err.count("error") == 1 and "Try a smaller --meta-lr" in err  # above it: the progress bar
    assert f"{out / 'checkpoint.pt'} (iteration 10) and best.pt are kept" in err and "--inner-lr (now 0.01)" in err
    for name in ("checkpoint.pt", "best.pt"):
        assert torch.load(out / name, weights_only=False)["iteration"] == 10
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_a_step_is_read_after_the_next_one_is_issued(tmp_path, capsys, monkeypatch):
    """The loop reads a step's loss after issuing the next step (on a GPU the host then queues it while the
    device runs the last one), and each step's own before a validation, a checkpoint or the end."""
    real, log, steps = loop.train_step, [], []

    class Logged:
        def __init__(self, numbers, i):
            self.numbers, self.i, self.stop = numbers, i, numbers.stop

        def read(self):
            log.append(f"read {self.i}")
            return self.numbers.read()

    def logged(*args, **kwargs):
        steps.append(1)
        log.append(f"step {len(steps)}")
        return Logged(real(*args, **kwargs), len(steps))

    real_validate = loop.evaluate_model

    def validate(*args, **kwargs):
        log.append("validate")
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", logged)
    monkeypatch.setattr(loop, "evaluate_model", validate)
    args = ["train", "--out", str(tmp_path / "run"), "--iterations", "5", "--val-every", "3", "--val-episodes", "1"]
    code, _, err = run([*args, "--test-episodes", "4"], capsys)
    assert code == 0, err
    assert log[:11] == ["step 1", "step 2", "read 1", "step 3", "read 2", "read 3", "validate",
                        "step 4", "step 5", "read 4", "read 5"], log  # fmt: skip
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [3, 5] and all(math.isfinite(h["train_loss"]) for h in history)


def test_failed_runs_leave_no_folder_and_empty_ones_are_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", "--dataset", "omniglot"], capsys)
    assert code == 2 and "omniglot needs --data PATH" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "maml-sinusoid").mkdir(parents=True)  # left by an older fastmeta
    assert main(["train", "--iterations", "2", "--val-every", "2", "--val-episodes", "1", "--test-episodes", "4"]) == 0
    assert (tmp_path / "runs/maml-sinusoid/checkpoint.pt").is_file() and not (
        tmp_path / "runs/maml-sinusoid-2"
    ).exists()


@pytest.mark.parametrize("name", ["maml-sinusoid", "metasgd-sinusoid", "metalstm-sinusoid", "protonet-omniglot"])
def test_checkpoints_of_earlier_versions_still_evaluate(name, tmp_path, capsys):
    """Checkpoints written before the learner declarations (tests/fixtures/checkpoints) load and test the same."""
    fixtures = Path(__file__).parent / "fixtures" / "checkpoints"
    expected = json.loads((fixtures / "expected.json").read_text())[name]
    data = None
    if name.endswith("omniglot"):
        if not OMNIGLOT.is_dir():
            pytest.skip(f"the Omniglot zips are not at {OMNIGLOT}")
        data = str(OMNIGLOT)
    result = training.evaluate(fixtures / f"{name}.pt", episodes=20, tasks_per_batch=10, data=data)
    assert result["mean"] == pytest.approx(expected["mean"], rel=1e-5)
    assert (result["metric"], result["tasks"], result["inner_steps"]) == (
        expected["metric"], expected["tasks"], expected["inner_steps"]
    )  # fmt: skip
    args = ["eval", str(fixtures / f"{name}.pt"), "--episodes", "4"] + (["--data", data] if data else [])
    code, stdout, err = run(args, capsys)
    assert code == 0 and f"{name.split('-')[0]} " in stdout, err
    if data is None:  # --resume with the settings it was written with: the old config equals today's
        algo, folder = name.split("-")[0], tmp_path / "run"
        folder.mkdir()
        for file in ("checkpoint.pt", "best.pt"):
            shutil.copy(fixtures / f"{name}.pt", folder / file)
        args = ["train", "--algo", algo, "--out", str(folder), "--resume", "--iterations", "2", "--val-every", "2"]
        args += ["--val-episodes", "1", "--hidden", "8", "--test-episodes", "4"]
        code, stdout, err = run(args + (["--zero-head"] if algo == "metalstm" else []), capsys)
        assert code == 0 and "test: mse" in stdout, err


def test_a_run_ends_with_its_test_against_the_baseline_and_the_next_command(tmp_path, capsys):
    """The main job's end: the test on best.pt with its CI, the pretrained baseline on the same tasks where a
    run of it sits beside this one (else how to train one), where the files are, and the eval command."""
    tiny = ["--iterations", "4", "--val-every", "2", "--val-episodes", "1", "--test-episodes", "20"]
    first = tmp_path / "maml-sinusoid"
    code, stdout, err = run(["train", "--out", str(first), *tiny], capsys)
    assert code == 0, err
    assert "test: mse " in stdout and "(95% CI), 20 10-shot tasks of the test split, 1 inner step" in stdout
    hint = f"python -m fastmeta train --algo pretrain --out {tmp_path / 'pretrain-sinusoid'}"
    assert f"no pretrain baseline beside this run to compare with: {hint}" in stdout
    assert f"checkpoints: {first}/best.pt (best validation), {first}/checkpoint.pt (latest)" in stdout
    assert stdout.strip().splitlines()[-1] == f"next: python -m fastmeta eval {first}/best.pt"
    assert main(["train", "--algo", "pretrain", "--out", str(tmp_path / "pretrain-sinusoid"), *tiny]) == 0
    capsys.readouterr()
    second = tmp_path / "maml-sinusoid-2"
    code, stdout, err = run(["train", "--out", str(second), *tiny, "--seed", "3"], capsys)
    assert code == 0, err
    line = next(x for x in stdout.splitlines() if "pretrain baseline on the same tasks" in x)
    ours = training.evaluate(second / "best.pt", 20, per_task=True)
    theirs = training.evaluate(tmp_path / "pretrain-sinusoid" / "best.pt", 20, seed=3, per_task=True)
    assert f"mse {theirs['mean']:.3f} +- {theirs['ci95']:.3f}" in line  # on this run's tasks (seed 3), not its own
    assert f"maml minus pretrain: {(ours['values'] - theirs['values']).mean().item():.3f}" in line
    code, stdout, err = run(["train", "--out", str(tmp_path / "j"), *tiny, "--json"], capsys)
    assert code == 0, err
    end = json.loads(stdout.strip().splitlines()[-1])
    assert end["iteration"] == 4 and end["test"]["tasks"] == 20
    assert end["baseline"]["path"] == str(tmp_path / "pretrain-sinusoid" / "best.pt")
    code, stdout, _ = run(["train", "--out", str(tmp_path / "t"), *tiny[:-2], "--test-episodes", "0"], capsys)
    assert code == 0 and "test:" not in stdout and "next: python -m fastmeta eval" in stdout


@pytest.mark.parametrize("recompute", ["steps", "2", "steps,2"])
def test_recompute_trains_the_same_model(tmp_path, recompute, monkeypatch):
    """--recompute saves memory, not results: the same weights after some second-order MAML steps as without it
    (3 inner steps, 4 tasks a meta-batch; sinusoids, no randomness in the model)."""
    from fastmeta.algorithms import maml_learners

    settings = ["--iterations", "6", "--val-every", "6", "--val-episodes", "1", "--test-episodes", "2",
                "--inner-steps", "3", "--meta-batch", "4"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "plain"), *settings]) == 0
    seen = []
    step = maml_learners.maml_step
    monkeypatch.setattr(maml_learners, "maml_step", lambda *a, **k: seen.append(k["recompute"]) or step(*a, **k))
    assert main(["train", "--out", str(tmp_path / "re"), "--recompute", recompute, *settings]) == 0
    assert set(seen) == {maml_learners.recompute_of(recompute)} and len(seen) == 6
    a = torch.load(tmp_path / "re" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)
    assert a["config"]["options"]["recompute"] == recompute
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)


def test_resume_may_change_recompute_only(tmp_path, capsys):
    """A run stopped (say, out of memory) resumes with --recompute steps and ends with the weights of the run that
    never stopped; any other change of settings is still refused."""
    settings = ["--iterations", "4", "--val-every", "2", "--val-episodes", "1", "--test-episodes", "2",
                "--inner-steps", "2", "--meta-batch", "4"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "plain"), *settings]) == 0
    half = tmp_path / "half"
    assert main(["train", "--out", str(half), "--time-limit", "0", *settings]) == 0  # stops after one step
    code, _, err = run(["train", "--out", str(half), "--resume", "--recompute", "steps", "--inner-lr", "0.02",
                        *settings], capsys)  # fmt: skip
    assert code == 2 and "other settings" in err and "inner_lr" in err and "recompute" not in err
    code, out, _ = run(["train", "--out", str(half), "--resume", "--recompute", "steps", *settings], capsys)
    assert code == 0 and "--resume: recompute none -> steps" in out
    a = torch.load(half / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4 and a["config"]["options"]["recompute"] == "steps"
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", ["0", "steps,0", "step", "2,steps", "-1", "steps,"])
def test_bad_recompute_values_are_refused(tmp_path, capsys, value):
    code, _, err = run(["train", f"--recompute={value}", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "recompute must be none, steps, an integer k >= 1 or steps,k" in err, err
    assert not (tmp_path / "run").exists()
    code, _, err = run(["train", "--algo", "protonet", "--dataset", "omniglot", "--recompute", "steps"], capsys)
    assert code == 2 and "recompute" in err


@pytest.mark.parametrize("dataset,algo", [("sinusoid", "maml"), ("omniglot", "protonet"), ("omniglot", "metasgd")])
def test_evaluation_in_chunks_scores_the_same_tasks_the_same(dataset, algo, monkeypatch):
    """Evaluation adapts a batch's tasks a few at a time where they do not fit at once (EVAL_MEMORY): the same
    tasks, each with the same score as in one piece, in the memory of a few."""
    if dataset == "omniglot" and not OMNIGLOT.is_dir():
        pytest.skip(f"the Omniglot zips are not at {OMNIGLOT}")
    extra = {"data": str(OMNIGLOT)} if dataset == "omniglot" else {}
    config = RunConfig.make(dataset, algo=algo, meta_batch=7, hidden=8, **extra)
    model, aux = training.build_model(config)
    episodes = training.datasets(config, "val")
    whole = training.evaluate_model(model, aux, config, episodes, 2, 1, per_task=True)
    per_task = 2 * (episodes[0].support_x.shape[1] + episodes[0].query_x.shape[1])
    per_task *= evaluation._activation_bytes(json.dumps(config.model_config(), sort_keys=True),
                                             tuple(episodes[0].support_x.shape[2:]))  # fmt: skip
    monkeypatch.setattr(evaluation, "EVAL_MEMORY", 3 * per_task)
    assert evaluation.tasks_at_once(config, episodes[0], "cpu") == 3
    chunked = training.evaluate_model(model, aux, config, episodes, 2, 1, per_task=True)
    assert chunked["tasks"] == whole["tasks"] == 14
    torch.testing.assert_close(chunked["values"], whole["values"], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(evaluation, "EVAL_MEMORY", 1)  # less than one task: one at a time, never none
    assert evaluation.tasks_at_once(config, episodes[0], "cpu") == 1
    assert episodes[0][2:5].num_tasks == 3
    with pytest.raises(TypeError, match="index with a slice of tasks"):
        episodes[0][2]


def test_anil_adapts_the_head_only():
    """--algo anil is maml_step and adapt with adapt_params=["head"]: the body's weights are every task's."""
    from fastmeta import adapt, maml_step

    config = RunConfig.make("sinusoid", algo="anil", inner_steps=2)
    model, aux = training.build_model(config)
    batch = training.datasets(config)[0]
    learner = LEARNERS["anil"]
    out = learner.objective(config, model, aux, batch)
    head = maml_step(model, batch, config.inner_lr, 2, False, config.loss_fn, adapt_params=["head"])
    every = maml_step(model, batch, config.inner_lr, 2, False, config.loss_fn)
    torch.testing.assert_close(out.loss, head.loss)
    assert not torch.allclose(out.loss, every.loss)
    predicted = learner.predict(config, model, aux, batch, 3)
    adapted = adapt(model, batch.support_x, batch.support_y, config.inner_lr, 3, config.loss_fn, adapt_params=["head"])
    torch.testing.assert_close(predicted, adapted(batch.query_x).detach())
