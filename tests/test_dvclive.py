"""DVCLive logging of training: one row per step equal to log.csv's, exact across a resume,
offline, and read by the real `dvc plots show` / `dvc metrics show` as dvc.yaml declares it."""

import csv
import json
import math
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from facelora.io.live import LiveSeries, read_series
from facelora.registry.layout import Layout
from facelora.train.checkpoint import list_checkpoints
from facelora.train.loop import Trainer, train_phase

from helpers import BIN, ROOT, settings, write_pairs

FAMILY = "qwen_image_edit"


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection attempt is recorded and refused; a Studio token is set, so DVCLive
    would post to DVC Studio if it were let."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("DVC_STUDIO_TOKEN", "isat_not-a-real-token")
    monkeypatch.setenv("DVC_STUDIO_REPO_URL", "https://example.invalid/repo.git")
    monkeypatch.setenv("DVC_STUDIO_URL", "https://studio.example.invalid")
    return attempts


def read_log(path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def assert_series_match_log(live_dir, log_rows, columns) -> None:
    """Each column but the step: one (step, value) per row of log.csv where it has a value,
    equal to it, in step order."""
    series = read_series(live_dir)
    assert set(series) == set(columns)
    for column in columns:
        expected = [(int(r["step"]), float(r[column])) for r in log_rows if r[column] != ""]
        assert series[column] == expected, column
    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary["step"] == int(log_rows[-1]["step"])
    assert summary["loss"] == float(log_rows[-1]["loss"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """A 6-step run in a project folder, its DVCLive folder at the layout's path."""
    project = tmp_path_factory.mktemp("live") / "project"
    layout = Layout(str(project / "results"))
    data = write_pairs(project / "data", n=2)
    params = settings(FAMILY, tiny_models[FAMILY], steps=6)
    out, live = Path(layout.train_dir("one")), Path(layout.train_live_dir("one"))
    train_phase(
        "one", data, out, params, cache_dir=project / "cache", show_progress=False, live_out=live
    )
    return project, out, live


def test_training_logs_each_step_as_log_csv_does(trained):
    _, out, live = trained
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_series_match_log(live, rows, ["loss", "lr", "grad_norm", "sigma_mean", "seconds"])
    assert not list(live.glob("report.*")) and not (live / "dvc.yaml").exists()


def test_a_killed_run_resumes_the_series_without_repeats_or_gaps(tmp_path, tiny_models):
    """Killed at its second checkpoint (log.csv and DVCLive already hold steps 4-6, the
    checkpoint does not), the run resumes from step 3: both are cut back to it and go on."""
    data = write_pairs(tmp_path / "data", n=2)
    params = settings(FAMILY, tiny_models[FAMILY], steps=6)

    def trainer(out):
        return Trainer(
            "one",
            data,
            tmp_path / out,
            params,
            cache_dir=tmp_path / "cache",
            live_dir=tmp_path / "live",
        )

    first = trainer("killed")
    save, calls = first.save, []

    def die_at_the_second_checkpoint(loss):
        calls.append(loss)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies before the step-6 checkpoint is saved
        return save(loss)

    first.save = die_at_the_second_checkpoint
    with pytest.raises(KeyboardInterrupt):
        first.run(show_progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [3]
    assert [s for s, _ in read_series(tmp_path / "live")["loss"]] == [1, 2, 3, 4, 5, 6]

    summary = trainer("killed").run(show_progress=False)
    assert summary["resumed"]
    rows = read_log(tmp_path / "killed" / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_series_match_log(
        tmp_path / "live", rows, ["loss", "lr", "grad_norm", "sigma_mean", "seconds"]
    )
    # and the resumed steps are the uninterrupted run's (the step times aside)
    trainer("straight").run(show_progress=False)
    straight = read_series(tmp_path / "live")
    assert {k: v for k, v in straight.items() if k != "seconds"} == {
        k: [(int(r["step"]), float(r[k])) for r in rows]
        for k in ("loss", "lr", "grad_norm", "sigma_mean")
    }


def test_a_term_without_a_value_has_no_point_that_step(tmp_path):
    live = LiveSeries(tmp_path / "live")
    rows = [
        {"step": 1, "loss": 0.5, "identity": math.nan},
        {"step": 2, "loss": 0.4, "identity": 0.25},
    ]
    live.replay(rows, ["loss", "identity"])
    live.log(3, {"step": 3, "loss": 0.3, "identity": None})
    assert read_series(tmp_path / "live") == {
        "loss": [(1, 0.5), (2, 0.4), (3, 0.3)],
        "identity": [(2, 0.25)],
    }
    # a new series over the same folder starts empty: nothing of the old one is kept
    LiveSeries(tmp_path / "live").log(1, {"loss": 1.0})
    assert read_series(tmp_path / "live") == {"loss": [(1, 1.0)]}


def test_no_network_even_with_a_studio_token(tmp_path, tiny_models, no_network, monkeypatch):
    from dvclive import Live

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    LiveSeries(tmp_path / "empty").log(1, {"loss": 1.0})  # a repository without a commit
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    # the check sees an attempt: plain DVCLive with the token set posts to Studio
    plain = Live(str(tmp_path / "plain"), save_dvc_exp=False, dvcyaml=None)
    plain.log_metric("loss", 1.0)
    plain.next_step()
    plain.end()
    assert no_network, "the no_network check saw no attempt from DVCLive with a token"
    no_network.clear()

    data = write_pairs(tmp_path / "data", n=2)
    params = settings(FAMILY, tiny_models[FAMILY], steps=3)
    train_phase(
        "one",
        data,
        tmp_path / "out",
        params,
        cache_dir=tmp_path / "cache",
        show_progress=False,
        live_out=tmp_path / "live",
    )
    assert [s for s, _ in read_series(tmp_path / "live")["loss"]] == [1, 2, 3]
    assert no_network == []
    assert os.environ["DVC_STUDIO_TOKEN"] == "isat_not-a-real-token"  # left as it was


def train_stage_outputs(phase: str) -> dict:
    """The metrics and plots the project's dvc.yaml declares for one phase's train stage."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]
    text = json.dumps({k: stage[k] for k in ("metrics", "plots")})
    return json.loads(text.replace("${item.name}", phase))


def test_dvc_reads_the_declared_plots_and_metrics(trained):
    """The real dvc CLI, offline, in a git + DVC repository holding the run's DVCLive folder
    and a train stage declared like the project's: `dvc plots show --json` finds every
    series with one point per step, `dvc metrics show --json` the last values."""
    project, out, _ = trained
    live = Layout().train_live_dir("one")  # as dvc names it: from the repository's root
    declared = train_stage_outputs("one")
    assert list(declared["plots"][0]) == [f"{live}/plots/metrics"]
    (project / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"train": {"cmd": "true", **declared}}})
    )
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "true",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }

    def run(*args):
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "config", "core.analytics", "false")
    rows = read_log(out / "log.csv")
    data = json.loads(run(str(BIN / "dvc"), "plots", "show", "--json"))["data"]
    for column in ("loss", "lr", "grad_norm", "sigma_mean", "seconds"):
        path = f"{live}/plots/metrics/{column}.tsv"
        assert path in data, (path, sorted(data))
        points = [p for entry in data[path] for p in entry["content"]["data"]["values"]]
        assert [(int(p["step"]), float(p[column])) for p in points] == [
            (int(r["step"]), float(r[column])) for r in rows
        ]
    metrics = json.loads(run(str(BIN / "dvc"), "metrics", "show", "--json"))
    found = next(iter(metrics.values()))["data"][f"{live}/metrics.json"]["data"]
    assert found["step"] == 6 and found["loss"] == float(rows[-1]["loss"])


def _means(identity, lpips):
    return {"identity_sim": identity, "lpips": lpips, "bg_ssim": None, "clip_score": None}


def test_evaluation_means_per_checkpoint_and_strength(tmp_path):
    """summary.json's nesting (phase -> step -> strength): one row per checkpoint step, a
    series per metric and strength; a metric never computed has none."""
    from facelora.evaluate.report import write_eval_live

    summary = {
        "base": {"0": {"0": _means(0.9, 0.5)}},
        "one": {
            "10": {"1": _means(0.80, 0.30), "1.25": _means(0.75, 0.28)},
            "5": {"1": _means(0.85, 0.35), "1.25": _means(None, 0.33)},
        },
    }
    write_eval_live("one", summary, tmp_path / "live")
    assert read_series(tmp_path / "live") == {
        "scale-1/identity_sim": [(5, 0.85), (10, 0.80)],
        "scale-1/lpips": [(5, 0.35), (10, 0.30)],
        "scale-1.25/identity_sim": [(10, 0.75)],
        "scale-1.25/lpips": [(5, 0.33), (10, 0.28)],
    }
    last = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert last["step"] == 10 and last["scale-1.25"] == {"identity_sim": 0.75, "lpips": 0.28}
    # one strength: the metric names alone; the folder is rewritten, nothing of before kept
    write_eval_live("one", {"one": {"5": {"1": _means(0.85, 0.35)}}}, tmp_path / "live")
    assert read_series(tmp_path / "live") == {"identity_sim": [(5, 0.85)], "lpips": [(5, 0.35)]}
    # no metric computed at all: the declared folder and the summary are still there
    write_eval_live("one", {"one": {"5": {"1": _means(None, None)}}}, tmp_path / "live")
    assert read_series(tmp_path / "live") == {}
    assert (tmp_path / "live" / "plots" / "metrics").is_dir()
    assert json.loads((tmp_path / "live" / "metrics.json").read_text()) == {"step": 5}
