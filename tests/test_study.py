"""The comparison study (edgepc.study, run as benchmarks/compare_losses.py): its protocol, its
bookkeeping, and a smoke run end to end on real Fashion-MNIST that a rerun reads back."""

import json
import re
from collections import Counter

import pytest
import yaml

from edgepc.hardware import pick_device
from edgepc.pipelines.config import CONFIGS, ConfigError, load_config
from edgepc.study import cli, execute, report
from edgepc.study.protocol import (
    Record,
    Run,
    Stat,
    choose,
    deploy_plan,
    load_study,
    summarise,
    trials,
)
from tests.conftest import PROJECT, benchmark_script


def study(profile=None, path=CONFIGS / "study.yaml"):
    return load_study(path, profile)


@pytest.mark.parametrize("path", ["study.yaml", "study-cifar100.yaml"])
def test_every_run_of_the_shipped_studies_is_a_valid_pipeline_config(path):
    s = study(path=CONFIGS / path)
    for pair in s.pairs:
        for setting in s.settings:
            for method in s.methods:
                for run in trials(s, pair, setting, method, s.seeds[0]):
                    config = load_config(s.pipeline, overrides=run.overrides(s))
                    assert config.distill.seed == s.seeds[0]
                    deployed = Run(**{**run.__dict__, "deploy": True})
                    load_config(s.pipeline, overrides=deployed.overrides(s))


def test_a_run_differs_from_another_only_in_its_loss_and_trial():
    s = study()
    train = {}
    for method, value in (("scratch", None), ("kd", 3.0), ("pc", 3.0), ("fitnet", 0.3)):
        run = Run("fmnist-tiny", "class_aware", method, "weight", value, 1)
        train[method] = load_config(s.pipeline, overrides=run.overrides(s)).distill.train
    assert (train["scratch"].alpha, train["scratch"].beta, train["scratch"].baselines) == (1, 0, {})
    assert (train["kd"].alpha, train["kd"].beta, train["kd"].baselines) == (
        1,
        0,
        {"kd": {"weight": 3.0}},
    )
    assert (train["pc"].beta, train["pc"].baselines, train["pc"].pc.tau) == (3.0, {}, 0.3)
    assert train["fitnet"].baselines == {"fitnet": {"weight": 0.3}}
    shared = {"epochs", "batch_size", "lr", "optimizer", "schedule", "augment", "weight_decay"}
    for t in train.values():
        assert {k: getattr(t, k) for k in shared} == {k: getattr(train["pc"], k) for k in shared}
    unaware = Run("fmnist-tiny", "class_unaware", "rkd_angle", "distill.train.lr", 0.01, 0)
    t = load_config(s.pipeline, overrides=unaware.overrides(s)).distill.train
    assert (t.alpha, t.lr, t.baselines) == (0, 0.01, {"rkd_angle": {"weight": 1.0}})


def test_every_method_gets_the_same_budget_except_scratch_on_a_weight_grid():
    s = study()
    for setting, spec in s.settings.items():
        ((_, values),) = spec.grid.items()
        for method in s.methods:
            n = len(trials(s, "fmnist-tiny", setting, method, 0))
            unweighted = method == "scratch" and setting == "class_aware"
            assert n == (1 if unweighted else len(values)), (setting, method)


def test_bad_study_configs_are_one_line_errors(tmp_path):
    raw = yaml.safe_load((CONFIGS / "study.yaml").read_text())
    cases = {
        "unknown method": ({**raw, "methods": ["pc", "pkd"]}, "'pkd' is neither scratch"),
        "deploy pair": ({**raw, "deploy": {"pair": "nope"}}, "deploy.pair 'nope'"),
        "extra key": ({**raw, "sedes": [0]}, "sedes"),
        "two knobs": (
            {
                **raw,
                "settings": {
                    "class_aware": {"alpha": 1, "select": "top1", "grid": {"weight": [1], "x": [2]}}
                },
            },
            "grid",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content))
        with pytest.raises(ConfigError, match=re.escape(message)):
            study(path=path)
    with pytest.raises(ConfigError, match=r"profile 'fast' is not in study\.yaml"):
        study("fast")


def _record(method, seed, phase="final", value=1.0, **metrics):
    run = Run("p", "class_aware", method, "weight", value, seed)
    return Record(run, phase, {f"distill.{k}": v for k, v in metrics.items()})


def test_selection_statistics_and_verdicts():
    tuned = [_record("kd", 0, "tune", v, val_top1=a) for v, a in ((0.3, 0.5), (1, 0.7), (3, 0.7))]
    assert choose(tuned, "top1").run.value == 1  # the first of the tied best
    stat = Stat.of([0.80, 0.82, 0.84])
    assert (stat.mean, stat.std, stat.n) == (pytest.approx(0.82), pytest.approx(0.02), 3)
    assert str(stat) == "0.8200 ± 0.0200"
    assert str(Stat.of([0.5])) == "0.5000"
    rows = summarise([_record("pc", s, test_top1=a) for s, a in enumerate((0.8, 0.9))])
    assert rows["pc"]["test_top1"].mean == pytest.approx(0.85)
    verdict = report.verdict
    assert verdict(Stat(0.90, 0.01, 3), Stat(0.80, 0.01, 3)).startswith("wins (Δ +10.00 points")
    assert verdict(Stat(0.80, 0.01, 3), Stat(0.90, 0.01, 3)).startswith("loses")
    assert verdict(Stat(0.81, 0.02, 3), Stat(0.80, 0.02, 3)).startswith("tie")
    assert verdict(Stat(0.9, 0, 1), Stat(0.8, 0, 1)) == "one seed: no noise estimate"
    lower = verdict(Stat(0.001, 0.001, 3), Stat(0.01, 0.001, 3), lower_is_better=True)
    assert lower.startswith("wins (Δ -0.90 points")


def test_int8_table_says_whether_pc_keeps_its_standing_through_quantization():
    def deployed(method, seed, top1, drop):
        run = Run("p", "class_aware", method, "weight", 1.0, seed, deploy=True)
        metrics = {"fp32_test_top1": top1 + drop / 100, "int8_test_top1": top1,
                   "int8_drop_points": drop, "fp32_test_pc_triplet_agreement": 0.75,
                   "int8_test_pc_triplet_agreement": 0.75, "int8_p50_ms_1t": 0.1,
                   "int8_size_mb": 0.04}  # fmt: skip
        return Record(run, "deploy", {f"validate.{k}": v for k, v in metrics.items()})

    records = [deployed("pc", s, 0.83 + s / 1000, 0.1 * s) for s in range(3)]
    records += [deployed("dist", s, 0.85 + s / 1000, 1 + 0.1 * s) for s in range(3)]
    lines = report.deploy_table(records).splitlines()
    assert lines[2].startswith("| pc | 0.8320 ± 0.0020 | 0.8310 ± 0.0010 | 0.10 ± 0.10 |")
    assert lines[-3].startswith("- int8 top-1: PC (0.8310 ± 0.0010) against dist (0.8510 ± ")
    assert lines[-3].endswith("loses (Δ -2.00 points, 2·SE 0.16).")
    assert lines[-2].endswith("wins (Δ -1.00 points, 2·SE 0.16).")  # PC loses less
    assert lines[-1].endswith("tie (Δ +0.00 points, 2·SE 0.00).")


def test_int8_rows_are_pc_and_the_baseline_with_the_best_validation_top1():
    s = study()
    final = [
        _record(method, seed, val_top1=top1)
        for method, top1 in (("scratch", 0.99), ("kd", 0.80), ("sp", 0.85), ("pc", 0.70))
        for seed in (0, 1, 2)
    ]
    final = [Record(Run(**{**r.run.__dict__, "pair": s.deploy.pair}), r.phase, r.metrics)
             for r in final]  # fmt: skip
    asked = []
    rows = list(deploy_plan(s, final, lambda run: asked.append(run) or {}))
    assert [(r.run.method, r.run.seed) for r in rows] == [
        ("pc", 0),
        ("pc", 1),
        ("pc", 2),
        ("sp", 0),
        ("sp", 1),
        ("sp", 2),
    ]
    assert all(r.run.deploy and r.phase == "deploy" for r in rows)
    assert len(asked) == 6


@pytest.mark.slow
def test_smoke_study_end_to_end_then_read_back_then_only_the_change(tmp_path, capsys, monkeypatch):
    out = tmp_path / "docs" / "RESULTS.md"
    args = ["--profile", "smoke", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    with monkeypatch.context() as patch:  # every run trains in the two worker processes
        patch.setattr(execute, "run_pipeline", lambda *a, **k: pytest.fail("not a worker"))
        assert cli.main([*args, "--jobs", "2"]) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    # class-unaware: kd, rkd_angle, pc × 1 lr; class-aware: the three × 2 weights; one seed.
    assert (first["trained"], first["reused"]) == (9, 0)
    [(device, runs)] = first["devices"].items()  # where each run trained, from the pipeline
    assert (device.split(":")[0], runs) == (pick_device("auto").type, 9)
    text = out.read_text()
    assert f"Runs trained on (the `edgepc.device` tag of each): {device} (9 runs)." in text
    for setting in ("class-unaware", "class-aware"):
        section = text.split(f"### smoke · {setting}")[1].split("<details>")[0]  # not the grid
        rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no head
        assert [row.split(" | ")[:2] for row in rows] == [
            ["| kd", "teacher logits"], ["| rkd_angle", "feature-only"], ["| pc", "feature-only"]
        ]  # fmt: skip
        for row in rows:
            numbers = [float(x) for x in re.findall(r"\b0\.\d{4}\b", row)]
            assert len(numbers) >= 4
            assert all(0 <= x <= 1 for x in numbers)
    assert (out.parent / "results" / "study-accuracy.png").stat().st_size > 10_000
    summary = text.split("## Summary")[1].split("![")[0]
    verdicts = [line for line in summary.splitlines() if line.startswith("| smoke")]
    assert len(verdicts) == 3 + 4  # unaware: knn, probe, triplet; aware: top1 too
    one = "wins 0, ties 0 and loses 0 of {} verdicts; {} have one seed"
    assert (
        f"- class-unaware: against the best feature-only baseline PC {one.format(3, 3)}; "
        f"against the best of any signal PC {one.format(3, 3)}." in summary
    )
    rows = {r["run"]["method"]: r["metrics"] for r in first["records"]
            if r["run"]["setting"] == "class_aware" and r["phase"] == "final"}  # fmt: skip
    for line in verdicts:  # against rkd_angle (feature-only), then the better of the two
        cells = line.strip("| ").split(" | ")
        assert re.fullmatch(r"[123] of 3", cells[3])
        assert cells[4].startswith("rkd_angle 0.")
        assert cells[5] == cells[7] == "one seed: no noise estimate"
        metric = f"distill.test_{cells[1]}"
        if "class-aware" in cells[0]:
            best = max(("kd", "rkd_angle"), key=lambda m: rows[m][metric])
            assert cells[6] == f"{best} {rows[best][metric]:.4f}"
    metrics = {(r["run"]["setting"], r["run"]["method"], r["run"]["value"]): r["metrics"]
               for r in first["records"]}  # fmt: skip
    assert all(m["distill.train_size"] == 200 for m in metrics.values())

    # A new machine: an empty MLflow store; the committed records are enough, nothing trains.
    empty = [*args[:-1], f"sqlite:///{tmp_path / 'empty.db'}"]
    assert cli.main(empty) == 0
    second = json.loads(out.with_suffix(".json").read_text())
    assert (second["trained"], second["reused"]) == (0, 9)
    assert second["devices"] == first["devices"]  # read back from the runs' tags
    assert second["records"] == first["records"]

    assert cli.main([*args, "--methods", "pc", "--report-only"]) == 0  # one shard
    only = json.loads(out.with_suffix(".json").read_text())
    assert (only["trained"], only["reused"]) == (0, 3)
    assert {r["run"]["method"] for r in only["kept"]} == {"kd", "rkd_angle"}  # not lost
    shard = [*args, "--methods", "pc", "--report-only", "--records", "none"]
    assert cli.main(shard) == 0  # from MLflow alone
    assert json.loads(out.with_suffix(".json").read_text())["reused"] == 3
    assert {r["run"]["method"] for r in only["records"]} == {"pc"}
    capsys.readouterr()
    assert cli.main([*args, "--methods", "pkd"]) == 2
    known = "['kd', 'rkd_angle', 'pc']"
    assert capsys.readouterr().err == f"error: unknown methods ['pkd']; the study has {known}\n"
    assert cli.main([*args, "--jobs", "0"]) == 2
    assert capsys.readouterr().err == "error: --jobs 0: give 1 or more processes\n"

    changed = yaml.safe_load((CONFIGS / "study.yaml").read_text())
    changed["profiles"]["smoke"]["settings"]["class_aware"]["grid"]["weight"] = [0.3, 2.0]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert cli.main([*args, "--config", str(path), "--report-only"]) == 0
    gaps = json.loads(out.with_suffix(".json").read_text())
    assert gaps["trained"] == 0
    assert {(r["run"]["setting"], r["phase"]) for r in gaps["records"]} == {
        ("class_unaware", "tune"),
        ("class_unaware", "final"),
        ("class_aware", "tune"),
    }
    text = out.read_text()
    assert "every run yet of smoke class-aware (kd, rkd_angle, pc)." in text
    aware = text.split("### smoke · class-aware")[1].split("<details>")[0]
    assert "| kd |" not in aware  # a method with a gap has no row
    assert "| pc |" not in aware

    records = json.loads(out.with_suffix(".json").read_text())
    for record in records["records"] + records["kept"]:  # as if made with another teacher
        record["metrics"]["teacher.test_top1"] += 0.01
    out.with_suffix(".json").write_text(json.dumps(records))
    capsys.readouterr()
    assert cli.main([*args, "--config", str(path)]) == 2
    assert "the records were made with one that scored" in capsys.readouterr().err
    out.with_suffix(".json").unlink()
    assert cli.main([*args, "--config", str(path)]) == 0
    third = json.loads(out.with_suffix(".json").read_text())
    # the three at weight 2 (the first trained in the refused invocation, now in MLflow)
    assert (third["trained"], third["reused"]) == (2, 7)


def test_loss_cost_table_has_every_transfer_loss_on_every_measured_device():
    table = report.loss_cost_table(study().methods)
    header, _, *rows = table.split("\n\n")[0].splitlines()
    devices = header.count("ms / peak extra MiB")
    assert devices == 2  # benchmarks/results holds a CPU and a CUDA run
    cells = {row.split(" | ")[0][2:]: row.strip("| ").split(" | ")[1:] for row in rows}
    assert set(cells) == {*study().methods, "pc_reference"} - {"scratch"}
    results = PROJECT / "benchmarks" / "results"
    measured = [
        {p["loss"] for p in json.loads((results / name).read_text())["points"]}
        for name in ("loss_cost.json", "loss_cost_cuda.json")
    ]
    for loss, values in cells.items():  # "—" exactly where a device's file lacks the loss
        for value, losses in zip(values, measured, strict=True):
            assert re.fullmatch(r"\d+\.\d / \d+", value) if loss in losses else value == "—"
    assert sum(v != "—" for values in cells.values() for v in values) >= 2 * 9  # all but CRD


def test_the_screen_profile_gives_pc_variants_and_baselines_matched_trials():
    s = study("screen")
    count = Counter(s.loss_of(m) for m in s.methods)
    assert count["pc"] >= 2
    assert count["rkd_angle"] == count["rkd_distance"] == count["crd"] == count["pc"]  # matched
    for method in s.methods:
        (run,) = trials(s, "fmnist-tiny", "class_unaware", method, 0)
        config = load_config(s.pipeline, overrides=run.overrides(s))
        assert config.teacher.checkpoint.endswith("fashion-mnist-mobilenetv2_1.0.pt")
        assert config.distill.train.alpha == 0
        train = config.distill.train  # the name says what the variant changes: _b<B>, _lr<lr>
        lr = float(method.split("_lr")[1]) if "_lr" in method else 0.003
        batch = int(method.split("_b")[1].split("_")[0]) if "_b" in method else 128
        assert (train.lr, train.batch_size) == (lr, batch)
        if s.loss_of(method) == "pc":  # a formulation change each, no baseline
            assert (config.distill.train.beta, config.distill.train.baselines) == (1.0, {})
        else:
            assert config.distill.train.beta == 0
            assert config.distill.train.baselines == {s.loss_of(method): {"weight": 1.0}}
    # The pair is the study's own fmnist-tiny as it was screened (batch 128, lr 0.003): the
    # study now trains at the batch and step size the screen chose, and nothing else differs.
    screened, now = s.pairs["fmnist-tiny"], study().pairs["fmnist-tiny"]
    assert screened.teacher == now.teacher
    changed = [(a, b) for a, b in zip(screened.overrides, now.overrides, strict=True) if a != b]
    assert changed == [
        (
            "distill.train={epochs: 8, batch_size: 128, lr: 0.003, pc: {tau: 0.3}}",
            "distill.train={epochs: 8, batch_size: 32, lr: 0.005, pc: {tau: 0.3}}",
        )
    ]


@pytest.mark.slow
def test_pc_variants_screens_confirms_and_chooses_on_validation_only(tmp_path, capsys):
    variants = benchmark_script("pc_variants")
    raw = yaml.safe_load((CONFIGS / "study.yaml").read_text())
    smoke = raw["profiles"]["smoke"]
    raw["profiles"] = {"screen": {
        "seeds": [0, 1],
        "methods": ["pc", "pc_tau0.1", "pc_q64", "rkd_angle", "rkd_angle_lr0.01", "rkd_angle_b32"],
        "settings": {"class_unaware": {"alpha": 0, "select": "knn_top1", "grid": {"weight": [1]}}},
        "pairs": smoke["pairs"],
        "deploy": None,
        "variants": {
            "pc_tau0.1": {"loss": "pc", "overrides": ["distill.train.pc.tau=0.1"]},
            "pc_q64": {"loss": "pc", "overrides": ["distill.train.pc.queue=64"]},
            "rkd_angle_lr0.01": {"loss": "rkd_angle", "overrides": ["distill.train.lr=0.01"]},
            "rkd_angle_b32": {"loss": "rkd_angle", "overrides": ["distill.train.batch_size=32"]},
        },
    }}  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "pc_variants.md"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(config), "--confirm", "2", "--out", str(out), "--cache",
            str(tmp_path / "cache"), "--tracking-uri", store]  # fmt: skip
    assert variants.main(args) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    screened = {r["run"]["method"]: r["metrics"] for r in first["records"]
                if r["phase"] == "screen"}  # fmt: skip
    assert list(screened) == raw["profiles"]["screen"]["methods"]
    confirmed = [r["run"] for r in first["records"] if r["phase"] == "confirm"]
    assert all(run["seed"] == 1 for run in confirmed)
    val = {m: v["distill.val_knn_top1"] for m, v in screened.items()}
    families = {"pc": ["pc", "pc_tau0.1", "pc_q64"],
                "rkd_angle": ["rkd_angle", "rkd_angle_lr0.01", "rkd_angle_b32"]}  # fmt: skip
    for family, members in families.items():
        best_two = sorted(members, key=lambda m: -val[m])[:2]
        assert [r["method"] for r in confirmed if r["method"] in members] == best_two
        both = {m: [r["metrics"]["distill.val_knn_top1"] for r in first["records"]
                    if r["run"]["method"] == m] for m in best_two}  # fmt: skip
        assert first["chosen"][family] == max(best_two, key=lambda m: sum(both[m]))
    text = out.read_text()
    assert text.count("**chosen**") == 2
    after = text.split("## After the choice")[1]
    assert "| rkd_angle | " in after
    assert "tie (" in after or "wins (" in after or "loses (" in after
    assert "distill.test" not in text.split("## After the choice")[0]
    # The queue variant really ran with its queue: a different run from plain PC.
    assert screened["pc_q64"]["distill.val_knn_top1"] != screened["pc"]["distill.val_knn_top1"]

    # A new machine: an empty store, the committed records alone; nothing trains.
    capsys.readouterr()
    empty = [*args[:-1], f"sqlite:///{tmp_path / 'empty.db'}"]
    assert variants.main([*empty, "--report-only"]) == 0
    assert "0 runs trained, 10 read back" in capsys.readouterr().out  # 6 screened, 4 confirmed
    assert json.loads(out.with_suffix(".json").read_text())["records"] == first["records"]


def test_the_committed_records_read_back_with_this_code(tmp_path):
    """docs/RESULTS.json regenerates the report without MLflow and without training: a change
    of the code that moved a run's cache key would show here as a run to train."""
    committed = json.loads((PROJECT / "docs" / "RESULTS.json").read_text())
    out = tmp_path / "RESULTS.md"
    args = ["--report-only", "--records", str(PROJECT / "docs" / "RESULTS.json"), "--out",
            str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    assert cli.main(args) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["trained"] == 0

    def runs(raw):
        return {json.dumps(r["run"], sort_keys=True) for r in [*raw["records"], *raw["kept"]]}

    assert runs(again) == runs(committed)
