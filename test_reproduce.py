"""reproduce.py: the smoke scale end to end (runs, records, the skip on a rerun), the report's
order column from fabricated records, and the laptop recipe that the README, pretrain.py and the
clock search share."""
import json
import shlex

import pytest

import reproduce
from runs import UserError
from conftest import ROOT, run_script
from pretrain import LAPTOP_RUN, parse_with_presets


def test_smoke_scale_runs_records_and_skips_what_is_done(tiny_folder, tmp_path, capsys):
    """The smoke scale's base recipe on two seeds, each pretrain.py then linear_eval.py of the
    trained and of the untrained network as subprocesses, the first seed interrupted before (its
    pretraining stopped after one step: the same command continues it to the end of its schedule);
    a rerun finds all four recorded and runs nothing; the report tabulates them."""
    args = ["--scale", "smoke", "--only", "base", "--seeds", "2", "--data-dir", tiny_folder,
            "--out", tmp_path]
    job = reproduce.jobs_for(["base"], "smoke", 1, tmp_path)[0]
    run_script(*job.pretrain_command(str(tiny_folder))[1:], "--max-steps", 1)
    first = run_script("reproduce.py", *args)
    assert f"continuing {job.run_dir / 'ckpt.pt'}" in first.stdout
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == [f"smoke/base/{e}/seed{s}" for s in (0, 1)
                                           for e in ("linear", "linear-random")]
    for r in records:
        assert r["commands"][0].startswith("python pretrain.py --dataset folder")
        assert f"--seed {r['seed']}" in r["commands"][0] and "linear_eval.py" in r["commands"][1]
        assert ("--random-init" in r["commands"][1]) == (r["evaluation"] == "linear-random")
        assert 0 <= r["metrics"]["top1"] <= 100
        # the pretraining's contrastive metrics describe the trained network only
        assert ("entropy" in r["metrics"]) == (r["evaluation"] == "linear")
        assert r["evaluation"] != "linear" or r["metrics"]["entropy"] > 0
        assert r["hardware"]["cores"] and r["pretrain_seconds"] > 0
        # the run from start to result: its pretraining and this evaluation
        assert r["metrics"]["minutes"] * 60 == pytest.approx(r["pretrain_seconds"] + r["evaluation_seconds"])
    assert "[4/4]" in first.stdout
    reproduce.main(list(map(str, args)))
    again = capsys.readouterr().out
    assert "4 already recorded" in again and "[1/" not in again
    reproduce.main(["--report", "--out", str(tmp_path)])
    table = (tmp_path / "tables.md").read_text()
    assert "The base recipe, over seeds" in table and "| base recipe |  |" in table


def fabricated(rows, scale="cpu"):
    """Records as the sweep writes them: {(pretrain, evaluation): [top-1 per seed]}."""
    records = {}
    for (pretrain, evaluation), values in rows.items():
        for seed, v in enumerate(values):
            key = f"{scale}/{pretrain}/{evaluation}/seed{seed}"
            records[key] = dict(key=key, scale=scale, pretrain=pretrain, evaluation=evaluation,
                                seed=seed, metrics=dict(top1=v, minutes=29.5),
                                commands=["python pretrain.py", "python linear_eval.py"],
                                hardware=dict(gpu=None, cpu="CPU", cores=2, omp_num_threads="2"),
                                load=dict(start=[1.0], end=[1.0]), pretrain_seconds=1700, git="-")
    return records


def order_column(table):
    return {line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip(" |")
            for line in table.splitlines() if line.startswith("| ") and "paper" not in line}


def test_order_column_holds_ties_and_reversals_from_records():
    """Table 1 with the base recipe's spread 1.0 (seeds 50.0 and 51.0): a difference over 1.0 in
    the paper's direction holds, within 1.0 ties, over 1.0 against it is reversed."""
    records = fabricated({("base", "linear"): [50.0, 51.0],  # 1/2 is the base recipe: 50.5
                          ("strength-1-blur", "linear"): [55.0],
                          ("strength-1", "linear"): [54.0],  # below 55.0 by 1.0: a tie
                          ("strength-1/4", "linear"): [52.0]})  # 1/8: not run
    table = reproduce.experiment_table("table1", records, "cpu")
    column = order_column(table)
    assert column["1"] == "below 1 + blur: tie"
    assert column["1/2"] == "below 1: holds"  # 54.0 vs 50.5
    assert column["1/4"] == "below 1/2: reversed"  # 52.0 vs 50.5
    assert column["1/8"] == "below 1/4: not run"
    assert "| 1/2 | 62.6 | 50.50 (spread 1.00) | 2 |" in table
    assert "differences within 1.00 points" in table


def test_an_experiment_of_ours_has_no_paper_columns_and_stays_at_its_scale(tmp_path):
    """The clock search has no paper value and no order to check: its table shows ours only
    (with the minutes each run took), at the laptop scale only, under no summary of orders."""
    records = fabricated({("base", "linear"): [57.0, 58.0], ("clock-b128-e18", "linear"): [60.0]},
                         "laptop")
    table = reproduce.experiment_table("clock", records, "laptop")
    assert "paper" not in table.split("\n|---")[0].rsplit("\n", 1)[-1]  # the header row
    assert "| B 128, 18 epochs | 60.00 | 1 | 29.50 |" in table
    assert "| README's first recipe: B 256, 10 epochs | 57.50 (spread 1.00) | 2 | 29.50 |" in table
    assert reproduce.experiment_table("clock", fabricated({("base", "linear"): [47.0]}), "cpu") == ""
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    text = reproduce.report(tmp_path)
    assert "## Scale `laptop`" in text and "| experiment | holds" not in text


def test_without_two_seeds_every_difference_counts():
    records = fabricated({("base", "linear"): [50.0], ("head-linear", "linear"): [50.01]})
    column = order_column(reproduce.experiment_table("fig8", records, "cpu"))
    assert column["linear, on h"] == "below nonlinear, on h: reversed"


def test_runs_equal_to_the_base_recipe_share_its_pretraining():
    """At the CIFAR scales tau 0.5, colour strength 1/2 and batch 256 with linear scaling are
    the base recipe: trained once. At paper scale (tau 0.1) tau 0.5 is a run of its own."""
    assert reproduce.canonical("cpu", "tau-0.5") == "base"
    assert reproduce.canonical("cpu", "strength-1/2") == "base"
    assert reproduce.canonical("cpu", "batch-256-linear") == "base"
    assert reproduce.canonical("paper", "tau-0.5") == "tau-0.5"
    assert reproduce.canonical("paper", "tau-0.1") == "base"
    # the smoke scale's folder of 32 px images takes the CIFAR recipe, as pretrain.py gives it
    assert reproduce.canonical("smoke", "tau-0.5") == "base"
    assert reproduce.canonical("smoke", "strength-1/2") == "base"
    assert reproduce.canonical("smoke", "tau-0.1") == "tau-0.1"
    assert reproduce.canonical("smoke", "strength-1") == "strength-1"


def test_a_runs_flags_replace_the_base_recipes():
    """A run's own value takes the base recipe's flag's place (each flag once in the recorded
    command), a flag the base recipe lacks is added, and values equal to a base flag's value
    (0.25 is the cpu scale's width) are values, not flags."""
    flags = reproduce.pretrain_flags("cpu", "batch-128-sqrt", "DATA")
    assert flags.count("--batch-size") == 1 and flags[flags.index("--batch-size") + 1] == "128"
    assert flags[flags.index("--lr") + 1] == "0.25" and "--lr-scaling" in flags
    flags = reproduce.pretrain_flags("cpu", "strength-1/4", "DATA")
    assert flags[flags.index("--color-strength") + 1] == "0.25"
    assert flags[flags.index("--width-multiplier") + 1] == "0.25" and flags[-1] == "--no-blur"
    flags = reproduce.pretrain_flags("laptop", "clock-w0.5-b128-e8", "DATA")
    assert [flags[flags.index(f) + 1] for f in ("--width-multiplier", "--batch-size", "--epochs")] == \
        ["0.5", "128", "8"]
    assert len(flags) == len(reproduce.pretrain_flags("laptop", "base", "DATA"))


def test_paths_are_the_users_and_the_smoke_scale_needs_data(tiny_folder, tmp_path, monkeypatch):
    """The scripts run in the repository: a relative --data-dir or --out is read from where the
    user is, and the smoke scale does not train on the repository's own pictures."""
    monkeypatch.chdir(tiny_folder.parent)
    args = reproduce.parse_args(["--scale", "smoke", "--data-dir", tiny_folder.name, "--out", "sweep"])
    assert args.data_dir == str(tiny_folder) and args.out == str(tiny_folder.parent / "sweep")
    with pytest.raises(UserError, match="--scale smoke needs --data-dir"):
        reproduce.parse_args(["--scale", "smoke"])


@pytest.mark.parametrize("args, message", [
    (["--only", "table9"], "no experiment 'table9' at --scale cpu"),
    (["--only", "clock"], "no experiment 'clock' at --scale cpu"),  # the laptop scale's
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--scale", "smoke", "--data-dir", "/nonexistent"], "/nonexistent does not exist"),
])
def test_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        reproduce.main(args)
    assert message in str(exit.value) and "Traceback" not in capsys.readouterr().err


def test_the_laptop_recipe_is_the_searchs_choice_in_the_readme_and_the_bare_command():
    """The README's laptop commands are the ones a long CPU run prints (pretrain.LAPTOP_RUN), and
    they configure the run and evaluation of the clock search's chosen row."""
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    pretraining, evaluation = LAPTOP_RUN.format("data/cifar10").split(", then ")
    assert pretraining in readme and evaluation.replace("<its folder>", "runs/<run>") in readme
    row = reproduce.EXPERIMENTS["minutes"].rows[0]
    assert parse_with_presets(shlex.split(pretraining)[2:])[0] == parse_with_presets(
        reproduce.pretrain_flags("laptop", row.pretrain, "data/cifar10"))[0]
    job = reproduce.Job("laptop", row.pretrain, row.evaluation, 0, ROOT / "results")
    flags = " ".join(job.evaluation_command())
    assert all(f in flags for f in evaluation.split("<its folder> ")[1].split(" --"))


def test_records_made_elsewhere_are_run_again(tmp_path, monkeypatch, capsys):
    """A fresh clone holds the repository's records but none of their runs: `--only base --seeds
    2` runs all four (once it said they were recorded and ran nothing); a job whose run folder is
    here is done."""
    scale_keys = [f"smoke/base/{e}/seed{s}" for s in (0, 1) for e in ("linear", "linear-random")]
    records = fabricated({("base", "linear"): [50.0, 51.0], ("base", "linear-random"): [20.0, 21.0]},
                         scale="smoke")
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(records[k]) + "\n" for k in scale_keys))
    ran = []
    monkeypatch.setattr(reproduce, "run_job", lambda job, *a: ran.append(job.key) or True)
    args = ["--scale", "smoke", "--only", "base", "--seeds", "2", "--data-dir", str(tmp_path),
            "--out", str(tmp_path)]
    reproduce.main(args)
    assert ran == scale_keys and "4 recorded by runs made elsewhere" in capsys.readouterr().out
    reproduce.jobs_for(["base"], "smoke", 1, tmp_path)[0].run_dir.mkdir(parents=True)  # seed 0's run
    ran.clear()
    reproduce.main(args)
    assert ran == scale_keys[2:]
