"""The `pyroflows` command: the main job, JSON output, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyroflows import build_flow, energies
from pyroflows.cli import build_parser, configure_threads, main, output_files
from pyroflows.commands.vi import vi_figure
from pyroflows.plotting import density_fit_figure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_json_and_plot(tmp_path, capsys):
    code = main(["fit", "--steps", "30", "--num-samples", "500", "--json", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["flow"] == "realnvp" and np.isfinite(metrics["test_nll"])
    assert (tmp_path / "fit-realnvp-moons.png").stat().st_size > 1000


def test_fit_user_csv(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(300, 3))
    np.savetxt(tmp_path / "points.csv", data, delimiter=",")
    code = main(["fit", "--flow", "nice", "--data", str(tmp_path / "points.csv"), "--steps", "20",
                 "--json", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    assert "test_nll" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv,match", [
    (["fit", "--flow", "nope"], "unknown flow"),
    (["fit", "--data", "/no/such/file.csv"], "not found"),
    (["fit", "--steps", "0"], "--steps"),
    (["sample", "--chains", "0"], "--chains"),
    (["vi", "--lr", "-1"], "--lr"),
    (["fit", "--threads", "0"], "--threads"),
    (["fit", "--device", "cuda:7"], "cuda"),
    (["fit", "--device", "banana"], "device"),
])
def test_bad_arguments_give_one_line(argv, match, capsys, tmp_path):
    if "--device" in argv and argv[-1].startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    code = main(argv + ["--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("pyroflows: error:") and match in err


def test_wrong_column_count(tmp_path, capsys):
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n6,7,8\n")
    code = main(["fit", "--data", str(tmp_path / "ragged.csv"), "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "ragged.csv" in err


def test_console_script_runs_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyroflows.cli", "fit", "--flow", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_sample_and_vi_take_the_common_data_flag(tmp_path, capsys):
    # --data is the common name (DESIGN.md); --target is the descriptive alias
    assert main(["sample", "--data", "banana", "--steps", "20", "--warmup", "10", "--chains", "8",
                 "--json", "--quiet", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["target"] == "banana"
    assert main(["vi", "--data", "u1", "--flow", "planar", "--steps", "5", "--kl-samples", "500",
                 "--json", "--quiet", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["target"] == "u1"


def test_vi_trains_a_spline_guide_as_the_guide_recommends(tmp_path, monkeypatch, capsys):
    seen = {}

    def fit_guide(model, guide, **kwargs):  # records the settings; "trains" by a no-op update
        seen.update(kwargs)
        guide()
        with torch.no_grad():
            next(guide.parameters()).add_(0.0)
        return {"train_loss": [0.0], "restored_step": None}

    monkeypatch.setattr("pyroflows.guides.fit_guide", fit_guide)
    argv = ["vi", "--data", "u1", "--steps", "10", "--kl-samples", "500", "--json", "--quiet",
            "--out", str(tmp_path), "--overwrite"]
    assert main([*argv, "--flow", "nsf", "--particles", "8"]) == 0
    assert seen["lr"] == 3e-3 and seen["anneal_steps"] == 8 and seen["anneal_from"] == 0.5
    assert seen["anneal_shape"] == "cosine"
    assert seen["num_particles"] == 8  # a flag given wins
    seen.clear()
    assert main([*argv, "--flow", "planar"]) == 0  # no recommendation: the command's defaults
    assert seen["lr"] == 1e-2 and seen["num_particles"] == 64 and seen["anneal_steps"] == 3
    assert "anneal_from" not in seen and "anneal_shape" not in seen
    capsys.readouterr()


def _help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}, sub.format_help()


def test_help_texts_say_what_flags_accept():
    actions, text = _help("fit")
    data_help = actions["data"].help
    assert all(name in data_help for name in ("moons", "digits", ".npy", ".csv"))
    assert "target" not in data_help  # fit takes data, not energy targets
    for flag in ("batch_size", "lr", "steps", "threads"):
        assert actions[flag].help, flag
    actions, text = _help("sample")
    assert "training" not in actions["steps"].help and "draws" in actions["steps"].help
    assert text.count("banana") == 1  # the target list appears once
    for command in ("fit", "vi", "sample", "bench"):
        assert "--threads" in _help(command)[1] and "--overwrite" in _help(command)[1]


def test_threads_small_work_uses_one_and_flag_wins():
    assert configure_threads(None, 1_000) == 1 and torch.get_num_threads() == 1
    assert configure_threads(2, 1_000) == 2 and torch.get_num_threads() == 2
    assert configure_threads(None, 1e15) == torch.get_num_threads() >= 1


def test_output_files_never_overwrite(tmp_path):
    first = output_files(tmp_path, "bench", [".json", ".md"])
    assert [p.name for p in first] == ["bench.json", "bench.md"]
    first[1].write_text("x")  # one of the pair exists: the whole pair moves on
    assert [p.name for p in output_files(tmp_path, "bench", [".json", ".md"])] == [
        "bench-2.json", "bench-2.md"]
    assert output_files(tmp_path, "bench", [".md"], overwrite=True)[0] == first[1]


def test_second_run_keeps_the_first_plot(tmp_path, capsys):
    argv = ["sample", "--target", "banana", "--steps", "10", "--warmup", "5", "--chains", "4",
            "--json", "--quiet", "--out", str(tmp_path)]
    plots = []
    for _ in range(2):
        assert main(argv) == 0
        plots.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plot"])
    assert plots[0] != plots[1]
    assert all(Path(p).is_file() for p in plots)
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plot"] == plots[0]


def test_fit_figure_has_labels_colour_bar_and_title():
    flow = build_flow("realnvp", 2, num_layers=2, hidden_dims=(8,))
    fig = density_fit_figure(flow, torch.randn(200, 2), num_samples=200,
                             title="realnvp on moons: held-out NLL 1.234")
    data_ax, samples_ax, density_ax, colour_bar = fig.axes
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in (data_ax, samples_ax, density_ax))
    assert colour_bar.get_ylabel() == "density"
    assert "realnvp" in fig._suptitle.get_text() and "1.234" in fig._suptitle.get_text()


def test_vi_figure_is_large_with_axes_and_kl():
    target = energies.get("u2")
    fig = vi_figure(target, {"AutoFlow(iaf)": target.sample(500)}, bins=20,
                    kl={"AutoFlow(iaf)": 0.0123})
    width, height = fig.get_size_inches()
    assert width >= 7 and height >= 3.5
    panels = fig.axes[:2]
    assert all(ax.get_xlabel() and ax.get_xticks().size for ax in panels)
    assert "0.012" in panels[1].get_title()


def test_sample_puts_divergences_in_context(tmp_path, capsys):
    assert main(["sample", "--target", "banana", "--steps", "20", "--warmup", "20", "--chains", "8",
                 "--target-accept", "0.9", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "divergent transitions" in out and "target_accept_prob" not in out
    assert main(["sample", "--target-accept", "1.5", "--quiet", "--out", str(tmp_path)]) == 2
    assert "--target-accept" in capsys.readouterr().err


def test_sample_command_under_the_default_device_trap(tmp_path):
    import pyro
    from conftest import default_device_trap

    args = build_parser().parse_args(["sample", "--target", "banana", "--steps", "5", "--warmup",
                                      "5", "--chains", "4", "--quiet", "--out", str(tmp_path)])
    # torch's own argument validation makes tensors on the default device: switch it off
    with default_device_trap(), pyro.validation_enabled(False):
        assert args.run(args)["plot"].endswith(".png")
