"""End to end: the Snakemake workflow and the DVC stage on the sample data, for real."""

import csv
import filecmp
import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from facelora.config import validate_params
from facelora.registry.layout import Layout

from helpers import BIN, ROOT, make_project, run_data_half

pytestmark = pytest.mark.slow
OUTPUTS = ["faces", "crops", "pairs", "captions", "split", "validation", "phases", "summary"]
TRAINED = [
    "train/broad/checkpoints",
    "train/skin_match/checkpoints",
    "train/best_quality/checkpoints",
]


def run(cmd, cwd, check=True, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_same_outputs(a: Path, b: Path, names=OUTPUTS) -> None:
    for name in names:
        left, right = tree(a / name), tree(b / name)
        assert set(left) == set(right), name
        different = [k for k in left if left[k] != right[k]]
        assert not different, f"{name}: {different[:5]}"


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory, sample_raw):
    project = make_project(tmp_path_factory.mktemp("sm") / "project", sample_raw)
    run([str(BIN / "snakemake"), "--cores", "2"], project)
    return project


def test_snakemake_runs_the_data_half(snakemake_project):
    L = Layout(str(snakemake_project / "results"))
    for path in [
        L.faces(),
        L.faces_rejected(),
        L.crops(),
        L.pairs(),
        L.captions(),
        L.split(),
        L.summary(),
        L.funnel_plot(),
        L.scores_plot(),
    ]:
        assert Path(path).is_file(), path
    for phase in ("broad", "skin_match", "best_quality"):
        assert (Path(L.phase_dir(phase)) / "manifest.jsonl").is_file()
        summary = json.loads(Path(L.train_summary(phase)).read_text())
        steps = {"broad": 8, "skin_match": 6, "best_quality": 4}[phase]
        assert summary["steps"] == steps and summary["checkpoints"]
        assert Path(L.loss_plot(phase)).is_file()
    # each checkpoint was judged, the best chosen, and the next phase started from it
    broad_best = json.loads(Path(L.best("broad")).read_text())
    summary = json.loads(Path(L.eval_summary()).read_text())
    assert set(summary["broad"]) == {"4", "8"} and "base" in summary
    for path in (L.final_lora(), L.final_comfyui(), L.final_card()):
        assert Path(path).is_file()
    for phase in ("broad", "skin_match", "best_quality"):
        assert Path(L.eval_plot(phase)).is_file()
        assert Path(L.contact_sheet(phase)).is_file()
    second = json.loads(Path(L.train_summary("skin_match")).read_text())
    assert second["init_lora"] == broad_best["lora"]
    # shard tables stay (a changed photo reruns only its shard), inside the DVC-tracked folders
    assert len(list(Path(L.faces_shard(0)).parent.glob("*.faces.parquet"))) == 2
    logs = snakemake_project / "logs"
    assert (logs / "detect" / "0.log").is_file() and (logs / "select" / "broad.log").is_file()


def test_a_second_run_has_nothing_to_do(snakemake_project):
    out = run([str(BIN / "snakemake"), "--cores", "2", "-n"], snakemake_project)
    assert "Nothing to be done" in out.stdout + out.stderr


def test_changing_one_photo_reruns_only_its_shard(snakemake_project):
    raw = snakemake_project / "data" / "raw"
    photo = raw / "manifest" / "after" / "t1_person4_lips.jpg"
    photo.write_bytes(photo.read_bytes() + b"\0")  # new content, same picture
    out = run([str(BIN / "snakemake"), "--cores", "2", "-n", "--quiet", "rules"], snakemake_project)
    counts = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts.get("detect") == 1, out.stdout
    assert counts.get("gather_faces") == 1


def planned(project: Path) -> tuple[dict[str, int], int]:
    """Jobs per rule, and input files named in all, of `snakemake -n --forceall` (everything)."""
    out = run([str(BIN / "snakemake"), "--cores", "1", "-n", "--forceall"], project)
    jobs: dict[str, int] = {}
    inputs = 0
    for line in out.stdout.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):", line)
        if head:
            jobs[head.group(1)] = jobs.get(head.group(1), 0) + 1
        elif line.strip().startswith("input:"):
            inputs += len(line.split(":", 1)[1].split(","))
    return jobs, inputs


def test_the_dag_does_not_grow_with_the_photos_in_a_shard(tmp_path, sample_raw):
    """Planning names one listing per shard, not every photo: 300 more photos leave the jobs
    and their inputs as they were (Snakemake's planning time follows these counts)."""
    from PIL import Image

    project = make_project(tmp_path / "project", sample_raw)
    jobs, inputs = planned(project)
    assert jobs["detect"] == jobs["crop"] == 2 and inputs < 200
    bulk = project / "data" / "raw" / "bulk"
    bulk.mkdir()
    for i in range(300):
        Image.new("RGB", (16, 16), (i % 256, i // 256, 7)).save(bulk / f"{i:04d}.jpg")
    assert planned(project) == (jobs, inputs)
    listed = Layout(str(project / "results"))
    names = [
        json.loads(line)[0]
        for shard in range(2)
        for line in Path(listed.raw_listing(shard)).read_text(encoding="utf-8").splitlines()
    ]
    assert sum(name.startswith("bulk/") for name in names) == 300


def test_config_overrides_are_refused(snakemake_project):
    out = run([str(BIN / "snakemake"), "-n", "--config", "lr=0.1"], snakemake_project, check=False)
    assert out.returncode != 0
    assert "edit it there (or use dvc exp run -S key=value)" in out.stdout + out.stderr


def git(project: Path, *args: str):
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], project)


def dvc(project: Path, *args: str, check: bool = True):
    return run([str(BIN / "dvc"), *args], project, check=check)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, sample_raw):
    """The demo project under git + DVC, reproduced with `dvc repro` and committed."""
    project = make_project(tmp_path_factory.mktemp("dvc") / "project", sample_raw)
    (project / ".gitignore").write_text("/logs\n.snakemake/\n/dvc_plots\n")
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    dvc(project, "add", "data/raw")  # the photos are data too: versioned, pushed, pulled
    git(project, "add", "-A")
    git(project, "commit", "-qm", "init")
    repro = dvc(project, "repro")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "reproduced")
    return project, repro.stdout + repro.stderr


def test_dvc_repro_gives_the_same_outputs(tmp_path, sample_raw, dvc_project):
    project, log = dvc_project
    stages = [
        "faces",
        "synthesize",
        "prepare",
        "baseline",
        "train@0",
        "train@1",
        "train@2",
        "evaluate",
        "merge",
        "report",
    ]
    assert [line.split("'")[1] for line in log.splitlines() if "Running stage" in line] == stages
    # the model the demo trains is made by the workflow itself (a tiny random model)
    assert (project / "results" / "models" / "tiny-qwen_image_edit" / "model_index.json").is_file()
    # compare with a clean Snakemake run (the shared project had a photo changed since)
    fresh = make_project(tmp_path / "sm", sample_raw)
    run([str(BIN / "snakemake"), "--cores", "2"], fresh)
    assert_same_outputs(project / "results", fresh / "results", OUTPUTS + TRAINED)
    assert "up to date" in dvc(project, "status").stdout
    # git holds only the metric and plot files of results/; DVC holds the rest
    tracked = run(["git", "ls-files", "results"], project).stdout.split()
    assert "results/eval/summary.json" in tracked and "results/summary/summary.json" in tracked
    assert "results/report/model_card.html" in tracked  # the report's pages, DVCLive's series
    assert "results/dvclive/train/broad/plots/metrics/loss.tsv" in tracked
    assert not [t for t in tracked if t.startswith(("results/train", "results/phases"))]


def test_dvc_push_to_a_remote_then_a_fresh_clone_pulls_everything(tmp_path, dvc_project):
    project, _ = dvc_project
    dvc(project, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(project, "commit", "-qam", "remote")
    dvc(project, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "pull")
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    for name in ("data/raw", "results/final", "results/train/broad", "results/phases/broad"):
        assert tree(clone / name) == tree(project / name), name
    assert (clone / "dvc.lock").read_text() == (project / "dvc.lock").read_text()


def test_dvc_experiment_retrains_and_compares(dvc_project):
    project, _ = dvc_project
    # lr is a training setting: an experiment retrains, the data half stays put
    exp = dvc(project, "exp", "run", "-S", "lr=5e-5")
    text = exp.stdout + exp.stderr
    assert "Stage 'prepare' didn't change" in text and "Stage 'baseline' didn't change" in text
    assert "Running stage 'train@0'" in text and "Running stage 'merge'" in text
    table = dvc(project, "exp", "show", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    assert "chosen.best_quality.bg_ssim" in rows[0]  # the final metrics beside lr
    # DVCLive logs `lr` too, so DVC names the setting's column by its file
    lr = "params.yaml:lr" if "params.yaml:lr" in rows[0] else "lr"
    assert {r[lr] for r in rows if r["Experiment"]} == {"5e-05"}
    assert {r[lr] for r in rows if r["rev"] == "workspace"} == {"5e-05"}
    # DVCLive's last training step of each phase, for the baseline commit and the experiment
    (experiment,) = [r for r in rows if r["Experiment"]]
    (baseline,) = [r for r in rows if r["rev"] not in ("workspace", experiment["rev"])]
    for phase in ("broad", "best_quality"):
        loss = f"results/dvclive/train/{phase}/metrics.json:loss"
        assert float(experiment[loss]) != float(baseline[loss]), phase
    metrics = dvc(project, "metrics", "show").stdout
    assert "funnel.pairs_usable" in metrics
    assert "broad.4.1.bg_ssim" in metrics  # per-checkpoint (and LoRA strength) means
    diff = dvc(project, "metrics", "diff", "--all", "HEAD").stdout
    assert "results/eval/summary.json" in diff
    dvc(project, "plots", "diff", "HEAD", "--out", "dvc_plots")
    assert (project / "dvc_plots" / "index.html").is_file()
    # the training and evaluation curves of both, from the files git keeps
    shown = json.loads(
        dvc(project, "plots", "diff", "HEAD", experiment["Experiment"], "--json").stdout
    )
    assert not shown.get("errors"), shown["errors"]
    for series in (
        "results/dvclive/train/broad/plots/metrics/loss.tsv",
        "results/dvclive/eval/broad/plots/metrics/bg_ssim.tsv",
    ):
        values = shown["data"][series][0]["content"]["data"]["values"]
        steps = {
            rev: sorted(int(v["step"]) for v in values if v["rev"] == rev)
            for rev in {v["rev"] for v in values}
        }
        assert len(steps) == 2, (series, steps)  # HEAD and the experiment
        a, b = steps.values()
        assert a == b and len(a) == len(set(a)), (series, steps)  # no step twice


# made by the workflow but versioned by no stage: the demo's tiny model (rebuilt from its
# seed when missing) and the encoding cache
UNVERSIONED = ("results/models/", "results/cache/")


def rule_sections() -> dict[str, set[str]]:
    """The params.yaml keys each rule's command declares it reads: the rule's rerun trigger
    (`command_settings(P, NAME)`), checked to be the declaration of the command it runs."""
    from facelora.workflow.cli import COMMANDS, reads_of
    from facelora.workflow.declared import dvc_keys

    found = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule )", smk.read_text())[1:]:
            name = block.split()[1].rstrip(":")
            if "shell:" not in block:
                continue
            declared = re.findall(r'command_settings\(P, "([^"]+)"\)', block)
            assert len(declared) == 1, f"rule {name}: one command_settings(P, ...) param"
            command = declared[0]
            assert command in COMMANDS, (name, command)
            shell = " ".join(re.findall(r'"([^"]*)"', block.split("shell:")[1]))
            runs = " ".join(shell.split()[1:3]) if command.startswith("gather ") else None
            head = shell.split()[1]
            assert runs == command if runs else command.split()[0] == head, (name, shell)
            found[name] = dvc_keys(reads_of(command) or ())
    return found


def _declares(stage_params: set[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in stage_params)


def dry_run_jobs(project: Path, args: list[str]) -> dict[str, set[str]]:
    """{rule: outputs} of every job `snakemake ARGS` would run with everything forced."""
    out = run([str(BIN / "snakemake"), "--cores", "1", "-n", "--forceall", *args], project)
    jobs, rule = {}, None
    for line in out.stdout.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):", line)
        if head:
            rule = head.group(1)
        elif rule and line.strip().startswith("output:"):
            jobs.setdefault(rule, set()).update(p.strip() for p in line.split(":", 1)[1].split(","))
    return jobs


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def test_dvc_stages_and_snakemake_rules_agree(dvc_project):
    """Each stage runs only its own rules; what they make is declared by this stage, or by a
    stage it depends on (which DVC brings up to date first, so Snakemake finds it current and
    leaves it alone); every declared output is made by a rule; and each stage declares every
    params.yaml section its rules read."""
    from dvc.repo import Repo

    project, _ = dvc_project
    sections = rule_sections()
    with Repo(str(project)) as repo:
        stages = [s for s in repo.index.stages if s.cmd]  # not data/raw.dvc
    outs = {s.name: [str(o.def_path) for o in s.outs] for s in stages}
    deps = {s.name: [str(d.def_path) for d in s.deps] for s in stages}
    direct = {
        name: {
            other
            for other, paths in outs.items()
            if other != name and any(_overlaps(d, o) for d in deps[name] for o in paths)
        }
        for name in outs
    }
    upstream = {}
    for name in outs:  # the transitive closure of "depends on"
        seen, todo = set(), list(direct[name])
        while todo:
            other = todo.pop()
            if other not in seen:
                seen.add(other)
                todo.extend(direct[other])
        upstream[name] = seen
    assert upstream["merge"] >= {"prepare", "baseline", "train@0", "train@2", "evaluate"}
    assert upstream["train@1"] == {"faces", "synthesize", "prepare", "baseline", "train@0"}

    ran: set[str] = set()
    for stage in stages:
        name = stage.name
        args = shlex.split(stage.cmd)
        assert args[:3] == ["facelora", "snakemake", "--allowed-rules"], stage.cmd
        jobs = dry_run_jobs(project, args[2:])
        ran |= set(jobs)
        assert jobs and set(jobs) <= set(args[3 : args.index("--")]), (name, jobs)
        made = set().union(*jobs.values())
        for path in made:
            if path.startswith(UNVERSIONED):
                continue
            holders = [o for o in outs[name] if _overlaps(path, o)]
            earlier = [s for s in upstream[name] if any(_overlaps(path, o) for o in outs[s])]
            assert holders or earlier, f"{name}: {path} is made but declared by no stage before"
        for out in outs[name]:
            assert any(_overlaps(p, out) for p in made), (name, out)
        declared = {key for d in stage.deps if hasattr(d, "params") for key in d.params}
        for rule in jobs:
            missing = {k for k in sections[rule] if not _declares(declared, k)}
            assert not missing, f"{name}: rule {rule} reads {missing}"
    # every rule that makes a versioned output belongs to some stage
    assert {"detect", "train", "evaluate", "choose", "eval_report", "final"} <= ran


def test_sharded_and_unsharded_runs_are_identical(tmp_path, sample_raw):
    one = run_data_half(sample_raw, tmp_path / "one", validate_params({}), shards=1)
    three = run_data_half(sample_raw, tmp_path / "three", validate_params({}), shards=3)
    assert_same_outputs(one, three, OUTPUTS[:-1])


def test_snakemake_lint_is_clean():
    out = run([str(BIN / "snakemake"), "--lint"], ROOT, check=False)
    text = out.stdout + out.stderr
    assert "Lints for" not in text, text
    assert out.returncode == 0, text


def test_snakefmt_is_clean():
    out = run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], ROOT, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_funnel_counts_agree_with_the_tables(snakemake_project):
    results = snakemake_project / "results"
    import json

    summary = json.loads((results / "summary" / "summary.json").read_text())
    pairs = pd.read_parquet(results / "pairs" / "pairs.parquet")
    assert summary["funnel"]["pairs_usable"] == int((pairs["status"] == "ok").sum())
    assert summary["rejected"]["images"]
    assert filecmp.cmp(results / "summary" / "summary.json", results / "summary" / "summary.json")


# --- the report ---------------------------------------------------------------------------

PHASE_NAMES = ("broad", "skin_match", "best_quality")


@pytest.fixture(scope="module")
def report_html(snakemake_project) -> Path:
    out = snakemake_project / Layout("results").report()
    run([str(BIN / "snakemake"), "--report", str(out)], snakemake_project)
    return out


def test_the_report_holds_every_phase(snakemake_project, report_html):
    from report_browser import data_uri_bytes, embedded

    html = report_html.read_text()
    results, categories = embedded(html, "results"), embedded(html, "categories")
    L = Layout("results")  # the report names results by their paths in the project

    def listed(category: str) -> set[str]:
        return set().union(*categories[category].values())

    for phase in PHASE_NAMES:
        assert L.loss_plot(phase) in categories["2. Training"][phase]
        assert {L.eval_plot(phase), L.contact_sheet(phase)} <= set(
            categories["3. Evaluation"][phase]
        )
        assert phase in results[L.loss_plot(phase)]["caption"]  # the caption's template ran
    assert {L.funnel_plot(), L.scores_plot(), L.report_funnel_page()} <= listed("1. Data")
    assert listed("4. Model") == {L.report_card_page()}
    # every result is embedded whole, so the file opens anywhere
    for path, entry in results.items():
        assert data_uri_bytes(entry["data_uri"]) == (snakemake_project / path).read_bytes(), path
    card = data_uri_bytes(results[L.report_card_page()]["data_uri"]).decode()
    assert "<h2>" in card and "<code>EDITFACE</code>" in card  # Markdown made HTML
    # no script, style or picture fetched from a network
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=[\"']?(https?:)?//", html)


def test_the_report_shows_its_pictures_in_a_browser_offline(snakemake_project, report_html):
    import numpy as np
    from PIL import Image
    from report_browser import CHROMIUM, CHROMIUM_ARGS, browser, show

    L = Layout(str(snakemake_project / "results"))
    outside: list[str] = []
    with browser() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.on(
            "request",
            lambda r: (
                None if r.url.startswith(("file:", "data:", "blob:")) else outside.append(r.url)
            ),
        )
        checks = [("2. Training", p, "loss", L.loss_plot(p)) for p in PHASE_NAMES]
        checks += [("3. Evaluation", p, "contact sheet", L.contact_sheet(p)) for p in PHASE_NAMES]
        checks += [("1. Data", None, "funnel", L.funnel_plot())]
        for category, phase, figure, png in checks:
            page.goto(report_html.as_uri())
            shown = [s for s in show(page, category, phase, figure)["shown"] if s["tag"] == "IMG"]
            # the browser decoded the very picture the workflow wrote
            assert [(s["width"], s["height"]) for s in shown] == [Image.open(png).size], (
                category,
                phase,
                figure,
                shown,
            )
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # not blank
        page.goto(report_html.as_uri())
        frames = show(page, "4. Model", None, None)["shown"]
        assert [s["tag"] for s in frames] == ["IFRAME"]
        card = page.frames[-1].inner_text("body")
        assert "Trigger word" in card
        chromium.close()
    assert not outside, outside[:5]


def test_snakemake_apply_edits_the_photos_of_data_apply(snakemake_project):
    """`snakemake apply`: a target of its own, not part of `all`. Without photos it fails with
    the command's message; with them (and apply.prompt) it edits them into results/apply."""
    import shutil

    import yaml

    project = snakemake_project
    L = Layout(str(project / "results"))
    default = run([str(BIN / "snakemake"), "--cores", "1", "-n", "--forceall"], project)
    assert "rule apply:" not in default.stdout  # not part of the default target
    missing = run([str(BIN / "snakemake"), "--cores", "1", "apply"], project, check=False)
    assert missing.returncode != 0
    log = (project / "logs" / "apply.log").read_text()
    assert "apply.photos" in log and "data/apply" in log and "Traceback" not in log
    settings_file = project / "params.yaml"
    saved = settings_file.read_text()
    settings = yaml.safe_load(saved)
    settings["apply"]["prompt"] = "EDITFACE add round glasses"
    photos = project / "data" / "apply"
    photos.mkdir()
    shutil.copy(project / "data" / "raw" / "kontext" / "astronaut_glasses_start.jpg", photos)
    try:
        settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        dry = run([str(BIN / "snakemake"), "--cores", "1", "-n", "apply"], project)
        assert "rule apply:" in dry.stdout and "results/final" in dry.stdout
        assert not re.search(r"rule (train|final):", dry.stdout)  # only apply is left to run
        run([str(BIN / "snakemake"), "--cores", "1", "apply"], project)
        report = json.loads(Path(L.apply_report()).read_text())
        assert report["prompt"] == "EDITFACE add round glasses"
        assert report["counts"]["edited"] == 1, report
        assert report["scale"] == json.loads(Path(L.final_info()).read_text())["scale"]
        assert (Path(L.apply_dir()) / "astronaut_glasses_start.png").is_file()
    finally:
        settings_file.write_text(saved)
        shutil.rmtree(photos)
