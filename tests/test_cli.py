"""The `pyroflows` command: the main job, JSON output, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pyroflows.cli import main


def test_fit_json_and_plot(tmp_path, capsys):
    code = main(["fit", "--steps", "30", "--num-samples", "500", "--json", "--quiet", "--out", str(tmp_path)])
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
    (["fit", "--steps", "0"], "num_steps"),
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
    proc = subprocess.run([sys.executable, "-m", "pyroflows.cli", "fit", "--flow", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_sample_and_vi_take_the_common_data_flag(tmp_path, capsys):
    # --data is the common name (DESIGN.md); --target is the descriptive alias
    assert main(["sample", "--data", "banana", "--steps", "20", "--warmup", "10", "--chains", "8",
                 "--json", "--quiet", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["target"] == "banana"
    assert main(["vi", "--data", "u1", "--flow", "planar", "--steps", "5", "--json", "--quiet", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["target"] == "u1"
